from common import FASTVAR, MODEL_CELL, MODEL_MD, SETUP, notebook

CELLS = [
("md", f"""
# 02 · Per-scale spectra: what each scale adds

The second observation behind {FASTVAR}: **the large scales mostly add high-frequency detail, while
the low frequencies settle early.** When that is true, a large scale can be computed on part of its
tokens, the ones that carry detail, without disturbing the structure of the picture.

This notebook checks the claim in frequency space on a real run. A *radially averaged power spectrum*
sorts a map's energy by spatial frequency, in cycles per image side, from 0 (the mean) up to the
grid's Nyquist limit, averaging over directions, channels and images. Every spectrum is taken on the
common final grid: a coarse scale's codes are first upsampled exactly the way the running sum adds
them. The spectral code is in `minivar.bench.analysis` (tested in `tests/test_analysis.py`); the cells here
only call it and plot.
"""),
("md", MODEL_MD),
("code", MODEL_CELL),
("code", SETUP),
("md", """
A small batch of prompts, one traced generation, and the image decoded after every scale (in grey
levels: the spectra below are of brightness).
"""),
("code", '''
prompts = ["two red circles above a blue square on a white background",
           "a big yellow triangle on a black background",
           "three green diamonds",
           "a purple square left of an orange circle"]
B = len(prompts)
out = pipe.generate(prompts, res=res, seed=SEED, trace=True)
tr = out.trace
scales, n = tr.scales, len(tr.scales)
labels = [f"{h}x{w}" for h, w in scales]
H, W = tr.summed[-1].shape[-2:]
# grey-level images in [0, 1] after each scale: (B, H_px, W_px)
grey = [torch.tensor(np.stack([np.asarray(im.convert("L"), dtype=np.float64) / 255 for im in
                               pipe.decode(s.unsqueeze(2).to(device))])) for s in tr.summed]
colours = plt.get_cmap("viridis")(np.linspace(0, 1, n))
print(f"{B} images, {n} scales, final latent grid {H}x{W}, images {grey[0].shape[-1]} px")

def scale_colourbar(fig, ax):
    """A colour bar naming the scale of each line."""
    sm = plt.cm.ScalarMappable(cmap="viridis", norm=plt.Normalize(-0.5, n - 0.5))
    cb = fig.colorbar(sm, ax=ax, ticks=range(n))
    cb.ax.set_yticklabels(labels)
    cb.set_label("scale")

fig, axes = plt.subplots(B, n, figsize=(1.3 * n, 1.35 * B), squeeze=False)
for i in range(n):
    for b in range(B):
        axes[b, i].imshow(grey[i][b], cmap="gray", vmin=0, vmax=1)
        axes[b, i].set_xticks([])
        axes[b, i].set_yticks([])
    axes[0, i].set_title(labels[i], fontsize=9)
fig.suptitle("Decoded image after each scale (grey levels), one row per prompt")
fig.tight_layout()
plt.show()
'''),
("md", """
## 1. The spectrum of each scale's residual codes

Each line is one scale's residual codes, upsampled to the final grid, coloured from the first scale
(dark) to the last (light). By construction a small scale can only hold low frequencies: an upsampled
2x2 grid has no fine detail. What to look for is the other half of the claim: whether the light, late
curves carry little energy at the lowest frequencies compared with the dark, early ones, that is,
whether the late scales leave the coarse structure alone.
"""),
("code", '''
on_grid = [analysis.resize_to(c, (H, W)) for c in tr.codes]            # (B, d, H, W) each
freq = analysis.radial_power_spectrum(on_grid[0])[0]
code_spectra = [analysis.radial_power_spectrum(c)[1] for c in on_grid]

fig, ax = plt.subplots(figsize=(8, 4))
floor = 1e-8
for i, p in enumerate(code_spectra):
    ax.plot(freq, p.clamp_min(floor), color=colours[i], marker=".")
ax.set_yscale("log")
ax.set_ylim(bottom=floor)
ax.set(title="Power spectrum of each scale's residual codes (on the final grid)",
       xlabel="spatial frequency (cycles per image side)", ylabel="power (code units², log scale)")
scale_colourbar(fig, ax)
plt.show()
'''),
("md", """
## 2. Low- versus high-frequency energy per scale

The same residuals split into two bands: *low* is everything below a quarter of the Nyquist
frequency of the final grid, *high* the rest; the two add up to the residual's mean energy. What to
look for: whether the high-frequency share grows with the scale, and how much of the last scales'
energy is high frequency.
"""),
("code", '''
bands = np.array([analysis.band_energy(c, cutoff=0.25) for c in on_grid])    # (n, 2): low, high
high_share = bands[:, 1] / bands.sum(1)

fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
x = np.arange(n)
axes[0].bar(x - 0.2, bands[:, 0], width=0.4, label="low (< 1/4 Nyquist)", color="C0")
axes[0].bar(x + 0.2, bands[:, 1], width=0.4, label="high (>= 1/4 Nyquist)", color="C3")
axes[0].set_xticks(x, labels)
axes[0].set(title="Energy of each scale's residual codes", xlabel="scale", ylabel="mean energy (code units²)")
axes[0].legend()
axes[1].plot(labels, 100 * high_share, "o-", color="C3")
axes[1].set(title="High-frequency share of each residual", xlabel="scale", ylabel="high-frequency energy (%)", ylim=(0, 100))
fig.tight_layout()
plt.show()
for lab, (lo, hi), s in zip(labels, bands, high_share):
    print(f"{lab:>6s}: low {lo:.2e}  high {hi:.2e}  high share {100 * s:5.1f} %")
'''),
("md", """
## 3. How fast each frequency band converges

To see convergence we measure how much each scale *changes* each frequency: the power spectrum of
the difference between the image decoded after a scale and the one before it, divided by the power
spectrum of the final image. A value of 1 % means that step moved that frequency by 1 % of its final
energy. (Comparing the two power spectra alone would miss content that moves without changing its
energy.)

The bands are tied to the token grids. A grid of side h holds frequencies up to h/2 cycles per image,
so with L = half the final grid's side: *coarse* (1 to L/4 cycles) is what the first few scales can
express, *medium* (L/4 to L/2) arrives with the middle scales, *fine* (L/2 to L) only with the last
scales, and *sub-token* (above L) is detail the VAE decoder draws inside a token. What to look for:
whether the coarse band's curve falls early and stays low while the fine and sub-token bands keep
changing until the last scale. That is the pattern "low frequencies converge early" predicts.
"""),
("code", """
img_freq = analysis.radial_power_spectrum(grey[0])[0]
img_spectra = [analysis.radial_power_spectrum(g)[1] for g in grey]
L, img_nyq = W // 2, int(img_freq[-1])
edges = [1, L / 4, L / 2, L + 1, img_nyq + 1]                  # frequency 0 (the mean) is left out
band_names = [f"coarse (1 to <{L / 4:g})", f"medium ({L / 4:g} to <{L / 2:g})", f"fine ({L / 2:g} to {L})",
              f"sub-token ({L + 1} to {img_nyq})"]
img_change = analysis.change_spectra(grey)                            # (n - 1, n_freq)
img_band_change = analysis.band_average(img_change, img_freq, edges)  # (n - 1, 4)

fig, axes = plt.subplots(1, 3, figsize=(16, 4), gridspec_kw={"width_ratios": [1.2, 1, 1.2]})
for i, p in enumerate(img_spectra):
    axes[0].plot(img_freq[1:], p[1:], color=colours[i])
axes[0].set(xscale="log", yscale="log", title="Spectrum of the image decoded after each scale",
            xlabel="spatial frequency (cycles per image side, log)", ylabel="power (brightness², brightness 0-1; log)")
scale_colourbar(fig, axes[0])
for k, name in enumerate(band_names):
    axes[1].plot(labels[1:], 100 * img_band_change[:, k], "o-", label=name)
axes[1].set(yscale="log", title="Change of each band per scale (image)", xlabel="scale added",
            ylabel="power of the change / final power (%, log)")
axes[1].legend(title="band (cycles per image side)", fontsize=8)
vals = (100 * img_change[:, 1:]).clamp_min(1e-3)
im = axes[2].imshow(vals.numpy(), aspect="auto", cmap="magma", norm=plt.matplotlib.colors.LogNorm(1e-2, float(vals.max())),
                    extent=(0.5, img_nyq + 0.5, n - 0.5, 0.5), interpolation="nearest")
axes[2].set_xscale("log")
axes[2].set_yticks(range(1, n), labels[1:])
axes[2].set(title="Change per frequency (image)", xlabel="spatial frequency (cycles per image side, log)", ylabel="scale added")
fig.colorbar(im, ax=axes[2], label="power of the change / final power (%)")
fig.tight_layout()
plt.show()
print("change of the image per band when each scale is added (% of the band's final power):")
print("         " + "".join(f"{name.split()[0]:>11s}" for name in band_names))
for lab, row in zip(labels[1:], img_band_change):
    print(f"  {lab:>6s} " + "".join(f"{100 * v:10.2f}%" for v in row))
"""),
("md", """
The same measurement on the latent itself: the running sum after each scale (its frequencies stop at
the final grid's limit L). The step a scale makes *is* its upsampled residual, so this is the
residual's spectrum relative to the final latent's.
"""),
("code", """
lat_freq = analysis.radial_power_spectrum(tr.summed[0])[0]
lat_edges = edges[:4]
lat_change = analysis.change_spectra(tr.summed)
lat_band_change = analysis.band_average(lat_change, lat_freq, lat_edges)

fig, ax = plt.subplots(figsize=(7, 3.6))
for k, name in enumerate(band_names[:3]):
    ax.plot(labels[1:], 100 * lat_band_change[:, k], "o-", label=name)
ax.set(yscale="log", title="Change of each band per scale (latent sum)", xlabel="scale added",
       ylabel="power of the change / final power (%, log)")
ax.legend(title="band (cycles per image side)", fontsize=8)
plt.show()
"""),
("md", """
## 4. Inside the transformer: hidden states at a few layers

The same analysis for the transformer's hidden states. An opt-in forward hook
(`analysis.capture_hidden`; it is removed when the `with` block ends) records the output of a few
blocks at every scale. We keep the conditional rows, lay the tokens out on their grid and upsample
them to the final grid. Top row: each scale's spectrum divided by its total power, so that shapes can
be compared. Bottom row: the change of each band from one scale's hidden state to the next, relative
to the last scale's. What to look for: whether later scales move the hidden state's power towards
higher frequencies (the lighter lines lie higher on the right), and which bands still change between
consecutive scales. Unlike the image, a hidden state is recomputed from scratch at every scale (with
that scale's own embedding), so it need not settle the way the picture does.
"""),
("code", """
layers = sorted({0, cfg.depth // 2, cfg.depth - 1})
with analysis.capture_hidden(pipe.transformer, layers) as states:
    pipe.generate(prompts, res=res, seed=SEED, output_type="latent")

fig, axes = plt.subplots(2, len(layers), figsize=(5.2 * len(layers), 7), squeeze=False)
hidden_change = {}
for j, li in enumerate(layers):
    maps = [analysis.resize_to(analysis.token_maps(states[li][i][:B], hw), (H, W)) for i, hw in enumerate(scales)]
    for i, m in enumerate(maps):
        p = analysis.radial_power_spectrum(m)[1]
        axes[0, j].plot(lat_freq, (p / p.sum()).clamp_min(1e-8), color=colours[i], marker=".")
    axes[0, j].set(yscale="log", title=f"Hidden state after block {li}", xlabel="spatial frequency (cycles per image side)",
                   ylabel="share of power (log)")
    hidden_change[li] = analysis.band_average(analysis.change_spectra(maps), lat_freq, lat_edges)
    for k, name in enumerate(band_names[:3]):
        axes[1, j].plot(labels[2:], 100 * hidden_change[li][1:, k], "o-", label=name.split()[0])
    axes[1, j].set(yscale="log", title=f"Block {li}: change per band from the previous scale", xlabel="scale",
                   ylabel="power of the change / final power (%, log)")
    axes[1, j].legend(title="band", fontsize=8)
scale_colourbar(fig, axes[0, -1])
fig.tight_layout()
plt.show()
"""),
("md", """
A summary of the numbers above, computed from this run (it is printed, not written by hand, so it
stays true when the weights change):
"""),
("code", """
first_late = max(1, n - 2)                                    # the last two scales
print(f"high-frequency share of the residual: {100 * high_share[0]:.0f} % at {labels[0]}, "
      f"{100 * high_share[n // 2]:.0f} % at {labels[n // 2]}, {100 * high_share[-1]:.0f} % at {labels[-1]}")
coarse_late = 100 * img_band_change[first_late - 1:, 0].max()
fine_late = 100 * img_band_change[first_late - 1:, 2:].max()
print(f"during the last two scales the image's coarse band changes by at most {coarse_late:.2f} % of its final power, "
      f"the fine and sub-token bands by up to {fine_late:.2f} %")
"""),
("md", f"""
**How to read it.** If the large scales mostly add detail, the high-frequency share rises towards the
last scales and the coarse band barely moves while they run, whereas the fine bands still do. Pruning
(notebook 03) bets on exactly this: at a large scale it computes the tokens that stand out from the
scale's mean (edges, detail) and fills the rest from an earlier scale, whose low-frequency content is
already in place. {FASTVAR} reports the same measurements on Infinity-2B; a weakly trained model can
deviate, and then pruning costs it more.
"""),
]

NB = notebook(CELLS)
