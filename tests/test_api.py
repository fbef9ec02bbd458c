"""The public API around generation: image encoding, guidance variants, negative prompts, traces."""
import threading

import numpy as np
import torch
from helpers import PROMPT, SETTINGS, TINY, fixture, rel_err, tiny_pipeline
from PIL import Image

from minivar.model.vae import codes_from_bits


def test_encode_image_gives_upstreams_bits_and_reconstruction():
    pipe, ref = tiny_pipeline(), fixture("vae_roundtrip")
    bits = pipe.encode_image(Image.open(TINY / "vae_roundtrip_input.png"), res=256)
    assert len(bits) == 7
    for si, b in enumerate(bits):
        assert torch.equal(b, ref[f"bits_{si}"].long().squeeze(1)), si
    scales = ref["scale_schedule"].tolist()
    z = codes_from_bits([b.unsqueeze(1) for b in bits], scales)          # (1, d, 1, H, W)
    assert (z.squeeze(2) - ref["z"]).abs().max() <= 1e-6
    recon = np.asarray(pipe.decode(ref["z"].unsqueeze(2))[0]).astype(int)
    assert np.abs(recon - ref["recon_rgb_uint8"].numpy().astype(int)).max() <= 1


def test_encoded_bits_teacher_force_a_generation():
    pipe = tiny_pipeline()
    bits = pipe.encode_image(TINY / "vae_roundtrip_input.png", res=256)
    out = pipe.generate(PROMPT, res=256, force_bits=bits, trace=True, **SETTINGS)
    assert all(torch.equal(a, b) for a, b in zip(out.trace.bits, bits))
    assert np.abs(np.asarray(out.image).astype(int) - fixture("vae_roundtrip")["recon_rgb_uint8"].numpy()).max() <= 1


def test_guidance_on_hidden_states_and_guidance_off():
    pipe = tiny_pipeline()
    kw = {**SETTINGS, "trace": True, "output_type": "latent", "res": 256}
    on_logits = pipe.generate(PROMPT, cfg_insertion_layer=0, **kw)
    on_hidden = pipe.generate(PROMPT, cfg_insertion_layer=-1, **kw)
    off = pipe.generate(PROMPT, cfg_insertion_layer=1, **kw)
    no_cfg = pipe.generate(PROMPT, **{**kw, "cfg": 1.0})
    assert not torch.equal(on_logits.trace.logits[0], on_hidden.trace.logits[0])
    assert no_cfg.trace.cfg_rows == [1] * 7 and off.trace.cfg_rows == [2] * 7
    # insertion 1 computes both halves but samples the conditional logits, i.e. no guidance
    for a, b in zip(off.trace.logits, no_cfg.trace.logits):
        assert rel_err(a, b) <= 1e-4


def test_negative_prompt_replaces_the_learned_unconditional_text():
    pipe = tiny_pipeline()
    kw = {**SETTINGS, "trace": True, "output_type": "latent", "res": 256}
    plain = pipe.generate(PROMPT, **kw)
    neg = pipe.generate(PROMPT, negative_prompt="blurry, low quality", **kw)
    neg_again = pipe.generate(PROMPT, negative_prompt="blurry, low quality", **kw)
    assert not torch.equal(plain.trace.logits[0], neg.trace.logits[0])
    assert torch.equal(neg.summed_codes, neg_again.summed_codes)


def test_trace_contents_are_consistent():
    out = tiny_pipeline().generate([PROMPT, "a cat"], res=256, trace=True, **SETTINGS)
    t = out.trace
    assert t.scales == out.scales and len(t.logits) == len(t.bits) == len(t.codes) == len(t.summed) == 7
    for (h, w), logits, bits, codes in zip(t.scales, t.logits, t.bits, t.codes):
        assert logits.shape == (2, h * w, 32, 2) and bits.shape == (2, h, w, 32) and codes.shape == (2, 32, h, w)
        assert set(bits.unique().tolist()) <= {0, 1}
    assert torch.equal(t.summed[-1], out.summed_codes)
    assert len(out.images) == 2 and all(s > 0 for s in t.seconds)


def test_aspect_ratios_snap_to_templates_like_upstream():
    from minivar.model.config import nearest_template, scale_schedule

    assert nearest_template(16 / 9) == 1.75 and nearest_template(9 / 16) == 0.571
    assert nearest_template(0.9) == 1.0  # a tie goes to the template listed first upstream
    assert scale_schedule(1024, 0.5)[-1] == (45, 90) and scale_schedule(512, 2.0)[-1] == (46, 23)


def test_sample_cache_loads_once_for_threads_asking_together(monkeypatch):
    """Threads calling minivar.sample for the same model share one load (the cache is locked while it
    loads), and a thread always gets the pipeline of the model it asked for."""
    from minivar import pipeline

    loads = []

    def fake_load(name, device, dtype, numerics=None):
        assert pipeline._PIPELINES_LOCK.locked()  # no other thread can look or clear meanwhile
        loads.append(name)
        return f"pipeline of {name}"

    monkeypatch.setattr(pipeline, "load", fake_load)
    monkeypatch.setattr(pipeline, "_PIPELINES", {})
    start, got = threading.Barrier(8), {}

    def ask(i):
        start.wait()
        name = "a" if i < 6 else f"b{i}"
        got[i] = (name, pipeline.cached_pipeline(name, "cpu", None))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(p == f"pipeline of {name}" for name, p in got.values()) and len(got) == 8
    assert loads.count("b6") == 1 and loads.count("b7") == 1 and 1 <= loads.count("a") <= 3  # a: reloaded only after a b
