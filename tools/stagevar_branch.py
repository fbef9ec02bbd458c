"""Which branch should run once guidance stops: the conditional one (minivar) or the null prompt's?

    python tools/stagevar_branch.py --n 1000

StageVAR's summaries describe the refinement stage as run without text conditioning (guidance scale 0,
the null prompt). minivar keeps the conditional rows instead (`sampling.conditional_only`). This
script scores both on the toy's mini-GenEval with the same prompts and seeds, for guidance stopped at
the refinement stage with no pruning and for the stagevar preset. The null-prompt variant is a patch
that exists only inside `null_branch()`: the same hand-over as `conditional_only`, but of the second
half of every per-row state (conditioning rows, KV caches, restoration cache and text segments).
"""
from __future__ import annotations

import argparse
import contextlib
from dataclasses import replace

import minivar
from minivar import sampling
from minivar.numerics import Text
from minivar.presets import reference_tokens, resolve_prune, stagevar
from minivar.toy.geneval import evaluate
from minivar.transformer import Conditioning, KVCache


def unconditional_only(c: Conditioning, caches: list[KVCache], pruner, B: int):
    """The unconditional (null-prompt) rows of a CFG batch, rows B..2B of every per-row state."""
    pruner.cache = {key: out[B:] for key, out in pruner.cache.items()}
    text = Text(c.text.tokens, [[segs[1]] for segs in c.text.segments], kv=c.text.kv)  # each image's null segment

    def tail(cache: KVCache) -> KVCache:
        view = KVCache.__new__(KVCache)
        view.k, view.v, view.pos = cache.k[B:], cache.v[B:], cache.pos
        return view

    return Conditioning(text, c.cond[B:], c.gss[B:]), [tail(cache) for cache in caches]


@contextlib.contextmanager
def null_branch():
    keep = sampling.conditional_only
    sampling.conditional_only = unconditional_only
    try:
        yield
    finally:
        sampling.conditional_only = keep


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000)
    a = ap.parse_args(argv)
    pipe = minivar.load("toy")
    cfg, scales = pipe.transformer.cfg, pipe.schedule(None, 1.0)
    preset = stagevar(scales, cfg.depth, reference_tokens(cfg, 1.0))
    arms = {"CFG stop alone": replace(resolve_prune(False, cfg, scales), cfg_stop=preset.cfg_stop), "stagevar": preset}
    print(f"| setting | conditional branch | null-prompt branch |  (mini-GenEval, n={a.n})")
    print("|---|---:|---:|")
    for label, prune in arms.items():
        cond = evaluate(pipe, n=a.n, prune=prune, psnr_scenes=1)["overall"]
        with null_branch():
            null = evaluate(pipe, n=a.n, prune=prune, psnr_scenes=1)["overall"]
        print(f"| {label} | {cond:.3f} | {null:.3f} |", flush=True)


if __name__ == "__main__":
    main()
