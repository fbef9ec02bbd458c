"""The procedural scenes and the mini-GenEval checker (no model involved)."""
import random
from dataclasses import replace

import numpy as np
import pytest

from minivar.toy import scenes
from minivar.toy.geneval import accuracy, check, detect
from minivar.toy.scenes import CATEGORIES, PALETTE, RELATIONS, SHAPES, Group, Obj, Scene, Spec

RES = 64  # the toy model's resolution


@pytest.fixture(scope="module")
def rendered():
    """The fixed prompt set, each rendered as a ground-truth scene."""
    specs = scenes.eval_specs(200)
    rng = random.Random(7)
    return specs, [scenes.render(scenes.make_scene(s, rng), RES) for s in specs]


def test_specs_are_deterministic_and_balanced():
    a, b = scenes.eval_specs(200), scenes.eval_specs(200)
    assert [s.caption for s in a] == [s.caption for s in b]
    assert {c: sum(s.category == c for s in a) for c in CATEGORIES} == dict.fromkeys(CATEGORIES, 40)
    assert len({s.caption for s in a}) > 150  # mostly distinct prompts


def test_captions_read_like_the_grammar():
    spec = Spec((Group("circle", 2, "red"), Group("square", 1, "blue")), "above", "white", "position")
    assert spec.caption == "two red circles above a blue square on a white background"
    spec = Spec((Group("triangle", 1, "orange", "big"),), None, "orange", "single_object")
    assert spec.caption == "a big orange triangle on an orange background"
    spec = Spec((Group("diamond"), Group("circle")), None, None, "two_objects")
    assert spec.caption == "a diamond and a circle"


@pytest.mark.parametrize("layout", scenes.LAYOUTS)
def test_scenes_honour_their_spec(layout):
    rng = random.Random(3)
    for _ in range(300):
        spec = scenes.random_spec(rng)
        scene = scenes.make_scene(spec, rng, layout)
        assert len(scene.objects) == spec.n_objects
        for i, a in enumerate(scene.objects):  # no overlaps, and the relation holds between groups
            assert all(scenes._apart(a, b) and scenes._related(a, b, spec.relation) for b in scene.objects[:i])
        assert scene.background not in {o.colour for o in scene.objects}
        assert spec.background in (None, scene.background)
        for o in scene.objects:
            g = spec.groups[o.group]
            assert o.shape == g.shape and g.colour in (None, o.colour)
            assert scenes.MARGIN <= o.cx - o.side / 2 and o.cx + o.side / 2 <= 1 - scenes.MARGIN
            edges = np.array([o.cx - o.side / 2, o.cy - o.side / 2, o.side]) * scenes.GRID  # on grid lines
            assert np.allclose(edges, edges.round()) and o.side in scenes.SIZES.values()


def test_canonical_layout_follows_from_the_caption():
    """Only the colours a caption leaves open vary between draws; everything else is fixed by it."""
    rng = random.Random(5)
    for _ in range(2000):
        spec = scenes.random_spec(rng)
        a, b = (scenes.make_scene(spec, random.Random(seed), "canonical") for seed in (1, 2))
        for i, o in enumerate(a.objects):  # no overlaps, the relation holds, inside the margins
            assert all(scenes._apart(o, p) and scenes._related(o, p, spec.relation) for p in a.objects[:i])
            assert scenes.MARGIN <= o.cx - o.side / 2 and o.cx + o.side / 2 <= 1 - scenes.MARGIN
        assert [(o.shape, o.side, o.cx, o.cy) for o in a.objects] == [(o.shape, o.side, o.cx, o.cy) for o in b.objects]
        assert a.background == b.background == (spec.background or a.background)
        if not any(g.size for g in spec.groups):
            assert {o.side for o in a.objects} == {scenes.SIZES["medium"]}
    spec = Spec((Group("circle", 1, "red"), Group("square", 1, "blue")), "above", None, "position")
    top, bottom = scenes.make_scene(spec, random.Random(0), "canonical").objects
    assert top.cy < 0.5 < bottom.cy and top.cx == bottom.cx == 0.5 - 0.5 / scenes.GRID
    with pytest.raises(ValueError, match="unknown layout"):
        scenes.make_scene(spec, random.Random(0), "grid")


def test_checker_accepts_canonical_scenes():
    specs = scenes.eval_specs(200)
    images = [scenes.render(scenes.make_scene(s, random.Random(i), "canonical"), RES) for i, s in enumerate(specs)]
    assert accuracy(specs, [check(s, im) for s, im in zip(specs, images)])["overall"] >= 0.98


def test_render_is_antialiased_and_deterministic():
    spec = Spec((Group("circle", 1, "red", "big"),), None, "white")
    img1 = np.asarray(scenes.render(scenes.make_scene(spec, random.Random(1)), RES))
    img2 = np.asarray(scenes.render(scenes.make_scene(spec, random.Random(1)), RES))
    assert img1.shape == (RES, RES, 3) and np.array_equal(img1, img2)
    colours = {tuple(c) for c in img1.reshape(-1, 3)}
    assert {PALETTE["red"], PALETTE["white"]} <= colours and len(colours) > 3  # blended edge pixels


def test_detect_one_object_of_each_shape():
    for shape in SHAPES:
        scene = Scene(Spec((Group(shape),)), "black", [Obj(shape, "yellow", 0.32, 0.4, 0.6)])
        bg, objects = detect(scenes.render(scene, RES))
        assert bg == "black" and len(objects) == 1
        o = objects[0]
        assert (o.shape, o.colour, o.size) == (shape, "yellow", "medium")
        assert abs(o.cx - 0.4) < 0.01 and abs(o.cy - (0.6 if shape != "triangle" else 0.6 + 0.32 / 6)) < 0.01


def test_checker_passes_ground_truth(rendered):
    specs, images = rendered
    scores = accuracy(specs, [check(s, im) for s, im in zip(specs, images)])
    assert scores["overall"] >= 0.98
    assert min(scores[c] for c in CATEGORIES) >= 0.95


def _mismatch(spec: Spec, rng: random.Random) -> Spec:
    """A caption that the scene of `spec` contradicts: another shape, colour, count or relation."""
    g = spec.groups[0]
    if spec.relation:
        opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
        return replace(spec, relation=opposite[spec.relation])
    if g.count > 1:
        return replace(spec, groups=(replace(g, count=5 - g.count),) + spec.groups[1:])
    if g.colour and rng.random() < 0.5:
        taken = {x.colour for x in spec.groups} | {spec.background}
        return replace(spec, groups=(replace(g, colour=rng.choice([c for c in PALETTE if c not in taken])),) + spec.groups[1:])
    others = [s for s in SHAPES if s not in {x.shape for x in spec.groups}]
    return replace(spec, groups=(replace(g, shape=rng.choice(others)),) + spec.groups[1:])


def test_checker_fails_mismatched_captions(rendered):
    specs, images = rendered
    rng = random.Random(0)
    verdicts = [check(_mismatch(s, rng), im) for s, im in zip(specs, images)]
    assert sum(v.ok for v in verdicts) == 0
    assert all(v.reasons for v in verdicts)


def test_checker_fails_wrong_background_and_extra_objects():
    spec = Spec((Group("square", 1, "green"),), None, "white")
    scene = scenes.make_scene(spec, random.Random(2))
    assert check(spec, scenes.render(scene, RES)).ok
    assert not check(replace(spec, background="black"), scenes.render(scene, RES)).ok
    scene.objects.append(Obj("circle", "blue", 0.1, 0.1, 0.1) if scene.objects[0].cx > 0.3 else Obj("circle", "blue", 0.1, 0.9, 0.9))
    verdict = check(spec, scenes.render(scene, RES))
    assert not verdict.ok and "2 objects instead of 1" in verdict.reasons


def test_checker_on_blank_and_noise_images():
    blank = np.full((RES, RES, 3), 245, np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (RES, RES, 3), dtype=np.uint8)
    spec = Spec((Group("circle", 1, "red"),))
    assert not check(spec, blank).ok and not check(spec, noise).ok


@pytest.mark.parametrize("relation", RELATIONS)
def test_relations_follow_centroids(relation):
    spec = Spec((Group("circle", 1, "red"), Group("square", 1, "blue")), relation, None, "position")
    scene = scenes.make_scene(spec, random.Random(11))
    assert check(spec, scenes.render(scene, RES)).ok
    for other in set(RELATIONS) - {relation}:
        main, _ = scenes.relation_offsets(*(scene.objects[0].cx, scene.objects[0].cy),
                                          *(scene.objects[1].cx, scene.objects[1].cy), other)
        assert check(replace(spec, relation=other), scenes.render(scene, RES)).ok == (main > 0.02)
