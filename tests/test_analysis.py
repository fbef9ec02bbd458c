"""Spectra and attention probes used by the notebooks."""
import math

import torch
from helpers import PROMPT, SETTINGS, tiny_pipeline

from minivar.analysis import (band_energy, capture_attention, diagonal_strength, previous_scale_attention,
                              radial_power_spectrum, relative_change)


def test_a_constant_map_has_all_its_energy_at_frequency_zero():
    freq, power = radial_power_spectrum(torch.full((3, 16, 16), 2.5))
    assert freq[0] == 0 and math.isclose(power[0].item(), 2.5**2 * 16 * 16, rel_tol=1e-9)
    assert power[1:].abs().max() < 1e-20
    low, high = band_energy(torch.full((1, 16, 16), 2.5))
    assert high < 1e-20 < low


def test_a_grating_peaks_at_its_frequency():
    y, x = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    for k in (3, 7, 12):
        img = torch.cos(2 * math.pi * k * x / 32) + 0.5 * torch.cos(2 * math.pi * k * y / 32)
        _, power = radial_power_spectrum(img)
        assert int(power.argmax()) == k


def test_parseval_and_white_noise_is_flat():
    torch.manual_seed(0)
    noise = torch.randn(64, 32, 32)
    freq, power = radial_power_spectrum(noise)
    assert len(freq) == 17
    assert 0.8 < float(power[1:].mean()) < 1.2 and float(power[1:].max() / power[1:].min()) < 1.6
    low, high = band_energy(noise[0])
    assert math.isclose(low + high, float(noise[0].double().pow(2).mean()), rel_tol=1e-9)


def test_relative_change_vanishes_for_equal_spectra():
    p = torch.rand(5) + 0.1
    change = relative_change([p, p.clone(), 2 * p])
    assert change.shape == (2, 5) and change[0].abs().max() == 0 and torch.allclose(change[1], torch.ones(5, dtype=p.dtype))


def test_attention_probe_records_and_then_turns_off():
    pipe = tiny_pipeline()
    with capture_attention(pipe.transformer, [1]) as maps:
        out = pipe.generate(PROMPT, res=256, output_type="latent", **SETTINGS)
    assert pipe.transformer.blocks[1].sa.probe is None
    assert len(maps[1]) == len(out.scales)
    p = maps[1][6]                                      # 16x16 scale over every token so far
    assert p.shape == (2, 256, sum(h * w for h, w in out.scales))
    assert torch.allclose(p.sum(-1), torch.ones(2, 256), atol=1e-4)
    block = previous_scale_attention(p[0], out.scales, 6)   # (256 queries, 12x12 keys)
    assert block.shape == (256, 144) and 0 <= diagonal_strength(block, (16, 16), (12, 12)) <= 1
