"""Analytic FLOP and byte counts of a generation, per scale and per sub-layer.

The count follows what the scale loop in sampling.py actually computes, so it transfers to any device:

    text    once: text pooling, the projection of the text for cross-attention, the shared AdaLN
    embed   the input tokens of the next scale that runs (word_embed)
    qkv     per layer: the fused q, k, v projection of the tokens the layer computes
    attn    per layer: softmax attention of those queries over the layer's KV cache plus themselves
    proj    per layer: the self-attention output projection
    ca      per layer: cross-attention (q and output projections and attention over the image's own
            text tokens; the text's k, v projection is computed once, at the first scale)
    ffn     per layer: fc1 and fc2
    select  per pruned sub-layer of the "projection" selector: the tokens' random projection to `rank`
            dimensions (StageVAR); the other selectors' scoring is elementwise (see below)
    head    the AdaLN head and the bit logits: on both halves where guidance mixes the logits, else on
            the conditional rows only
    vae     the decoder's convolutions (`vae_decode_count`)

FLOPs count a multiply-add as 2 and cover matmuls, attention and convolutions only. Norms, GELU,
RoPE, sampling and pruning's scoring, gather and scatter are elementwise and left out: together they
are well under 1 % of the total at the sizes that matter. Bytes are the ideal memory traffic of a
sub-layer: its weights read once, its inputs read once and its outputs written once; attention also
reads every cached key and value. A real kernel moves at least this much; flops / bytes is the
arithmetic intensity that places a sub-layer on a roofline.

    python -m minivar.flops --model infinity-2b --res 1024          # unpruned vs prune=True, with CFG
"""
from __future__ import annotations

import argparse
from collections import defaultdict
from dataclasses import dataclass, field

from ..model.config import PRESETS, InfinityConfig, scale_schedule
from ..pipeline import kv_cache_bytes
from ..model.pruning import resolve_prune
from ..model.pruning import PruneSchedule
from ..model.sampling import Plan, Settings, plan
from ..model.vae import VAE_PRESETS, VAEConfig

BLOCK_PARTS = ("qkv", "attn", "proj", "ca", "ffn")
PARTS = ("text", "embed", *BLOCK_PARTS, "select", "head")
SUB_LAYERS = 3  # self-attention, cross-attention, FFN: each chooses its own tokens at a pruned scale


@dataclass
class Count:
    flops: float = 0.0
    bytes: float = 0.0

    def __add__(self, other: Count) -> Count:
        return Count(self.flops + other.flops, self.bytes + other.bytes)

    def __mul__(self, k: float) -> Count:
        return Count(self.flops * k, self.bytes * k)


@dataclass(frozen=True)
class Precision:
    """Bytes per element of stored weights and of activations (and the KV cache)."""
    weight: int = 4
    act: int = 4


FP32 = Precision()


def linear_flops(n: int, d_in: int, d_out: int, p: Precision = FP32) -> Count:
    """A Linear applied to n rows."""
    return Count(2 * n * d_in * d_out, p.weight * d_in * d_out + p.act * n * (d_in + d_out))


def attention(rows: int, q_len: int, kv_len: int, width: int, p: Precision = FP32) -> Count:
    """Softmax attention of q_len queries over kv_len keys in each of `rows` images, width = heads * head_dim.

    QK^T and AV are each 2 * q_len * kv_len * width FLOPs per image; q and the output are read and
    written once, and every key and value is read once.
    """
    return Count(4 * rows * q_len * kv_len * width, p.act * rows * width * 2 * (q_len + kv_len))


def conv(h: int, w: int, c_in: int, c_out: int, k: int, p: Precision = FP32) -> Count:
    """A k x k convolution with an (h, w) output and the same input size (stride 1, 'same' padding)."""
    return Count(2 * h * w * c_in * c_out * k * k, p.weight * c_in * c_out * k * k + p.act * h * w * (c_in + c_out))


# --------------------------------------------------------------------------------------------------
# Transformer
# --------------------------------------------------------------------------------------------------
@dataclass
class ScaleCount:
    """What one scale costs: parts summed over all layers, and the tokens each layer computed."""
    si: int
    hw: tuple[int, int]
    rows: int                     # batch rows the transformer ran (2B with CFG)
    kept: list[int]               # tokens computed per layer (h * w unless pruned)
    kv_len: list[int] = field(default_factory=list)  # keys each layer attends to (its cache plus its own)
    parts: dict[str, Count] = field(default_factory=dict)

    @property
    def total(self) -> Count:
        return sum(self.parts.values(), Count())


def text_count(cfg: InfinityConfig, rows: int, text_tokens: int, p: Precision = FP32) -> Count:
    """`Infinity.condition`: pooling (its own attention), the text projection for cross-attention, AdaLN."""
    C, Ct, N = cfg.embed_dim, cfg.text_channels, rows * text_tokens
    pool = linear_flops(N, Ct, 2 * C, p) + attention(rows, 1, text_tokens, C, p) + linear_flops(rows, C, C, p)
    return pool + linear_flops(N, Ct, C, p) + linear_flops(N, C, C, p) + linear_flops(rows, C, 6 * C, p)


def block_count(cfg: InfinityConfig, rows: int, k: int, kv_len: int, text_tokens: int,
                p: Precision = FP32) -> dict[str, Count]:
    """One block computing k tokens per image, attending to kv_len keys (its cache plus the k)."""
    C, F, n = cfg.embed_dim, cfg.ffn_hidden, rows * k
    ca = linear_flops(n, C, C, p) + attention(rows, k, text_tokens, C, p) + linear_flops(n, C, C, p)
    return {"qkv": linear_flops(n, C, 3 * C, p), "attn": attention(rows, k, kv_len, C, p), "proj": linear_flops(n, C, C, p),
            "ca": ca, "ffn": linear_flops(n, C, F, p) + linear_flops(n, F, C, p)}


def transformer_count(cfg: InfinityConfig, scales: list[tuple[int, int]], prune: PruneSchedule | None = None, *,
                      batch: int = 1, cfg_on: bool = True, cfg_stop_scale: int | None = None,
                      text_tokens: int = 32, p: Precision = FP32) -> list[ScaleCount]:
    """Per-scale counts of a generation with guidance on the logits (`cfg_on`) or none: the plan the
    loop would run (`sampling.plan`), counted by `plan_count`."""
    settings = Settings(cfg=3.0 if cfg_on else 1.0, cfg_stop_scale=cfg_stop_scale)
    return plan_count(cfg, plan(cfg, scales, 1.0, settings, prune or PruneSchedule.none()), batch, text_tokens, p)


def plan_count(cfg: InfinityConfig, the_plan: Plan, batch: int = 1, text_tokens: int = 32,
               p: Precision = FP32) -> list[ScaleCount]:
    """Per-scale counts of the scales a plan runs: 2 * batch rows where it guides, else batch; each
    layer attends to the tokens it stored at earlier scales plus its own."""
    ran, prune, C = the_plan.ran, the_plan.prune, cfg.embed_dim
    full_rows = 2 * batch if the_plan.cfg_on else batch
    cached, out = [0] * cfg.depth, []
    for k, step in enumerate(ran):
        rows, L = 2 * batch if step.guided else batch, step.hw[0] * step.hw[1]
        sc = ScaleCount(step.si, step.hw, rows, list(step.kept), [cached[li] + n for li, n in enumerate(step.kept)])
        parts: dict[str, Count] = defaultdict(Count)
        if k == 0:
            parts["text"] = text_count(cfg, full_rows, text_tokens, p)
            parts["ca"] = linear_flops(full_rows * text_tokens, C, 2 * C, p) * cfg.depth  # text K, V per layer
        for li, n in enumerate(step.kept):
            for name, c in block_count(cfg, rows, n, sc.kv_len[li], text_tokens, p).items():
                parts[name] += c
            if n < L and prune.selector == "projection":
                parts["select"] += linear_flops(rows * L, C, min(prune.rank, C), p) * SUB_LAYERS
            cached[li] += n if step.stored else 0
        head_rows = 2 * batch if step.mix_logits else batch  # `sampling.step_logits`
        parts["head"] = linear_flops(head_rows, C, 2 * C, p) + linear_flops(head_rows * L, C, 2 * cfg.d_vae, p)
        if k + 1 < len(ran):
            nh, nw = ran[k + 1].hw
            parts["embed"] = linear_flops(batch * nh * nw, cfg.d_vae, C, p)
        sc.parts = {name: parts[name] for name in PARTS if name in parts}
        out.append(sc)
    return out


# --------------------------------------------------------------------------------------------------
# VAE decoder
# --------------------------------------------------------------------------------------------------
def resblock_count(h: int, w: int, c_in: int, c_out: int, p: Precision = FP32) -> Count:
    c = conv(h, w, c_in, c_out, 3, p) + conv(h, w, c_out, c_out, 3, p)
    return c + conv(h, w, c_in, c_out, 1, p) if c_in != c_out else c


def vae_decode_count(vcfg: VAEConfig, latent_hw: tuple[int, int], batch: int = 1, p: Precision = FP32) -> Count:
    """The convolutions of `vae.Decoder` for a latent (batch, d, h, w); mirrors its level structure."""
    ch, mult = vcfg.base_ch, vcfg.ch_mult
    h, w = latent_hw
    top = ch * mult[-1]
    total = conv(h, w, vcfg.codebook_dim, top, 3, p) + resblock_count(h, w, top, top, p) * 2
    widths_in = [ch * m for m in (*mult[1:], mult[-1])]
    for i in reversed(range(len(mult))):
        c_out = ch * mult[i]
        for b in range(vcfg.num_res_blocks + 1):
            total += resblock_count(h, w, widths_in[i] if b == 0 else c_out, c_out, p)
        if 1 <= i <= vcfg.n_resample:
            h, w = 2 * h, 2 * w
            total += conv(h, w, c_out, c_out, 3, p)
    return (total + conv(h, w, ch * mult[0], 3, 3, p)) * batch


# --------------------------------------------------------------------------------------------------
# Summaries and the CLI
# --------------------------------------------------------------------------------------------------
def totals(counts: list[ScaleCount]) -> dict[str, Count]:
    """Per-part totals over all scales."""
    out: dict[str, Count] = defaultdict(Count)
    for sc in counts:
        for name, c in sc.parts.items():
            out[name] += c
    return dict(out)


def summary(counts: list[ScaleCount], vae: Count | None = None) -> dict:
    """A JSON-ready summary: per-part and per-scale FLOPs and bytes."""
    parts = totals(counts)
    transformer = sum(parts.values(), Count())
    return {
        "transformer_flops": transformer.flops, "transformer_bytes": transformer.bytes,
        "vae_flops": vae.flops if vae else 0.0, "vae_bytes": vae.bytes if vae else 0.0,
        "parts": {k: {"flops": c.flops, "bytes": c.bytes} for k, c in parts.items()},
        "scales": [{"si": sc.si, "hw": list(sc.hw), "rows": sc.rows, "kept": sc.kept,
                    "flops": sc.total.flops, "bytes": sc.total.bytes,
                    "parts": {k: c.flops for k, c in sc.parts.items()}} for sc in counts],
    }


def compare(model: str = "infinity-2b", res: int = 1024, cfg_on: bool = True, text_tokens: int = 32,
            prune="preset", batch: int = 1) -> dict[str, dict]:
    """Unpruned vs pruned counts of a preset model (the VAE decoder of its family included)."""
    cfg = PRESETS[model]
    scales = scale_schedule(res)
    vcfg = VAE_PRESETS["d56" if cfg.spatial_patchify else "d32"]
    final = scales[-1] if not cfg.spatial_patchify else (2 * scales[-1][0], 2 * scales[-1][1])
    vae = vae_decode_count(vcfg, final, batch)
    out = {}
    for label, p in (("unpruned", False), ("pruned", True if prune == "preset" else prune)):
        settings = Settings(cfg=3.0 if cfg_on else 1.0)
        the_plan = plan(cfg, scales, 1.0, settings, resolve_prune(p, cfg, scales))
        out[label] = summary(plan_count(cfg, the_plan, batch, text_tokens), vae)
        out[label]["kv_cache_bytes"] = kv_cache_bytes(the_plan, cfg, rows=(2 if cfg_on else 1) * batch)
    return out


def format_table(result: dict[str, dict]) -> str:
    """Markdown: TFLOP per part, unpruned vs pruned."""
    u, pr = result["unpruned"], result["pruned"]
    lines = ["| part | unpruned TFLOP | pruned TFLOP | ratio |", "|---|---:|---:|---:|"]
    for name in PARTS:
        a, b = u["parts"].get(name, {}).get("flops", 0.0), pr["parts"].get(name, {}).get("flops", 0.0)
        if a or b:  # "select" exists only with the projection selector
            lines.append(f"| {name} | {a / 1e12:.3f} | {b / 1e12:.3f} | {f'{a / b:.2f}x' if a and b else ''} |")
    for key, label in (("transformer_flops", "**transformer**"), ("vae_flops", "vae decoder")):
        a, b = u[key], pr[key]
        lines.append(f"| {label} | {a / 1e12:.2f} | {b / 1e12:.2f} | {a / b if b else float('nan'):.2f}x |")
    a, b = u["transformer_flops"] + u["vae_flops"], pr["transformer_flops"] + pr["vae_flops"]
    lines.append(f"| transformer + vae | {a / 1e12:.2f} | {b / 1e12:.2f} | {a / b:.2f}x |")
    lines.append(f"| KV cache GiB | {u['kv_cache_bytes'] / 2**30:.2f} | {pr['kv_cache_bytes'] / 2**30:.2f} | |")
    return "\n".join(lines)


MAX_TEXT_TOKENS = 512  # T5 reads at most this many tokens of a prompt


def text_tokens_problem(n: int) -> str | None:
    """Why `--text-tokens n` cannot be counted, in one line (None: it can)."""
    if not 1 <= n <= MAX_TEXT_TOKENS:
        return f"--text-tokens {n}: give 1..{MAX_TEXT_TOKENS} (T5 reads at most {MAX_TEXT_TOKENS} tokens)"
    return None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m minivar.flops", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="infinity-2b", choices=sorted(PRESETS))
    ap.add_argument("--res", type=int, default=1024)
    ap.add_argument("--no-cfg", action="store_true", help="count without classifier-free guidance")
    ap.add_argument("--text-tokens", type=int, default=32, help="prompt tokens, EOS included (T5 reads 1..512)")
    ap.add_argument("--prune", default="preset", choices=["preset", "fastvar", "stagevar"],
                    help="'preset' (prune=True), 'fastvar' or 'stagevar'")
    a = ap.parse_args(argv)
    if problem := text_tokens_problem(a.text_tokens):
        ap.error(problem)
    try:
        r = compare(a.model, a.res, not a.no_cfg, a.text_tokens, a.prune)
    except ValueError as e:  # a resolution with no scale schedule; 'fastvar' on a grid it is not keyed on
        ap.error(f"--res {a.res} --prune {a.prune}: {e}")
    print(f"{a.model} at {a.res}^2, CFG {'off' if a.no_cfg else 'on'}, {a.text_tokens} text tokens, prune={a.prune}")
    print(format_table(r))


if __name__ == "__main__":
    main()
