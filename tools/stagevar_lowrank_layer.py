"""Does computing a layer in a rank-r token space pay? Error on the toy, time on the Infinity-2B width.

    python tools/stagevar_lowrank_layer.py            # prints two markdown tables

The candidate: at a refinement scale, approximate the FFN input X (N tokens x C) by its mean plus a rank-r
part, found with a seeded random projection (a randomized range finder: Y = (X - m) G with G Gaussian C x r,
Q = orth(Y), X ~ m + Q Q^T (X - m)). A linear map then costs r rows instead of N:
fc1(X) ~ fc1(m) + Q (Q^T (X - m) W1^T). The GELU between fc1 and fc2 is not linear, so fc2 still sees N full
rows: the FFN saves at most its first half. Attention is the same story (the q/k/v projections factor, the
softmax over N keys does not).

1. Error, toy model: FFN inputs and outputs of blocks 1..3 at the refinement scales (8x8, 12x12, 16x16),
   conditional row, unpruned runs of four prompts at seed 0; relative error of the FFN output when its
   input is replaced by the rank-r approximation, with the share of centred input energy that rank r keeps.
2. Time, one FFN at Infinity-2B width (C 2048, hidden 8192) on the 64x64 tokens of a 1024 image, one branch
   (CFG stopped), float32, this machine's threads: full, low-rank fc1 (+ full GELU and fc2), and a lone
   linear layer full against factored (the ceiling, if no nonlinearity followed).
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

import minivar
from minivar.model.config import PRESETS
from minivar.model.transformer import FFN

PROMPTS = ["a red circle", "two green squares", "three purple diamonds", "a blue triangle above a yellow circle"]
RANKS = (8, 32, 64)


def low_rank(x: torch.Tensor, r: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean (1, C), Q (N, r) orthonormal, Z (r, C)) with x ~ mean + Q Z, from a seeded Gaussian sketch."""
    g = torch.randn(x.shape[-1], r, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    m = x.mean(0, keepdim=True)
    xc = x - m
    q = torch.linalg.qr(xc @ g).Q
    return m, q, q.T @ xc


def fc1_low_rank(ffn: FFN, x: torch.Tensor, r: int) -> torch.Tensor:
    """fc1 of the rank-r approximation of x: on r + 1 rows, then expanded to N."""
    m, q, z = low_rank(x, r)
    return ffn.fc1(m) + q @ F.linear(z, ffn.fc1.weight)


def ffn_low_rank(ffn: FFN, x: torch.Tensor, r: int) -> torch.Tensor:
    """`FFN.forward` with fc1 in rank r (GELU and fc2 on all N rows)."""
    return ffn.fc2(F.gelu(fc1_low_rank(ffn, x, r), approximate="tanh"))


def error_table() -> str:
    pipe = minivar.load("toy")
    blocks = pipe.transformer.blocks
    seen: dict[int, list] = {i: [] for i in (1, 2, 3)}
    hooks = [blocks[i].ffn.register_forward_hook(lambda mod, args, out, i=i: seen[i].append((mod, args[0][0], out[0])))
             for i in seen]
    try:
        for prompt in PROMPTS:
            out = pipe.generate(prompt, seed=0, trace=True, output_type="latent")  # every prompt: the same scales
    finally:
        for h in hooks:
            h.remove()
    scales = out.trace.scales
    refine = {s for s, stage in zip(scales, out.stages) if stage == "refinement"}
    rows = {}
    for i, calls in seen.items():
        for k, (mod, x, y) in enumerate(calls):
            hw = scales[k % len(scales)]
            if hw not in refine:
                continue
            x, y = x.double(), y.double()
            for r in RANKS:
                m, q, z = low_rank(x, r)
                kept = float(z.square().sum() / (x - m).square().sum())
                err = float((mod(m + q @ z) - y).norm() / (y - y.mean(0)).norm())
                rows.setdefault((hw, r), []).append((kept, err))
    lines = ["| scale | rank r | centred input energy kept | FFN output error (relative to its spread) |",
             "|---|---:|---:|---:|"]
    for (hw, r), v in sorted(rows.items()):
        lines.append(f"| {hw[0]}x{hw[1]} | {r} | {100 * statistics.mean(a for a, _ in v):.1f} % | "
                     f"{100 * statistics.mean(b for _, b in v):.1f} % |")
    return "\n".join(lines)


def timed(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def time_table(n: int = 64 * 64) -> str:
    cfg = PRESETS["infinity-2b"]
    c, hidden = cfg.embed_dim, cfg.ffn_hidden
    torch.manual_seed(0)
    x = torch.randn(n, c)
    ffn = FFN(c, hidden)  # minivar's FFN, default (random) initialisation
    full = timed(lambda: ffn(x))
    lin = timed(lambda: ffn.fc1(x))
    lines = [f"One FFN of Infinity-2B width (C {c}, hidden {hidden}), {n} tokens, float32, "
             f"{torch.get_num_threads()} threads; median of 5:", "",
             "| variant | rank r | seconds | speedup |", "|---|---:|---:|---:|",
             f"| FFN, full | | {full:.3f} | 1.00x |"]
    for r in RANKS:
        t = timed(lambda: ffn_low_rank(ffn, x, r))
        lines.append(f"| FFN, fc1 in rank r (GELU, fc2 full) | {r} | {t:.3f} | {full / t:.2f}x |")
    lines.append(f"| fc1 alone, full | | {lin:.3f} | 1.00x |")
    for r in RANKS:
        t = timed(lambda: fc1_low_rank(ffn, x, r))
        lines.append(f"| fc1 alone, factored | {r} | {t:.3f} | {lin / t:.2f}x |")
    return "\n".join(lines)


@torch.no_grad()
def main() -> None:
    print(error_table())
    print()
    print(time_table())


if __name__ == "__main__":
    main()
