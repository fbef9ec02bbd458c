"""The algorithm, and nothing else: Infinity's next-scale bitwise VAR with FastVAR's token pruning.

It imports only torch, numpy, sentencepiece and the standard library. Read it in the order a call
meets it, after ../pipeline.py (the README's "Reading the code" says more on each file):

    t5.py            the prompt -> tokens -> text features
    sampling.py      the scale loop: plan, guidance, KV cache, pruning, sampling, residual sum
    transformer.py   one scale through the blocks: self-attention, cross-attention, FFN
    pruning.py       pivotal tokens, cached restoration, skipped scales, and the presets
    vae.py           bits -> codes (BSQ) and the decoder that turns the latent into pixels
    config.py        configs, the scale schedules, reading config files

What keeps CPU results equal to upstream's bit for bit is outside, in ../parity.py: loading puts
every model in that mode.
"""
