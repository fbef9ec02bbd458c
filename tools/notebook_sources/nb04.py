from common import FASTVAR, MODEL_CELL, notebook

CELLS = [
("md", f"""
# 04 · Latency per scale, unpruned and pruned

The first observation behind {FASTVAR}: **the large scales dominate the latency.** A scale of h x w
tokens runs every layer on h·w tokens, and its self-attention also reads every token of the earlier
scales, so its cost grows faster than its token count. This notebook measures that on this machine's
CPU with minivar's benchmark module (`minivar.bench`: a warm-up round, then rounds that alternate
the cases, reported as medians and spreads) and puts the wall time next to the analytic FLOP count
(`minivar.bench.flops`), without and with the pruning preset (`prune=True`), at a few resolutions.

The benchmark names a resolution by Infinity's pixel budget, which fixes the token grids: 256 means 7
scales up to a 16x16 grid, 512 ten scales up to 32x32, 768 twelve up to 48x48, 1024 thirteen up to
64x64. A toy token covers 4x4 pixels instead of Infinity's 16x16, so the toy's images have a quarter
of that side; the plots name each case by its final token grid.

Wall times depend on the machine and on what else runs on it; the FLOP counts do not. With a small
model and small scales a CPU is held back by the fixed cost of each operation more than by
arithmetic, so there the time falls less than the FLOPs do.
"""),
("md", """
Choose the model in the next cell. `'toy'` times the shipped toy model. For `'infinity-2b'` the
benchmark builds a model with Infinity-2B's real widths but only two layers and random weights
(`infinity-2b-shape` in `minivar.bench`): timing does not depend on the weights, and every layer
costs the same, so the per-scale picture is that of the full model scaled down. No download is
needed; on a CPU expect several minutes per resolution.
"""),
("code", MODEL_CELL),
("code", '''
%matplotlib inline
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

from minivar.bench import run as bench

plt.rcParams.update({"figure.dpi": 72, "font.size": 9})
# One thread for the toy: its matrices are too small to gain from a second one, and on a busy machine
# waiting for the other thread at every operation costs far more than it saves. Set your own here.
threads = 1 if model == "toy" else torch.get_num_threads()
torch.set_num_threads(threads)
if model == "toy":
    subj = bench.pipeline_subject(model, with_vae=True)
    resolutions = [256, 512, 768]   # the toy's own budget (7 scales) and two larger ones (10 and 12 scales)
elif f"{model}-shape" in bench.SHAPE_MODELS:
    subj = bench.shape_subject(f"{model}-shape", depth=2, with_vae=True)
    resolutions = [512, 1024]
else:
    raise ValueError(f"this notebook times 'toy' or an Infinity preset ({', '.join(bench.SHAPE_MODELS)}), not {model!r}")
REPEATS = 2                         # timed rounds per case; more give steadier medians
cfg = subj.model.cfg
m = bench.machine_info()
print(f"{subj.name}: {cfg.depth} layers, width {cfg.embed_dim}; resolutions {resolutions}")
print(f"{m['cpu']}, {m['logical_cpus']} logical CPUs, {threads} torch thread(s), load average {m['loadavg'][0]:.1f}")
'''),
("md", """
## Running the benchmark

Every resolution is run without and with `prune=True`, with classifier-free guidance (two batch
rows) and one image per run: a warm-up round, then timed rounds that alternate the cases, so that a
change in the machine's load hits all of them alike.
"""),
("code", '''
cases = [bench.Case(subj.name, r, p, False) for r in resolutions for p in (False, True)]
t0 = time.perf_counter()
results = bench.run_cases(subj, cases, warmup=1, repeats=REPEATS)
summary = {(c.res, c.prune): bench.summarize(subj, c, results[c]) for c in cases}
print(f"benchmark took {time.perf_counter() - t0:.0f} s")
grid = {r: "x".join(map(str, summary[r, False]["scales_run"][-1])) for r in resolutions}   # final token grid
for (r, p), s in summary.items():
    print(f"res {r} prune={'on ' if p else 'off'}: scales run {['x'.join(map(str, hw)) for hw in s['scales_run']]}; "
          f"prune schedule drop={s['prune']['drop']} skip={s['prune']['skip']} cache={s['prune']['cache_scale']}")
'''),
("md", """
## 1. Time and FLOPs per scale

Top row: the median wall time of each scale (error bars from the fastest to the slowest round).
Bottom row: the analytic FLOPs of the same scale. Scales missing from the pruned curve are skipped by
the preset. What to look for: how steeply time and FLOPs climb with the scale, whether the measured
time follows the FLOPs at the large scales, and that pruning lowers only the scales it touches.
"""),
("code", '''
def per_scale(s):
    """Scale label -> (median s, min s, max s, GFLOP) for the scales a case ran."""
    return {"x".join(map(str, hw)): (t["median"], t["min"], t["max"], f["flops"] / 1e9)
            for hw, t, f in zip(s["scales_run"], s["scale_time"], s["flops"]["scales"])}

fig, axes = plt.subplots(2, len(resolutions), figsize=(5.5 * len(resolutions), 7), squeeze=False)
for j, r in enumerate(resolutions):
    full = per_scale(summary[r, False])
    labels = list(full)
    x = np.arange(len(labels))
    for k, (p, style) in enumerate(((False, "o-"), (True, "s--"))):
        d = per_scale(summary[r, p])
        xs = [i for i, lab in enumerate(labels) if lab in d]
        med = np.array([d[labels[i]][0] for i in xs])
        lo, hi = np.array([d[labels[i]][1] for i in xs]), np.array([d[labels[i]][2] for i in xs])
        name = "prune=True" if p else "unpruned"
        axes[0, j].errorbar(xs, 1000 * med, yerr=[1000 * (med - lo), 1000 * (hi - med)], fmt=style, capsize=3, label=name)
        axes[1, j].plot(xs, [d[labels[i]][3] for i in xs], style, label=name)
    for ax in axes[:, j]:
        ax.set_xticks(x, labels, rotation=45)
        ax.set_yscale("log")
        ax.set_xlabel("scale (token grid)")
        ax.legend(fontsize=8)
    axes[0, j].set(title=f"Wall time per scale, {grid[r]} final grid", ylabel="milliseconds (median, log)")
    axes[1, j].set(title=f"Transformer FLOPs per scale, {grid[r]} final grid", ylabel="GFLOP (analytic, log)")
fig.tight_layout()
plt.show()
'''),
("md", """
## 2. Where the time goes

The share of the unpruned transformer's time spent in each scale, next to the scale's share of the
tokens and of the FLOPs. What to look for: how much of the total the last two or three scales take,
and whether their share of FLOPs and time exceeds their share of tokens (attention over the growing
cache makes each of their tokens dearer).
"""),
("code", '''
fig, axes = plt.subplots(1, len(resolutions), figsize=(5.5 * len(resolutions), 3.6), squeeze=False)
for j, r in enumerate(resolutions):
    d = per_scale(summary[r, False])
    labels = list(d)
    t = np.array([v[0] for v in d.values()])
    g = np.array([v[3] for v in d.values()])
    tok = np.array([int(a) * int(b) for a, b in (lab.split("x") for lab in labels)])
    x = np.arange(len(labels))
    ax = axes[0, j]
    ax.bar(x - 0.27, 100 * tok / tok.sum(), width=0.27, label="tokens")
    ax.bar(x, 100 * g / g.sum(), width=0.27, label="FLOPs (analytic)")
    ax.bar(x + 0.27, 100 * t / t.sum(), width=0.27, label="wall time (measured)")
    ax.set_xticks(x, labels, rotation=45)
    ax.set(title=f"Share of each scale, unpruned, {grid[r]} final grid", xlabel="scale (token grid)",
           ylabel="share of the total (%)")
    ax.legend(fontsize=8)
    last = 2
    print(f"{grid[r]:>5s} final grid: the last {last} scales ({', '.join(labels[-last:])}) hold {100 * tok[-last:].sum() / tok.sum():.0f} % "
          f"of the tokens, {100 * g[-last:].sum() / g.sum():.0f} % of the FLOPs and "
          f"{100 * t[-last:].sum() / t.sum():.0f} % of the transformer's wall time")
fig.tight_layout()
plt.show()
'''),
("md", """
## 3. End to end: text, transformer, VAE

The median time of each stage of a whole generation, unpruned and pruned; the printout gives the
measured speed-up beside the ratio of analytic FLOPs. Pruning only changes the transformer: the text
encoder and the VAE decoder cost the same in both.
"""),
("code", '''
fig, axes = plt.subplots(1, len(resolutions), figsize=(5.5 * len(resolutions), 3.4), squeeze=False)
stages = ["text", "transformer", "vae"]
for j, r in enumerate(resolutions):
    ax = axes[0, j]
    for k, p in enumerate((False, True)):
        s = summary[r, p]
        left = 0.0
        for m, stage in enumerate(stages):
            v = s["time"][stage]["median"]
            ax.barh(k, v, left=left, color=f"C{m}", label=stage if k == 0 else None)
            left += v
    ax.set_yticks([0, 1], ["unpruned", "prune=True"])
    ax.set(title=f"Median time of one generation, {grid[r]} final grid", xlabel="seconds")
    ax.legend(fontsize=8)
    a, b = summary[r, False], summary[r, True]
    print(f"{grid[r]:>5s} final grid: total {a['time']['total']['median']:.2f} s -> {b['time']['total']['median']:.2f} s "
          f"({a['time']['total']['median'] / b['time']['total']['median']:.2f}x); transformer "
          f"{a['time']['transformer']['median']:.2f} s -> {b['time']['transformer']['median']:.2f} s "
          f"({a['time']['transformer']['median'] / b['time']['transformer']['median']:.2f}x); transformer FLOPs "
          f"{a['flops']['transformer_flops'] / 1e9:.2f} -> {b['flops']['transformer_flops'] / 1e9:.2f} GFLOP "
          f"({a['flops']['transformer_flops'] / b['flops']['transformer_flops']:.2f}x)")
fig.tight_layout()
plt.show()
'''),
("md", f"""
**How to read it.** By the FLOP count the cost of a VAR generation sits in its last scales, and the
measured times show how far this machine follows that count. Those last scales are where pruning has
to act, and notebooks 02 and 03 ask whether their work is also the most redundant. With a small model
on a CPU the measured speed-up stays below the FLOP ratio: the fixed cost per operation and the
unchanged text encoder and VAE remain. {FASTVAR} reports time and FLOPs for Infinity-2B on a GPU at
1024x1024 and beyond.
"""),
]

NB = notebook(CELLS)
