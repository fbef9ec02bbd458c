"""Sweep StageVAR's projection rank and refinement boundary on the toy: mini-GenEval against transformer
GFLOP per image, with unpruned and prune=True for reference (a Pareto plot).

    python tools/stagevar_sweep.py --n 200 --out docs/bench/stagevar_sweep      # .json, .md and .png

Every setting uses the same prompts and seeds (`minivar.toy.geneval.evaluate`). The rank sweep keeps the
refinement boundary at r = 0.20; the boundary sweep keeps rank 8 and moves only where guidance stops
(`presets.stagevar(refinement_from=...)`): the pruning band is prune=True's in every setting.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import minivar
from minivar.presets import REFINEMENT_FROM, STAGEVAR_RANK, reference_tokens, stagevar
from minivar.toy.geneval import evaluate

RANKS = (1, 2, 4, 8, 32, 128)
BOUNDARIES = (0.10, 0.20, 0.32, 0.47, 1.01)  # 1.01: no refinement scale, guidance everywhere


def settings(pipe) -> list[tuple[str, object]]:
    """(label, prune argument) of every point of the sweep."""
    cfg = pipe.transformer.cfg
    scales, ref = pipe.schedule(None, 1.0), reference_tokens(cfg, 1.0)
    points: list[tuple[str, object]] = [("unpruned", False), ("prune=True", True)]
    points += [(f"stagevar r={r}", stagevar(scales, cfg.depth, ref, rank=r)) for r in RANKS]
    points += [(f"stagevar refine>={b:.2f}", stagevar(scales, cfg.depth, ref, STAGEVAR_RANK, refinement_from=b))
               for b in BOUNDARIES if b != REFINEMENT_FROM]
    return points


def run(n: int, seed: int) -> list[dict]:
    pipe = minivar.load("toy")
    rows = []
    for label, prune in settings(pipe):
        r = evaluate(pipe, n=n, prune=prune, seed=seed, psnr_scenes=4)
        rows.append({"label": label, "overall": r["overall"], "categories": r["categories"],
                     "transformer_gflops": r["cost"]["transformer_gflops"], "seconds": r["generation_seconds"]})
        print(f"{label:26s} mini-GenEval {r['overall']:.3f}  {r['cost']['transformer_gflops']:.4f} GFLOP", flush=True)
    return rows


def markdown(rows: list[dict], n: int) -> str:
    lines = [f"mini-GenEval (n={n}, same prompts and seeds) against transformer GFLOP per image, toy model:", "",
             "| setting | mini-GenEval | transformer GFLOP | of unpruned |", "|---|---:|---:|---:|"]
    base = rows[0]["transformer_gflops"]
    lines += [f"| {r['label']} | {r['overall']:.3f} | {r['transformer_gflops']:.4f} | "
              f"{100 * r['transformer_gflops'] / base:.0f} % |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for group, style in (("unpruned", "ks"), ("prune=True", "r*"), ("stagevar r=", "o-"), ("stagevar refine", "^--")):
        pts = [r for r in rows if r["label"].startswith(group)]
        ax.plot([r["transformer_gflops"] for r in pts], [r["overall"] for r in pts], style, ms=8, label=group.strip("= "))
        for r in pts:
            ax.annotate(r["label"].replace("stagevar ", ""), (r["transformer_gflops"], r["overall"]), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
    ax.set(xlabel="transformer GFLOP per image (analytic, CFG on)", ylabel="mini-GenEval overall",
           title="StageVAR on the toy: rank and refinement boundary")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("docs/bench/stagevar_sweep"))
    a = ap.parse_args(argv)
    rows = run(a.n, a.seed)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps({"n": a.n, "seed": a.seed, "rows": rows}, indent=1) + "\n")
    a.out.with_suffix(".md").write_text(markdown(rows, a.n))
    plot(rows, a.out.with_suffix(".png"))
    print(markdown(rows, a.n))


if __name__ == "__main__":
    main()
