"""Is the toy's position score limited by layout or by colour? mini-GenEval's position prompts, asked three ways.

    python tools/toy_position_probe.py [MODEL] [--n 1000]

mini-GenEval names both groups' colours in a position prompt ("a yellow circle right of a purple square"),
so its position category also asks for colour binding; GenEval's position prompts name objects only. For
the position specs of `eval_specs(n)` whose two groups differ in shape (with the same shape, only the
colours tell the groups apart), this scores:

    colours named         mini-GenEval's prompts and checker
    colours not judged    the same images, checked without the colours
    colours open          prompts without colours ("a circle right of a square"), as GenEval asks

Results: docs/toy/experiments.md, "Position: colour, not layout".
"""
from __future__ import annotations

import argparse
from dataclasses import replace

import minivar
from minivar.toy.geneval import accuracy, check, generate_all
from minivar.toy.scenes import eval_specs


def without_colours(spec):
    return replace(spec, groups=tuple(replace(g, colour=None) for g in spec.groups))


def position_score(specs, images) -> float:
    """mini-GenEval's position accuracy of `images`, each checked against its spec."""
    return accuracy(specs, [check(s, im) for s, im in zip(specs, images)])["position"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default="toy")
    ap.add_argument("--n", type=int, default=1000)
    a = ap.parse_args(argv)
    pipe = minivar.load(a.model)
    named = [s for s in eval_specs(a.n) if s.category == "position" and s.groups[0].shape != s.groups[1].shape]
    opened = [without_colours(s) for s in named]
    named_images, _ = generate_all(pipe, named, False, cfg=3.0, tau=0.5)
    open_images, _ = generate_all(pipe, opened, False, cfg=3.0, tau=0.5)
    print(f"{a.model}: {len(named)} position prompts with two different shapes (of eval_specs({a.n})), cfg 3, tau 0.5")
    print(f"  colours named       {position_score(named, named_images):.3f}")
    print(f"  colours not judged  {position_score(opened, named_images):.3f}")
    print(f"  colours open        {position_score(opened, open_images):.3f}")

if __name__ == "__main__":
    main()
