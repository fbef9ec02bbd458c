"""Invariants of the scale loop: caching, batching and the no-op pruning schedule change nothing."""
import torch
from helpers import PROMPT, SETTINGS, rel_err, tiny_pipeline

from minivar.model.vae import latent_to_tokens
from minivar.model.config import scale_schedule
from minivar.model.pruning import PruneSchedule
from minivar.model.sampling import guide
from minivar.model.transformer import Attn


def uncached_logits(pipe, out, n_scales: int) -> list[torch.Tensor]:
    """Logits of the first n scales from ONE forward over the concatenated sequence, no KV cache.

    Each scale's input is rebuilt from the cached run's running latent; a block-causal mask lets a
    token see its own scale and every earlier one, which is what the cache provides step by step.
    """
    model, scales = pipe.transformer, out.scales[:n_scales]
    kv, segments = pipe.text_rows([PROMPT], None, cfg_on=True)
    c = model.condition(kv, segments)
    xs = [model.embed_scale(model.first_tokens(c), 0)]
    for si in range(1, n_scales):
        tokens = latent_to_tokens(out.trace.summed[si - 1][:, :, None], scales[si], patchify=False)
        xs.append(model.embed_scale(model.word_embed(tokens).repeat(2, 1, 1), si))
    level = torch.cat([torch.full((h * w,), si) for si, (h, w) in enumerate(scales)])
    mask = level[None, :] <= level[:, None]                               # (L, L) block-causal
    rope = torch.cat([model.rope.table(1.0, h, w, "cpu") for h, w in scales], dim=1)
    x = torch.cat(xs, dim=1)
    for block in model.blocks:
        x = block(x, c.gss, c.text, Attn(None, rope, mask=mask))
    logits = guide(model.logits(x, c.cond).mul(1 / SETTINGS["tau"]), SETTINGS["cfg"])
    bounds = torch.tensor([0] + [h * w for h, w in scales]).cumsum(0).tolist()
    return [logits[:, a:b] for a, b in zip(bounds[:-1], bounds[1:])]


@torch.no_grad()
def test_cached_forward_equals_uncached_forward():
    pipe = tiny_pipeline()
    out = pipe.generate(PROMPT, res=256, trace=True, **SETTINGS)
    full = uncached_logits(pipe, out, len(out.scales))
    for si, (cached, whole) in enumerate(zip(out.trace.logits, full)):
        assert rel_err(cached.reshape(whole.shape), whole) <= 1e-4, f"scale {si}"


def test_batch_of_two_prompts_teacher_forced_equals_single_runs():
    pipe, prompts = tiny_pipeline(), [PROMPT, "two cats sleeping on a sofa at night"]
    singles = [pipe.generate(p, res=256, trace=True, **SETTINGS) for p in prompts]
    forced = [torch.cat([s.trace.bits[i] for s in singles]) for i in range(len(singles[0].trace.bits))]
    batch = pipe.generate(prompts, res=256, trace=True, force_bits=forced, **SETTINGS)
    for i in range(len(forced)):
        for b, single in enumerate(singles):
            assert torch.equal(batch.trace.logits[i][b], single.trace.logits[i][0]), (i, b)
    for b, single in enumerate(singles):
        assert torch.equal(batch.trace.bits[-1][b], single.trace.bits[-1][0])


def test_keep_all_schedule_is_bit_identical_to_no_pruning():
    pipe = tiny_pipeline()
    base = pipe.generate(PROMPT, res=1024, trace=True, prune=False, output_type="latent", **SETTINGS)
    keep_all = PruneSchedule(drop={9: 0.0, 10: 1e-9}, layers=(0, 3), cache_scale=8)
    same = pipe.generate(PROMPT, res=1024, trace=True, prune=keep_all, output_type="latent", **SETTINGS)
    assert all(torch.equal(a, b) for a, b in zip(base.trace.logits, same.trace.logits))
    assert torch.equal(base.summed_codes, same.summed_codes)  # the decoder input: images are equal too
    assert len(scale_schedule(1024)) == len(base.trace.bits)
