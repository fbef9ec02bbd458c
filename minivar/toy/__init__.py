"""The toy world: everything minivar needs to train and judge a small Infinity offline.

    scenes.py   captioned flat-shape scenes, in canonical or random layouts (the data)
    train.py    tokenizer, BSQ VAE, T5 + Infinity, written in the real checkpoint formats
    geneval.py  mini-GenEval, an analytic checker of colour, shape, count and position
    weights/    the trained toy, a model directory shipped as package data (`minivar.load("toy")`)

    python -m minivar.toy.train --out minivar/toy/weights --overwrite
    python -m minivar.toy.eval --n 200 --json scores.json

None of this is on the path of `minivar.sample`: the model code (config ... pipeline) only knows
checkpoints, and the toy is one more checkpoint directory.
"""
