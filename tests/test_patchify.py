"""Infinity-8B's layout on a tiny random model: 14-bit VAE at patch 8, 2x2 cells (56 bits) per token."""
import json
import shutil

import pytest
import torch
from helpers import PROMPT, SETTINGS, TINY

import minivar
from minivar.model.config import InfinityConfig
from minivar.model.transformer import Infinity
from minivar.model.vae import BSQVAE, VAEConfig


@pytest.fixture(scope="module")
def patchify_files(tmp_path_factory):
    """A tiny 8B-shaped model saved in the real formats (random weights, tiny-a's T5)."""
    d = tmp_path_factory.mktemp("tiny8b")
    torch.manual_seed(0)
    vae_cfg = VAEConfig(codebook_dim=14, base_ch=32, num_res_blocks=1, ch_mult=(1, 1, 1, 1), patch_size=8)
    torch.save({"vae": BSQVAE(vae_cfg).state_dict()}, d / "vae.pth")
    (d / "vae_config.json").write_text(json.dumps({"vae_model_call": {
        "codebook_dim": 14, "patch_size": 8, "encoder_ch_mult": [1, 1, 1, 1], "decoder_ch_mult": [1, 1, 1, 1]},
        "base_ch": 32, "num_res_blocks": 1}))
    args = dict(depth=2, embed_dim=128, num_heads=2, text_channels=128, apply_spatial_patchify=1, block_chunks=2)
    model = Infinity(InfinityConfig.from_upstream(args, d_vae=56))
    torch.save(model.state_dict(), d / "infinity.pth")
    (d / "infinity_config.json").write_text(json.dumps(args))
    shutil.copytree(TINY / "t5", d / "t5")
    return d


def test_patchified_generation_and_round_trip(patchify_files):
    d = patchify_files
    pipe = minivar.load(transformer=d / "infinity.pth", vae=d / "vae.pth", text_encoder=d / "t5",
                        config=d / "infinity_config.json", vae_config=d / "vae_config.json")
    assert pipe.transformer.cfg.d_vae == 56 and pipe.transformer.head.out_features == 112
    out = pipe.generate(PROMPT, res=256, trace=True, **SETTINGS)
    assert out.image.size == (256, 256)
    assert out.trace.bits[-1].shape == (1, 16, 16, 56)            # transformer tokens: 16x16 grid
    assert out.summed_codes.shape == (1, 14, 32, 32)              # VAE latent: 32x32 cells of 14 bits
    bits = pipe.encode_image(out.image, res=256)
    assert [tuple(b.shape) for b in bits] == [tuple(b.shape) for b in out.trace.bits]
    forced = pipe.generate(PROMPT, res=256, force_bits=bits, trace=True, **SETTINGS)
    assert all(torch.equal(a, b) for a, b in zip(forced.trace.bits, bits))
