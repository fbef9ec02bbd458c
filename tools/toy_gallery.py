"""Draw docs/toy/gallery.png: the first prompts of each mini-GenEval category, as the shipped toy
draws them at seed 0, each marked with the checker's verdict (green frame: passes, red: fails).

    python tools/toy_gallery.py
"""
from pathlib import Path

from PIL import Image, ImageDraw

import minivar
from minivar.toy.geneval import check
from minivar.toy.scenes import CATEGORIES, eval_specs

PER_CATEGORY, SCALE, PAD = 6, 2, 4
OUT = Path(__file__).resolve().parents[1] / "docs" / "toy" / "gallery.png"


def main() -> None:
    pipe = minivar.load("toy")
    specs = eval_specs(200)
    rows = [[s for s in specs if s.category == c][:PER_CATEGORY] for c in CATEGORIES]
    side = 64 * SCALE + 2 * PAD
    sheet = Image.new("RGB", (side * PER_CATEGORY, side * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(rows):
        images = pipe.generate([s.caption for s in row], seed=0, prune=False, cfg=3.0, tau=0.5).images
        for c, (spec, image) in enumerate(zip(row, images)):
            x, y = c * side, r * side
            colour = (40, 170, 60) if check(spec, image).ok else (210, 40, 40)
            draw.rectangle([x + 1, y + 1, x + side - 2, y + side - 2], outline=colour, width=PAD - 1)
            sheet.paste(image.resize((64 * SCALE,) * 2, Image.Resampling.NEAREST), (x + PAD, y + PAD))
            print(f"{spec.category:14s} {'pass' if check(spec, image).ok else 'FAIL'}  {spec.caption}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(OUT)
    print(f"saved {OUT}")


if __name__ == "__main__":
    main()
