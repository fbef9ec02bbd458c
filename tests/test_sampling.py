"""The bit sampler: what top-k and top-p mean for two-valued bits, and how it uses the generator."""
import torch

from minivar.model.sampling import sample_bits


def draw(logits, top_k, top_p, seed=0):
    gen = torch.Generator().manual_seed(seed)
    bits = sample_bits(logits.clone(), top_k, top_p, gen)
    return bits, gen.get_state()


def test_top_p_removes_the_unlikely_value_only_below_its_threshold():
    # p(value 1) = 0.02 in row 0 (removed at top_p 0.97, since 0.02 <= 0.03), 0.3 in row 1 (kept)
    logits = torch.tensor([[[0.0, torch.log(torch.tensor(0.02 / 0.98))], [0.0, torch.log(torch.tensor(0.3 / 0.7))]]])
    logits = logits.expand(500, 2, 2).contiguous()
    bits, _ = draw(logits, 900, 0.97)
    assert bits[:, 0].sum() == 0                       # never the removed value
    assert 100 < bits[:, 1].sum() < 200                # about 30 % of 500 draws
    unfiltered, _ = draw(logits, 0, 0.0)
    assert 0 < unfiltered[:, 0].sum() < 30             # without the filter it does occur (about 2 %)


def test_top_k_is_a_no_op_from_two_and_greedy_at_one():
    torch.manual_seed(0)
    logits = torch.randn(4, 300, 2)
    assert torch.equal(draw(logits, 2, 0.0)[0], draw(logits, 0, 0.0)[0])
    assert torch.equal(draw(logits, 900, 0.0)[0], draw(logits, 0, 0.0)[0])
    assert torch.equal(draw(logits, 1, 0.0)[0], logits.argmax(-1))


def test_generator_use_does_not_depend_on_what_was_removed():
    torch.manual_seed(1)
    logits = torch.randn(2, 64, 2) * 4
    states = [draw(logits, k, p)[1] for k, p in [(0, 0.0), (1, 0.0), (900, 0.97), (900, 0.5)]]
    assert all(torch.equal(states[0], s) for s in states[1:])


def test_top_p_zero_is_accepted_and_means_no_filter_as_upstream():
    """Scripts ported from upstream pass top_p=0 for "no top-p": generate takes it, and it draws
    exactly what top_p=1 (keep every value) draws."""
    from helpers import PROMPT, SETTINGS, tiny_pipeline

    pipe, kw = tiny_pipeline(), {**SETTINGS, "res": 256, "trace": True, "output_type": "latent"}
    off, one, filtered = (pipe.generate(PROMPT, **{**kw, "top_p": p}) for p in (0, 1.0, 0.5))
    assert all(torch.equal(a, b) for a, b in zip(off.trace.bits, one.trace.bits))
    assert not all(torch.equal(a, b) for a, b in zip(off.trace.bits, filtered.trace.bits))
