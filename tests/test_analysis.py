"""Spectra and attention probes used by the notebooks."""
import math
import threading

import torch
from helpers import PROMPT, SETTINGS, tiny_pipeline

from minivar.bench.analysis import (band_average, band_energy, bit_entropy, capture_attention, capture_hidden,
                              change_spectra, computed_fraction, diagonal_strength, offset_attention, pca_rgb, previous_scale_attention,
                              psnr, radial_power_spectrum, relative_change, token_maps)
from minivar.model.pruning import ScaleRecord
from minivar.model.transformer import ATTENTION_PROBES


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


def test_a_gaussian_blob_has_the_gaussian_spectrum():
    # A blob exp(-r^2 / 2 s^2) on an N x N grid has power (2 pi s^2)^2 / N^2 * exp(-4 pi^2 s^2 f^2 / N^2) at f
    # cycles per image side: a straight line in log power against f^2, and its mean squared at f = 0.
    N, s = 64, 3.0
    y, x = torch.meshgrid(torch.arange(N, dtype=torch.float64), torch.arange(N, dtype=torch.float64), indexing="ij")
    blob = torch.exp(-((x - N / 2) ** 2 + (y - N / 2) ** 2) / (2 * s * s))
    freq, power = radial_power_spectrum(blob)
    assert math.isclose(power[0].item(), (2 * math.pi * s * s) ** 2 / N**2, rel_tol=1e-9)
    assert bool((power[1:16] < power[:15]).all())                 # falls steadily
    f2 = freq[1:11] ** 2
    slope = torch.linalg.lstsq(torch.stack([f2, torch.ones_like(f2)], 1), power[1:11].log()[:, None]).solution[0, 0]
    assert math.isclose(float(slope), -4 * math.pi**2 * s * s / N**2, rel_tol=0.03)


def test_band_energy_separates_a_coarse_from_a_fine_grating():
    x = torch.arange(32.0, dtype=torch.float64).expand(32, 32)
    coarse, fine = torch.cos(2 * math.pi * 2 * x / 32), torch.cos(2 * math.pi * 12 * x / 32)   # 2 and 12 of 16 cycles
    (lo_c, hi_c), (lo_f, hi_f) = band_energy(coarse), band_energy(fine)
    assert math.isclose(lo_c, 0.5, rel_tol=1e-9) and hi_c < 1e-20
    assert math.isclose(hi_f, 0.5, rel_tol=1e-9) and lo_f < 1e-20


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
    assert ATTENTION_PROBES.get() is None
    assert len(maps[1]) == len(out.scales)
    p = maps[1][6]                                      # 16x16 scale over every token so far
    assert p.shape == (2, 256, sum(h * w for h, w in out.scales))
    assert torch.allclose(p.sum(-1), torch.ones(2, 256), atol=1e-4)
    block = previous_scale_attention(p[0], out.scales, 6)   # (256 queries, 12x12 keys)
    assert block.shape == (256, 144) and 0 <= diagonal_strength(block, (16, 16), (12, 12)) <= 1


def test_attention_probe_is_off_by_default_and_does_not_change_the_result():
    pipe = tiny_pipeline()
    assert ATTENTION_PROBES.get() is None
    plain = pipe.generate(PROMPT, res=256, output_type="latent", **SETTINGS).summed_codes
    with capture_attention(pipe.transformer, [0, 2], rows=1) as maps:
        probed = pipe.generate(PROMPT, res=256, output_type="latent", **SETTINGS).summed_codes
    assert torch.equal(plain, probed)
    assert [m.shape[0] for m in maps[2]] == [1] * len(maps[2])     # only the conditional row is kept


def test_attention_probe_sees_only_its_own_threads_generations():
    """Two generations at once (e.g. a server's threads): the probe records its own thread's only."""
    pipe = tiny_pipeline()
    with capture_attention(pipe.transformer, [1]) as maps:
        other = threading.Thread(target=pipe.generate, args=(PROMPT,),
                                 kwargs=dict(res=256, output_type="latent", **SETTINGS))
        other.start()
        other.join()
        assert maps[1] == []
        out = pipe.generate(PROMPT, res=256, output_type="latent", **SETTINGS)
    assert len(maps[1]) == len(out.scales)


def test_change_spectra_see_moved_content_that_power_spectra_miss():
    x = torch.arange(16.0, dtype=torch.float64).expand(16, 16)
    a = torch.cos(2 * math.pi * 3 * x / 16)
    b = torch.cos(2 * math.pi * 3 * x / 16 + 1.0)                 # same spectrum, content shifted
    assert relative_change([radial_power_spectrum(a)[1], radial_power_spectrum(b)[1]])[0, 3] < 1e-9
    change = change_spectra([a, b, b])
    assert change.shape == (2, 9) and change[1].max() == 0
    assert math.isclose(float(change[0, 3]), 2 - 2 * math.cos(1.0), rel_tol=1e-9)   # |e^i - 1|^2


def test_band_average_takes_the_mean_inside_each_band():
    freq = torch.arange(6.0)
    values = torch.stack([freq, 10 * freq])                       # (2, 6)
    assert torch.equal(band_average(values, freq, [0, 2, 6]), torch.tensor([[0.5, 3.5], [5.0, 35.0]]))


def test_token_maps_follow_raster_order():
    x = torch.randn(2, 3 * 5, 4)
    maps = token_maps(x, (3, 5))
    assert maps.shape == (2, 4, 3, 5) and torch.equal(maps[1, :, 2, 4], x[1, 2 * 5 + 4])


def test_hidden_state_capture_records_every_scale_and_removes_its_hooks():
    pipe = tiny_pipeline()
    with capture_hidden(pipe.transformer, [0, 3]) as states:
        out = pipe.generate(PROMPT, res=256, output_type="latent", **SETTINGS)
    assert all(not b._forward_hooks for b in pipe.transformer.blocks)
    C = pipe.transformer.cfg.embed_dim
    assert [s.shape for s in states[3]] == [(2, h * w, C) for h, w in out.scales]   # CFG: two rows


def test_pca_colours_span_the_reference_and_agree_across_calls():
    torch.manual_seed(0)
    ref = torch.randn(2, 8, 6, 6)
    rgb = pca_rgb(ref)
    assert rgb.shape == (2, 6, 6, 3) and torch.allclose(rgb.amin((0, 1, 2)), torch.zeros(3, dtype=rgb.dtype))
    assert torch.allclose(rgb.amax((0, 1, 2)), torch.ones(3, dtype=rgb.dtype))
    assert torch.equal(pca_rgb(ref[:1], ref), rgb[:1])


def test_bit_entropy_is_one_for_a_coin_and_zero_for_a_sure_bit():
    assert math.isclose(bit_entropy(torch.zeros(1, 4, 3, 2)), 1.0)
    assert bit_entropy(torch.tensor([[50.0, -50.0]])) < 1e-20


def test_psnr_of_a_one_level_difference():
    a = torch.zeros(4, 4, 3, dtype=torch.uint8)
    assert psnr(a, a) == math.inf
    assert math.isclose(psnr(a, a + 1), 20 * math.log10(255), rel_tol=1e-12)


def test_offset_attention_centre_is_the_diagonal_strength():
    torch.manual_seed(0)
    block = torch.rand(8 * 8, 6 * 6)
    off = offset_attention(block, (8, 8), (6, 6), radius=1)
    assert off.shape == (3, 3) and math.isclose(float(off[1, 1]), diagonal_strength(block, (8, 8), (6, 6)), rel_tol=1e-6)
    iy, ix = torch.arange(8).repeat_interleave(8) * 6 // 8, torch.arange(8).repeat(8) * 6 // 8
    own = torch.zeros(64, 36)
    own[torch.arange(64), iy * 6 + ix] = 1                            # every query looks at its own cell only
    assert torch.equal(offset_attention(own, (8, 8), (6, 6), radius=1), torch.tensor([[0, 0, 0], [0, 1.0, 0], [0, 0, 0]],
                                                                                     dtype=torch.float64))


def test_computed_fraction_counts_the_kept_tokens_of_each_step():
    rec = ScaleRecord(keep={(1, "sa"): torch.tensor([[0, 1]]), (1, "ffn"): torch.tensor([[1, 3]])})
    assert torch.equal(computed_fraction(rec, (2, 2)), torch.tensor([[[0.5, 1.0], [0.0, 0.5]]]))
