"""The analytic FLOP count: a hand count on a tiny config, then torch's own counter on real forwards."""
import json
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from minivar.model.config import PRESETS, InfinityConfig, scale_schedule
from minivar.bench.flops import plan_count, totals, transformer_count, vae_decode_count
from minivar.model.pruning import PruneSchedule
from minivar.model.sampling import Settings, plan, run_scale_loop
from minivar.model.transformer import Infinity
from minivar.model import vae as vae_mod
from minivar.model.vae import VAE_PRESETS, BSQVAE, VAEConfig

TINY = InfinityConfig(depth=4, embed_dim=128, num_heads=2, mlp_ratio=4, text_channels=128, d_vae=32)
TINY_VAE = VAEConfig(codebook_dim=32, base_ch=24, num_res_blocks=1, ch_mult=(1, 2, 4, 4, 4), patch_size=16)


def test_hand_count_two_scales():
    """C=128, FFN 512, d=32, 4 layers, 1 image without CFG, 3 text tokens, scales 1x1 then 2x2."""
    counts = transformer_count(TINY, [(1, 1), (2, 2)], batch=1, cfg_on=False, text_tokens=3)
    # text, once: pool kv 2*3*128*256 + pool attention 4*1*3*128 + pool proj 2*128*128
    #             + text proj 2 * (2*3*128*128) + shared AdaLN 2*128*768
    assert counts[0].parts["text"].flops == 196608 + 1536 + 32768 + 196608 + 196608
    # scale 0, per layer: qkv 2*128*384 = 98304, attention 4*1*1*128 = 512, proj 2*128*128 = 32768,
    # ca q + text kv + attention + proj = 32768 + 196608 + 1536 + 32768, ffn 2*2*128*512 = 262144
    per_layer0 = 98304 + 512 + 32768 + (32768 + 196608 + 1536 + 32768) + 262144
    head0 = 2 * 128 * 256 + 2 * 128 * 64
    embed0 = 2 * 4 * 32 * 128  # the 2x2 scale's inputs
    assert counts[0].total.flops == 624128 + 4 * per_layer0 + head0 + embed0 == 3368448
    # scale 1: 4 queries over 1 cached + 4 new keys; the text's k, v are already computed; the last
    # scale embeds nothing
    per_layer1 = 4 * 98304 + 4 * 4 * 5 * 128 + 4 * 32768 + (4 * 32768 + 4 * 4 * 3 * 128 + 4 * 32768) + 4 * 262144
    head1 = 2 * 128 * 256 + 2 * 4 * 128 * 64
    assert counts[1].total.flops == 4 * per_layer1 + head1 == 7536640
    assert set(counts[1].parts) == {"qkv", "attn", "proj", "ca", "ffn", "head"}


def test_pruned_layers_count_kept_tokens_and_their_keys():
    prune = PruneSchedule(drop={2: 0.5}, skip=frozenset({3}), layers=(1, 2), cache_scale=1)
    counts = transformer_count(TINY, [(1, 1), (2, 2), (4, 4), (6, 6)], prune, cfg_on=False, text_tokens=3)
    assert [c.si for c in counts] == [0, 1, 2]
    assert counts[2].kept == [16, 8, 8, 16]
    # layer 1 at scale 2 attends 1 + 4 cached keys plus its 8 kept tokens
    dense = transformer_count(TINY, [(1, 1), (2, 2), (4, 4)], cfg_on=False, text_tokens=3)
    attn = 2 * 4 * 16 * 21 * 128 + 2 * 4 * 8 * 13 * 128
    assert counts[2].parts["attn"].flops == attn
    assert dense[2].parts["attn"].flops == 4 * 4 * 16 * 21 * 128


def _generate(model: Infinity, scales, prune: PruneSchedule, s: Settings, text_tokens: int, B: int = 1):
    rows = 2 * B
    kv = torch.randn(rows * text_tokens, model.cfg.text_channels)
    segments = [(i * text_tokens, (i + 1) * text_tokens) for i in range(rows)]
    c = model.condition(kv, segments)
    return run_scale_loop(model, c, B, plan(model.cfg, scales, 1.0, s, prune), s)


@pytest.mark.parametrize("prune,stop", [
    (PruneSchedule.none(), None),
    (PruneSchedule(drop={5: 0.4, 6: 0.5}, skip=frozenset(), layers=(1, 2), cache_scale=4), None),
    (PruneSchedule(drop={5: 0.4}, skip=frozenset({6}), layers=(0, 3), cache_scale=3), 2),
    (PruneSchedule(drop={5: 0.4, 6: 0.5}, layers=(1, 2), cache_scale=4, selector="projection", rank=3, cfg_stop=5), None),
])
def test_matches_torch_flop_counter(prune, stop):
    """torch's FlopCounterMode on a real generation with CFG (the math attention kernel, so that
    attention is visible to it as matmuls) sees exactly the analytic count."""
    torch.manual_seed(0)
    model = Infinity(TINY).eval()
    scales = scale_schedule(256)
    s = Settings(cfg=3.0, seed=1, cfg_stop_scale=stop)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        _generate(model, scales, prune, s, text_tokens=5)
    counts = transformer_count(TINY, scales, prune, batch=1, cfg_on=True, cfg_stop_scale=stop, text_tokens=5)
    assert fc.get_total_flops() == sum(c.flops for c in totals(counts).values())


@pytest.mark.parametrize("s", [
    Settings(cfg=[3.0, 1.0, 3.0, 3.0, 1.0, 3.0, 1.0], seed=1),
    Settings(cfg=3.0, seed=1, cfg_insertion_layer=-1),
    Settings(cfg=3.0, seed=1, cfg_insertion_layer=1),
], ids=["cfg-1-at-some-scales", "guidance-on-hidden-states", "no-mixing"])
def test_head_is_counted_on_the_rows_it_runs(s):
    """Where guidance does not mix the logits the head runs on the conditional rows only
    (`sampling.step_logits`); the count used to price it on both halves."""
    torch.manual_seed(0)
    model = Infinity(TINY).eval()
    scales, C, d = scale_schedule(256), TINY.embed_dim, TINY.d_vae
    shapes = []  # (rows, tokens) of every call of the head's final Linear
    model.head.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape[:2])))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        _generate(model, scales, PruneSchedule.none(), s, text_tokens=5)
    the_plan = plan(TINY, scales, 1.0, s, PruneSchedule.none())
    counts = plan_count(TINY, the_plan, batch=1, text_tokens=5)
    assert [c.parts["head"].flops for c in counts] == [2 * b * C * 2 * C + 2 * b * L * C * 2 * d for b, L in shapes]
    assert fc.get_total_flops() == sum(c.flops for c in totals(counts).values())
    assert [b for b, _ in shapes] == [2 if step.mix_logits else 1 for step in the_plan.ran]


def test_vae_decoder_matches_torch_flop_counter():
    torch.manual_seed(0)
    vae = BSQVAE(TINY_VAE).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        vae.decode(torch.randn(2, 32, 3, 5))
    assert fc.get_total_flops() == vae_decode_count(TINY_VAE, (3, 5), batch=2).flops


def test_param_count_matches_the_model():
    with torch.device("meta"):
        model = Infinity(TINY)
    assert TINY.param_count() == sum(p.numel() for p in model.parameters())
    for name in ("infinity-2b", "infinity-8b"):  # the published checkpoints' counts (tests/fixtures)
        keys = json.loads((Path(__file__).parent / "fixtures" / f"{name.replace('-', '_')}_keys.json").read_text())
        assert PRESETS[name].param_count() == keys["param_count"]


def test_real_2b_decoder_at_1024_by_hand_and_by_torch():
    """Infinity-2B's d32 decoder for a 1024x1024 image (latent 64x64), counted three ways: by hand
    from its layers, by `vae_decode_count`, and by FlopCounterMode on the real-size model on the
    meta device (shapes only, no compute). 9.85 TFLOP, all direct convolutions."""
    def conv(c_in, c_out, side, k=3):
        return 2 * k * k * c_in * c_out * side * side

    same = {side: 6 * conv(c, c, side) for c, side in ((512, 64), (512, 128), (512, 256))}  # 3 blocks x 2
    hand = (conv(32, 512, 64) + 4 * conv(512, 512, 64)                                  # conv_in, mid
            + same[64] + conv(512, 512, 128) + same[128] + conv(512, 512, 256)          # levels 4, 3
            + same[256] + conv(512, 512, 512)                                           # level 2
            + conv(512, 256, 512) + conv(256, 256, 512) + conv(512, 256, 512, 1)        # level 1: block 0
            + 4 * conv(256, 256, 512) + conv(256, 256, 1024)                            # blocks 1, 2, upsample
            + conv(256, 128, 1024) + conv(128, 128, 1024) + conv(256, 128, 1024, 1)     # level 0: block 0
            + 4 * conv(128, 128, 1024) + conv(128, 3, 1024))                            # blocks 1, 2, conv_out
    with torch.device("meta"):
        vae = BSQVAE(VAE_PRESETS["d32"]).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        vae.decode(torch.empty(1, 32, 64, 64, device="meta"), tiled=False)
    assert fc.get_total_flops() == vae_decode_count(VAE_PRESETS["d32"], (64, 64)).flops == hand
    assert round(hand / 1e12, 2) == 9.85


@pytest.mark.parametrize("band_elems", [1 << 24, 20_000])
def test_banded_decoder_does_the_counted_work(monkeypatch, band_elems):
    """Decoding in row bands runs the same convolutions: exactly the count with one band per map, and
    a little more with many bands (a band at the image's top or bottom edge computes one row it drops)."""
    torch.manual_seed(0)
    monkeypatch.setattr(vae_mod, "BAND_ELEMS", band_elems)
    vae = BSQVAE(TINY_VAE).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        vae.decode(torch.randn(1, 32, 4, 3), tiled=True)
    counted = vae_decode_count(TINY_VAE, (4, 3)).flops
    if band_elems == 1 << 24:
        assert fc.get_total_flops() == counted
    else:
        assert counted < fc.get_total_flops() < 1.1 * counted


@pytest.mark.parametrize("args, says", [
    (["--res", "333"], "unsupported res=333"),
    (["--text-tokens", "0"], "--text-tokens 0"),
    (["--text-tokens", "513"], "--text-tokens 513"),
    (["--prune", "bogus"], "invalid choice: 'bogus'"),
])
def test_command_line_bad_input_is_one_line(capsys, args, says):
    from minivar.bench.flops import main

    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert says in err.splitlines()[-1] and err.splitlines()[-1].startswith("python -m minivar.flops: error:")


def test_command_line_counts_the_2b_preset(capsys):
    from minivar.bench.flops import main

    main(["--res", "1024"])
    out = capsys.readouterr().out
    assert out.startswith("infinity-2b at 1024^2, CFG on, 32 text tokens, prune=preset")
    row = next(line for line in out.splitlines() if line.startswith("| **transformer**"))
    unpruned, pruned = (float(v) for v in row.split("|")[2:4])
    ratio = float(row.split("|")[4].strip().rstrip("x"))
    assert ratio == pytest.approx(unpruned / pruned, abs=0.01) and unpruned > pruned  # the TFLOP shown to 2 places
