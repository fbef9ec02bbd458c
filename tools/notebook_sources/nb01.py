from common import FASTVAR, INFINITY, MODEL_CELL, MODEL_MD, SETUP, notebook

CELLS = [
("md", f"""
# 01 · One generation, taken apart

{INFINITY} paints an image from coarse to fine. Its transformer first predicts a 1x1 grid of *bits*,
then a 2x2 grid, then 4x4, and so on up to the final grid. The bits of each scale become *residual
codes* (one vector of ±1/√d values per token); every scale's codes are upsampled to the final grid and
added to a running sum, and the VAE decoder turns the final sum into pixels. The prompt reaches the
transformer through a T5 text encoder.

Here we follow one prompt through these steps using minivar's public API and the `Trace` that
`generate(..., trace=True)` returns. The notebooks after this one use the same pieces to show why
{FASTVAR} can prune tokens at the large scales without hurting the picture much.
"""),
("md", MODEL_MD),
("code", MODEL_CELL),
("code", SETUP),
("md", """
## 1. Text: tokens, then T5 features

The tokenizer cuts the prompt into sentencepiece pieces and appends an end-of-sequence token. T5 turns
each token into a feature vector (one row of the heat map). Every transformer layer reads these rows
through cross-attention, and their pooled summary is the input of the first, 1x1 scale.
"""),
("code", '''
prompt = "two red circles above a blue square on a white background"
ids, mask = pipe.tokenizer(prompt)
n_tok = int(mask.sum())
sp = pipe.tokenizer.sp
pieces = [sp.id_to_piece(i) if i < sp.get_piece_size() else f"<id {i}>" for i in ids[0, :n_tok].tolist()]
feats, lens = pipe.encode_text([prompt])
print(f"{n_tok} tokens (end-of-sequence included):", pieces)
print("T5 features:", tuple(feats[0].shape), "= (tokens, channels)")

f = feats[0].cpu().numpy()
v = np.abs(f).max()
fig, ax = plt.subplots(figsize=(9, 0.22 * n_tok + 1.5))
im = ax.imshow(f, aspect="auto", cmap="RdBu_r", vmin=-v, vmax=v)
ax.set_yticks(range(n_tok), pieces, fontsize=8)
ax.set(title="T5 features of the prompt", xlabel="feature channel (index)", ylabel="token")
fig.colorbar(im, ax=ax, label="activation (arbitrary units)")
plt.show()
'''),
("md", """
## 2. The scale schedule

The resolution selects a list of token grids (`pipe.schedule`). Every scale runs all layers on all of
its tokens, and its self-attention also reads the tokens of every earlier scale, so the token count
per scale (log axis) already tells where the work is: the last few scales hold most of the tokens.
"""),
("code", '''
scales = pipe.schedule(res, h_div_w=1.0)
tokens = np.array([h * w for h, w in scales])
labels = [f"{h}x{w}" for h, w in scales]
print(f"{len(scales)} scales, {tokens.sum()} tokens in all; one token covers {pipe.token_px}x{pipe.token_px} pixels")
print("scale  grid    tokens  share of all tokens")
for i, (lab, t) in enumerate(zip(labels, tokens)):
    print(f"{i:5d}  {lab:6s} {t:7d}  {100 * t / tokens.sum():6.1f} %")

fig, ax = plt.subplots(figsize=(8, 3.2))
ax.bar(labels, tokens, color="C0")
ax.set_yscale("log")
ax.set(title="Tokens per scale", xlabel="scale (token grid h x w)", ylabel="tokens (count, log scale)")
ax2 = ax.twinx()
ax2.plot(labels, 100 * np.cumsum(tokens) / tokens.sum(), "o-", color="C1")
ax2.set_ylabel("cumulative share of tokens (%)", color="C1")
ax2.set_ylim(0, 105)
plt.show()
'''),
("md", """
## 3. Generating with a trace

With `trace=True` the output keeps, for every scale: the bit logits as they were sampled, the bits
`(B, h, w, d)`, the residual codes `(B, d, h, w)`, the running sum on the final grid `(B, d, H, W)` and
the wall time of the scale.
"""),
("code", '''
out = pipe.generate(prompt, res=res, seed=SEED, cfg=3.0, tau=0.5, trace=True)
tr = out.trace
for i, (h, w) in enumerate(tr.scales):
    print(f"scale {i:2d} {h:3d}x{w:<3d} bits {tuple(tr.bits[i].shape)}  codes {tuple(tr.codes[i].shape)}  "
          f"summed {tuple(tr.summed[i].shape)}  {1000 * tr.seconds[i]:7.1f} ms")
print("stage times (s):", {k: round(v, 3) for k, v in out.timings.items()})
'''),
("md", """
## 4. Scale by scale: bits, residual codes, running sum, image

One column per scale. Row 1 is one of the d bit planes (black 0, white 1). Rows 2 and 3 show the
scale's residual codes and the running sum as colours: their projection on the three main directions
of the final latent, the same in every column, so colours can be compared across columns. Row 4 is
what the VAE decodes from the running sum, the image you would get by stopping after that scale.

What to look for: the scale after which the layout and the colours of the decoded image stop changing,
and what the later, larger scales still change: whole regions, or only edges and texture.
"""),
("code", '''
decoded = [pipe.decode(s.unsqueeze(2).to(device))[0] for s in tr.summed]   # (B, d, H, W) -> (B, d, 1, H, W)
final = tr.summed[-1]
rows = ["bit plane 0", "residual codes", "running sum", "decoded sum"]
n = len(tr.scales)
fig, axes = plt.subplots(4, n, figsize=(1.5 * n, 6.6), squeeze=False)
for i, (h, w) in enumerate(tr.scales):
    axes[0, i].imshow(tr.bits[i][0, :, :, 0], cmap="gray", vmin=0, vmax=1)
    axes[1, i].imshow(analysis.pca_rgb(tr.codes[i][:1], tr.codes[-1])[0])
    axes[2, i].imshow(analysis.pca_rgb(tr.summed[i][:1], final)[0])
    axes[3, i].imshow(decoded[i])
    axes[0, i].set_title(f"{i}: {h}x{w}", fontsize=9)
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
for r, name in enumerate(rows):
    axes[r, 0].set_ylabel(name, fontsize=9)
fig.suptitle(f"Scale by scale (column: scale index and token grid; images {decoded[-1].size[0]} px)")
fig.tight_layout()
plt.show()
'''),
("md", """
How much does each scale still change the result? Left: the mean absolute change of the decoded image
when the scale is added, in 8-bit grey levels. Right: the size of the scale's contribution to the
latent, relative to the final latent.
"""),
("code", '''
px = [np.asarray(im, dtype=np.float64) for im in decoded]
step_change = [np.abs(b - a).mean() for a, b in zip(px[:-1], px[1:])]
resid = [float((b - a).norm() / final.norm()) for a, b in zip(tr.summed[:-1], tr.summed[1:])]

fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
axes[0].bar(labels[1:], step_change, color="C2")
axes[0].set(title="Change of the decoded image per scale", xlabel="scale added",
            ylabel="mean |change| (grey levels, 0-255)")
axes[1].bar(labels[1:], resid, color="C3")
axes[1].set(title="Size of each scale's contribution", xlabel="scale added",
            ylabel="|sum after - sum before| / |final sum| (ratio)")
fig.tight_layout()
plt.show()
'''),
("md", """
## 5. Classifier-free guidance

With guidance the transformer runs twice per scale, once with the prompt and once with learned
"empty prompt" rows, and the bit logits are pushed away from the unconditional ones by the factor
`cfg`; `cfg=1` switches guidance off and halves the work. The seed is the same in every run. What to
look for: how closely each image follows the prompt, and how guidance changes the model's certainty
about each bit from scale to scale. Certainty is measured as the entropy of the distribution a bit is
drawn from: 1 bit is a coin flip, 0 bits a sure value.
"""),
("code", '''
cfgs = [1.0, 3.0, 6.0]
runs = {c: pipe.generate(prompt, res=res, seed=SEED, cfg=c, tau=0.5, trace=True) for c in cfgs}

fig, axes = plt.subplots(1, len(cfgs) + 1, figsize=(12, 3.2), gridspec_kw={"width_ratios": [1] * len(cfgs) + [1.8]})
for ax, c in zip(axes, cfgs):
    ax.imshow(runs[c].image)
    ax.set_title(f"cfg = {c:g}" + (" (no guidance)" if c == 1 else ""), fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
for c in cfgs:
    ent = [analysis.bit_entropy(lg) for lg in runs[c].trace.logits]
    axes[-1].plot(labels, ent, "o-", label=f"cfg = {c:g}")
axes[-1].set(title="Uncertainty of the sampled bits", xlabel="scale", ylabel="mean entropy per bit (bits)", ylim=(0, 1.02))
axes[-1].legend()
fig.tight_layout()
plt.show()
'''),
("md", """
## 6. The final image

The decoded sum after the last scale, and where the wall time of the generation went: the text
encoder, the transformer over all scales, and the VAE decoder.
"""),
("code", '''
fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), gridspec_kw={"width_ratios": [1, 1.2]})
axes[0].imshow(out.image)
axes[0].set_title(f"{out.image.size[0]}x{out.image.size[1]} px, seed {SEED}", fontsize=10)
axes[0].set_xticks([])
axes[0].set_yticks([])
parts = list(out.timings)
axes[1].barh(parts, [out.timings[p] for p in parts], color="C0")
axes[1].set(title="Wall time of the generation", xlabel="seconds", ylabel="stage")
fig.suptitle(prompt, fontsize=10)
fig.tight_layout()
plt.show()
'''),
("md", f"""
**What this sets up.** Two things to keep from this notebook: most tokens, and so most of the work,
sit in the last few scales; and the decoded image after each scale shows how much of the picture is
already decided before those scales run. {FASTVAR} rests on the second being "most of it" for a
well-trained model: if the last scales mostly add detail, they can be computed on fewer tokens.
Notebook 02 measures this in frequency terms, 03 shows the pruning itself, and 04 the time it saves.
"""),
]

NB = notebook(CELLS)
