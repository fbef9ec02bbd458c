"""HART (minivar.hart) against upstream HART and FastVAR's HART, run on CPU by tools/hart_golden/make_golden.py.

Fixtures: hart-tiny-a (1024's 14-scale schedule, B=1, cfg 4.5, seed 1; also FastVAR-HART's pruned run)
and hart-tiny-b (6 scales, B=2 with one fully padded and one 5-token text, cfg 2.0, seed 7).
"""
import ast
import functools
import json
from pathlib import Path

import pytest
import torch

from minivar.hart import HartTrace, fastvar_hart, generate, load_hart
from minivar.hart.config import SCHEDULE_1024, HartConfig, VQConfig
from minivar.loading.weights import CheckpointError

FIXTURES = Path(__file__).parent / "fixtures"
RUNS = [("hart-tiny-a", "run"), ("hart-tiny-b", "run"), ("hart-tiny-a", "run_fastvar")]


@functools.cache
def golden(name: str, run: str) -> dict:
    return torch.load(FIXTURES / name / f"{run}.pt", weights_only=True)


@functools.cache
def models(name: str):
    return load_hart(FIXTURES / name)


@functools.cache
def ours(name: str, run: str, forced: bool):
    g, (model, vq) = golden(name, run), models(name)
    prune = fastvar_hart(model.cfg.depth, model.cfg.patch_nums) if run == "run_fastvar" else None
    trace = HartTrace()
    with torch.inference_mode():
        image = generate(model, vq, g["context"], g["context_position_ids"], cfg=g["spec"]["cfg"],
                         seed=g["spec"]["seed"], prune=prune, force_tokens=g["tokens"] if forced else None, trace=trace)
    return image, trace


@pytest.mark.parametrize("name,run", RUNS)
def test_teacher_forced_logits_match_upstream(name, run):
    g = golden(name, run)
    _, trace = ours(name, run, forced=True)
    assert len(trace.logits) == len(g["patch_nums"])
    for si, logits in enumerate(trace.logits):
        ref = g["logits"][si]
        got = logits[:, g["logit_positions"][si]]
        assert ((got - ref).norm() / ref.norm()).item() <= 1e-4, f"scale {si}"
        # every position: the normaliser and the logit of the token upstream drew
        lse = torch.logsumexp(logits, dim=-1)
        assert torch.allclose(lse, g["logsumexp"][si], rtol=1e-4, atol=1e-4), f"scale {si}"
        drawn = logits.gather(-1, g["tokens"][si][..., None])[..., 0]
        assert torch.allclose(drawn, g["sampled_logit"][si], rtol=1e-4, atol=1e-4), f"scale {si}"


@pytest.mark.parametrize("name,run", RUNS)
def test_sampled_tokens_latent_and_image_match_upstream(name, run):
    g = golden(name, run)
    image, trace = ours(name, run, forced=False)
    for si, (tokens, ref) in enumerate(zip(trace.tokens, g["tokens"], strict=True)):
        assert torch.equal(tokens, ref), f"scale {si}: {(tokens != ref).sum().item()} tokens differ"
    for si, ref in enumerate(g["f_hat"]):  # every scale's f_hat (upstream's runs), or the last one (FastVAR's)
        got = trace.f_hat[si - len(g["f_hat"])]
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5), f"f_hat after scale {si}"
    levels = ((image * 255).round() - (g["image"] * 255).round()).abs().max().item()
    assert levels <= 1
    assert image.shape == g["image"].shape


def test_decoder_alone_matches_upstream():
    g = golden("hart-tiny-b", "run")
    _, vq = models("hart-tiny-b")
    with torch.inference_mode():
        image = vq.decode(g["f_hat"][-1].clone())
    assert ((image * 255).round() - (g["image"] * 255).round()).abs().max().item() <= 1


def test_generator_consumption_is_upstreams():
    """Upstream draws exactly once per scale from its seeded generator: one multinomial over all tokens."""
    g = golden("hart-tiny-b", "run")
    draws = [c for c in g["generator_calls"] if c["fn"] == "torch.multinomial"]
    assert [c["rows"] for c in draws] == [g["spec"]["B"] * t.shape[1] for t in g["tokens"]]
    assert all(c["generator"] == "model.rng" and c["replacement"] for c in draws)
    assert [c["top_k"] for c in g["generator_calls"] if c["fn"] == "sample_with_top_k_top_p_"] == [600] * 6


def test_fastvar_hart_preset():
    s = fastvar_hart(24, SCHEDULE_1024)
    assert s.drop == {12: 0.5, 13: 0.75} and s.cache_scale == 11 and s.layers == (0, 23) and not s.skip
    assert [s.kept(si, 5, pn * pn) for si, pn in enumerate(SCHEDULE_1024)][-3:] == [1296, 1152, 1024]
    s.validate(len(SCHEDULE_1024), 24)
    assert not fastvar_hart(2, (1, 2, 3, 4, 6, 8)).prunes
    with pytest.raises(ValueError, match="36x36"):
        fastvar_hart(2, (1, 2, 4, 48, 64))


def test_unsupported_upstream_options_are_one_line_errors():
    vq = VQConfig(vocab_size=64, z_channels=4)
    with pytest.raises(CheckpointError, match=r"disable_aln=False.*minivar implements HART"):
        HartConfig.from_upstream({"depth": 2, "disable_aln": False}, vq)
    with pytest.raises(CheckpointError, match="share_quant_resi=1"):
        VQConfig.from_upstream({"share_quant_resi": 1})
    cfg = HartConfig.from_upstream({"depth": 2, "patch_nums": [1, 2], "unknown": 3}, vq)
    assert cfg.patch_nums == (1, 2) and cfg.vocab_size == 64 and cfg.d_vae == 4


def test_missing_weights_file_is_named(tmp_path):
    for part in ("llm", "tokenizer"):
        (tmp_path / part).mkdir()
        (tmp_path / part / "config.json").write_text((FIXTURES / "hart-tiny-b" / part / "config.json").read_text())
    with pytest.raises(CheckpointError, match="holds none of ema_model.bin"):
        load_hart(tmp_path)


def test_infinity_package_never_imports_hart():
    """A reader of minivar/model/ never meets HART: no module there imports minivar.hart (or anything above it)."""
    for path in (Path(__file__).parents[1] / "minivar" / "model").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1 and "hart" not in (node.module or ""), f"{path.name} imports {node.module}"
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("minivar") for a in node.names), path.name


@pytest.mark.parametrize("listing,part", [("hart_0.7b_llm_keys.json", "llm"), ("hart_0.7b_tokenizer_keys.json", "tokenizer")])
def test_keys_and_shapes_match_the_real_hart_checkpoints(listing, part):
    """Upstream's hart-0.7b modules, listed on the meta device (configs partly assumed, see the listing's
    `assumed`): every key the discrete path uses is a minivar key of the same shape, and nothing else is."""
    from minivar.hart.config import HART_PRESETS
    from minivar.hart.loading import used_name
    from minivar.hart.transformer import Hart
    from minivar.hart.vq import HartVQ

    manifest = json.loads((FIXTURES / listing).read_text())
    want = {used_name(part, k): tuple(v[0]) for k, v in manifest["keys"].items() if used_name(part, k) is not None}
    cfg, vq_cfg = HART_PRESETS["hart-0.7b"]
    assert HartConfig.from_upstream(manifest["config"], vq_cfg) == cfg if part == "llm" else \
        VQConfig.from_upstream(manifest["config"]) == vq_cfg
    with torch.device("meta"):
        model = Hart(cfg) if part == "llm" else HartVQ(vq_cfg)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == want


@pytest.mark.parametrize("change,match", [
    (dict(context=torch.zeros(1, 299, 24)), r"context must be text states \(B, 300, 24\)"),
    (dict(context_position_ids=torch.zeros(1, 300)), "context_position_ids must be integer positions"),
    (dict(cfg=float("nan")), "cfg=nan is invalid"),
    (dict(seed=-1), "seed=-1 is invalid"),
    (dict(force_tokens=[torch.zeros(1, 4, dtype=torch.long)]), r"force_tokens\[0\] must be integer codes of shape \(1, 1\)"),
    (dict(force_tokens=[torch.full((1, 1), 1024)]), r"force_tokens\[0\] holds codes outside 0 \.\.\. 1023"),
])
def test_bad_generate_inputs_are_one_line_errors(change, match):
    model, vq = models("hart-tiny-b")
    args = dict(context=torch.zeros(1, 300, 24), context_position_ids=torch.zeros(1, 300, dtype=torch.long))
    with pytest.raises(ValueError, match=match) as e:
        generate(model, vq, **{**args, **change})
    assert "\n" not in str(e.value)
