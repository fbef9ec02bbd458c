"""Golden fixtures for minivar.hart: run upstream HART (and FastVAR's copy of it) on CPU, record the numbers.

    python tools/hart_golden/make_golden.py --hart /path/to/mit-han-lab/hart --fastvar /path/to/csguoh/FastVAR \
        --out tests/fixtures

Nothing from upstream is copied here or into the package: the harness puts the fetched trees on sys.path
at run time, builds tiny randomly initialised models with upstream's own classes, saves them in HART's
file layout (`llm/config.json`, `llm/ema_model.bin`, `tokenizer/config.json`, `tokenizer/pytorch_model.bin`)
and records what `HARTForT2I.autoregressive_infer_cfg` computes on the discrete path (`final_stage=1`).
Each upstream tree runs in its own child process (both define the package `hart`).

Stand-ins, none of which changes a number that minivar is compared on:
* `hart_backend.fused_kernels.rms_norm` (a compiled CUDA kernel) -> the plain formula in float32:
  out = x * rsqrt(mean(x^2) + eps) * weight. The fused RoPE kernels are only referenced by code that
  inference does not run; they raise if called.
* `transformers` (not installed, and only its base classes are used by the parts run here) -> a module
  with `PretrainedConfig` (keyword arguments become attributes), `PreTrainedModel` (an nn.Module that keeps
  its config; `from_pretrained(dir)` builds from `config.json` and loads `pytorch_model.bin` if present),
  and `AutoConfig` / `AutoModel` whose `register` does nothing.
* `Tensor.cuda` / `Module.cuda` -> return self (upstream calls them unconditionally).
* FastVAR's copy only: its attention reshapes the output of its non-flash branch (its own softmax
  attention `slow_attn`, the branch every float32 run takes) with `q.shape[1]`, which in that branch's
  (B, H, L, hd) layout is the head count, so the branch cannot run at all. The harness loads
  `fastvar_basic.py` with that one expression read as the sequence length (`.reshape(B, -1, C)`); the
  arithmetic is FastVAR's own.
The harness also records every call upstream makes to `torch.multinomial`, `Tensor.exponential_` and
`np.random.shuffle`, to state how it consumes its generators.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

SCHEDULE_1024 = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)

# Tiny models. Vocabulary >= 600 because upstream's sampler asks for top-k 600 / 300 whatever top_k says.
TOKENIZER = dict(vocab_size=1024, z_channels=8, ch=32, ch_mult=[1, 1], quantizer_type="var_hybrid",
                 quant_resi=0.5, share_quant_resi=4, v_patch_nums=list(SCHEDULE_1024), hybrid=True)
TRANSFORMER = dict(context_token=300, context_dim=24, depth=2, embed_dim=32, num_heads=2, mlp_ratio=4.0,
                   norm_eps=1e-6, mlp_type="llama", attn_type="llama", disable_aln=True, shared_aln=False,
                   sep_aln_pooling_mode="max", use_cross_attn=False, use_timestep_embed=False,
                   attn_l2_norm=False, flash_if_available=False, fused_if_available=False,
                   diff_width=32, diff_depth=1, num_sampling_steps="8", diffusion_batch_mul=1)
FIXTURES = {
    "hart-tiny-a": dict(patch_nums=list(SCHEDULE_1024), use_context_norm=True, weight_seed=0,
                        runs=[dict(name="run", tree="hart", B=1, cfg=4.5, seed=1, valid=[37]),
                              dict(name="run_fastvar", tree="fastvar", B=1, cfg=4.5, seed=1, valid=[37])]),
    "hart-tiny-b": dict(patch_nums=[1, 2, 3, 4, 6, 8], use_context_norm=False, weight_seed=1,
                        runs=[dict(name="run", tree="hart", B=2, cfg=2.0, seed=7, valid=[300, 5])]),
}


# --------------------------------------------------------------------------------------------------
# Stand-ins
# --------------------------------------------------------------------------------------------------
def rms_norm(out, x, weight, eps, use_quant):
    assert not use_quant
    xf = x.float()
    out.copy_(xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float())


def not_run(*a, **k):
    raise NotImplementedError("the fused RoPE kernels are not used at inference")


def install_stand_ins():
    backend = types.ModuleType("hart_backend")
    kernels = types.ModuleType("hart_backend.fused_kernels")
    kernels.rms_norm = rms_norm
    kernels.fused_rope_forward_func = kernels.fused_rope_backward_func = not_run
    kernels.fused_rope_with_pos_forward_func = not_run
    backend.fused_kernels = kernels
    sys.modules["hart_backend"], sys.modules["hart_backend.fused_kernels"] = backend, kernels

    tf = types.ModuleType("transformers")

    class PretrainedConfig:
        def __init__(self, **kwargs):
            for k, v in kwargs.items():
                setattr(self, k, v)

    class PreTrainedModel(nn.Module):
        config_class = None
        gradient_checkpointing = False

        def __init__(self, config, *args, **kwargs):
            nn.Module.__init__(self)
            self.config = config

        @classmethod
        def from_pretrained(cls, path):
            path = Path(path)
            model = cls(cls.config_class(**json.loads((path / "config.json").read_text())))
            weights = path / "pytorch_model.bin"
            if weights.exists():
                model.load_state_dict(torch.load(weights, weights_only=True))
            return model

    class Auto:
        @staticmethod
        def register(*args, **kwargs):
            pass

    tf.PretrainedConfig, tf.PreTrainedModel, tf.PreTrainedTokenizer = PretrainedConfig, PreTrainedModel, object
    tf.AutoConfig = tf.AutoModel = Auto
    sys.modules["transformers"] = tf
    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.Module.cuda = lambda self, *a, **k: self


# --------------------------------------------------------------------------------------------------
# Tiny checkpoints
# --------------------------------------------------------------------------------------------------
def randomise(model: nn.Module, seed: int) -> None:
    """Every parameter random and O(1)-scaled, so that no path is a no-op: weights ~ N(0, 1/fan_in),
    norm weights 1 + N(0, 0.1^2), biases and embeddings N(0, 0.1^2) / N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=gen)
            if name.endswith("bias"):
                p.copy_(0.1 * r)
            elif p.ndim == 1:
                p.copy_(1 + 0.1 * r)
            elif "embedding" in name or "lvl_embed" in name:
                p.copy_(r if "embedding" in name else 0.5 * r)
            else:
                p.copy_(r / math.sqrt(p[0].numel()))


def build_fixture_models(out: Path, spec: dict) -> None:
    from hart.modules.models.autoencoder import HARTAutoEncoderWithDisc
    from hart.modules.models.autoencoder.configuration import HARTAutoEncoderWithDiscConfig
    from hart.modules.models.transformer import HARTForT2I
    from hart.modules.models.transformer.configuration import HARTForT2IConfig

    tok_dir, llm_dir = out / "tokenizer", out / "llm"
    tok_dir.mkdir(parents=True, exist_ok=True)
    llm_dir.mkdir(parents=True, exist_ok=True)
    tok_cfg = dict(TOKENIZER, v_patch_nums=spec["patch_nums"])
    (tok_dir / "config.json").write_text(json.dumps(tok_cfg, indent=1))
    torch.manual_seed(spec["weight_seed"])
    tok = HARTAutoEncoderWithDisc(HARTAutoEncoderWithDiscConfig(**tok_cfg))
    randomise(tok.vae, 100 + spec["weight_seed"])
    # The discriminator (2.8 M parameters) is left out of the tiny file: inference never reads it.
    torch.save({k: v for k, v in tok.state_dict().items() if not k.startswith("disc.")}, tok_dir / "pytorch_model.bin")

    llm_cfg = dict(TRANSFORMER, patch_nums=spec["patch_nums"], use_context_norm=spec["use_context_norm"],
                   vae_path=str(tok_dir))
    (llm_dir / "config.json").write_text(json.dumps({**llm_cfg, "vae_path": None}, indent=1))
    model = HARTForT2I(HARTForT2IConfig(**llm_cfg))
    randomise(model, 200 + spec["weight_seed"])
    with torch.no_grad():  # logits spread of a few units, so that sampling is a real draw, not an argmax
        model.head.weight.mul_(0.1)
    # The two training-only buffers (the causal mask is (L + 299)^2 floats) are left out of the tiny file.
    sd = {k: v for k, v in model.state_dict().items() if k not in ("attn_bias_for_masking", "lvl_1L")}
    torch.save(sd, llm_dir / "ema_model.bin")


def load_upstream(out: Path):
    from hart.modules.models.transformer import HARTForT2I
    from hart.modules.models.transformer.configuration import HARTForT2IConfig

    cfg = json.loads((out / "llm" / "config.json").read_text())
    model = HARTForT2I(HARTForT2IConfig(**{**cfg, "vae_path": str(out / "tokenizer")}))
    missing, unexpected = model.load_state_dict(torch.load(out / "llm" / "ema_model.bin", weights_only=True),
                                                strict=False)
    assert sorted(missing) == ["attn_bias_for_masking", "lvl_1L"] and not unexpected, (missing, unexpected)
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Recording one run
# --------------------------------------------------------------------------------------------------
def context_inputs(B: int, valid: list[int], n: int, dim: int, seed: int):
    gen = torch.Generator().manual_seed(1000 + seed)
    context = torch.randn(B, n, dim, generator=gen)
    mask = torch.arange(n)[None] < torch.tensor(valid)[:, None]
    return context, mask, torch.cumsum(mask, dim=1) - 1


def logit_positions(l: int, k: int = 16) -> torch.Tensor:
    return torch.unique(torch.linspace(0, l - 1, min(k, l)).round().long())


def record_run(out: Path, run: dict) -> dict:
    import hart.modules.models.transformer.hart_transformer_t2i as t2i

    model = load_upstream(out)
    quant, vae = model.vae_quant_proxy[0], model.vae_proxy[0]
    rec = dict(raw=[], guided=[], tokens=[], f_hat=[], calls=[])
    sampler, next_input, to_img = t2i.sample_with_top_k_top_p_, quant.get_next_autoregressive_input, vae.fhat_to_img

    def sample(logits, **kw):
        rec["guided"].append(logits.detach().clone())
        idx = sampler(logits, **kw)
        rec["tokens"].append(idx[:, :, 0].clone())
        rec["calls"].append(dict(fn="sample_with_top_k_top_p_", top_k=kw["top_k"], top_p=kw["top_p"],
                                 generator="model.rng" if kw["rng"] is model.rng else repr(kw["rng"])))
        return idx

    def next_autoregressive_input(si, SN, f_hat, h, patch_nums=None):
        f, nxt = next_input(si, SN, f_hat, h, patch_nums=patch_nums)
        rec["f_hat"].append(f.clone())
        return f, nxt

    def fhat_to_img(f_hat):
        rec["f_hat"].append(f_hat.clone())
        rec["decoded"] = to_img(f_hat.clone())
        return rec["decoded"].clone()

    get_logits = model.get_logits
    model.get_logits = lambda h, cond: rec["raw"].append(get_logits(h, cond)) or rec["raw"][-1]
    t2i.sample_with_top_k_top_p_ = sample
    quant.get_next_autoregressive_input = next_autoregressive_input
    vae.fhat_to_img = fhat_to_img
    log_generators(rec["calls"], model.rng)

    B, cfg = run["B"], json.loads((out / "llm" / "config.json").read_text())
    context, mask, pos = context_inputs(B, run["valid"], cfg["context_token"], cfg["context_dim"], run["seed"])
    with torch.inference_mode():
        image = model.autoregressive_infer_cfg(B=B, label_B=context.clone(), g_seed=run["seed"], cfg=run["cfg"],
                                               more_smooth=False, context_position_ids=pos.clone(),
                                               context_mask=mask.clone(), final_stage=1)
    return summarise(rec, run, context, mask, pos, image, model)


def log_generators(calls: list, rng: torch.Generator) -> None:
    """Record every draw from a generator during the run (patched for this child process only)."""
    multinomial, exponential, shuffle = torch.multinomial, torch.Tensor.exponential_, np.random.shuffle

    def m(probs, num_samples, replacement=False, *, generator=None, **kw):
        calls.append(dict(fn="torch.multinomial", rows=probs.shape[0], num_samples=num_samples,
                          replacement=replacement, generator="model.rng" if generator is rng else repr(generator)))
        return multinomial(probs, num_samples, replacement, generator=generator, **kw)

    def e(self, *a, generator=None, **kw):
        calls.append(dict(fn="Tensor.exponential_", numel=self.numel(),
                          generator="model.rng" if generator is rng else repr(generator)))
        return exponential(self, *a, generator=generator, **kw)

    def s(x):
        calls.append(dict(fn="np.random.shuffle", n=len(x), generator="numpy global"))
        return shuffle(x)

    torch.multinomial, torch.Tensor.exponential_, np.random.shuffle = m, e, s


def summarise(rec, run, context, mask, pos, image, model) -> dict:
    B, lse, pick, sel, sampled_logit = run["B"], [], [], [], []
    for guided, tokens in zip(rec["guided"], rec["tokens"]):
        l = guided.shape[1]
        lse.append(torch.logsumexp(guided, dim=-1))
        sampled_logit.append(guided.gather(-1, tokens[..., None])[..., 0])
        p = logit_positions(l)
        pick.append(p)
        sel.append(guided[:, p].clone())
    return dict(spec=run, patch_nums=list(model.patch_nums), context=context, context_mask=mask,
                context_position_ids=pos, tokens=rec["tokens"], logit_positions=pick, logits=sel,
                logsumexp=lse, sampled_logit=sampled_logit, raw_logits_first=rec["raw"][0][:, -1:].clone(),
                f_hat=rec["f_hat"] if run["tree"] == "hart" else rec["f_hat"][-1:], image=image.float(), decoded_clamped=rec["decoded"],
                generator_calls=rec["calls"])


def patch_fastvar_reshape() -> None:
    """Load FastVAR's fastvar_basic.py with its non-flash output reshape read as (B, L, C) (see the docstring)."""
    import importlib.util

    name = "hart.modules.networks.fastvar_basic"
    spec = importlib.util.find_spec(name)
    if spec is None:
        return  # upstream HART: nothing to patch
    src = Path(spec.origin).read_text()
    bad = ".reshape(B, q.shape[1], C)"
    assert src.count(bad) == 1, "FastVAR's attention changed; review the stand-in"
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    exec(compile(src.replace(bad, ".reshape(B, -1, C)"), spec.origin, "exec"), module.__dict__)


# hart-0.7b as assumed (its config.json files could not be read from here): see `keys`.
REAL_TOKENIZER = dict(vocab_size=4096, z_channels=32, ch=160, ch_mult=[1, 1, 2, 2, 4], quantizer_type="var_hybrid",
                      quant_resi=0.5, share_quant_resi=4, v_patch_nums=list(SCHEDULE_1024), hybrid=True)
REAL_TRANSFORMER = dict(TRANSFORMER, depth=24, embed_dim=1536, num_heads=24, context_dim=1536, diff_width=1024,
                        diff_depth=6, diffusion_batch_mul=4, patch_nums=list(SCHEDULE_1024), use_context_norm=False)


def on_meta(build):
    """Build a model whose parameters and buffers live on the meta device. Upstream's constructor calls
    `.item()` (its drop-path rates), which the meta device refuses, so each tensor is created on the CPU
    and moved to meta as it is registered."""
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def parameter(self, name, p):
        register_parameter(self, name, None if p is None else nn.Parameter(p.to("meta"), p.requires_grad))

    def buffer(self, name, t, persistent=True):
        register_buffer(self, name, None if t is None else t.to("meta"), persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = parameter, buffer
    try:
        return build()
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer


def keys(out: Path, commit: str) -> None:
    """Key listings of hart-0.7b's transformer (`llm/`) and tokenizer (`tokenizer/`) state dicts."""
    import tempfile

    from hart.modules.models.autoencoder import HARTAutoEncoderWithDisc
    from hart.modules.models.autoencoder.configuration import HARTAutoEncoderWithDiscConfig
    from hart.modules.models.transformer import HARTForT2I
    from hart.modules.models.transformer.configuration import HARTForT2IConfig

    with tempfile.TemporaryDirectory() as tok_dir:
        (Path(tok_dir) / "config.json").write_text(json.dumps(REAL_TOKENIZER))
        llm = on_meta(lambda: HARTForT2I(HARTForT2IConfig(**REAL_TRANSFORMER, vae_path=tok_dir)))
        tok = on_meta(lambda: HARTAutoEncoderWithDisc(HARTAutoEncoderWithDiscConfig(**REAL_TOKENIZER)))
    assumed = ("config.json of mit-han-lab/hart-0.7b-1024px not readable here; depth 24, width 1536, 24 heads, "
               "use_context_norm false, diff_width 1024 and diff_depth 6 (upstream defaults) are assumptions; "
               "context_token 300 and context_dim 1536 (Qwen2-VL-1.5B) are from upstream's sample.py and README")
    for name, model, config in (("hart_0.7b_llm_keys.json", llm, REAL_TRANSFORMER),
                                ("hart_0.7b_tokenizer_keys.json", tok, REAL_TOKENIZER)):
        listing = dict(description=f"upstream {type(model).__name__} state_dict built on the meta device",
                       upstream=dict(repository="github:mit-han-lab/hart", commit=commit), config=config,
                       assumed=assumed, param_count=sum(p.numel() for p in model.parameters()),
                       keys={k: [list(v.shape), str(v.dtype).removeprefix("torch.")]
                             for k, v in model.state_dict().items()})
        (out / name).write_text(json.dumps(listing, indent=1) + "\n")
        print(f"{name}: {len(listing['keys'])} keys, {listing['param_count']:,} parameters")


def child(args) -> None:
    sys.path.insert(0, str(Path(args.tree).resolve()))
    install_stand_ins()
    patch_fastvar_reshape()
    torch.set_num_threads(2)
    out = Path(args.fixture)
    if args.keys:
        return keys(out, args.spec)
    spec = json.loads(args.spec)
    if args.build:
        build_fixture_models(out, spec)
        return
    result = record_run(out, spec)
    torch.save(result, out / f"{spec['name']}.pt")
    print(f"{out.name}/{spec['name']}: tokens per scale {[tuple(t.shape) for t in result['tokens']]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hart", help="a checkout of github:mit-han-lab/hart")
    ap.add_argument("--fastvar", help="a checkout of github:csguoh/FastVAR (its HART/ folder is used)")
    ap.add_argument("--out", default="tests/fixtures")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--commit", help="upstream HART's commit, recorded in the key listings (default: git rev-parse)")
    ap.add_argument("--keys", action="store_true", help="only write the hart-0.7b key listings into --out")
    ap.add_argument("--tree", help=argparse.SUPPRESS)
    ap.add_argument("--fixture", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.keys:
        commit = args.commit or subprocess.run(["git", "-C", args.hart, "rev-parse", "HEAD"], capture_output=True,
                                               text=True).stdout.strip()
        subprocess.run([sys.executable, __file__, "--child", "--keys", "--tree", args.hart, "--fixture", args.out,
                        "--spec", commit or "unknown"], check=True)
        return
    trees = {"hart": args.hart, "fastvar": str(Path(args.fastvar) / "HART")}
    for name, spec in FIXTURES.items():
        fixture = Path(args.out) / name
        base = [sys.executable, __file__, "--child", "--fixture", str(fixture)]
        subprocess.run(base + ["--build", "--tree", trees["hart"], "--spec", json.dumps(spec)], check=True)
        for run in spec["runs"]:
            subprocess.run(base + ["--tree", trees[run["tree"]], "--spec", json.dumps(run)], check=True)


if __name__ == "__main__":
    main()
