"""Sweep StageVAR's projection rank and refinement boundary on the toy: mini-GenEval against transformer
GFLOP per image, with unpruned and prune=True for reference (a Pareto plot).

    python tools/stagevar_sweep.py --n 200 --out docs/bench/stagevar_sweep      # .json, .md and .png

Every setting uses the same prompts and seeds (`minivar.toy.geneval.evaluate`). The rank sweep keeps the
refinement boundary at r = 0.20; the boundary sweep keeps rank 8 and moves only where guidance stops
(`pruning.stagevar(refinement_from=...)`): the pruning band is prune=True's in every setting. "CFG stop
alone" drops guidance from the refinement stage on and prunes nothing: the cost of StageVAR's first idea
by itself. The band family keeps stagevar's selector and stop but computes the scales prune=True skips,
with half their tokens dropped: all but the last of them, or all.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import minivar
from minivar.model.pruning import REFINEMENT_FROM, STAGEVAR_RANK, reference_tokens, resolve_prune, stagevar
from minivar.toy.geneval import evaluate

RANKS = (1, 2, 4, 8, 32, 128)
BOUNDARIES = (0.05, 0.10, 0.20, 0.32, 0.47, 1.01)  # 1.01: no refinement scale, guidance everywhere


def settings(pipe) -> list[tuple[str, object]]:
    """(label, prune argument) of every point of the sweep."""
    cfg = pipe.transformer.cfg
    scales, ref = pipe.schedule(None, 1.0), reference_tokens(cfg, 1.0)
    sv = stagevar(scales, cfg.depth, ref)
    no_pruning = replace(resolve_prune(False, cfg, scales), cfg_stop=sv.cfg_stop)
    points: list[tuple[str, object]] = [("unpruned", False), ("CFG stop alone", no_pruning), ("prune=True", True)]
    points += [(f"stagevar r={r}", stagevar(scales, cfg.depth, ref, rank=r)) for r in RANKS]
    points += [(f"stagevar refine>={b:.2f}", stagevar(scales, cfg.depth, ref, STAGEVAR_RANK, refinement_from=b))
               for b in BOUNDARIES if b != REFINEMENT_FROM]
    skipped = sorted(sv.skip)  # a lighter band: skipped scales computed instead, half their tokens dropped
    points += [("stagevar band: last scale skipped only",
                replace(sv, drop={**sv.drop, **{si: 0.5 for si in skipped[:-1]}}, skip=frozenset(skipped[-1:]))),
               ("stagevar band: no scale skipped",
                replace(sv, drop={**sv.drop, **{si: 0.5 for si in skipped}}, skip=frozenset()))]
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


GROUPS = (("unpruned", "ks"), ("CFG stop alone", "gD"), ("prune=True", "r*"), ("stagevar r=", "o-"),
          ("stagevar refine", "^--"), ("stagevar band", "v:"))


def draw(ax, rows: list[dict]) -> None:
    """The Pareto plot on a matplotlib axis: score against transformer GFLOP (log scale), one marker
    style per family; settings that land on the same point share one label."""
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter
    for group, style in GROUPS:
        pts = [r for r in rows if r["label"].startswith(group)]
        ax.plot([r["transformer_gflops"] for r in pts], [r["overall"] for r in pts], style, ms=8,
                label=group.strip("= "), alpha=0.85)
    labels: dict[tuple[float, float], list[dict]] = {}   # points that would overprint share a label
    for r in rows:
        labels.setdefault((round(r["transformer_gflops"], 2), round(r["overall"], 2)), []).append(r)
    for group in labels.values():
        ax.annotate(", ".join(r["label"].replace("stagevar ", "") for r in group),
                    (group[0]["transformer_gflops"], group[0]["overall"]), fontsize=7, xytext=(5, 2),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set(xlabel="transformer GFLOP per image (analytic, CFG on; log scale)", ylabel="mini-GenEval overall",
           title="StageVAR on the toy: projection rank, refinement boundary, pruning band")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    draw(ax, rows)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("docs/bench/stagevar_sweep"))
    ap.add_argument("--replot", action="store_true", help="redraw the .png from the existing .json")
    a = ap.parse_args(argv)
    if a.replot:
        plot(json.loads(a.out.with_suffix(".json").read_text())["rows"], a.out.with_suffix(".png"))
        return
    rows = run(a.n, a.seed)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps({"n": a.n, "seed": a.seed, "rows": rows}, indent=1) + "\n")
    a.out.with_suffix(".md").write_text(markdown(rows, a.n))
    plot(rows, a.out.with_suffix(".png"))
    print(markdown(rows, a.n))


if __name__ == "__main__":
    main()
