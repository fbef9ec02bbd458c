"""What the toy's 16x16 bits look like when 90 % of its tokens are restored from 12x12 (prune=True).

    python tools/toy_restore_bits.py [MODEL] [--n 64]

For the first n mini-GenEval prompts, generated unpruned and with the toy preset (same seeds, so every
scale before 16x16 is the same in both), it compares the most likely bit of every (token, channel) at
16x16: how often the pruned bits agree with the unpruned ones, and how often each agrees with 12x12's
bits at the same place (nearest upsampling). If restored tokens only lost detail, the pruned bits would
agree with 12x12's as often as the unpruned ones do; docs/toy/experiments.md ("Where the 16x16 pruning
loses its score") reports that they agree more often: a restored token repeats 12x12's correction.
"""
from __future__ import annotations

import argparse

import torch

import minivar
from minivar.model.pruning import resize_tokens
from minivar.toy.scenes import eval_specs


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default="toy")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    a = ap.parse_args(argv)
    pipe = minivar.load(a.model)
    captions = [s.caption for s in eval_specs(a.n)]
    hits = {"pruned = unpruned": 0.0, "unpruned = 12x12": 0.0, "pruned = 12x12": 0.0,
            "restored tokens: unpruned = 12x12": 0.0, "restored tokens: pruned = 12x12": 0.0}
    for i in range(0, a.n, a.batch):
        runs = [pipe.generate(captions[i:i + a.batch], seed=i, trace=True, prune=p).trace for p in (False, True)]
        dense, pruned = (t.logits[-1].argmax(-1) for t in runs)        # (B, 256, d) each, after CFG
        coarse = resize_tokens(runs[1].logits[-2].argmax(-1).float(), runs[1].scales[-2], runs[1].scales[-1],
                               "nearest").long()                     # 12x12's bits at each 16x16 cell
        share = len(dense) / a.n
        hits["pruned = unpruned"] += (pruned == dense).float().mean().item() * share
        hits["unpruned = 12x12"] += (dense == coarse).float().mean().item() * share
        hits["pruned = 12x12"] += (pruned == coarse).float().mean().item() * share
        # restored: not computed by the last layer's last sub-layer (its output goes straight to the head)
        record = runs[1].pruning[len(runs[1].scales) - 1]
        last = max(layer for layer, _ in record.keep)
        restored = torch.ones(dense.shape[:2], dtype=torch.bool)
        restored[torch.arange(len(dense))[:, None], record.keep[last, "ffn"][:len(dense)]] = False  # the conditional rows
        for name, bits in (("unpruned", dense), ("pruned", pruned)):
            hits[f"restored tokens: {name} = 12x12"] += (bits == coarse)[restored].float().mean().item() * share
    print(f"{a.model}, {a.n} prompts, 16x16 argmax bits (share of token-channels):")
    for name, v in hits.items():
        print(f"  {name:34s} {v:.3f}")


if __name__ == "__main__":
    main()
