"""Teacher-forcing table for the toy: the first k scales take the VAE's bits of the rendered
canonical ground-truth scene, the model samples the rest (60 mini-GenEval prompts, cfg 3, tau 0.5).

    python tools/toy_teacher_forcing.py
"""
import random

import numpy as np
import torch

import minivar
from minivar.toy.geneval import accuracy, check
from minivar.toy.scenes import eval_specs, make_scene, render

pipe = minivar.load("toy")
specs = eval_specs(60)
truth = [np.asarray(render(make_scene(s, random.Random(i), "canonical"), 64)) for i, s in enumerate(specs)]
bits = [pipe.encode_image(t) for t in truth]          # per image: list of (1, h, w, d)
for k in (0, 3, 5, 6, 7):
    images = []
    for i in range(0, len(specs), 8):
        chunk = range(i, min(i + 8, len(specs)))
        force = [torch.cat([bits[j][si] for j in chunk]) for si in range(k)] if k else None
        out = pipe.generate([specs[j].caption for j in chunk], seed=i // 8, prune=False, cfg=3.0, tau=0.5, force_bits=force)
        images += out.images
    acc = accuracy(specs, [check(s, im) for s, im in zip(specs, images)])
    print(k, round(acc["overall"], 3), {c: round(v, 2) for c, v in acc.items() if c != "overall"})
