"""mini-GenEval: score generated images against the scene spec that produced their prompt.

The checker is analytic, no learned detector: every pixel takes its nearest palette colour (if one
is close enough), the most common colour is the background, and each connected blob of another
colour is an object. A blob's shape is the template (circle, square, triangle, diamond) that best
overlaps it inside its bounding box; its size is its bounding-box side. A prompt passes when the
image shows exactly the objects the spec asks for: every group with its count (and colour and size
when the caption names them), no extra objects, the named background, and the relation between the
groups' centroids.

    python -m minivar.toy.eval --n 200 --json scores.json        # the shipped toy, unpruned
    python -m minivar.toy.eval --prune                           # with the toy pruning preset
    python -m minivar.toy.eval --prune stagevar                  # prune=True + projection + refinement CFG stop
    python -m minivar.toy.eval --prune --against scores.json     # ... and its difference to the first run

Categories follow GenEval's: single object (colour + shape), colour attribution (two objects, each
with its colour), counting, position, and two objects (shapes only). The overall score is the mean
of the category scores. The CLI also reports the VAE's reconstruction PSNR on held-out scenes and
the numerics the model ran in (scores differ a little between bf16 and fp32). `--against` pairs two
runs prompt by prompt (same --n, --seed and --batch): the difference's standard error then comes from
the prompts whose verdict changed (`paired_gap`), about half of either score's own.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from .scenes import CATEGORIES, PALETTE, SIZES, Spec, eval_specs, make_scene, placed, relation_offsets, render

COLOUR_NAMES = list(PALETTE)
COLOUR_RGB = np.array([PALETTE[c] for c in COLOUR_NAMES], dtype=np.float32)  # (P, 3)
MAX_COLOUR_DIST = 80.0     # farther than this from every palette colour: no colour (edges, artefacts)
MIN_AREA = 0.005           # smallest object, fraction of the image area (a small triangle is ~0.016)
MIN_SHAPE_IOU = 0.6        # a blob that fits no template this well has no shape
MAX_ASPECT = 1.5           # every shape of the world has a square bounding box; merged blobs do not
RELATION_MARGIN = 0.02     # centroids must differ by this fraction of the side along the relation


# --------------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------------
@dataclass
class Detected:
    colour: str
    shape: str          # one of SHAPES, or "unknown"
    size: str           # one of SIZES
    cx: float           # centroid, fractions of the image side
    cy: float
    area: float         # fraction of the image area
    iou: float          # overlap with the best shape template


def colour_labels(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) index of the nearest palette colour, -1 where none is close."""
    dist = np.linalg.norm(rgb[:, :, None, :].astype(np.float32) - COLOUR_RGB, axis=-1)  # (H, W, P)
    labels = dist.argmin(-1)
    labels[dist.min(-1) > MAX_COLOUR_DIST] = -1
    return labels


def shape_templates(h: int, w: int) -> dict[str, np.ndarray]:
    """Each shape drawn to fill an h x w box (pixel centres), as boolean masks (h, w)."""
    v, u = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
    return {
        "circle": (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25,
        "square": np.ones((h, w), bool),
        "triangle": np.abs(u - 0.5) <= v / 2,           # apex at the top, base at the bottom
        "diamond": np.abs(u - 0.5) + np.abs(v - 0.5) <= 0.5,
    }


def classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """The template that best overlaps a blob cropped to its bounding box: (shape, IoU)."""
    h, w = mask.shape
    if max(h, w) > MAX_ASPECT * min(h, w):
        return "unknown", 0.0
    ious = {name: (mask & t).sum() / (mask | t).sum() for name, t in shape_templates(h, w).items()}
    best = max(ious, key=ious.get)
    return (best if ious[best] >= MIN_SHAPE_IOU else "unknown"), float(ious[best])


def size_name(side: float) -> str:
    """The size word whose nominal side is nearest to `side` (fraction of the image side)."""
    return min(SIZES, key=lambda s: abs(SIZES[s] - side))


def detect(image: Image.Image | np.ndarray) -> tuple[str | None, list[Detected]]:
    """Background colour name and the objects of an image."""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    H, W = rgb.shape[:2]
    labels = colour_labels(rgb)
    counts = np.bincount(labels[labels >= 0], minlength=len(COLOUR_NAMES))
    if counts.sum() == 0:
        return None, []
    bg = int(counts.argmax())
    objects = []
    for ci, name in enumerate(COLOUR_NAMES):
        if ci != bg and counts[ci] >= MIN_AREA * H * W:
            objects += _blobs(labels == ci, name, H, W)
    return COLOUR_NAMES[bg], objects


def _blobs(mask: np.ndarray, colour: str, H: int, W: int) -> list[Detected]:
    """The objects of one colour: its connected blobs that are not thin rims.

    Anti-aliased edges between two colours leave rims of in-between colours (red on blue edges look
    purple). A morphological opening erases such rims but would also blunt the tips of triangles and
    diamonds, so it only decides which blobs count; each blob is then measured unopened.
    """
    blobs = label_components(mask)
    solid = dilate(erode(mask))          # a 3x3 opening
    out = []
    for k, sl in enumerate(bounding_boxes(blobs), start=1):
        crop = blobs[sl] == k
        if (crop & solid[sl]).sum() >= MIN_AREA * H * W:
            out.append(_measure(crop, sl, colour, H, W))
    return out


# Share of its bounding box each shape fills: turns a blob's area into its side, robustly to
# anti-aliased tips that a bounding box would lose.
FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5, "unknown": 1.0}


def _measure(crop: np.ndarray, sl: tuple[slice, slice], colour: str, H: int, W: int) -> Detected:
    ys, xs = np.nonzero(crop)
    shape, iou = classify_shape(crop)
    area = crop.sum() / (H * W)
    return Detected(colour, shape, size_name(np.sqrt(area / FILL[shape])), (sl[1].start + xs.mean() + 0.5) / W,
                    (sl[0].start + ys.mean() + 0.5) / H, float(area), iou)


# --------------------------------------------------------------------------------------------------
# Binary morphology in numpy (3x3 neighbourhoods; outside the image counts as background)
# --------------------------------------------------------------------------------------------------
def _neighbours(mask: np.ndarray, reduce, cross: bool) -> np.ndarray:
    """Combine every pixel with its 4 (cross) or 8 neighbours using reduce (np.minimum / np.maximum)."""
    H, W = mask.shape
    p = np.pad(mask, 1)
    out = mask.copy()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if (dy, dx) != (0, 0) and not (cross and dy and dx):
                out = reduce(out, p[1 + dy : 1 + dy + H, 1 + dx : 1 + dx + W])
    return out


def erode(mask: np.ndarray) -> np.ndarray:
    return _neighbours(mask, np.minimum, cross=False)


def dilate(mask: np.ndarray) -> np.ndarray:
    return _neighbours(mask, np.maximum, cross=False)


def label_components(mask: np.ndarray) -> np.ndarray:
    """4-connected components of a boolean mask: (H, W) int, 0 outside, 1..n inside (in scan order).

    Every pixel starts with its own number and repeatedly takes the largest number among its
    4-neighbours inside the mask until nothing changes; then the numbers are made consecutive.
    """
    ids = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while True:
        nxt = np.where(mask, _neighbours(ids, np.maximum, cross=True), 0)
        if np.array_equal(nxt, ids):
            break
        ids = nxt
    values, first = np.unique(ids[mask], return_index=True)  # each component's number and first pixel
    rank = np.empty(len(values), dtype=ids.dtype)
    rank[np.argsort(first)] = np.arange(1, len(values) + 1)   # 1..n in scan order of first pixels
    out = np.zeros_like(ids)
    out[mask] = rank[np.searchsorted(values, ids[mask])]
    return out


def bounding_boxes(labels: np.ndarray) -> list[tuple[slice, slice]]:
    """(rows, cols) slices of each component 1..n of label_components' output, in one pass over the
    labelled pixels (not one pass per component: noisy large images have thousands)."""
    n = int(labels.max())
    ys, xs = np.nonzero(labels)
    k = labels[ys, xs] - 1
    lo_y, lo_x = np.full(n, labels.shape[0]), np.full(n, labels.shape[1])
    hi_y, hi_x = np.full(n, -1), np.full(n, -1)
    np.minimum.at(lo_y, k, ys), np.minimum.at(lo_x, k, xs)
    np.maximum.at(hi_y, k, ys), np.maximum.at(hi_x, k, xs)
    return [(slice(a, b + 1), slice(c, d + 1)) for a, b, c, d in zip(lo_y, hi_y, lo_x, hi_x)]


# --------------------------------------------------------------------------------------------------
# Checking a spec
# --------------------------------------------------------------------------------------------------
@dataclass
class Verdict:
    ok: bool
    reasons: list[str] = field(default_factory=list)   # why it failed (empty when ok)
    objects: list[Detected] = field(default_factory=list)


def check(spec: Spec, image: Image.Image | np.ndarray) -> Verdict:
    """Does the image show exactly what the spec's caption asks for?"""
    background, objects = detect(image)
    reasons = []
    if spec.background and background != spec.background:
        reasons.append(f"background is {background}, not {spec.background}")
    matches = []
    for g in spec.groups:
        found = [o for o in objects if o.shape == g.shape and g.colour in (None, o.colour)
                 and g.size in (None, o.size)]
        if len(found) != g.count:
            reasons.append(f"{len(found)} x '{g.phrase}' instead of {g.count}")
        matches.append(found)
    if len(objects) != spec.n_objects:
        reasons.append(f"{len(objects)} objects instead of {spec.n_objects}")
    if spec.relation and not _relation_holds(matches[0], matches[1], spec.relation):
        reasons.append(f"not '{spec.relation}'")
    if spec.placement and not all(placed(o.cx, o.cy, spec.placement) for o in matches[0]):
        reasons.append(f"not at the {spec.placement}")
    return Verdict(not reasons, reasons, objects)


def _relation_holds(first: list[Detected], second: list[Detected], relation: str) -> bool:
    """Every object of the first group is on the named side of every object of the second."""
    if not first or not second:
        return False
    return all(relation_offsets(a.cx, a.cy, b.cx, b.cy, relation)[0] > RELATION_MARGIN
               for a in first for b in second)


def accuracy(specs: list[Spec], verdicts: list[Verdict]) -> dict[str, float]:
    """Per-category accuracy and "overall", the mean over categories (GenEval's convention)."""
    per = defaultdict(list)
    for spec, v in zip(specs, verdicts):
        per[spec.category].append(v.ok)
    scores = {c: float(np.mean(per[c])) for c in CATEGORIES if per[c]}
    scores["overall"] = float(np.mean(list(scores.values())))
    return scores


def paired_gap(specs: list[Spec], before: list[bool], after: list[bool]) -> dict[str, tuple[float, float]]:
    """How far `after` scores from `before` on the same prompts and seeds: (after - before, its standard
    error) per category and "overall" (the mean over categories, as in `accuracy`).

    Two runs on the same prompts and seeds (a pruned one and the unpruned one, say) are paired: most images
    come out alike and most verdicts agree. The error is therefore the paired one, from the prompts whose
    verdict changed, and much smaller than either score's own (for the toy's prune=True at n 1000, about
    0.008 against 0.015). The categories' errors combine as independent.
    """
    diffs = defaultdict(list)
    for spec, a, b in zip(specs, before, after, strict=True):
        diffs[spec.category].append(float(b) - float(a))
    out = {}
    for c in (c for c in CATEGORIES if diffs[c]):
        d = np.array(diffs[c])
        out[c] = (float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0)
    out["overall"] = (float(np.mean([g for g, _ in out.values()])),
                      float(np.sqrt(sum(e * e for _, e in out.values()))) / len(out))
    return out


# --------------------------------------------------------------------------------------------------
# Scoring a pipeline
# --------------------------------------------------------------------------------------------------
def generate_all(pipe, specs: list[Spec], prune, batch: int = 8, seed: int = 0, **settings) -> tuple[list[Image.Image], dict]:
    """One image per spec, in fixed batches (batch i uses seed + i), and the pruning schedule used."""
    images, info = [], {}
    for i in range(0, len(specs), batch):
        out = pipe.generate([s.caption for s in specs[i : i + batch]], prune=prune, seed=seed + i // batch, **settings)
        images += out.images
        info = {"scales": out.scales, "prune": out.prune}
    return images, info


@torch.no_grad()
def recon_psnr(vae, scales: list[tuple[int, int]], n: int = 64, seed: int = 987_654, res: int = 128) -> float:
    """Mean PSNR (dB) of VAE round trips (encode, multi-scale bits, decode) of held-out scenes."""
    from .scenes import random_spec
    from ..model.vae import image_to_pixels, pixels_to_image

    rng = random.Random(seed)
    images = np.stack([np.asarray(render(make_scene(random_spec(rng), rng), res)) for _ in range(n)])
    psnrs = []
    for chunk in np.array_split(images, max(1, n // 16)):
        _, z, _, _ = vae.encode_to_bits(image_to_pixels(torch.from_numpy(chunk)), [(1, h, w) for h, w in scales])
        out = pixels_to_image(vae.decode(z)).numpy().astype(np.float64)
        mse = ((out - chunk.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
        psnrs += list(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10)))
    return float(np.mean(psnrs))


def cost(pipe, scales: list[tuple[int, int]], schedule, cfg_on: bool, text_tokens: int) -> dict:
    """Analytic transformer FLOPs (flops.py) and token-layer evaluations per image, for one schedule."""
    from ..bench.flops import summary, transformer_count

    counts = transformer_count(pipe.transformer.cfg, scales, schedule, cfg_on=cfg_on, text_tokens=text_tokens)
    return {"transformer_gflops": summary(counts)["transformer_flops"] / 1e9,
            "token_layers": sum(sum(sc.kept) for sc in counts),
            "scales_run": [list(sc.hw) for sc in counts]}


def evaluate(pipe, n: int = 200, prune=False, batch: int = 8, seed: int = 0, cfg: float = 3.0,
             tau: float = 0.5, psnr_scenes: int = 64) -> dict:
    """mini-GenEval of a pipeline on the toy world: scores, cost of the schedule and VAE PSNR."""
    from ..model.pruning import resolve_prune

    specs = eval_specs(n)
    t0 = time.perf_counter()
    images, info = generate_all(pipe, specs, prune, batch, seed, cfg=cfg, tau=tau)
    seconds = time.perf_counter() - t0
    verdicts = [check(s, im) for s, im in zip(specs, images)]
    scales, text_tokens = info["scales"], round(np.mean([len(pipe.tokenizer.encode(s.caption)) + 1 for s in specs]))
    dense = resolve_prune(False, pipe.transformer.cfg, scales)
    res = images[0].size[0]
    scores = accuracy(specs, verdicts)
    return {"overall": scores["overall"], "categories": scores,
            "n": n, "prune": info["prune"] != dense, "preset": prune_label(prune), "settings": {"cfg": cfg, "tau": tau, "batch": batch, "seed": seed},
            "numerics": pipe.numerics, "numerics_reason": pipe.numerics_reason,
            "passed": [v.ok for v in verdicts],  # per prompt, in eval_specs(n)'s order: what `paired_gap` pairs
            "cost": cost(pipe, scales, info["prune"], cfg != 1, text_tokens),
            "cost_unpruned": cost(pipe, scales, dense, cfg != 1, text_tokens),
            "generation_seconds": seconds, "recon_psnr_db": recon_psnr(pipe.vae, scales, psnr_scenes, res=res),
            "failures": [{"prompt": s.caption, "reasons": v.reasons} for s, v in zip(specs, verdicts) if not v.ok]}


def prune_label(prune) -> str:
    """How a `prune` argument reads in a report: off, on (prune=True), a preset word, or "schedule"."""
    if prune is None or prune is False:
        return "off"
    if prune is True:
        return "on"
    return prune if isinstance(prune, str) else "schedule"


def format_report(name: str, r: dict) -> str:
    cats = r["categories"]
    lines = [f"mini-GenEval  model={name}  prune={r.get('preset', 'on' if r['prune'] else 'off')}  n={r['n']}  "
             f"cfg={r['settings']['cfg']} tau={r['settings']['tau']}  numerics={r['numerics']}", "",
             "| category | accuracy |", "|---|---:|"]
    lines += [f"| {c} | {cats[c]:.3f} |" for c in CATEGORIES if c in cats]
    lines += [f"| **overall** | **{r['overall']:.3f}** |", ""]
    c, u = r["cost"], r["cost_unpruned"]
    lines.append(f"transformer GFLOP per image (CFG on): {c['transformer_gflops']:.3f}"
                 + (f"  (unpruned {u['transformer_gflops']:.3f}: {u['transformer_gflops'] / c['transformer_gflops']:.2f}x fewer)"
                    if r["prune"] else ""))
    lines.append(f"token-layer evaluations per image: {c['token_layers']}"
                 + (f" of {u['token_layers']} unpruned" if r["prune"] else ""))
    lines.append(f"VAE reconstruction PSNR on held-out scenes: {r['recon_psnr_db']:.2f} dB")
    lines.append(f"generation: {r['generation_seconds']:.1f} s for {r['n']} images")
    lines.append(f"numerics: {r['numerics']} ({r['numerics_reason']})")
    return "\n".join(lines)


def format_gap(gap: dict[str, tuple[float, float]], r: dict, base: dict, base_name: str) -> str:
    """`paired_gap` of run r against an earlier run `base` on the same prompts and seeds (`--against`)."""
    lost = sum(a and not b for a, b in zip(base["passed"], r["passed"]))
    gained = sum(b and not a for a, b in zip(base["passed"], r["passed"]))
    lines = [f"against {base_name} (prune={base.get('preset', '?')}, numerics={base.get('numerics', '?')}): "
             "this run minus that one, with the paired standard error", "",
             "| category | difference | s.e. |", "|---|---:|---:|"]
    lines += [f"| {c} | {g:+.3f} | {e:.3f} |" for c, (g, e) in gap.items() if c != "overall"]
    g, e = gap["overall"]
    lines += [f"| **overall** | **{g:+.3f}** | {e:.3f} |", "",
              f"{lost} prompts pass there and fail here, {gained} the other way round"]
    return "\n".join(lines)


def check_command_line(a: argparse.Namespace) -> None:
    """The eval command's own arguments (the model checks cfg and tau against its schedule when it samples)."""
    from ..pipeline import MAX_SEED, check_arguments

    if a.n < 1:
        raise ValueError(f"--n {a.n}: give 1 or more prompts (1000 for issue-grade scores: 200 a category)")
    if a.batch < 1:
        raise ValueError(f"--batch {a.batch}: give 1 or more images per generate call")
    last = (a.n - 1) // a.batch  # batch i is seeded seed + i
    if not 0 <= a.seed <= MAX_SEED - last:
        raise ValueError(f"--seed {a.seed}: batch i is seeded seed + i, so use 0..{MAX_SEED - last}")
    check_arguments(cfg=a.cfg, tau=a.tau)
    if a.json is not None:
        if a.json.is_dir():
            raise ValueError(f"--json {a.json} is a folder: give a file, e.g. {a.json / 'scores.json'}")
        if not a.json.parent.is_dir():
            raise ValueError(f"--json {a.json}: the folder {a.json.parent} does not exist; create it first")
        if not os.access(a.json.parent, os.W_OK):
            raise ValueError(f"--json {a.json}: the folder {a.json.parent} is not writable")


def load_against(path: Path, n: int, seed: int, batch: int) -> dict:
    """The earlier run that `--against` names, checked to pair with this one (same prompts, same seeds)."""
    try:
        base = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"--against {path}: no such file; write it first with --json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--against {path}: not a JSON file written by --json ({type(e).__name__}: {e})") from None
    if not (isinstance(base, dict) and isinstance(base.get("passed"), list) and isinstance(base.get("settings"), dict)):
        raise ValueError(f"--against {path}: it holds no per-prompt verdicts ('passed'); score that arm again "
                         "with --json from this version")
    theirs = (base.get("n"), base["settings"].get("seed"), base["settings"].get("batch"))
    if theirs != (n, seed, batch) or len(base["passed"]) != n:
        raise ValueError(f"--against {path}: it was scored with --n {theirs[0]} --seed {theirs[1]} --batch {theirs[2]}, "
                         f"this run with --n {n} --seed {seed} --batch {batch}; pairing needs the same three")
    return base


def per_scale(text: str) -> float | list[float]:
    """"0.5" -> 0.5; "0.1,0.1,0.5" -> [0.1, 0.1, 0.5] (one value per scale)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or a comma-separated list of numbers") from None
    return values[0] if len(values) == 1 else values


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m minivar.toy.eval", description="mini-GenEval on the toy world")
    p.add_argument("model", nargs="?", default="toy", help="model name or directory (default: toy)")
    p.add_argument("--prune", nargs="?", const=True, default=False, choices=[True, "fastvar", "stagevar"],
                   help="the model's pruning preset: --prune alone is prune=True; --prune stagevar adds StageVAR's "
                        "projection selector and refinement-stage CFG stop (default: off)")
    p.add_argument("--no-prune", dest="prune", action="store_const", const=False, help="no pruning (the default)")
    p.add_argument("--n", type=int, default=200, help="prompts, balanced over the categories (default: 200)")
    p.add_argument("--batch", type=int, default=8, help="images per generate call (default: 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first batch; batch i uses seed + i")
    p.add_argument("--cfg", type=per_scale, default=3.0, metavar="CFG[,CFG...]",
                   help="guidance scale, one value or one per scale (default: %(default)s)")
    p.add_argument("--tau", type=per_scale, default=0.5, metavar="TAU[,TAU...]",
                   help="temperature, one value or one per scale (default: %(default)s)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write scores and costs as JSON")
    p.add_argument("--against", type=Path, default=None, metavar="PATH",
                   help="the --json of an earlier run with the same --n, --seed and --batch (the unpruned one, say): "
                        "also print this run's difference to it per category, with the paired standard error")
    a = p.parse_args(argv)
    try:  # what the command line can get wrong, before minutes of sampling
        check_command_line(a)
        base = load_against(a.against, a.n, a.seed, a.batch) if a.against else None
    except ValueError as e:
        p.error(str(e))
    from ..cli import is_known, one_line
    from ..pipeline import load

    try:
        pipe = load(a.model)
        r = evaluate(pipe, a.n, a.prune, a.batch, a.seed, a.cfg, a.tau)
    except Exception as e:  # a bad model directory, or a per-scale list that does not fit its schedule
        if os.environ.get("MINIVAR_DEBUG") or not is_known(e):
            raise
        p.exit(2, f"{p.prog}: error: {one_line(e)}\n")
    print(format_report(a.model, r))
    if base is not None:
        gap = paired_gap(eval_specs(a.n), base["passed"], r["passed"])
        print("\n" + format_gap(gap, r, base, str(a.against)))
        r["against"] = {"path": str(a.against), **{c: {"difference": g, "se": e} for c, (g, e) in gap.items()}}
    if a.json:
        a.json.write_text(json.dumps(r, indent=1) + "\n")


if __name__ == "__main__":
    main()
