"""Configs, presets and scale schedules.

A *scale schedule* is the list of token grids (h, w) that next-scale prediction walks through, from
1x1 up to the final latent grid. Infinity trains on a fixed table of aspect-ratio templates
(height / width) and pixel budgets; every budget of a template is a prefix of that template's
13-scale '1M' list. minivar reproduces that table and extends it past 1M for zero-shot high
resolution (FastVAR's recipe: one more scale on top of the 1M list).
"""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

# Token grids (h, w) per aspect-ratio template h/w, as trained by Infinity (patch 16: a 64x64 grid is
# 1024x1024 pixels). Templates below 1 are these with h and w swapped.
_TALL_GRIDS: dict[float, list[tuple[int, int]]] = {
    1.000: [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (32, 32), (40, 40), (48, 48), (64, 64)],
    1.250: [(1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24), (35, 28), (45, 36), (55, 44), (70, 56)],
    1.333: [(1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21), (36, 27), (48, 36), (60, 45), (72, 54)],
    1.500: [(1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22), (39, 26), (48, 32), (63, 42), (78, 52)],
    1.750: [(1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20), (42, 24), (56, 32), (70, 40), (84, 48)],
    2.000: [(1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19), (46, 23), (60, 30), (74, 37), (90, 45)],
    2.500: [(1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16), (50, 20), (65, 26), (80, 32), (100, 40)],
    3.000: [(1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15), (54, 18), (72, 24), (90, 30), (111, 37)],
}


def _all_templates() -> dict[float, list[tuple[int, int]]]:
    out = dict(_TALL_GRIDS)
    for ratio, grids in _TALL_GRIDS.items():
        if ratio != 1.0:
            # Upstream names the wide templates by truncating 1/ratio to three decimals (0.666, 0.571...).
            out[int(1 / ratio * 1000) / 1000] = [(w, h) for h, w in grids]
    return out  # upstream's order, which decides ties in `nearest_template`


TEMPLATES = _all_templates()
# Pixel budget -> number of scales of the template list it uses.
BUDGETS = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}
# Zero-shot high resolution (FastVAR's recipe): the 1M list plus one larger final grid whose area
# matches the pixel budget (84x84 for 1344^2; FastVAR shows 84x84 for 1:1 and 120x60 for 2:1), with
# the long side capped at 128 cells, the size of the RoPE table upstream precomputes (2048 / 16).
HIGH_RES = {"1.8M": 1344, "4M": 2048}
RES_TO_BUDGET = {256: "0.06M", 512: "0.25M", 768: "0.60M", 1024: "1M", 1344: "1.8M", 2048: "4M"}
MAX_GRID = 128


def nearest_template(h_div_w: float) -> float:
    """Snap an aspect ratio (height / width) to the nearest trained template, as upstream does."""
    lo, hi = min(TEMPLATES), max(TEMPLATES)
    ok = isinstance(h_div_w, numbers.Real) and not isinstance(h_div_w, bool)  # numpy scalars too
    if not ok or not lo * 0.9 <= float(h_div_w) <= hi * 1.1:
        raise ValueError(f"unsupported h_div_w={h_div_w!r}: choose a height/width ratio between "
                         f"{lo} and {hi}; the trained templates are {sorted(TEMPLATES)}")
    return min(TEMPLATES, key=lambda t: abs(t - float(h_div_w)))  # first of equals wins, like upstream's argmin


def budget_for_res(res: int | str) -> str:
    """Map a resolution (256/512/768/1024, or 1344/2048 zero-shot) or a budget name to a budget."""
    if res in BUDGETS or res in HIGH_RES:
        return res
    if res not in RES_TO_BUDGET:
        raise ValueError(f"unsupported res={res!r}: choose one of {sorted(RES_TO_BUDGET)} "
                         f"(or a pixel budget {list(BUDGETS) + list(HIGH_RES)})")
    return RES_TO_BUDGET[res]


def _high_res_grid(h: int, w: int, side_px: int) -> tuple[int, int]:
    s = (side_px / 16) / (h * w) ** 0.5
    s = min(s, MAX_GRID / max(h, w))
    return round(h * s), round(w * s)


def scale_schedule(res: int | str = 1024, h_div_w: float = 1.0) -> list[tuple[int, int]]:
    """The (h, w) token grids for a resolution and aspect ratio (snapped to the nearest template)."""
    grids = TEMPLATES[nearest_template(h_div_w)]
    budget = budget_for_res(res)
    if budget in BUDGETS:
        return list(grids[: BUDGETS[budget]])
    return list(grids) + [_high_res_grid(*grids[-1], HIGH_RES[budget])]


def rope_grid_for(h_div_w_template: float) -> tuple[int, int]:
    """The grid RoPE positions are normalised to: the template's final 1M grid, whatever the budget."""
    return TEMPLATES[h_div_w_template][-1]


def check_int(name: str, value: Any, lo: int = 1, hi: int | None = None) -> None:
    """`value` must be a true int (not a bool, not 128.0, not "4") in lo..hi."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        allowed = f"an integer >= {lo}" if hi is None else f"an integer in {lo}..{hi}"
        raise ValueError(f"{name}={value!r} is invalid: it must be {allowed}")


def check_positive(name: str, value: Any) -> None:
    """`value` must be a finite real number > 0 (an int is fine)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}={value!r} is invalid: it must be a finite number > 0")


@dataclass
class InfinityConfig:
    depth: int = 32
    embed_dim: int = 2048
    num_heads: int = 16
    mlp_ratio: float = 4.0
    text_channels: int = 2048   # width of the T5 features
    text_maxlen: int = 512      # rows of the learned unconditional text
    d_vae: int = 32             # bits per transformer token (56 for 8B: 14 bits x 2x2 patchify)
    spatial_patchify: bool = False  # 8B: the transformer sees 2x2 VAE cells per token
    norm_eps: float = 1e-6
    num_levels: int = 15        # rows of the scale (level) embedding
    block_chunks: int = 8       # how upstream grouped blocks in its checkpoint; only used to save
    pn: str = "1M"              # the pixel budget it was trained at (upstream's `pn`): the default schedule

    def __post_init__(self):
        for name in ("depth", "embed_dim", "num_heads", "text_channels", "text_maxlen", "d_vae", "num_levels",
                     "block_chunks"):
            check_int(name, getattr(self, name))
        check_positive("mlp_ratio", self.mlp_ratio)
        check_positive("norm_eps", self.norm_eps)
        if not isinstance(self.spatial_patchify, bool):
            raise ValueError(f"spatial_patchify={self.spatial_patchify!r} is invalid: it must be true or false")
        if not isinstance(self.pn, str) or self.pn not in {**BUDGETS, **HIGH_RES}:
            raise ValueError(f"pn={self.pn!r} is invalid: it must be one of {list(BUDGETS) + list(HIGH_RES)}")
        if self.embed_dim % self.num_heads or (self.embed_dim // self.num_heads) % 4:
            raise ValueError(f"embed_dim={self.embed_dim} and num_heads={self.num_heads} are invalid: the head width "
                             "embed_dim / num_heads must be a whole multiple of 4 (2D RoPE)")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def ffn_hidden(self) -> int:
        return round(self.embed_dim * self.mlp_ratio / 256) * 256

    @property
    def pool_heads(self) -> int:
        # Text pooling heads: 128-wide over T5 channels (64-wide for very wide models), as upstream.
        return self.text_channels // (64 if self.embed_dim > 4096 else 128)

    def param_count(self) -> int:
        """Parameters of `Infinity(cfg)`, including the learned unconditional text rows (buffers excluded)."""
        C, Ct, F, d, H = self.embed_dim, self.text_channels, self.ffn_hidden, self.d_vae, self.num_heads
        sa = 3 * C * C + 2 * C + H + C * C + C          # qkv, q and v biases, temperature, proj
        ca = C * C + C + 2 * C * C + C + C * C + C      # q, kv and v bias, proj
        block = 6 * C + sa + ca + 2 * C + C * F + F + F * C + C
        pool = C + Ct * 2 * C + C + C * C + C           # learned query, kv and v bias, proj
        text = self.text_maxlen * Ct + C + Ct + pool + Ct * C + C + C * C + C
        embeds = self.num_levels * C + d * C + C + C * 6 * C + 6 * C
        head = C * 2 * C + 2 * C + C * 2 * d + 2 * d
        return self.depth * block + text + embeds + head

    @classmethod
    def from_upstream(cls, args: dict | str | Path, d_vae: int | None = None) -> InfinityConfig:
        """Build from upstream Infinity constructor arguments (a dict or a JSON file of them).

        Accepts the plain kwargs or a JSON holding them under `all_constructor_arguments` or
        `constructor_kwargs` (like the golden fixture's infinity_config.json). Wrong types or values
        raise one ValueError that names the file, the field and what is allowed.
        """
        where = "Infinity config" if isinstance(args, dict) else f"Infinity config {args}"
        if not isinstance(args, dict):
            args = read_json_object(Path(args), "Infinity config")
        try:
            return cls._from_args(args, d_vae)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    @classmethod
    def _from_args(cls, args: dict, d_vae: int | None) -> InfinityConfig:
        for key in ("all_constructor_arguments", "constructor_kwargs"):
            if key in args:
                if not isinstance(args[key], dict):
                    raise ValueError(f"{key} must be a JSON object, got {type(args[key]).__name__}")
                args = {**args, **args[key]}
        if isinstance(args.get("model_type"), str) and args["model_type"] in PRESETS:
            return PRESETS[args["model_type"]]
        patchify = args.get("apply_spatial_patchify", 0)
        if patchify not in (0, 1) or isinstance(patchify, float):
            raise ValueError(f"apply_spatial_patchify={patchify!r} is invalid: it must be 0, 1, true or false")
        derived = args.get("derived") if isinstance(args.get("derived"), dict) else {}
        d = d_vae or args.get("d_vae") or derived.get("d_vae") or (56 if patchify else 32)
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in args.items() if k in known}
        return cls(**{**kw, "d_vae": d, "spatial_patchify": bool(patchify)})

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, InfinityConfig] = {
    # 2,204,564,032 parameters (bf16 checkpoint ~4.4 GB)
    "infinity-2b": InfinityConfig(depth=32, embed_dim=2048, num_heads=16),
    # 8,375,791,824 parameters (bf16 shards ~16.8 GB)
    "infinity-8b": InfinityConfig(depth=40, embed_dim=3584, num_heads=28, d_vae=56, spatial_patchify=True),
}


# --------------------------------------------------------------------------------------------------
# Reading config files
# --------------------------------------------------------------------------------------------------
class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or does not fit the model it is loaded into."""


def require_file(path: Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{what} not found: {path} (check the path, or run `minivar download MODEL`)")
    return path


def read_json_object(path: Path, what: str) -> dict:
    """A JSON file that must hold one object (a config): anything else is a CheckpointError naming the file."""
    path = require_file(Path(path), what)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{what} {path} is not valid JSON ({' '.join(str(e).split())[:160]})") from None
    except OSError as e:
        raise CheckpointError(f"{what} {path} cannot be read ({e.strerror or e})") from None
    if not isinstance(obj, dict):
        kind = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(obj), "null")
        raise CheckpointError(f"{what} {path} holds a JSON {kind}, not an object of settings")
    return obj
