from common import FASTVAR, MODEL_CELL, MODEL_MD, SETUP, notebook

CELLS = [
("md", f"""
# 03 · Pruning: which tokens are computed, what it costs the image, and why it works

{FASTVAR} makes the large scales cheap. At a pruned scale, inside a window of layers, before each
sub-layer (self-attention, cross-attention, feed-forward) it

1. gives every token a score, its squared distance to the scale's mean token ("pivotal token
   selection", PTS): a token that differs from the average of its scale is likely to carry detail;
2. runs the sub-layer on the highest-scoring tokens only;
3. fills each remaining position with the output the same sub-layer produced at an earlier *cache
   scale*, resized to the current grid ("cached token restoration").

minivar does this as one step of the scale loop (`minivar/model/pruning.py`), and `generate(trace=True)`
records the scores and the kept indices of every pruned (scale, layer, sub-layer). Below we look at
them, compare pruned with unpruned images, sweep the share of kept tokens against quality and FLOPs,
and measure the cross-scale attention pattern that makes restoring from an earlier scale reasonable.
"""),
("md", MODEL_MD),
("code", MODEL_CELL),
("code", SETUP),
("md", """
## The schedule used here

So that the same cells read well on any model, we prune the **last two scales** and restore from the
scale just before them, inside FastVAR's layer window (layers 3 to 27 of 32, scaled to the model's
depth). `keep` is the share of tokens computed at the two pruned scales. The cell also prints what
`prune=True`, minivar's preset for this model and resolution, would do instead.
"""),
("code", '''
from minivar import PruneSchedule
from minivar.bench import flops
from minivar.model import pruning

scales = pipe.schedule(res, h_div_w=1.0)
n = len(scales)
labels = [f"{h}x{w}" for h, w in scales]
pruned_scales, cache_scale = [n - 2, n - 1], n - 3
first, last = (round(x / pruning.FASTVAR_DEPTH * cfg.depth) for x in pruning.FASTVAR_LAYERS)
window = (first, min(last, cfg.depth - 1))

def schedule(keep: float, selector: str = "pivotal") -> PruneSchedule:
    """Compute `keep` of the tokens at the last two scales (keep=0: skip them altogether)."""
    if keep >= 1:
        return PruneSchedule.none()
    if keep <= 0:
        return PruneSchedule(skip=frozenset(pruned_scales))
    return PruneSchedule(drop={si: 1 - keep for si in pruned_scales}, layers=window, cache_scale=cache_scale,
                         selector=selector)

demo = schedule(0.5)
print(f"pruned scales {[labels[si] for si in pruned_scales]}, cache scale {labels[cache_scale]}, "
      f"layers {window[0]}..{window[1]} of {cfg.depth}")
print("demo schedule:", demo)
preset = pruning.resolve_prune(True, cfg, scales)
print("prune=True here:", preset)
'''),
("md", """
## 1. Pivotal-token scores and kept tokens

For each pruned scale (rows) and three layers of the window (pairs of columns): the PTS score of
every token before the self-attention sub-layer, and the tokens kept for computation (white). What to
look for: whether the high scores follow the content of the image on the right (objects, edges) while
flat regions score low and are restored from the cache scale. In early layers the score reflects the
input codes; deeper in the window it reflects what the model has computed so far.
"""),
("code", '''
prompt = "two red circles above a blue square on a white background"
pr = pipe.generate(prompt, res=res, seed=SEED, trace=True, prune=demo)
records = pr.trace.pruning                        # scale index -> ScaleRecord(keep, scores)
show_layers = sorted({window[0], (window[0] + window[1]) // 2, window[1]})

fig, axes = plt.subplots(len(pruned_scales), 2 * len(show_layers) + 1,
                         figsize=(2.3 * (2 * len(show_layers) + 1), 2.5 * len(pruned_scales)), squeeze=False)
for r, si in enumerate(pruned_scales):
    h, w = scales[si]
    for c, li in enumerate(show_layers):
        score = records[si].scores[li, "sa"][0].reshape(h, w)
        kept = torch.zeros(h * w)
        kept[records[si].keep[li, "sa"][0]] = 1
        im = axes[r, 2 * c].imshow(score, cmap="magma")
        fig.colorbar(im, ax=axes[r, 2 * c], fraction=0.046, label="|x - mean|²")
        axes[r, 2 * c].set_title(f"{h}x{w}, layer {li}: score", fontsize=9)
        axes[r, 2 * c + 1].imshow(kept.reshape(h, w), cmap="gray", vmin=0, vmax=1)
        axes[r, 2 * c + 1].set_title(f"kept {int(kept.sum())} of {h * w}", fontsize=9)
    axes[r, -1].imshow(pr.image)
    axes[r, -1].set_title("pruned result", fontsize=9)
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
fig.suptitle("Pivotal-token scores before self-attention (squared distance to the scale's mean token) and kept tokens")
fig.tight_layout()
plt.show()
'''),
("md", """
## 2. Computed versus restored

Tokens are chosen anew before every sub-layer, so a position can be computed in one sub-layer and
restored in the next. The large map gives, per position, the share of the window's sub-layer steps in
which it was computed (1: always computed, 0: always restored from the cache scale). The three small
maps show the self-attention, cross-attention and feed-forward choices of one layer side by side.
"""),
("code", '''
mid = show_layers[len(show_layers) // 2]
fig, axes = plt.subplots(len(pruned_scales), 4, figsize=(12, 2.9 * len(pruned_scales)), squeeze=False,
                         gridspec_kw={"width_ratios": [1.3, 1, 1, 1]})
for r, si in enumerate(pruned_scales):
    h, w = scales[si]
    share = analysis.computed_fraction(records[si], (h, w))[0]
    im = axes[r, 0].imshow(share, cmap="viridis", vmin=0, vmax=1)
    fig.colorbar(im, ax=axes[r, 0], fraction=0.046, label="share of steps computed")
    axes[r, 0].set_title(f"{h}x{w}: computed share over layers {window[0]}..{window[1]}", fontsize=9)
    for c, name in enumerate(["sa", "ca", "ffn"]):
        kept = torch.zeros(h * w)
        kept[records[si].keep[mid, name][0]] = 1
        axes[r, c + 1].imshow(kept.reshape(h, w), cmap="gray", vmin=0, vmax=1)
        axes[r, c + 1].set_title(f"layer {mid} {name}: computed (white)", fontsize=9)
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
fig.tight_layout()
plt.show()
'''),
("md", """
## 3. Pruned versus unpruned

The same prompt and seed without pruning, with the demo schedule, and with `prune=True`. Up to the
first pruned scale the runs are identical bit for bit (the random generator is consumed the same way
in both), so every difference starts at a pruned scale. What to look for: whether the pruned image
keeps the layout and colours of the unpruned one, and whether the difference map concentrates on
edges. On the right, per scale: the share of sampled bits that differ from the unpruned run, and the
size of the difference of the running latent.
"""),
("code", '''
dense = pipe.generate(prompt, res=res, seed=SEED, trace=True)
by_preset = pipe.generate(prompt, res=res, seed=SEED, prune=True)
diff = np.abs(np.asarray(dense.image, dtype=np.float64) - np.asarray(pr.image, dtype=np.float64)).mean(-1)
bit_diff = [100 * float((a != b).double().mean()) for a, b in zip(dense.trace.bits, pr.trace.bits)]
lat_diff = [100 * float((a - b).norm() / a.norm()) for a, b in zip(dense.trace.summed, pr.trace.summed)]

fig, axes = plt.subplots(1, 5, figsize=(19, 3.6), gridspec_kw={"width_ratios": [1, 1, 1.25, 1, 1.6]})
axes[0].imshow(dense.image)
axes[0].set_title("unpruned", fontsize=10)
axes[1].imshow(pr.image)
axes[1].set_title(f"demo: keep 50 % at {', '.join(labels[si] for si in pruned_scales)}", fontsize=10)
im = axes[2].imshow(diff, cmap="inferno", vmin=0)
fig.colorbar(im, ax=axes[2], fraction=0.046, label="|difference| (grey levels, 0-255)")
axes[2].set_title(f"demo - unpruned: PSNR {analysis.psnr(dense.image, pr.image):.1f} dB", fontsize=10)
axes[3].imshow(by_preset.image)
axes[3].set_title(f"prune=True: PSNR {analysis.psnr(dense.image, by_preset.image):.1f} dB", fontsize=10)
for ax in axes[:4]:
    ax.set_xticks([])
    ax.set_yticks([])
axes[4].plot(labels, bit_diff, "o-", label="bits that differ (%)")
axes[4].plot(labels, lat_diff, "s-", label="latent sum: |diff| / |unpruned| (%)")
axes[4].set(title="Where demo and unpruned part ways", xlabel="scale", ylabel="percent")
axes[4].legend(fontsize=8)
fig.tight_layout()
plt.show()
for lab, b, l in zip(labels, bit_diff, lat_diff):
    print(f"{lab:>6s}: bits differ {b:5.1f} %   latent difference {l:5.1f} %")
'''),
("md", """
## 4. How much can be dropped? A sweep of the keep ratio

We generate a set of mini-GenEval prompts (`minivar.toy.geneval`: an analytic checker of colour, shape,
count and position in the toy's world of flat shapes) with several keep ratios at the last two
scales, once with pivotal-token selection and once with the same number of randomly chosen tokens;
also with the two scales skipped entirely (keep 0) and with the `prune=True` preset. Quality is
measured in two ways: mini-GenEval accuracy, and the PSNR of each image against its unpruned twin
(same prompt and seed; higher means closer). Cost is the analytic transformer FLOP count per image
(`minivar.bench.flops`, guidance included). mini-GenEval is scored for the toy only: its checker reads
flat palette colours, which only the toy's world has, and it only means something for a model that
passes it unpruned (see the model card in `minivar/toy/weights/README.md`). The PSNR works for any model.

What to look for: how far the keep ratio can fall before PSNR drops steeply; whether pivotal selection
stays above random selection at the same cost, which is the case for choosing tokens by score; and
what skipping the scales, the cheapest option, costs in detail.
"""),
("code", '''
from minivar.toy import geneval as mini_geneval

N_EVAL, BATCH = (16, 8) if model == "toy" else (8, 4)
specs = mini_geneval.eval_specs(N_EVAL)
text_tokens = round(np.mean([len(pipe.tokenizer.encode(s.caption)) + 1 for s in specs]))

score_geneval = model == "toy"   # the analytic checker fits the toy's world of flat shapes only

def run(sched):
    images, _ = mini_geneval.generate_all(pipe, specs, sched, batch=BATCH, seed=0, res=res)
    acc = float("nan")
    if score_geneval:
        acc = mini_geneval.accuracy(specs, [mini_geneval.check(s, im) for s, im in zip(specs, images)])["overall"]
    gflop = flops.summary(flops.transformer_count(cfg, scales, sched, text_tokens=text_tokens))["transformer_flops"] / 1e9
    return images, acc, gflop

t0 = time.perf_counter()
ref_images, ref_acc, ref_gflop = run(schedule(1.0))
keeps = [0.75, 0.5, 0.25, 0.1]
sweep = {}
for selector in ("pivotal", "random"):
    for keep in keeps:
        images, acc, gflop = run(schedule(keep, selector))
        sweep[selector, keep] = dict(images=images, acc=acc, gflop=gflop,
                                     psnr=np.mean([min(analysis.psnr(a, b), 60) for a, b in zip(ref_images, images)]))
for key, sched in ((("skip", 0.0), schedule(0.0)), (("preset", None), preset)):
    images, acc, gflop = run(sched)
    sweep[key] = dict(images=images, acc=acc, gflop=gflop,
                      psnr=np.mean([min(analysis.psnr(a, b), 60) for a, b in zip(ref_images, images)]))
print(f"{len(sweep) + 1} settings x {N_EVAL} prompts in {time.perf_counter() - t0:.0f} s")
print(f"unpruned: mini-GenEval {ref_acc:.2f}, {ref_gflop:.3f} GFLOP")
for (sel, keep), r in sweep.items():
    print(f"{sel:8s} keep {'-' if keep is None else f'{keep:.2f}':>4s}: mini-GenEval {r['acc']:.2f}  PSNR vs unpruned {r['psnr']:5.1f} dB  "
          f"{r['gflop']:.3f} GFLOP ({100 * r['gflop'] / ref_gflop:.0f} % of unpruned)")
'''),
("code", '''
fig, axes = plt.subplots(1, 3, figsize=(16, 4))
for selector, style in (("pivotal", "o-"), ("random", "s--")):
    rows = [sweep[selector, k] for k in keeps]
    axes[0].plot(keeps, [r["psnr"] for r in rows], style, label=f"{selector} selection")
    axes[1].plot(keeps, [r["acc"] for r in rows], style, label=f"{selector} selection")
    axes[2].plot([r["gflop"] for r in rows], [r["psnr"] for r in rows], style, label=f"{selector} selection")
skip = sweep["skip", 0.0]
axes[0].plot([0], [skip["psnr"]], "k^", label="skip both scales")
axes[1].plot([0], [skip["acc"]], "k^", label="skip both scales")
axes[1].axhline(ref_acc, color="gray", ls=":", label="unpruned")
axes[2].plot([skip["gflop"]], [skip["psnr"]], "k^", label="skip both scales")
axes[2].plot([sweep["preset", None]["gflop"]], [sweep["preset", None]["psnr"]], "r*", ms=12, label="prune=True (preset)")
axes[1].axhline(sweep["preset", None]["acc"], color="r", ls="--", lw=1, label="prune=True (preset)")
axes[2].axvline(ref_gflop, color="gray", ls=":", label="unpruned cost")
if not score_geneval:
    axes[1].text(0.5, 0.5, "mini-GenEval is scored for the toy only", ha="center", transform=axes[1].transAxes)
axes[0].set(title="Image difference vs keep ratio", xlabel="share of tokens computed at the last two scales",
            ylabel="PSNR vs unpruned (dB, capped at 60)")
axes[1].set(title=f"mini-GenEval accuracy ({N_EVAL} prompts)", xlabel="share of tokens computed at the last two scales",
            ylabel="accuracy (fraction of prompts)", ylim=(-0.05, 1.05))
axes[2].set(title="Quality vs cost", xlabel="transformer GFLOP per image (analytic)", ylabel="PSNR vs unpruned (dB)")
for ax in axes:
    ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

show = [("pivotal", 0.5), ("pivotal", 0.1), ("random", 0.1), ("skip", 0.0)]
fig, axes = plt.subplots(2, len(show) + 1, figsize=(2.4 * (len(show) + 1), 5.2))
for r in range(2):
    axes[r, 0].imshow(ref_images[r])
    axes[r, 0].set_title("unpruned", fontsize=9)
    for c, key in enumerate(show):
        axes[r, c + 1].imshow(sweep[key]["images"][r])
        axes[r, c + 1].set_title(f"{key[0]} keep {key[1]:g}", fontsize=9)
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
fig.suptitle("Two mini-GenEval prompts: " + " / ".join(s.caption for s in specs[:2]), fontsize=9)
fig.tight_layout()
plt.show()
'''),
("md", """
## 5. Stages: where StageVAR accelerates, and what it costs

StageVAR (arXiv 2512.16483) splits a generation into three stages: the early scales decide what the
picture shows (*semantic*), the middle ones its layout (*structure*), the late ones only refine
fidelity (*refinement*). `minivar.model.pruning.stages` places each scale by its share r of the model's
reference grid, the rule `prune=True` uses: semantic below r = 0.08, refinement from r = 0.20, where
FastVAR's recipe starts pruning. Every generation reports the stage of each scale (`Output.stages`,
`Trace.stage`). `prune="stagevar"` is `prune=True` plus StageVAR's two refinement-stage changes:
guidance is dropped there (the conditional rows run alone: half the batch) and tokens are chosen in a
random rank-8 projection of their features (`selector="projection"`).

The table lists each scale with its stage and what the two presets do there. Then
`analysis.stage_profile` checks the rule on this model: per scale, the share of the final image's
low-frequency band (below a quarter of Nyquist) that the scale changes, and how much of it is in place
after the scale. A semantic scale moves the low band a lot; a refinement scale should barely move it.
Last, the stagevar preset on the mini-GenEval prompts of section 4, beside `prune=True`.
"""),
("code", '''
stagevar = pruning.resolve_prune("stagevar", cfg, scales)
ref = pruning.reference_tokens(cfg, 1.0)
def action(p, si):
    if si in p.skip:
        return "skipped"
    what = f"drop {p.drop[si]:.0%}" if p.drop.get(si, 0) > 0 else ("cache" if si == p.cache_scale else "full")
    return what + (", no CFG" if p.cfg_stop is not None and si >= p.cfg_stop else "")
print(f"{'scale':>6s} {'share':>6s}  {'stage':10s}  {'prune=True':18s}  stagevar")
for si, (lab, st) in enumerate(zip(labels, dense.stages)):
    share = scales[si][0] * scales[si][1] / ref
    print(f"{lab:>6s} {share:6.3f}  {st:10s}  {action(preset, si):18s}  {action(stagevar, si)}")

profile = analysis.stage_profile(pipe, [prompt, "two green squares"], [0, 1], res=res)
print()
for (h, w), st, c, done in zip(profile["scales"], profile["stages"], profile["change"], profile["settled"]):
    print(f"{h:>3d}x{w:<3d} {st:10s}  changes {100 * c:6.2f} % of the final low band, {100 * done:6.2f} % in place after it")
'''),
("code", '''
images, acc, gflop = run(stagevar)
sweep["stagevar", None] = dict(images=images, acc=acc, gflop=gflop,
                               psnr=np.mean([min(analysis.psnr(a, b), 60) for a, b in zip(ref_images, images)]))
for name, key in (("prune=True", ("preset", None)), ("stagevar", ("stagevar", None))):
    r = sweep[key]
    print(f"{name:10s}: mini-GenEval {r['acc']:.2f} (unpruned {ref_acc:.2f})  PSNR vs unpruned {r['psnr']:5.1f} dB  "
          f"{r['gflop']:.3f} GFLOP ({100 * r['gflop'] / ref_gflop:.0f} % of unpruned)")
'''),
("md", """
The few prompts above cannot tell presets apart. `tools/stagevar_sweep.py` scores every setting on
1000 mini-GenEval prompts (the same prompts and seeds for each) and writes
`docs/bench/stagevar_sweep.json`; the cell below plots the committed run. Two families: the projection
rank r at the default boundary, and the refinement boundary (where guidance stops) at rank 8; beside
them, guidance dropped in the refinement stage with no pruning at all ("CFG stop alone"), and a
lighter pruning band that computes the scales `prune=True` skips ("band"). A point up and to the left
is better: higher score for fewer transformer FLOPs.
"""),
("code", '''
import json
import sys
from pathlib import Path
checkout = Path(minivar.__file__).resolve().parents[1]    # the clone this notebook runs from
sys.path.insert(0, str(checkout / "tools"))
from stagevar_sweep import draw      # the plotting function of tools/stagevar_sweep.py

runs = json.loads((checkout / "docs/bench/stagevar_sweep.json").read_text())
print(f"n = {runs['n']} prompts per setting, seed {runs['seed']}")
for r in runs["rows"]:
    print(f"{r['label']:26s} mini-GenEval {r['overall']:.3f}  {r['transformer_gflops']:.3f} GFLOP")
fig, ax = plt.subplots(figsize=(8, 5))
draw(ax, runs["rows"])
plt.show()
'''),
("md", """
## 6. Cross-scale attention: why restoring from an earlier scale works

The third observation: **a token attends strongly to the same place at the previous scale.** We
record self-attention probabilities with `analysis.capture_attention`, an opt-in probe. Inside the
`with` block (and only in this thread) each chosen layer hands its queries and keys to the probe once
per scale; outside it the attention code finds no probe table, so normal generation pays nothing for
it (and a test checks that the probe does not change the result).

For every recorded layer and scale we take the attention a query pays to the *previous* scale's
tokens, normalised to sum to one, and measure:

* the **diagonal strength**: the share that lands on the previous-scale cell covering the query's own
  position, in units of what uniform attention would give (1 = no preference, >1 = the query looks at
  its own place more than elsewhere);
* the same share by **offset** from the own cell, averaged over the queries of the last scale.

Then, for the layer with the strongest diagonal at the last scale (the curves show every recorded
layer): the whole query-by-key block in raster order, where a diagonal band means that each query
attends near its own position, and the attention maps of three single queries with their own
position marked. What to look for: values well above 1 at the centre of the offset maps, falling off
with distance.
"""),
("code", """
att_layers = list(range(cfg.depth)) if cfg.depth <= 8 else [cfg.depth // 4, cfg.depth // 2, 3 * cfg.depth // 4]
with analysis.capture_attention(pipe.transformer, att_layers, rows=1) as maps:   # conditional row only
    pipe.generate(prompt, res=res, seed=SEED, output_type="latent")
from minivar.model.transformer import ATTENTION_PROBES
assert ATTENTION_PROBES.get() is None                                   # the probe is gone again

def prev_block(layer, s):
    \"\"\"Conditional row's attention from scale s to scale s - 1, each query's row summing to 1: (h*w, hp*wp).\"\"\"
    b = analysis.previous_scale_attention(maps[layer][s][0], scales, s)
    return b / b.sum(-1, keepdim=True)

steps = list(range(2, n))
uniform = {s: scales[s - 1][0] * scales[s - 1][1] for s in steps}        # 1 / uniform share = previous tokens
strength = {li: [analysis.diagonal_strength(prev_block(li, s), scales[s], scales[s - 1]) * uniform[s] for s in steps]
            for li in att_layers}

fig, ax = plt.subplots(figsize=(8, 3.6))
for li in att_layers:
    ax.plot([labels[s] for s in steps], strength[li], "o-", label=f"layer {li}")
ax.axhline(1, color="k", ls=":", label="uniform attention")
ax.set(yscale="log", title="Attention on the own cell of the previous scale", xlabel="scale of the queries",
       ylabel="diagonal strength (x uniform, log)")
ax.legend(fontsize=8, ncol=2)
plt.show()
for li in att_layers:
    print(f"layer {li}: diagonal strength (x uniform) " + ", ".join(f"{labels[s]} {v:.1f}" for s, v in zip(steps, strength[li])))

si = n - 1
(h, w), (hp, wp) = scales[si], scales[si - 1]
radius = 2
fig, axes = plt.subplots(1, len(att_layers), figsize=(3.3 * len(att_layers), 3.2), squeeze=False)
for ax, li in zip(axes[0], att_layers):
    off = analysis.offset_attention(prev_block(li, si), (h, w), (hp, wp), radius) * uniform[si]
    im = ax.imshow(off.numpy(), cmap="viridis", extent=(-radius - 0.5, radius + 0.5, radius + 0.5, -radius - 0.5))
    fig.colorbar(im, ax=ax, fraction=0.046, label="share (x uniform)")
    ax.set(title=f"layer {li}", xlabel="column offset (cells)", ylabel="row offset (cells)")
fig.suptitle(f"Attention of the {h}x{w} queries to the {hp}x{wp} scale, by offset from the own cell")
fig.tight_layout()
plt.show()

best = max(att_layers, key=lambda li: strength[li][-1])
block = prev_block(best, si)
fig, axes = plt.subplots(1, 4, figsize=(16, 3.8), gridspec_kw={"width_ratios": [1.4, 1, 1, 1]})
im = axes[0].imshow(block.numpy(), aspect="auto", cmap="magma",
                    norm=plt.matplotlib.colors.LogNorm(max(float(block.min()), 1e-5), float(block.max())))
fig.colorbar(im, ax=axes[0], fraction=0.046, label="share of attention (log)")
axes[0].set(title=f"Layer {best}: {h}x{w} queries -> {hp}x{wp} keys", xlabel=f"key index ({hp}x{wp} grid, raster order)",
            ylabel=f"query index ({h}x{w} grid, raster order)")
for ax, (qy, qx) in zip(axes[1:], [(h // 4, w // 4), (h // 2, w // 2), (3 * h // 4, 3 * w // 4)]):
    im = ax.imshow(block[qy * w + qx].reshape(hp, wp), cmap="viridis")
    ax.plot([qx * wp // w], [qy * hp // h], "r+", ms=14, mew=2)
    ax.set(title=f"query ({qy}, {qx}) of {h}x{w}", xlabel="key column", ylabel="key row")
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of attention")
fig.tight_layout()
plt.show()
"""),
("md", """
The evidence of this run in numbers (printed from the results above, so it stays true when the
weights change):
"""),
("code", """
mid_keep = 0.5
piv, rnd = sweep["pivotal", mid_keep], sweep["random", mid_keep]
print(f"keep {mid_keep:g} of the last two scales: {100 * piv['gflop'] / ref_gflop:.0f} % of the unpruned FLOPs; "
      f"PSNR vs unpruned {piv['psnr']:.1f} dB with pivotal selection, {rnd['psnr']:.1f} dB with random selection")
print(f"skipping both scales: {100 * skip['gflop'] / ref_gflop:.0f} % of the FLOPs, PSNR {skip['psnr']:.1f} dB")
last = {li: strength[li][-1] for li in att_layers}
print(f"attention of the {labels[-1]} queries on their own {labels[-2]} cell, in multiples of uniform attention: "
      + ", ".join(f"layer {li} {v:.1f}x" for li, v in last.items()))
"""),
("md", f"""
**How to read it.** If the observations hold for the model, the kept tokens trace the image's
content, the restored ones lie in flat regions whose sub-layer outputs hardly differ from an
upsampled earlier scale, and queries at a large scale look at their own cell of the previous scale
many times more than uniform attention would. A token's output at a large scale is then mostly a
refinement of what the same place computed one scale before, which is why filling dropped tokens
from a cached scale changes the image little, and why choosing the tokens by score should beat
choosing them at random. Notebook 02 adds the frequency view: the large scales mainly add detail.
{FASTVAR} shows the same analysis for Infinity-2B at 1024x1024.
"""),
]

NB = notebook(CELLS)
