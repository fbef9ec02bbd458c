"""HART's two configs (the AR transformer and the residual VQ tokenizer), its scale schedule and presets.

Field names follow the `config.json` files of upstream's checkpoints (`llm/` and `tokenizer/`), so that
`from_upstream` reads them without a translation table; options that upstream offers but hart-0.7b
does not use (GPT-2 blocks, AdaLN in every block, cross-attention, cosine attention) are refused there.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from ..model.config import CheckpointError

SCHEDULE_1024 = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)  # 14 scales; the last is 64x64 at 1024 px


@dataclass(frozen=True)
class HartConfig:
    """The AR transformer. The first "scale" is the text: `context_token` projected text states."""
    depth: int = 24
    embed_dim: int = 1536
    num_heads: int = 24
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    context_token: int = 300          # text tokens, padded: the prefix of every KV cache
    context_dim: int = 1536           # width of the text encoder's hidden states (Qwen2-1.5B)
    use_context_norm: bool = False    # an RMSNorm on the text states before their projection
    patch_nums: tuple[int, ...] = SCHEDULE_1024
    vocab_size: int = 4096            # the tokenizer's codebook size (read from it)
    d_vae: int = 32                   # the tokenizer's latent channels (read from it)
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def ffn_hidden(self) -> int:
        """SwiGLU width: 2/3 of mlp_ratio * C, rounded up to a multiple of 256 (4096 for C = 1536)."""
        return int(self.embed_dim * self.mlp_ratio * 2 / 3 + 255) // 256 * 256

    @classmethod
    def from_upstream(cls, d: dict, vq: VQConfig) -> HartConfig:
        """From an upstream `llm/config.json` (a `HARTForT2IConfig`) and the tokenizer's config."""
        refuse(d, "transformer config", mlp_type="llama", attn_type="llama", disable_aln=True, shared_aln=False,
               use_cross_attn=False, attn_l2_norm=False, use_timestep_embed=False)
        return cls(**pick(cls, d, patch_nums=tuple), vocab_size=vq.vocab_size, d_vae=vq.z_channels)


@dataclass(frozen=True)
class VQConfig:
    """The multi-scale residual VQ tokenizer (VAR's, with HART's continuous last residual in step 2)."""
    vocab_size: int = 4096
    z_channels: int = 32
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2          # hard-coded upstream
    quant_conv_ks: int = 3
    quant_resi: float = 0.5          # Phi mixes h and conv(h) with this weight
    share_quant_resi: int = 4        # Phi convolutions shared over scales

    @classmethod
    def from_upstream(cls, d: dict) -> VQConfig:
        """From an upstream `tokenizer/config.json` (a `HARTAutoEncoderWithDiscConfig`)."""
        refuse(d, "tokenizer config", using_znorm=False, double_decoder=False)
        cfg = cls(**pick(cls, d, ch_mult=tuple))
        if cfg.share_quant_resi < 2 or abs(cfg.quant_resi) <= 1e-6:
            raise CheckpointError(f"tokenizer config has share_quant_resi={cfg.share_quant_resi}, quant_resi="
                                  f"{cfg.quant_resi}: minivar supports partially shared Phi (>= 2, non-zero), as HART uses")
        return cfg


def pick(cls, d: dict, **casts) -> dict:
    """The config's own fields out of an upstream dict (which holds many more), cast where a type is given."""
    names = {f.name for f in fields(cls)}
    return {k: casts.get(k, lambda v: v)(v) for k, v in d.items() if k in names}


def refuse(d: dict, what: str, **supported) -> None:
    """One CheckpointError line if the upstream config asks for an option minivar does not implement."""
    bad = [f"{k}={d[k]!r}" for k, v in supported.items() if k in d and d[k] != v]
    if bad:
        raise CheckpointError(f"{what} asks for {', '.join(bad)}; minivar implements HART as hart-0.7b uses it "
                              f"({', '.join(f'{k}={v!r}' for k, v in supported.items())})")


# hart-0.7b at 1024 px. The public config.json files were not readable from here: depth, width and heads
# are inferred (24 x 1536 with 24 heads of 64 gives the 0.73 B parameters HART reports, without AdaLN in
# the blocks, which FastVAR's patch of the `disable_aln` branch confirms); use_context_norm is assumed off.
# tests/fixtures/hart_0.7b_*_keys.json list upstream's modules built with these values.
HART_PRESETS = {
    # 693 M transformer parameters here (730 M with step 2's diffusion MLP); tokenizer decoder side 65 M
    "hart-0.7b": (HartConfig(), VQConfig()),
}
