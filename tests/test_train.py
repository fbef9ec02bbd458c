"""Training code on a tiny recipe: the pieces agree with inference, losses go down, files load back."""
import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import minivar
from minivar.model.vae import quantize_multiscale
from minivar.loading.checkpoint import flatten_block_keys
from minivar.model.config import InfinityConfig
from minivar.toy import train
from minivar.model.transformer import Attn
from minivar.model.vae import BSQVAE

TINY = train.RECIPES["tiny"]


def test_straight_through_quantiser_matches_the_inference_quantiser():
    torch.manual_seed(0)
    h = torch.randn(2, 8, 16, 16, requires_grad=True)
    scales = [(1, a, b) for a, b in TINY.scales]
    z, bits, _ = quantize_multiscale(h, scales, straight_through=True)
    z_ref, ref_bits, _ = quantize_multiscale(h.detach(), scales)
    assert torch.equal(z, z_ref) and all(torch.equal(a, b) for a, b in zip(bits, ref_bits))
    z.square().sum().backward()  # gradients reach the encoder side through the straight-through estimator
    assert h.grad is not None and h.grad.abs().sum() > 0
    # without it the sign blocks them: the codes' gradient w.r.t. h is zero almost everywhere
    h2 = h.detach().clone().requires_grad_(True)
    quantize_multiscale(h2, scales)[0].square().sum().backward()
    assert h2.grad.abs().max() < 1e-4 * h.grad.abs().max()
    # keep=k sums the first k scales only
    z3, bits3, _ = quantize_multiscale(h.detach(), scales, keep=3)
    assert len(bits3) == 3 and not torch.allclose(z3, z_ref)


def test_self_correction_without_flips_is_the_inference_quantiser():
    torch.manual_seed(0)
    h = torch.randn(3, 8, 16, 16)
    scales = TINY.scales
    gen = torch.Generator().manual_seed(0)
    bits, inputs = train.self_correcting_bits(h, scales, torch.zeros(3), gen)
    _, ref_bits, ref_inputs = quantize_multiscale(h, [(1, a, b) for a, b in scales])
    assert all(torch.equal(a, b) for a, b in zip(bits, ref_bits))
    assert all(torch.equal(a, b) for a, b in zip(inputs, ref_inputs))
    # with flips, the first scale's targets are unchanged; later targets correct the flipped inputs
    bits2, inputs2 = train.self_correcting_bits(h, scales, torch.tensor([0.0, 0.3, 0.3]), gen)
    assert torch.equal(bits2[0], ref_bits[0]) and torch.allclose(inputs2[0][0], ref_inputs[0][0], atol=1e-6)
    assert not torch.equal(inputs2[0][1:], ref_inputs[0][1:]) and not torch.equal(bits2[3][1:], ref_bits[3][1:])


def test_block_causal_mask():
    mask = train.block_causal_mask([(1, 1), (2, 2), (3, 3)])
    assert mask.shape == (14, 14)
    assert mask[0].tolist() == [True] + [False] * 13
    assert mask[1:5, :5].all() and not mask[1:5, 5:].any()
    assert mask[5:].all()


def test_teacher_forced_forward_matches_the_scale_loop():
    """The training forward (whole sequence, block-causal mask) gives the logits the cached scale loop
    computes for the same bits: training and sampling see the same model."""
    torch.manual_seed(0)
    cfg = InfinityConfig(depth=2, embed_dim=64, num_heads=2, text_channels=128, text_maxlen=16, d_vae=8, block_chunks=1)
    model = train.init_infinity(minivar.model.transformer.Infinity(cfg)).eval()
    torch.nn.init.normal_(model.head.weight, std=0.02)
    scales = [(1, 1), (2, 2), (4, 4)]
    kv, segments = torch.randn(5, 128), [(0, 5)]
    vae_bits = [torch.randint(0, 2, (1, 1, h, w, 8)) for h, w in scales]
    # the scale loop, teacher-forced
    from minivar.model.sampling import Settings, Trace, plan, run_scale_loop
    from minivar.model.pruning import PruneSchedule
    trace = Trace()
    settings = Settings(cfg=1.0, tau=1.0, seed=0, force_bits=[b[:, 0] for b in vae_bits])
    with torch.no_grad():
        run_scale_loop(model, model.condition(kv, segments), 1, plan(model.cfg, scales, 1.0, settings, PruneSchedule.none()),
                       settings, trace)
        # the same bits through the training forward: inputs are the running sums, downsampled
        from minivar.model.vae import bits_to_codes
        summed, next_inputs = 0, []
        for si, b in enumerate(vae_bits[:-1]):
            summed = summed + F.interpolate(bits_to_codes(b), size=(1, 4, 4), mode="trilinear")
            next_inputs.append(F.interpolate(summed, size=(1, *scales[si + 1]), mode="trilinear"))
        c = model.condition(kv, segments)
        x = train.teacher_inputs(model, c, next_inputs)
        rope = torch.cat([model.rope.table(1.0, h, w, "cpu") for h, w in scales], dim=1)
        for block in model.blocks:
            x = block(x, c.gss, c.text, Attn(None, rope, mask=train.block_causal_mask(scales)))
        logits = model.logits(x, c.cond).view(1, -1, 8, 2)
    loop = torch.cat(trace.logits, dim=1)  # (1, L, d, 2)
    assert torch.allclose(logits, loop, atol=1e-4)


def test_losses_of_the_first_scales_alone_equal_those_of_the_whole_sequence():
    """What the coarse batch relies on: under the block-causal mask, running only the first k scales
    gives those scales exactly the losses they get inside the whole sequence."""
    torch.manual_seed(0)
    cfg = InfinityConfig(depth=2, embed_dim=64, num_heads=2, text_channels=128, text_maxlen=16, d_vae=8, block_chunks=1)
    model = minivar.model.transformer.Infinity(cfg).eval()  # default init: the head is not zero
    scales, k = [(1, 1), (2, 2), (3, 3), (4, 4)], 2
    bits = [torch.randint(0, 2, (2, 1, h, w, 8)) for h, w in scales]
    inputs = [torch.randn(2, 8, 1, h, w) for h, w in scales[1:]]
    c = model.condition(torch.randn(7, 128), [(0, 3), (3, 7)])
    rope = torch.cat([model.rope.table(1.0, h, w, "cpu") for h, w in scales], dim=1)
    mask, L = train.block_causal_mask(scales), sum(h * w for h, w in scales[:k])
    with torch.no_grad():
        whole = train.scale_losses(model, c, inputs, bits, scales, rope, mask)
        prefix = train.scale_losses(model, c, inputs[: k - 1], bits[:k], scales[:k], rope[:, :L], mask[:L, :L])
    assert len(prefix) == k and torch.allclose(torch.stack(prefix), torch.stack(whole[:k]), atol=1e-6)
    assert not torch.allclose(whole[k], whole[0])  # the losses differ by scale: the comparison means something


def test_vae_loss_goes_down():
    """A few steps on one fixed batch: reconstruction improves through the quantiser."""
    torch.manual_seed(0)
    _, x = train.pixels_batch(random.Random(0), 4, TINY.res)
    vae = BSQVAE(TINY.vae)
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        loss, stats = train.vae_loss(vae, x, TINY.scales, TINY.commit)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(stats["l1"])
    assert losses[-1] < 0.9 * losses[0]


def test_infinity_loss_goes_down_and_the_files_load_back(tmp_path):
    torch.manual_seed(0)
    recipe = replace(TINY, gpt_stage=train.Stage(steps=16, batch=4, lr=3e-3, warmup=2))
    tok = train.train_tokenizer(recipe, tmp_path / "t5")
    assert tok.sp.encode("two red circles", out_type=str) == ["▁two", "▁red", "▁circles"]
    vae = BSQVAE(recipe.vae).eval().requires_grad_(False)  # untrained: its bits are still a function of the image
    log = train.Log(None)
    model, t5 = train.train_infinity(recipe, vae, tok, log)
    losses = [r["loss"] for r in log.rows]
    assert losses[-1] < losses[0] < 0.7  # starts at ln 2 per bit
    train.save_vae(vae, tmp_path, torch.bfloat16)
    train.save_infinity(model, recipe, tmp_path, torch.bfloat16)
    train.save_t5(t5, tmp_path / "t5")
    sd = torch.load(tmp_path / "infinity.pth", weights_only=True)
    assert any(k.startswith("block_chunks.0.module.1.") for k in sd) and not any(k.startswith("blocks.") for k in sd)
    assert flatten_block_keys(sd).keys() == model.state_dict().keys()
    assert set(torch.load(tmp_path / "vae.pth", weights_only=True)) == {"vae"}
    pipe = minivar.load(transformer=tmp_path / "infinity.pth", config=tmp_path / "infinity_config.json",
                        vae=tmp_path / "vae.pth", vae_config=tmp_path / "vae_config.json", text_encoder=tmp_path / "t5")
    assert pipe.transformer.cfg.depth == 2 and pipe.vae.cfg.patch_size == 2
    sd_loaded = pipe.transformer.state_dict()
    assert all(torch.equal(sd_loaded[k], v.to(torch.bfloat16).float()) for k, v in model.state_dict().items())
    out = pipe.generate("a red circle", res="0.06M", seed=0)
    assert out.image.size == (32, 32)


def test_set_changes_one_recipe_field():
    r = train.override(TINY, "t5.num_layers=3")
    assert r.t5.num_layers == 3 and r.t5.d_model == TINY.t5.d_model and r.infinity == TINY.infinity
    assert train.override(TINY, "layout=random").layout == "random"
    assert train.override(TINY, "truncate_to=[4]").truncate_to == (4,)
    assert train.override(TINY, "gpt_stage.lr=0.001").gpt_stage.lr == 0.001
    for bad, words in [("layuot=random", "no field 'layuot'"), ("t5.layers=4", "no field 'layers'"), ("steps", "FIELD=VALUE")]:
        with pytest.raises(ValueError, match=words):
            train.override(TINY, bad)


def test_short_run_reuses_the_tokenizer_and_vae(tmp_path, capsys):
    """The short-run protocol: a first full run, then a transformer-only run on top of its VAE that
    copies the VAE and tokenizer byte for byte, honours --steps and --set, and scores itself."""
    recipe = replace(TINY, vae_stage=train.Stage(steps=2, batch=2, lr=1e-3, warmup=1),
                     gpt_stage=train.Stage(steps=2, batch=2, lr=1e-3, warmup=1))
    train.run(recipe, tmp_path / "base")
    train.RECIPES["tiny-test"] = recipe
    try:
        train.main(["tiny-test", "--out", str(tmp_path / "short"), "--reuse-vae", str(tmp_path / "base"),
                    "--steps", "3", "--set", "caption_drop=0.5", "--eval", "5", "--threads", "1"])
    finally:
        del train.RECIPES["tiny-test"]
    for name in ("vae.pth", "t5/spiece.model"):
        assert (tmp_path / "short" / name).read_bytes() == (tmp_path / "base" / name).read_bytes()
    rows = [json.loads(line) for line in (tmp_path / "short" / "train_log.jsonl").read_text().splitlines()]
    assert not any(r["stage"] == "vae" for r in rows)
    assert max(r["step"] for r in rows if r["stage"] == "infinity") == 2
    assert json.loads((tmp_path / "short" / "infinity_config.json").read_text())["constructor_kwargs"]["cond_drop_rate"] == 0.5
    scores = json.loads((tmp_path / "short" / "geneval.json").read_text())
    assert scores["n"] == 5 and 0.0 <= scores["overall"] <= 1.0
    assert "mini-GenEval" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# Bad input: one line before any work, nothing in OUT touched
# --------------------------------------------------------------------------------------------------
TOY_DIR = Path(train.__file__).parent / "weights"


@pytest.fixture
def calls(monkeypatch) -> list:
    """train.run replaced by a stub that records its arguments: the flag checks must stop main before it."""
    seen = []
    monkeypatch.setattr(train, "run", lambda *args, **kwargs: seen.append((args, kwargs)) or {})
    return seen


@pytest.fixture
def no_training(monkeypatch):
    """Every training stage fails at once: a refused run must stop before them (and without the check,
    a test fails fast)."""
    def started(*args, **kwargs):
        raise AssertionError("training started")

    for stage in ("train_tokenizer", "train_vae", "train_infinity"):
        monkeypatch.setattr(train, stage, started)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.splitlines()[-1]
    assert line.startswith("python -m minivar.toy.train: error: ")
    return line


BAD_FLAGS = [  # (arguments to the toy recipe, words of the error)
    (["--threads", "0"], "--threads=0 is invalid: use 1 or more"),
    (["--steps", "-5"], "--steps=-5 is invalid: use 1 or more"),
    (["--steps", "0"], "--steps=0 is invalid"),
    (["--checkpoint-every", "-1"], "--checkpoint-every=-1 is invalid: use N >= 1 steps, or 0 for no checkpoints"),
    (["--eval", "-3"], "--eval=-3 is invalid"),
    (["--set", "gpt_stage.batch=0"], "--set gpt_stage.batch=0 is invalid: use 1 or more"),
    (["--set", "vae_stage.lr=NaN"], "--set vae_stage.lr=nan is invalid: use a finite number > 0"),
    (["--set", "gpt_stage.lr=-1"], "--set gpt_stage.lr=-1 is invalid"),
    (["--set", "gpt_stage.warmup=-5"], "--set gpt_stage.warmup=-5 is invalid"),
    (["--set", "res=48"], "--set res=48 is invalid: use 64, the last scale's side"),
    (["--set", "vae.patch_size=2"], "--set res=64 is invalid: use 32"),
    (["--set", "budget=1.8M"], "--set budget='1.8M' is invalid: use one of"),
    (["--set", "vocab=10"], "--set vocab=10 is invalid: use 64 or more"),
    (["--set", "corpus=0"], "--set corpus=0 is invalid"),
    (["--set", "caption_drop=2"], "--set caption_drop=2 is invalid: use a share in [0, 1]"),
    (["--set", "truncate_to=[9]"], "--set truncate_to=(9,) is invalid: use a non-empty list of scale counts in 1..7"),
    (["--set", "coarse_scales=9"], "--set coarse_scales=9 is invalid"),
    (["--set", "layout=grid"], "--set layout='grid' is invalid: use one of ['random', 'canonical']"),
    (["--set", "seed=-1"], "--set seed=-1 is invalid"),
    (["--set", "infinity.depth=5"], "--set infinity.depth=5 is invalid: use a multiple of infinity.block_chunks"),
    (["--set", "infinity.num_levels=3"], "--set infinity.num_levels=3 is invalid: use 7 or more"),
    (["--set", "infinity.text_maxlen=16"], "--set infinity.text_maxlen=16 is invalid: use 64 or more"),
    (["--set", "t5.d_model=64"], "--set infinity.text_channels=128 is invalid: use 64, t5.d_model"),
    (["--set", "t5.num_layers=0"], "--set t5.num_layers=0 is invalid"),
    (["--set", "t5.feed_forward_proj=swish"], "--set t5.feed_forward_proj 'swish' is not supported"),
    (["--set", "infinity.num_heads=3"], "embed_dim=128 and num_heads=3 are invalid"),
    (["--set", "res=abc"], "res takes an integer like 64, not \"abc\""),
    (["--set", "gpt_stage.lr=true"], "lr takes a number like 0.002, not true"),
    (["--set", "truncate_to=5"], "truncate_to takes a list like [5, 6], not 5"),
    (["--set", "t5=3"], "t5 is a group of fields"),
    (["--set", "res.x=3"], "res is a value, it has no field 'x'"),
    (["--set", "t5.vocab_size=99"], "the run derives t5.vocab_size from vocab; set vocab instead"),
]


@pytest.mark.parametrize("args, words", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_a_bad_flag_is_one_line_before_any_work(args, words, tmp_path, capsys, calls):
    with pytest.raises(SystemExit) as exit:
        train.main(["--out", str(tmp_path / "out"), *args])
    assert exit.value.code == 2 and words in one_error_line(capsys)
    assert calls == [] and not (tmp_path / "out").exists()


def test_good_flags_reach_the_run(tmp_path, calls):
    train.main(["--out", str(tmp_path), "--steps", "1", "--checkpoint-every", "0", "--set", "truncate=0",
                "--set", "gpt_stage.lr=1", "--threads", str(torch.get_num_threads())])
    (recipe, out), kwargs = calls[0]
    assert recipe.gpt_stage.steps == 1 and recipe.truncate == 0 and kwargs["checkpoint_every"] == 0


def model_files(src, dst):
    """A model directory at dst with (only) src's tokenizer and VAE files."""
    (dst / "t5").mkdir(parents=True)
    for name in train.FINISHED:
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_bad_out_and_reuse_vae_are_one_line_before_anything_is_written(tmp_path, capsys, no_training):
    (tmp_path / "file").write_text("not a directory")
    model = model_files(TOY_DIR, tmp_path / "model")
    broken = model_files(TOY_DIR, tmp_path / "broken")
    (broken / "vae.pth").write_bytes(b"not a checkpoint")
    cases = [
        (["--out", str(tmp_path / "file")], "file is a file, not a directory"),
        (["--out", str(tmp_path / "file" / "sub")], "file is a file, not a directory"),
        (["--out", str(tmp_path / "out"), "--reuse-vae", str(tmp_path / "nowhere")],
         "nowhere has no t5/spiece.model, vae.pth, vae_config.json; point it at a model directory"),
        (["--out", str(tmp_path / "out"), "--init", str(tmp_path / "nowhere")],  # the flag the user gave
         f"--init {tmp_path / 'nowhere'}: {tmp_path / 'nowhere'} has no t5/spiece.model"),
        (["--out", str(tmp_path / "out"), "--reuse-vae", str(broken)], "broken/vae.pth"),
        (["tiny", "--out", str(tmp_path / "out"), "--reuse-vae", str(model)],
         "its VAE has 32 bits per token and 4-pixel patches, the recipe 8 and 2"),
        (["--out", str(model), "--reuse-vae", str(model), "--overwrite"], "model is --out too"),
        (["--out", str(tmp_path / "out"), "--resume", "--overwrite"], "give one of them"),
    ]
    for args, words in cases:
        with pytest.raises(SystemExit) as exit:
            train.main([*args, "--threads", str(torch.get_num_threads())])
        line = one_error_line(capsys)
        assert exit.value.code == 2 and words in line, line
    assert not (tmp_path / "out").exists() and (tmp_path / "file").read_text() == "not a directory"
    assert sorted(p.name for p in model.rglob("*")) == ["spiece.model", "t5", "vae.pth", "vae_config.json"]


def test_word_roles_follow_the_caption_grammar():
    assert train.word_roles("two big red circles left of a blue square on a white background") == \
        [0, 0, 0, 0, 2, 2, 1, 1, 1, 2, 2, 2, 2]
    assert train.word_roles("a circle above two squares") == [0, 0, 2, 1, 1]
    assert train.word_roles("an orange square at the right on a black background") == [0, 0, 0] + [2] * 7
    assert train.word_roles("three green diamonds") == [0, 0, 0]


def test_token_roles_label_every_piece_and_eos(tmp_path):
    tok = train.train_tokenizer(TINY, tmp_path)
    caption = "a red circle and a blue square"
    labels = train.token_roles(tok, [caption, "zq"], 40)
    pieces = [len(tok.encode(w)) for w in caption.split()]
    expected = [r for n, r in zip(pieces, train.word_roles(caption)) for _ in range(n)] + [2]
    assert labels[0, : len(expected)].tolist() == expected and (labels[0, len(expected):] == train.NO_ROLE).all()


def test_directional_heads_look_after_and_before_each_word():
    from minivar.model.t5 import T5Encoder, relative_position_bucket

    t5 = train.directional_heads(T5Encoder(replace(TINY.t5, vocab_size=200)), 6.0)
    table = t5.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight  # (buckets, heads)
    rel = torch.arange(40)[None, :] - torch.arange(40)[:, None]        # key - query
    b = table[relative_position_bucket(rel, TINY.t5.relative_attention_num_buckets,
                                       TINY.t5.relative_attention_max_distance)]  # (query, key, heads)
    assert ((b[..., 0] > 0) == (rel > 0)).all() and ((b[..., 0] < 0) == (rel < 0)).all()  # head 0: later words
    assert ((b[..., 1] > 0) == (rel < 0)).all() and ((b[..., 1] < 0) == (rel > 0)).all()  # head 1: earlier words


def test_mix_and_placed_scenes_keep_the_default_draws():
    from minivar.toy import scenes

    a, b = random.Random(3), random.Random(3)
    assert scenes.batch(a, 6, 32, "canonical")[0] == [scenes.random_spec(b).caption for _ in range(6)]
    only_two = scenes.batch(random.Random(3), 12, 32, "canonical", mix=(0, 0, 0, 0, 1))[0]
    assert all(" and " in c for c in only_two)
    placed = scenes.batch(random.Random(3), 40, 32, "canonical", placed_share=1.0)[0]
    assert all(" at the " in c for c in placed)
