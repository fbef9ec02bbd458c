"""A procedural world of captioned flat shapes: the toy model's training data and its evaluation.

A *spec* is what a caption says: one or two groups of objects (count, shape, and optionally colour
and size), an optional spatial relation between the groups, and an optional background colour. A
*scene* makes a spec concrete: it picks whatever the caption leaves open (colours, sizes, the
background) and places every object: at random, or in the "canonical" layout that the toy's
transformer learns from, where positions, unnamed sizes and an unnamed background follow from the
caption. Rendering draws the scene with PIL, anti-aliased by drawing at 4x and downsampling.

    rng = random.Random(0)
    spec = random_spec(rng)             # Spec: two red circles above a blue square ...
    scene = make_scene(spec, rng)       # Scene: background + objects with positions
    image = render(scene, 128)          # PIL RGB image
    spec.caption                        # "two red circles above a blue square on a white background"

Everything is deterministic given the seed of the `random.Random` that drives it, and nothing is
downloaded. geneval.py checks generated images against the spec that produced the prompt.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

# Named colours, far apart in RGB so that a pixel's nearest colour is unambiguous.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35), "orange": (250, 145, 20), "yellow": (245, 225, 40), "green": (35, 165, 65),
    "blue": (35, 75, 225), "purple": (145, 50, 195), "white": (245, 245, 245), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")
# Objects sit on a GRID x GRID lattice of the image: their bounding boxes start and end on grid
# lines. The lattice is the toy's final 16 x 16 token grid (4 x 4 pixels per token at 64 px), so every
# token sees one of a few edge patterns, and the fine scale's bits follow from the coarse layout
# instead of from sub-token positions that a 1 M-parameter transformer cannot pin down (with free
# positions it rounds every corner off).
GRID = 16
# Side of an object's bounding box, in grid cells. Even a small object spans four tokens of the
# toy's final 16 x 16 grid: fewer, and its corners are lost in the VAE.
SIZE_CELLS: dict[str, int] = {"small": 4, "medium": 5, "big": 6}
SIZES: dict[str, float] = {name: cells / GRID for name, cells in SIZE_CELLS.items()}  # fractions of the side
RELATIONS = ("left of", "right of", "above", "below")
# Where a lone object may be said to sit ("a red circle at the left"): training captions only, which teach
# the transformer's coarse scales where left and right are (docs/toy/experiments.md, comparison 19)
PLACEMENTS = ("left", "right", "top", "bottom")
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
CATEGORIES = ("single_object", "colour", "counting", "position", "two_objects")
MARGIN = 1 / GRID  # free border around the image, as a fraction of its side
GAP = 1 / GRID     # minimum free space between two objects' bounding boxes


# --------------------------------------------------------------------------------------------------
# Specs: what a caption says
# --------------------------------------------------------------------------------------------------
def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class Group:
    """`count` objects of one shape; colour and size are None when the caption leaves them open."""
    shape: str
    count: int = 1
    colour: str | None = None
    size: str | None = None

    @property
    def phrase(self) -> str:
        words = [w for w in (self.size, self.colour) if w] + [self.shape + ("s" if self.count > 1 else "")]
        return " ".join([COUNT_WORDS[self.count] if self.count > 1 else article(words[0]), *words])


@dataclass(frozen=True)
class Spec:
    groups: tuple[Group, ...]
    relation: str | None = None     # how groups[0] sits relative to groups[1]; None means "and"
    background: str | None = None
    category: str = "single_object"
    placement: str | None = None    # one of PLACEMENTS, for a spec of one object

    @property
    def caption(self) -> str:
        text = self.groups[0].phrase
        if len(self.groups) == 2:
            text += f" {self.relation or 'and'} {self.groups[1].phrase}"
        if self.placement:
            text += f" at the {self.placement}"
        if self.background:
            text += f" on {article(self.background)} {self.background} background"
        return text

    @property
    def n_objects(self) -> int:
        return sum(g.count for g in self.groups)


def _pick(rng: random.Random, options, p_none: float = 0.0):
    return None if rng.random() < p_none else rng.choice(list(options))


def random_spec(rng: random.Random, category: str | None = None, p_open: float = 0.3) -> Spec:
    """A random spec of `category` (random if None). Training leaves attributes open with
    probability `p_open`; evaluation uses p_open=0 for the attributes its category is about."""
    category = category or rng.choice(CATEGORIES)
    colours, shapes = list(PALETTE), list(SHAPES)
    size = lambda: _pick(rng, SIZES, p_none=1 - p_open)  # noqa: E731  sizes are mentioned sparingly
    if category == "single_object":
        groups = (Group(rng.choice(shapes), 1, _pick(rng, colours, p_open / 2), size()),)
    elif category == "counting":
        groups = (Group(rng.choice(shapes), rng.choice([2, 3]), _pick(rng, colours, p_open), size()),)
    elif category == "colour":  # colour attribution: two objects, each colour bound to its shape
        c1, c2 = rng.sample(colours, 2)
        groups = (Group(rng.choice(shapes), 1, c1, size()), Group(rng.choice(shapes), 1, c2, size()))
    elif category == "two_objects":
        s1, s2 = rng.sample(shapes, 2)
        groups = (Group(s1, 1, _pick(rng, colours, 1 - p_open)), Group(s2, 1, _pick(rng, colours, 1 - p_open)))
    elif category == "position":
        groups = _position_groups(rng, colours, shapes, p_open)
    else:
        raise ValueError(f"unknown category {category!r}: choose one of {CATEGORIES}")
    relation = rng.choice(RELATIONS) if category == "position" else None
    return _with_background(Spec(groups, relation, None, category), rng, p_open)


def placed_spec(rng: random.Random, p_open: float = 0.3) -> Spec:
    """One object said to sit at one side of the picture: "a big red circle at the left"."""
    group = Group(rng.choice(SHAPES), 1, _pick(rng, list(PALETTE), p_open / 2), _pick(rng, SIZES, p_none=1 - p_open))
    spec = _with_background(Spec((group,), None, None, "single_object"), rng, p_open)
    return Spec(spec.groups, None, spec.background, spec.category, rng.choice(PLACEMENTS))


def _position_groups(rng: random.Random, colours, shapes, p_open: float) -> tuple[Group, Group]:
    """Two groups that a reader can tell apart: different shapes, or the same shape in two colours."""
    counts = rng.choice([(1, 1)] * 3 + [(2, 1), (1, 2)]) if p_open else (1, 1)
    c1, c2 = rng.sample(colours, 2)
    s1, s2 = rng.choice(shapes), rng.choice(shapes)
    open1, open2 = rng.random() < p_open, rng.random() < p_open
    if s1 == s2:
        open1 = open2 = False
    return (Group(s1, counts[0], None if open1 else c1), Group(s2, counts[1], None if open2 else c2))


def _with_background(spec: Spec, rng: random.Random, p_open: float) -> Spec:
    """Name a background colour (one that no object is said to have) about half of the time."""
    if rng.random() < max(p_open, 0.5):
        return spec
    used = {g.colour for g in spec.groups}
    return Spec(spec.groups, spec.relation, rng.choice([c for c in PALETTE if c not in used]), spec.category,
                spec.placement)


def eval_specs(n: int = 200, seed: int = 1234) -> list[Spec]:
    """The fixed mini-GenEval prompt set: n specs, balanced over CATEGORIES, no open attributes
    except the colours of `two_objects` (as GenEval, it asks about shapes only)."""
    rng = random.Random(seed)
    return [random_spec(rng, CATEGORIES[i % len(CATEGORIES)], p_open=0.0) for i in range(n)]


# --------------------------------------------------------------------------------------------------
# Scenes: a spec made concrete
# --------------------------------------------------------------------------------------------------
@dataclass
class Obj:
    shape: str
    colour: str
    side: float     # bounding-box side, fraction of the image side
    cx: float       # centre, fractions of the image side (y grows downwards)
    cy: float
    group: int = 0


@dataclass
class Scene:
    spec: Spec
    background: str
    objects: list[Obj] = field(default_factory=list)


LAYOUTS = ("random", "canonical")


def make_scene(spec: Spec, rng: random.Random, layout: str = "random", max_tries: int = 200) -> Scene:
    """Fill in open attributes and place the objects so that none overlap and the relation holds.

    layout="random" picks every open attribute and position at random. layout="canonical" makes the
    picture a function of the caption except for the object colours it leaves open: objects go to
    fixed slots (`_place_canonical`), an unnamed size is medium and an unnamed background is white
    (black if an object is said to be white).

    Why canonical layouts exist: a VAR model samples all bits of one scale independently given the
    scales before it, so the coarse scales (1x1 ... 8x8) must commit to one layout. When a caption
    allows many layouts, each token's bits average over them and the picture comes out as blobs
    that merge, split or vanish; when the caption fixes the layout, the coarse scales have one
    answer to learn. The only global choice left open, an unnamed colour, is made once by the 1x1
    scale. The checker (geneval.py) judges colour, shape, count and the relation of centroids, never
    exact positions, so it scores both layouts alike."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: choose one of {LAYOUTS}")
    named = {g.colour for g in spec.groups}
    if spec.background:
        background = spec.background
    elif layout == "canonical":
        background = next(c for c in ("white", "black", *PALETTE) if c not in named)
    else:
        background = rng.choice([c for c in PALETTE if c not in named])
    free = [c for c in PALETTE if c != background]
    for _ in range(max_tries):
        objects = []
        for gi, g in enumerate(spec.groups):
            colour = g.colour or rng.choice(free)
            for _ in range(g.count):
                size = g.size or ("medium" if layout == "canonical" else rng.choice(list(SIZES)))
                objects.append(Obj(g.shape, colour, SIZES[size], 0.0, 0.0, gi))
        if layout == "canonical":
            _place_canonical(objects, spec.relation, spec.placement)
            return Scene(spec, background, objects)
        if _place(objects, spec.relation, rng, placement=spec.placement):
            return Scene(spec, background, objects)
    raise RuntimeError(f"could not lay out {spec.caption!r}")


PLACED_SLOTS = {"left": ("lo", "mid"), "right": ("hi", "mid"), "top": ("mid", "lo"), "bottom": ("mid", "hi")}


def _place_canonical(objects: list[Obj], relation: str | None, placement: str | None = None) -> None:
    """Fixed slots on each axis: "lo" ends one cell before the middle line, "hi" starts one cell after
    it, "mid" is centred. One group: 1 object in the middle, 2 side by side, 3 as two over one (a row
    of three medium objects needs 15 cells plus two gaps, more than the 14 inside the margins). Two
    groups: each takes a half (left/right, or top/bottom for above/below) in caption order unless
    the relation says otherwise, and a group of two splits its half across the other axis."""
    def start(slot: str, cells: int) -> int:
        return {"lo": GRID // 2 - 1 - cells, "hi": GRID // 2 + 1, "mid": (GRID - cells) // 2}[slot]

    groups = [[o for o in objects if o.group == gi] for gi in sorted({o.group for o in objects})]
    if placement:
        slots = [PLACED_SLOTS[placement]]
    elif len(groups) == 1:
        slots = {1: [("mid", "mid")], 2: [("lo", "mid"), ("hi", "mid")],
                 3: [("lo", "lo"), ("hi", "lo"), ("mid", "hi")]}[len(objects)]
    else:
        first = "hi" if relation in ("right of", "below") else "lo"
        halves = (first, "hi" if first == "lo" else "lo")
        across = {1: ["mid"], 2: ["lo", "hi"]}
        slots = [(half, other) for half, g in zip(halves, groups) for other in across[len(g)]]
        if relation in ("above", "below"):
            slots = [(y, x) for x, y in slots]
    for o, (sx, sy) in zip([o for g in groups for o in g], slots):
        cells = round(o.side * GRID)
        o.cx, o.cy = (start(sx, cells) + cells / 2) / GRID, (start(sy, cells) + cells / 2) / GRID


def _place(objects: list[Obj], relation: str | None, rng: random.Random, tries: int = 100,
           placement: str | None = None) -> bool:
    """Drop objects one by one at random free grid positions; retry the whole layout if one does not fit."""
    margin = round(MARGIN * GRID)
    for _ in range(tries):
        ok = True
        for i, o in enumerate(objects):
            cells = round(o.side * GRID)
            for _ in range(50):  # the box's first row and column, in cells, then its centre
                left, top = (rng.randint(margin, GRID - margin - cells) for _ in range(2))
                o.cx, o.cy = (left + cells / 2) / GRID, (top + cells / 2) / GRID
                if all(_apart(o, p) and _related(o, p, relation) for p in objects[:i]) and placed(o.cx, o.cy, placement):
                    break
            else:
                ok = False
                break
        if ok:
            return True
    return False


def _apart(a: Obj, b: Obj) -> bool:
    reach = (a.side + b.side) / 2 + GAP - 1e-9  # grid positions: exactly GAP apart is apart
    return abs(a.cx - b.cx) >= reach or abs(a.cy - b.cy) >= reach


def _related(a: Obj, b: Obj, relation: str | None) -> bool:
    """Objects of different groups obey the relation with a clear margin along a dominant axis."""
    if relation is None or a.group == b.group:
        return True
    first, second = (a, b) if a.group == 0 else (b, a)
    main, cross = relation_offsets(first.cx, first.cy, second.cx, second.cy, relation)
    return main > 0.12 and main > abs(cross)


def placed(cx: float, cy: float, placement: str | None) -> bool:
    """Whether a centre (fractions of the side) lies clearly on the named side of the picture (any, for None)."""
    if placement is None:
        return True
    return {"left": 0.5 - cx, "right": cx - 0.5, "top": 0.5 - cy, "bottom": cy - 0.5}[placement] > 0.12


def relation_offsets(ax: float, ay: float, bx: float, by: float, relation: str) -> tuple[float, float]:
    """(offset along the relation's axis, positive when it holds; offset across it) for A rel B."""
    dx, dy = bx - ax, by - ay  # from A to B
    return {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------
SUPERSAMPLE = 4


def shape_polygon(shape: str, cx: float, cy: float, side: float) -> list[tuple[float, float]] | None:
    """Vertices of a polygonal shape filling a side x side box centred at (cx, cy); None for a circle."""
    h = side / 2
    if shape == "square":
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":  # pointing up, base at the bottom of the box
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        return [(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)]
    return None


def render(scene: Scene, res: int = 128) -> Image.Image:
    """Draw the scene at res x res pixels, anti-aliased (drawn at 4x, then box-filtered down)."""
    big = res * SUPERSAMPLE
    img = Image.new("RGB", (big, big), PALETTE[scene.background])
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        cx, cy, side = o.cx * big, o.cy * big, o.side * big
        poly = shape_polygon(o.shape, cx, cy, side)
        if poly is None:
            draw.ellipse([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], fill=PALETTE[o.colour])
        else:
            draw.polygon(poly, fill=PALETTE[o.colour])
    return img.resize((res, res), Image.Resampling.BOX)


def batch(rng: random.Random, n: int, res: int = 128, layout: str = "random",
          mix: tuple[float, ...] = (), placed_share: float = 0.0) -> tuple[list[str], np.ndarray]:
    """n random captioned scenes: (captions, uint8 images (n, res, res, 3)).

    `mix` weighs the CATEGORIES (one weight each); empty means equal odds. A share `placed_share` of the
    scenes are `placed_spec`s instead. With the defaults the scenes are drawn exactly as before either
    existed, so older recipes make the same scenes."""
    captions, images = [], []
    for _ in range(n):
        if placed_share and rng.random() < placed_share:
            spec = placed_spec(rng)
        else:
            spec = random_spec(rng, rng.choices(CATEGORIES, weights=mix)[0] if mix else None)
        captions.append(spec.caption)
        images.append(np.asarray(render(make_scene(spec, rng, layout), res)))
    return captions, np.stack(images)
