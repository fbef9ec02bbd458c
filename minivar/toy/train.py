"""Train the toy Infinity from scratch on procedural shape scenes, in the real checkpoint formats.

    python -m minivar.toy.train --out minivar/toy/weights --overwrite # the shipped toy, all three stages
    python -m minivar.toy.train --reuse-vae minivar/toy/weights --steps 1050 --eval 100 --out /tmp/run \
        --set t5.num_layers=4                                         # a short A/B run (about 20 min)
    python -m minivar.toy.train --out minivar/toy/weights --resume    # the first, continued after an interruption

The short-run protocol keeps the tokenizer and VAE of an existing model directory, trains only the
transformer and T5 for `--steps`, then scores the result with mini-GenEval (`--eval N` prompts).
`--set` changes one field of the recipe (dotted for nested configs), so two runs that differ in one
`--set` are a controlled comparison; docs/toy/experiments.md records every one.

Runs are resumable: the VAE and transformer stages write OUT/resume.pt every `--checkpoint-every`
steps (default 100), and the same command plus `--resume` continues from it, ending with the weights
of an uninterrupted run (same --threads; tests/test_train_resume.py checks it tensor for tensor).
An OUT that holds an earlier run (its log, checkpoint or weights) is refused unless the command says
`--resume` (continue it) or `--overwrite` (start afresh, replacing its files). Every flag, `--set`
value, model directory and checkpoint is checked before anything in OUT is written: a bad one is
one line, `python -m minivar.toy.train: error: ...`, and exit status 2.

Three stages, each seeded, each with a progress bar and a loss log (train_log.jsonl):

1. tokenizer  a sentencepiece model trained on captions from scenes.py
2. VAE        a small BSQ VAE: encoder -> multi-scale residual bit quantiser with a straight-through
              estimator -> decoder, trained on reconstruction (plus a commitment term). 40 % of the
              steps decode only the first 5 or 6 scales, so that coarse scales carry the shapes and
              a latent whose last scales were skipped (pruning) still decodes to a clean picture.
3. Infinity   a small transformer and a tiny T5 encoder trained together by teacher-forced next-scale
              bit prediction: all scales run as one sequence under a block-causal mask, and each scale
              predicts its bits from the VAE's running latent of the scales before it (bitwise
              cross-entropy), with Infinity's bitwise self-correction (random bit flips in the inputs
              that later scales learn to undo). Captions are dropped 10% of the time in favour of the
              learned `cfg_uncond` rows, which is what classifier-free guidance needs at sampling time.
              Each step also trains a second batch on the first 5 scales alone, where the layout is
              decided (exact under the block-causal mask, and a quarter of the tokens). Its scenes
              use the canonical layout (scenes.make_scene): where objects go, an unnamed size and an
              unnamed background follow from the caption, so a layout never has to be invented by
              bits that are sampled independently of each other.

The output directory is a model directory that `minivar.load(path)` reads like any other:
infinity.pth + infinity_config.json (upstream keys and constructor arguments), vae.pth +
vae_config.json ({'vae': state_dict}, upstream arguments) and t5/ (Hugging Face layout).

Uses scenes.py (captions and images), the model's own modules (model/vae.py's quantiser and
autoencoder, model/transformer.py in parity mode (parity.py), model/t5.py and its tokenizer) and
loading/checkpoint.py (--reuse-vae).
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import scenes
from ..model.vae import quantize_multiscale
from ..model.config import BUDGETS, InfinityConfig, scale_schedule
from ..model.t5 import T5Config, T5Encoder, relative_position_bucket
from ..model.t5 import Tokenizer
from ..model.transformer import Attn, Conditioning, Infinity
from ..loading.checkpoint import load_infinity, load_t5, load_vae
from .. import parity
from ..pipeline import bad
from ..model.vae import BSQVAE, VAEConfig, image_to_pixels


@dataclass
class Stage:
    steps: int
    batch: int
    lr: float
    warmup: int = 100


@dataclass
class Recipe:
    res: int = 64                    # image side in pixels (4 pixels per token at the 16x16 scale)
    budget: str = "0.06M"            # Infinity's 7-scale 1:1 schedule, 1x1 ... 16x16
    seed: int = 0
    vocab: int = 128                 # sentencepiece pieces (plus T5's 100 sentinel ids)
    corpus: int = 20_000             # captions the tokenizer is trained on
    # 0.41M parameters. No residual blocks in the encoder levels (the decoder keeps one per level):
    # on this budget the shallow VAE trains several times faster per step and per second.
    vae: VAEConfig = field(default_factory=lambda: VAEConfig(codebook_dim=32, base_ch=48, num_res_blocks=0,
                                                             ch_mult=(1, 1, 1), patch_size=4))
    # 0.36M parameters
    t5: T5Config = field(default_factory=lambda: T5Config(d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4,
                                                          feed_forward_proj="gated-gelu"))
    # 1.88M parameters; 8 heads of width 16 and 6 blocks (docs/toy/experiments.md, comparisons 9 to 14)
    infinity: InfinityConfig = field(default_factory=lambda: InfinityConfig(depth=6, embed_dim=128, num_heads=8,
                                                                            text_channels=128, block_chunks=2))
    vae_stage: Stage = field(default_factory=lambda: Stage(steps=2500, batch=8, lr=2e-3, warmup=50))
    gpt_stage: Stage = field(default_factory=lambda: Stage(steps=3600, batch=16, lr=2e-3, warmup=50))
    commit: float = 0.25             # weight of the VAE's commitment loss
    truncate: float = 0.4            # share of VAE steps that decode only the first scales ...
    truncate_to: tuple[int, ...] = (5, 6)  # ... this many of them (up to 8x8 or 12x12)
    caption_drop: float = 0.1        # share of captions replaced by cfg_uncond
    self_correct: float = 0.2        # bits flipped in teacher-forced inputs: up to this share (per image)
    coarse_batch: int = 16           # extra scenes per step trained on the first scales only ...
    coarse_scales: int = 5           # ... this many (1x1 ... 8x8), where the layout is decided
    # Scenes the transformer learns from: "canonical" places objects in slots that follow from the
    # caption (scenes.make_scene); the VAE always sees "random" layouts, the wider distribution.
    layout: str = "canonical"
    # Odds of each scenes.CATEGORIES in the transformer's scenes (empty: equal, as before mixes existed);
    # the tokenizer and the VAE always see equal odds.
    mix: tuple[float, ...] = ()
    # A model directory whose transformer and T5 this run starts from instead of a fresh init ("": none);
    # its tokenizer and VAE are the run's (--init DIR implies --reuse-vae DIR).
    init: str = ""
    # Bias that T5 heads 0 and 1 add to every key after / before the query (0: off). Head 0 then reads
    # what follows each word and head 1 what precedes it, so a colour word "knows" whether another
    # object phrase comes after it: word order, which a bag of words loses (docs/toy/experiments.md,
    # comparison 17). Set at the start of the transformer stage, also over --init's T5.
    t5_directional: float = 0.0
    # Weight of an auxiliary loss on T5 (0: off): a linear probe, trained alongside and not saved, reads
    # from each token's T5 feature which noun phrase of the caption it belongs to (first, second, or
    # neither). The real Infinity's T5 comes pretrained; the toy's learns only through the image loss and
    # reads captions as bags of words (comparison 18), which this gives it instead.
    t5_roles: float = 0.0
    # Share of the transformer's scenes that show one object "at the left" (right, top, bottom) of the
    # picture: the only scenes where a word alone says which half an object takes, so the coarse scales
    # must learn where left and right are, which binding needs (comparison 19). 0: none.
    placed: float = 0.0

    @property
    def scales(self) -> list[tuple[int, int]]:
        return scale_schedule(self.budget)


RECIPES: dict[str, Recipe] = {
    "toy": Recipe(),
    # seconds on a laptop: for tests of the training code, not for pictures
    "tiny": Recipe(res=32, budget="0.06M", vocab=128, corpus=2000,
                   vae=VAEConfig(codebook_dim=8, base_ch=24, num_res_blocks=0, ch_mult=(1, 1), patch_size=2),
                   t5=T5Config(d_model=128, d_kv=16, d_ff=64, num_layers=1, num_heads=2, feed_forward_proj="gated-gelu"),
                   infinity=InfinityConfig(depth=2, embed_dim=64, num_heads=2, text_channels=128, text_maxlen=64,
                                           block_chunks=1),
                   vae_stage=Stage(steps=30, batch=4, lr=2e-3, warmup=5),
                   gpt_stage=Stage(steps=30, batch=4, lr=2e-3, warmup=5), coarse_batch=4),
}


# --------------------------------------------------------------------------------------------------
# Helpers: optimiser, schedule, logging
# --------------------------------------------------------------------------------------------------
def lr_at(step: int, stage: Stage) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < stage.warmup:
        return stage.lr * (step + 1) / stage.warmup
    t = (step - stage.warmup) / max(1, stage.steps - stage.warmup)
    return stage.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def optimizer(params, stage: Stage) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=stage.lr, betas=(0.9, 0.95), weight_decay=0.01)


class Log:
    """Appends one JSON line per logged step and keeps the history for the caller."""

    def __init__(self, path: Path | None):
        self.path, self.rows = path, []

    def __call__(self, **row) -> None:
        self.rows.append(row)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def pixels_batch(rng: random.Random, n: int, res: int, layout: str = "random",
                 mix: tuple[float, ...] = (), placed: float = 0.0) -> tuple[list[str], torch.Tensor]:
    """Captions and images (n, 3, res, res) in [-1, 1]."""
    captions, images = scenes.batch(rng, n, res, layout, mix, placed)
    return captions, image_to_pixels(torch.from_numpy(images))


# --------------------------------------------------------------------------------------------------
# Checkpoints: stopping and resuming a run
# --------------------------------------------------------------------------------------------------
class RunError(ValueError):
    """The run cannot start or continue as asked (its --out, --reuse-vae or --resume): one line that names
    the file and what to do, raised before anything in OUT is written or removed."""


class ResumeError(RunError):
    """--resume cannot continue: the checkpoint is missing, unreadable, malformed or of other arguments."""


class StageClock:
    """Seconds per stage. A resumed run starts from the checkpoint's, so it reports the whole run
    (less the time between the last checkpoint and the interruption)."""

    def __init__(self, seconds: dict[str, float] | None = None):
        self.seconds, self.t = dict(seconds or {}), time.perf_counter()

    def lap(self, stage: str) -> dict[str, float]:
        """Add the time since the last lap to `stage`."""
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self.t
        self.t = now
        return self.seconds


def flat(d: dict, prefix: str = "") -> dict:
    """{"t5": {"num_layers": 2}} -> {"t5.num_layers": 2}: the dotted names --set uses."""
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


# What Checkpoint.step_done writes: each entry's type, and each stage's modules
ENTRIES = {"recipe": dict, "reuse": (str, type(None)), "stage": str, "step": int, "modules": dict,
           "optimizer": dict, "rng": dict, "log": str, "seconds": dict}
MODULES = {"vae": ["vae"], "infinity": ["infinity", "t5"]}
OPTIONAL = ("roles",)  # the t5_roles probe, present when the recipe trains it
AFRESH = "start afresh with --overwrite instead of --resume"


class Checkpoint:
    """OUT/resume.pt: all a stage's loop needs to continue bit for bit (weights, optimiser state, every
    random state it draws from, the log so far, the seconds spent), with the recipe it belongs to.

    Written after every `every`-th step of the VAE and transformer stages and after their last step
    (every = 0: never), to a temporary name then renamed, so a kill while writing keeps the previous
    one; removed when the run completes. Read with weights_only=True, so it holds only tensors and
    plain Python values (a random.Random state becomes [version, tensor, gauss_next]). A resumed run
    writes nothing (the log as it was at the checkpoint) until the state has loaded into its stage.
    """

    def __init__(self, out: Path, recipe: Recipe, every: int, reuse: Path | None, log: Log):
        self.path, self.recipe, self.every, self.reuse, self.log = out / "resume.pt", recipe, every, reuse, log
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.fields = flat(json.loads(json.dumps(asdict(recipe))))  # tuples as lists, as they load back
        self.clock, self.state = StageClock(), None
        self.where = f"--resume: {self.path}"

    def start(self) -> None:
        """A fresh run: forget an earlier run's checkpoint and log."""
        self.remove()
        self.log.path.unlink(missing_ok=True)

    def remove(self) -> None:
        """Delete the checkpoint, and a half-written one a kill may have left."""
        self.path.unlink(missing_ok=True)
        self.tmp.unlink(missing_ok=True)

    def steps(self, stage: str) -> int:
        return {"vae": self.recipe.vae_stage, "infinity": self.recipe.gpt_stage}[stage].steps

    def read(self) -> str:
        """Read and check the checkpoint, writing nothing; the stage to continue. ResumeError (one line)
        if it is missing, unreadable, malformed, or of another recipe or other arguments."""
        if not self.path.exists():
            raise self.refusal("not found (a completed run removes it)")
        try:
            state = torch.load(self.path, weights_only=True)
        except Exception as e:  # a truncated or foreign file: whatever torch.load raises
            raise self.refusal(f"is not a readable checkpoint ({type(e).__name__})") from None
        if problem := self.malformed(state):
            raise self.refusal(problem)
        theirs = state["recipe"]
        diff = [f"{k} {theirs.get(k)} here {self.fields.get(k)}" for k in sorted(theirs.keys() | self.fields.keys())
                if theirs.get(k) != self.fields.get(k)]
        if diff:
            raise self.refusal(f"is of another recipe ({'; '.join(diff)})",
                               "resume with the same recipe, --steps and --set")
        if (state["reuse"] is None) != (self.reuse is None):
            raise self.refusal(f"was written by a run {'with' if state['reuse'] else 'without'} --reuse-vae",
                               "resume with the same arguments")
        stage, step = state["stage"], state["step"]
        if not 1 <= step <= self.steps(stage):
            raise self.refusal(f"is at step {step}, outside the {stage} stage's 1..{self.steps(stage)}")
        self.state, self.clock = state, StageClock(state["seconds"])
        return stage

    def refusal(self, problem: str, advice: str = AFRESH) -> ResumeError:
        return ResumeError(f"{self.where} {problem}; {advice}")

    @staticmethod
    def malformed(state) -> str | None:
        """What is wrong with the form of a loaded checkpoint (entries, types, stage, modules), or None."""
        if not isinstance(state, dict):
            return f"holds a {type(state).__name__}, not a checkpoint's dict"
        for key, kind in ENTRIES.items():
            if key not in state:
                return f"has no {key!r} entry"
            if not isinstance(state[key], kind) or isinstance(state[key], bool):
                return f"has a {type(state[key]).__name__} as its {key!r} entry"
        stage, modules, rng = state["stage"], sorted(state["modules"]), state["rng"]
        if stage not in MODULES:
            return f"is of stage {stage!r}, not one of {list(MODULES)}"
        if stage == "vae" and state["reuse"] is not None:
            return "is of the VAE stage, which a run with --reuse-vae does not train"
        if [m for m in modules if m not in OPTIONAL] != MODULES[stage]:
            return f"holds the modules {modules}, the {stage} stage has {MODULES[stage]}"
        missing = [k for k in ["torch", "python"] + (["generator"] if stage == "infinity" else []) if k not in rng]
        if missing:
            return f"has no {missing[0]!r} random state"
        if not all(isinstance(v, (int, float)) for v in state["seconds"].values()):
            return "has seconds that are not numbers"
        return None

    def restore(self, stage: str, modules: dict[str, nn.Module], opt: torch.optim.Optimizer, rng: random.Random,
                gen: torch.Generator | None = None) -> int:
        """Load a resumed stage's state into its freshly built loop (ResumeError if it does not fit), then
        put the log back as it was when the checkpoint was written; the step to continue from (0 unless
        the checkpoint is of this stage)."""
        state, self.state = self.state, None
        if state is None or state["stage"] != stage:
            return 0
        try:
            for name, module in modules.items():
                module.load_state_dict(state["modules"][name])
            opt.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"]["torch"])
            version, internal, gauss = state["rng"]["python"]
            rng.setstate((version, tuple(internal.tolist()), gauss))
            if gen is not None:
                gen.set_state(state["rng"]["generator"])
        except Exception as e:  # tensors of another shape or dtype, a foreign optimiser or random state
            raise self.refusal(f"does not fit the {stage} stage ({type(e).__name__}: "
                               f"{' '.join(str(e).split())[:160]})") from None
        self.log.path.write_text(state["log"])
        self.log(stage="resumed", at=stage, step=state["step"], threads=torch.get_num_threads())
        return state["step"]

    def step_done(self, stage: str, step: int, modules: dict[str, nn.Module], opt: torch.optim.Optimizer,
                  rng: random.Random, gen: torch.Generator | None = None) -> None:
        """Called after each step (0-based `step`, logged already): writes the checkpoint when it is due."""
        done = step + 1
        if not self.every or (done % self.every and done < self.steps(stage)):
            return
        version, internal, gauss = rng.getstate()
        state = {"recipe": self.fields, "reuse": None if self.reuse is None else str(self.reuse),
                 "stage": stage, "step": done, "modules": {k: m.state_dict() for k, m in modules.items()},
                 "optimizer": opt.state_dict(),
                 "rng": {"torch": torch.get_rng_state(), "python": [version, torch.tensor(internal), gauss],
                         **({"generator": gen.get_state()} if gen is not None else {})},
                 "log": self.log.path.read_text(), "seconds": dict(self.clock.lap(stage))}
        torch.save(state, self.tmp)
        os.replace(self.tmp, self.path)


# --------------------------------------------------------------------------------------------------
# Stage 1: tokenizer
# --------------------------------------------------------------------------------------------------
def train_tokenizer(recipe: Recipe, out_dir: Path) -> Tokenizer:
    """A sentencepiece model over captions, with T5's ids: pad 0, eos 1, unk 2, no bos.

    BPE rather than T5's unigram: on a corpus of some thirty distinct words the unigram trainer keeps
    odd fragments ("two" -> t w o), while BPE merges every word into one piece and keeps single
    characters for words it has never seen.
    """
    import sentencepiece as spm

    rng = random.Random(recipe.seed)
    captions = [scenes.random_spec(rng).caption for _ in range(recipe.corpus)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions), model_writer=model, vocab_size=recipe.vocab, model_type="bpe",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1, hard_vocab_limit=False,
        character_coverage=1.0, minloglevel=2)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "spiece.model").write_bytes(model.getvalue())
    return Tokenizer(out_dir / "spiece.model")


# --------------------------------------------------------------------------------------------------
# Stage 2: VAE
# --------------------------------------------------------------------------------------------------
def vae_loss(vae: BSQVAE, x: torch.Tensor, scales, commit: float, keep: int | None = None) -> tuple[torch.Tensor, dict]:
    """Reconstruction (MSE + L1) of x from the first `keep` scales of its latent (all when None),
    plus the commitment of the encoder output to its full quantised latent."""
    h = vae.encoder(x)
    z, _, _ = quantize_multiscale(h, [(1, *hw) for hw in scales], keep=keep, straight_through=True)
    y = vae.decoder(z)
    mse, l1 = F.mse_loss(y, x), F.l1_loss(y, x)
    commitment = F.mse_loss(h, z.detach()) if keep is None else torch.zeros(())
    psnr = 10 * math.log10(4 / max(mse.item(), 1e-10))  # pixels span 2 ([-1, 1])
    return mse + l1 + commit * commitment, {"mse": mse.item(), "l1": l1.item(), "commit": commitment.item(), "psnr": psnr}


def init_vae(vae: BSQVAE) -> BSQVAE:
    """PyTorch's default init, except that every residual branch starts at zero (its second conv), so
    each block starts as the identity: the untrained VAE passes colours straight through, which
    shortens training a lot."""
    for name, m in vae.named_modules():
        if name.endswith("conv2"):
            nn.init.zeros_(m.conv.weight)
            nn.init.zeros_(m.conv.bias)
    return vae


def train_vae(recipe: Recipe, log: Log, ckpt: Checkpoint | None = None) -> BSQVAE:
    """The VAE stage; with `ckpt`, continued from a resumed checkpoint and checkpointed as it goes."""
    torch.manual_seed(recipe.seed)
    rng, stage = random.Random(recipe.seed + 1), recipe.vae_stage
    vae = init_vae(BSQVAE(recipe.vae)).train()
    opt = optimizer(vae.parameters(), stage)
    loop = {"modules": {"vae": vae}, "opt": opt, "rng": rng}
    start = ckpt.restore("vae", **loop) if ckpt else 0
    bar = tqdm(range(start, stage.steps), desc="vae", unit="step", initial=start, total=stage.steps)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, stage)
        _, x = pixels_batch(rng, stage.batch, recipe.res)
        # Some steps decode a latent cut after its 8x8 or 12x12 scale, as when pruning skips the
        # last scales: the decoder learns to render them sharply and coarse scales carry the shapes.
        keep = rng.choice(recipe.truncate_to) if rng.random() < recipe.truncate else None
        loss, stats = vae_loss(vae, x, recipe.scales, recipe.commit, keep)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        bar.set_postfix(psnr=f"{stats['psnr']:.1f}", l1=f"{stats['l1']:.4f}")
        if step % 25 == 0 or step == stage.steps - 1:
            log(stage="vae", step=step, lr=lr_at(step, stage), keep=keep, **stats)
        if ckpt:
            ckpt.step_done("vae", step, **loop)
    return vae.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------
# Stage 3: Infinity (and T5), teacher-forced over all scales at once
# --------------------------------------------------------------------------------------------------
def init_t5(t5: T5Encoder, position_std: float = 3.0) -> T5Encoder:
    """T5's initialisation (attention scores are not scaled by 1/sqrt(d_kv), so q starts small), except
    for the relative position biases, drawn with std `position_std` instead of d_model^-0.5.

    Why: a caption's meaning is in which word sits next to which ("a purple circle on a green
    background"). With T5's usual tiny position biases every head starts out position-blind, and a
    from-scratch two-layer encoder takes thousands of steps to learn to look at its neighbours: with
    them, the 1x1 scale's bits (fixed by the background colour) stayed at 0.37 nats/bit after 600
    steps where 0.05 is possible; with std 3 each head starts with a strong (random) preference for
    some nearby offsets, and the same run reaches 0.06.
    """
    cfg = t5.cfg
    for name, p in t5.named_parameters():
        if name.endswith("layer_norm.weight"):
            continue
        fan_in = {"q": cfg.d_model * cfg.d_kv, "o": cfg.num_heads * cfg.d_kv, "wo": cfg.d_ff}
        key = name.split(".")[-2]
        std = 1.0 if name == "shared.weight" else fan_in.get(key, cfg.d_model) ** -0.5
        nn.init.normal_(p, std=position_std if key == "relative_attention_bias" else std)
    return t5


def directional_heads(t5: T5Encoder, bias: float) -> T5Encoder:
    """Make T5 head 0 attend to the keys after each query and head 1 to those before it: their relative
    position biases become +bias on that side, -bias on the other and 0 on the query itself (which is
    all the first and last tokens have to look at on their empty side)."""
    table = t5.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight  # (buckets, heads)
    cfg = t5.cfg
    after = relative_position_bucket(torch.arange(1, cfg.relative_attention_max_distance + 1),
                                     cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance).unique()
    before = relative_position_bucket(-torch.arange(1, cfg.relative_attention_max_distance + 1),
                                      cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance).unique()
    with torch.no_grad():
        for head, (near, far) in enumerate([(after, before), (before, after)]):
            table[:, head] = 0.0
            table[near, head] = bias
            table[far, head] = -bias
    return t5


def init_infinity(model: Infinity) -> Infinity:
    """Small normal weights and zero biases everywhere; the bit head starts at zero (every bit at 50%)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    nn.init.normal_(model.lvl_embed.weight, std=0.02)
    nn.init.zeros_(model.head.weight)
    return model


def block_causal_mask(scales: list[tuple[int, int]]) -> torch.Tensor:
    """(L, L) bool: a token may attend to every token of its own scale and of the scales before it."""
    ids = torch.cat([torch.full((h * w,), si) for si, (h, w) in enumerate(scales)])
    return ids[:, None] >= ids[None, :]


CAPTION_TOKENS = 64  # a caption is read up to this many tokens (with EOS); cfg_uncond needs as many rows


def encode_text(t5: T5Encoder, model: Infinity, tok: Tokenizer, captions: list[str], drop: torch.Tensor,
                keep_hidden: bool = False):
    """Packed text rows (N, Ct) and each image's segment; dropped captions become cfg_uncond rows,
    as many as the caption has tokens (what the pipeline feeds the unconditional branch). With
    `keep_hidden`, also T5's features of every caption, dropped or not: (B, width, Ct)."""
    ids, mask = tok(captions, max_length=CAPTION_TOKENS)
    n = mask.sum(-1).tolist()
    width = max(n)
    hidden = t5(ids[:, :width], mask[:, :width])                    # (B, width, Ct)
    rows = [model.cfg_uncond[:k] if dropped else h[:k] for h, k, dropped in zip(hidden, n, drop.tolist())]
    bounds = [0]
    for k in n:
        bounds.append(bounds[-1] + k)
    packed = torch.cat(rows), list(zip(bounds[:-1], bounds[1:]))
    return (*packed, hidden) if keep_hidden else packed


CONNECTORS = {"and": 1, "above": 1, "below": 1, "left": 2, "right": 2}  # a connector word and its length in words
NO_ROLE = -100  # cross_entropy's ignore_index


def word_roles(caption: str) -> list[int]:
    """Which noun phrase each word of a caption belongs to: 0 the first, 1 the second, 2 neither (the
    connector between them and the background phrase)."""
    words, roles, group = caption.split(), [], 0
    i = 0
    while i < len(words):
        if words[i] in CONNECTORS:
            span = CONNECTORS[words[i]]
            roles, group, i = roles + [2] * span, 1, i + span
        elif words[i] == "at":  # "at the left": where a lone object sits
            roles, i = roles + [2] * 3, i + 3
        elif words[i] == "on":  # "on a white background" ends every caption that names one
            return roles + [2] * (len(words) - i)
        else:
            roles, i = roles + [group], i + 1
    return roles


def token_roles(tok: Tokenizer, captions: list[str], width: int) -> torch.Tensor:
    """(B, width) role of every token (word_roles; EOS 2, padding NO_ROLE). A caption whose word-by-word
    pieces differ from its own is left out (NO_ROLE throughout)."""
    out = torch.full((len(captions), width), NO_ROLE)
    for b, caption in enumerate(captions):
        pieces = [tok.encode(w) for w in caption.split()]
        labels = [r for p, r in zip(pieces, word_roles(caption)) for _ in p] + [2]
        if sum(pieces, []) == tok.encode(caption) and len(labels) <= width:
            out[b, : len(labels)] = torch.tensor(labels)
    return out


def teacher_inputs(model: Infinity, c: Conditioning, next_inputs: list[torch.Tensor]) -> torch.Tensor:
    """The whole input sequence (B, L, C): the start token, then every later scale's input, which is
    the running latent of the scales before it (VAE side, area-downsampled), embedded; each scale
    gets its level embedding."""
    parts = [model.first_tokens(c)]                                  # (B, 1, C)
    for t in next_inputs:                                            # (B, d, 1, h, w)
        parts.append(model.word_embed(t.flatten(2).transpose(1, 2)))  # (B, h*w, C)
    return torch.cat([p + model.lvl_embed.weight[si] for si, p in enumerate(parts)], dim=1)


def self_correcting_bits(h: torch.Tensor, scales: list[tuple[int, int]], flip: torch.Tensor,
                         gen: torch.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Targets and inputs for teacher forcing, with Infinity's bitwise self-correction.

    bsq.quantize_multiscale of h (B, d, H, W), except that before a scale's codes enter the running
    latent, each of its bits is flipped with probability flip[b] (per image). The flipped latent is
    what later scales see as input and what their targets correct, just as at sampling time later
    scales must correct the bits the sampler got wrong. The target of each scale is its unflipped
    bits. With flip = 0 this is exactly quantize_multiscale's bits and next-scale inputs.
    Returns bits per scale (B, 1, h, w, d) and next-scale inputs (B, d, 1, h', w').
    """
    def perturb(bits: torch.Tensor) -> torch.Tensor:
        noisy = torch.rand(bits.shape, generator=gen) < flip.view(-1, 1, 1, 1, 1)
        return bits ^ noisy.long() if noisy.any() else bits

    _, targets, inputs = quantize_multiscale(h, [(1, *hw) for hw in scales], perturb=perturb)
    return targets, inputs


def scale_losses(model: Infinity, c: Conditioning, next_inputs, bits, scales, rope, mask) -> list[torch.Tensor]:
    """Bitwise cross-entropy of teacher-forced predictions, one mean per scale.

    `scales` may be the first few scales of the schedule only (with their inputs, bits, and the
    first rows of rope and mask): under the block-causal mask no token sees a later scale, so the
    losses of a prefix are exactly those of the whole sequence.
    """
    x = teacher_inputs(model, c, next_inputs)
    for block in model.blocks:
        x = block(x, c.gss, c.text, Attn(None, rope, mask=mask))
    logits = model.logits(x, c.cond)                                 # (B, L, 2d)
    B, L = logits.shape[:2]
    target = torch.cat([b.reshape(B, -1, b.shape[-1]) for b in bits], dim=1)  # (B, L, d)
    ce = F.cross_entropy(logits.view(B, L, -1, 2).permute(0, 3, 1, 2), target, reduction="none")  # (B, L, d)
    return [part.mean() for part in ce.split([h * w for h, w in scales], dim=1)]


def teacher_batch(recipe: Recipe, vae: BSQVAE, t5: T5Encoder, model: Infinity, tok: Tokenizer, n: int, scales,
                  rng: random.Random, gen: torch.Generator, roles: nn.Module | None = None):
    """n captioned scenes as (conditioning, next-scale inputs, target bits) for the given scales, with
    self-correction flips and caption dropout; with the `roles` probe, also its loss (else None)."""
    captions, x = pixels_batch(rng, n, recipe.res, recipe.layout, recipe.mix, recipe.placed)
    with torch.no_grad():
        flip = torch.rand(n, generator=gen) * recipe.self_correct
        bits, next_inputs = self_correcting_bits(vae.encode(x), recipe.scales, flip, gen)
    drop = torch.rand(n, generator=gen) < recipe.caption_drop
    kv, segments, hidden = encode_text(t5, model, tok, captions, drop, keep_hidden=True)
    role_loss = None
    if roles is not None:
        role_loss = F.cross_entropy(roles(hidden).flatten(0, 1), token_roles(tok, captions, hidden.shape[1]).flatten(),
                                    ignore_index=NO_ROLE)
    k = len(scales)
    return (model.condition(kv, segments), next_inputs[: k - 1], bits[:k]), role_loss


def train_infinity(recipe: Recipe, vae: BSQVAE, tok: Tokenizer, log: Log, ckpt: Checkpoint | None = None,
                   start_from: dict[str, dict] | None = None) -> tuple[Infinity, T5Encoder]:
    """Each step: `gpt_stage.batch` scenes over the whole schedule, plus `coarse_batch` more over its
    first `coarse_scales` scales only. Those few tokens decide the layout (where objects go, how
    many there are), the hardest thing for the small model to learn, and cost little: at 64 px, the
    first 5 scales are 121 of 521 tokens. The loss is the mean over scales of each scale's mean
    bitwise cross-entropy (so the few tokens that fix the layout are not drowned by the many of the
    last scale), a scale's mean taken over every image that reached it. With `ckpt`, continued from a
    resumed checkpoint and checkpointed as it goes. `start_from` ({"infinity": sd, "t5": sd}, read_init)
    replaces the fresh init; the step schedule, optimiser and random streams start afresh all the same."""
    torch.manual_seed(recipe.seed + 2)
    rng, stage, scales = random.Random(recipe.seed + 3), recipe.gpt_stage, recipe.scales
    gen = torch.Generator().manual_seed(recipe.seed + 4)
    t5 = init_t5(T5Encoder(replace(recipe.t5, vocab_size=tok.vocab_size))).train()
    # Trained with the numerics it samples with (loading applies parity mode to every model it loads).
    model = parity.apply(init_infinity(Infinity(replace(recipe.infinity, d_vae=recipe.vae.codebook_dim)))).train()
    if start_from:
        model.load_state_dict(start_from["infinity"])
        t5.load_state_dict(start_from["t5"])
    if recipe.t5_directional:
        directional_heads(t5, recipe.t5_directional)
    rope = torch.cat([model.rope.table(1.0, h, w, "cpu") for h, w in scales], dim=1)  # (2, L, hd/2)
    mask = block_causal_mask(scales)
    coarse = scales[: recipe.coarse_scales]
    Lc = sum(h * w for h, w in coarse)
    roles = nn.Linear(recipe.t5.d_model, 3) if recipe.t5_roles else None  # the probe of `t5_roles`, not saved
    extra = {"roles": roles} if roles is not None else {}
    params = [p for m in (model, t5, *extra.values()) for p in m.parameters()]
    opt = optimizer(params, stage)
    loop = {"modules": {"infinity": model, "t5": t5, **extra}, "opt": opt, "rng": rng, "gen": gen}
    start = ckpt.restore("infinity", **loop) if ckpt else 0
    bar = tqdm(range(start, stage.steps), desc="infinity", unit="step", initial=start, total=stage.steps)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, stage)
        batch, role_loss = teacher_batch(recipe, vae, t5, model, tok, stage.batch, scales, rng, gen, roles)
        per_scale = full = scale_losses(model, *batch, scales, rope, mask)
        if recipe.coarse_batch:
            batch, _ = teacher_batch(recipe, vae, t5, model, tok, recipe.coarse_batch, coarse, rng, gen)
            part = scale_losses(model, *batch, coarse, rope[:, :Lc], mask[:Lc, :Lc])
            n, m = stage.batch, recipe.coarse_batch
            per_scale = [(n * a + m * b) / (n + m) for a, b in zip(full, part)] + full[len(part):]
        loss = torch.stack(per_scale).mean()
        if role_loss is not None:
            loss = loss + recipe.t5_roles * role_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        logged = [p.item() for p in per_scale]
        bar.set_postfix(loss=f"{loss.item():.4f}", last=f"{logged[-1]:.4f}")
        if step % 25 == 0 or step == stage.steps - 1:
            log(stage="infinity", step=step, lr=lr_at(step, stage), loss=loss.item(), per_scale=logged,
                **({"role_loss": role_loss.item()} if role_loss is not None else {}))
        if ckpt:
            ckpt.step_done("infinity", step, **loop)
    return model.eval().requires_grad_(False), t5.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------
# Saving in the formats of the real checkpoints
# --------------------------------------------------------------------------------------------------
def chunked_block_keys(sd: dict[str, torch.Tensor], chunks: int) -> dict[str, torch.Tensor]:
    """The inverse of checkpoint.flatten_block_keys: `blocks.{n}.*` -> `block_chunks.{c}.module.{i}.*`."""
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    per_chunk = depth // chunks
    out = {}
    for k, v in sd.items():
        if k.startswith("blocks."):
            _, n, rest = k.split(".", 2)
            k = f"block_chunks.{int(n) // per_chunk}.module.{int(n) % per_chunk}.{rest}"
        out[k] = v
    return out


def storage(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating tensors in the storage dtype (the loaders cast back to the compute dtype)."""
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}


def save_infinity(model: Infinity, recipe: Recipe, out: Path, dtype: torch.dtype) -> None:
    cfg = model.cfg
    assert cfg.depth % cfg.block_chunks == 0, "block_chunks must divide depth"
    torch.save(storage(chunked_block_keys(model.state_dict(), cfg.block_chunks), dtype), out / "infinity.pth")
    args = {  # upstream Infinity's constructor arguments (the ones that shape this model)
        "depth": cfg.depth, "embed_dim": cfg.embed_dim, "num_heads": cfg.num_heads, "mlp_ratio": cfg.mlp_ratio,
        "text_channels": cfg.text_channels, "text_maxlen": cfg.text_maxlen, "norm_eps": cfg.norm_eps,
        "block_chunks": cfg.block_chunks, "pn": recipe.budget, "apply_spatial_patchify": 0,
        "cond_drop_rate": recipe.caption_drop, "shared_aln": True, "head_aln": True, "cos_attn": True,
        "use_bit_label": 1, "rope2d_each_sa_layer": 1, "rope2d_normalized_by_hw": 2,
        "add_lvl_embeding_only_first_block": 1, "train_h_div_w_list": [1.0],
    }
    meta = {"upstream_class": "infinity.models.infinity.Infinity", "constructor_kwargs": args,
            "derived": {"d_vae": cfg.d_vae}, "storage_dtype": str(dtype).removeprefix("torch."),
            "trained_by": "python -m minivar.toy.train"}
    (out / "infinity_config.json").write_text(json.dumps(meta, indent=1) + "\n")


def save_vae(vae: BSQVAE, out: Path, dtype: torch.dtype) -> None:
    cfg = vae.cfg
    torch.save({"vae": storage(vae.state_dict(), dtype)}, out / "vae.pth")
    call = {"schedule_mode": "dynamic", "codebook_dim": cfg.codebook_dim, "codebook_size": 2**cfg.codebook_dim,
            "patch_size": cfg.patch_size, "encoder_ch_mult": list(cfg.ch_mult), "decoder_ch_mult": list(cfg.ch_mult)}
    meta = {"vae_type": cfg.codebook_dim, "base_ch": cfg.base_ch, "num_res_blocks": cfg.num_res_blocks,
            "vae_model_call": call, "quantizer_type": "MultiScaleBSQ", "storage_dtype": str(dtype).removeprefix("torch."),
            "trained_by": "python -m minivar.toy.train"}
    (out / "vae_config.json").write_text(json.dumps(meta, indent=1) + "\n")


def save_t5(t5: T5Encoder, out: Path) -> None:
    """A Hugging Face T5EncoderModel directory (spiece.model is already there)."""
    from safetensors.torch import save_file

    cfg = t5.cfg
    sd = {k: v.contiguous() for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}  # tied
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["T5EncoderModel"], "model_type": "t5", **asdict(cfg),
              "dense_act_fn": "gelu_new", "is_gated_act": cfg.feed_forward_proj.startswith("gated"),
              "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1, "n_positions": 512,
              "tie_word_embeddings": False, "torch_dtype": "float32"}
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")


# --------------------------------------------------------------------------------------------------
# Argument checks: all before any work, so that a bad value costs no training and loses no file
# --------------------------------------------------------------------------------------------------
def same_kind(value, default) -> bool:
    """Whether a --set value may replace a recipe field's `default`: a number for a float, an integer
    for an integer (not a bool), a list of the same kind for a tuple, else the same type."""
    if isinstance(default, float) and not isinstance(value, bool):
        return isinstance(value, (int, float))
    if isinstance(default, tuple):
        return isinstance(value, tuple) and (not default or all(same_kind(v, default[0]) for v in value))
    return type(value) is type(default)


KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", tuple: "a list"}
# Fields the run derives from others (and overwrites): what to set instead
DERIVED = {"t5.vocab_size": "vocab", "infinity.d_vae": "vae.codebook_dim", "infinity.pn": "budget"}


def set_field(obj, path: list[str], value):
    """obj (a dataclass) with the field at `path` (["t5", "num_layers"]) replaced by value, which must be
    of that field's kind; the model configs then check the value itself."""
    names = [f.name for f in fields(obj)]
    if path[0] not in names:
        raise ValueError(f"{type(obj).__name__} has no field {path[0]!r}; fields: {', '.join(names)}")
    old = getattr(obj, path[0])
    if len(path) > 1:
        if not is_dataclass(old):
            raise ValueError(f"{path[0]} is a value, it has no field {path[1]!r}")
        value = set_field(old, path[1:], value)
    elif is_dataclass(old):
        raise ValueError(f"{path[0]} is a group of fields ({', '.join(f.name for f in fields(old))}); "
                         f"set one of them, as {path[0]}.FIELD=VALUE")
    else:
        value = tuple(value) if isinstance(old, tuple) and isinstance(value, list) else value  # JSON has no tuples
        if not same_kind(value, old):
            kind = KINDS.get(type(old), type(old).__name__)
            raise ValueError(f"{path[0]} takes {kind} like {json.dumps(old)}, not {json.dumps(value)}")
    return replace(obj, **{path[0]: value})


def override(recipe: Recipe, assignment: str) -> Recipe:
    """recipe with one field changed: "layout=random", "gpt_stage.steps=800", "t5.num_layers=4".
    The value is parsed as JSON when it can be (numbers, lists), else taken as a string."""
    key, sep, text = assignment.partition("=")
    if not sep:
        raise ValueError(f"--set {assignment!r}: expected FIELD=VALUE, e.g. t5.num_layers=4")
    if key in DERIVED:
        raise ValueError(f"--set {assignment!r}: the run derives {key} from {DERIVED[key]}; set {DERIVED[key]} instead")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    try:
        return set_field(recipe, key.split("."), value)
    except ValueError as e:  # the field's kind, or the model config's own check of the value
        raise ValueError(f"--set {assignment!r}: {e}") from None


def is_share(v, r) -> bool:
    return 0 <= v <= 1


# What the recipe's fields accept beyond their kind (set_field keeps each field's kind; the model configs
# check their own fields): dotted name -> (accepts(value, recipe), advice). Checked in this order, so
# that the rules after "budget" may use the scale schedule. {n}, {res} and {t5} in the advice are the
# schedule's number of scales, the image side it needs and t5.d_model.
STAGE_RULES = {"steps": (lambda v, r: v >= 1, "use 1 or more"), "batch": (lambda v, r: v >= 1, "use 1 or more"),
               "lr": (lambda v, r: math.isfinite(v) and v > 0, "use a finite number > 0"),
               "warmup": (lambda v, r: v >= 0, "use 0 or more")}
RECIPE_RULES = {
    "budget": (lambda v, r: v in BUDGETS, f"use one of {list(BUDGETS)}"),
    "res": (lambda v, r: v == r.vae.patch_size * r.scales[-1][0],
            "use {res}, the last scale's side in tokens times vae.patch_size"),
    "seed": (lambda v, r: 0 <= v < 2**63, "use an integer in 0..2**63-1"),
    "vocab": (lambda v, r: v >= 64, "use 64 or more (the captions' characters alone take about 30 pieces)"),
    "corpus": (lambda v, r: v >= 1, "use 1 or more captions"),
    "commit": (lambda v, r: math.isfinite(v) and v >= 0, "use a finite number >= 0"),
    "truncate": (is_share, "use a share in [0, 1]"),
    "truncate_to": (lambda v, r: v and all(1 <= k <= len(r.scales) for k in v),
                    "use a non-empty list of scale counts in 1..{n}"),
    "caption_drop": (is_share, "use a share in [0, 1]"),
    "self_correct": (is_share, "use a share in [0, 1]"),
    "coarse_batch": (lambda v, r: v >= 0, "use 0 (none) or more"),
    "placed": (is_share, "use a share in [0, 1]"),
    "t5_roles": (lambda v, r: math.isfinite(v) and v >= 0, "use 0 (off) or a finite weight > 0"),
    "t5_directional": (lambda v, r: math.isfinite(v) and v >= 0 and (not v or r.t5.num_heads >= 2),
                       "use 0 (off) or a finite bias > 0, with t5.num_heads >= 2"),
    "coarse_scales": (lambda v, r: 1 <= v <= len(r.scales), "use a scale count in 1..{n}"),
    "layout": (lambda v, r: v in scenes.LAYOUTS, f"use one of {list(scenes.LAYOUTS)}"),
    "mix": (lambda v, r: not v or (len(v) == len(scenes.CATEGORIES) and all(math.isfinite(x) and x >= 0 for x in v)
                                   and sum(v) > 0),
            f"use [] (equal odds) or one weight >= 0 per category of {list(scenes.CATEGORIES)}, not all 0"),
    **{f"{stage}.{k}": rule for stage in ("vae_stage", "gpt_stage") for k, rule in STAGE_RULES.items()},
    "infinity.depth": (lambda v, r: v % r.infinity.block_chunks == 0, "use a multiple of infinity.block_chunks"),
    "infinity.text_channels": (lambda v, r: v == r.t5.d_model, "use {t5}, t5.d_model (the width of T5's features)"),
    "infinity.text_maxlen": (lambda v, r: v >= CAPTION_TOKENS,
                             f"use {CAPTION_TOKENS} or more: a dropped caption of up to {CAPTION_TOKENS} tokens "
                             "takes as many rows of cfg_uncond"),
    "infinity.num_levels": (lambda v, r: v >= len(r.scales), "use {n} or more, one per scale"),
    "infinity.spatial_patchify": (lambda v, r: not v, "use false: the toy has no 2x2 patchify"),
}


def check_recipe(recipe: Recipe) -> None:
    """ValueError, one line naming the field, for a recipe that would fail mid-run or train nonsense."""
    try:
        recipe.t5.check()
    except ValueError as e:
        raise ValueError(f"--set t5.{e}") from None
    values = flat(asdict(recipe))
    for name, (accepts, advice) in RECIPE_RULES.items():
        if not accepts(values[name], recipe):
            scales = recipe.scales if recipe.budget in BUDGETS else [(0, 0)]
            side = scales[-1][0] * recipe.vae.patch_size
            raise bad(f"--set {name}", values[name], advice.format(n=len(scales), res=side, t5=recipe.t5.d_model))


# What a run writes in OUT, and so would replace
RUN_FILES = ("resume.pt", "train_log.jsonl", "infinity.pth", "vae.pth", "t5")


def check_out(out: Path, reuse: Path | None, resume: bool, overwrite: bool) -> None:
    """RunError for an OUT the run cannot write, or holding an earlier run it was not asked to continue
    (--resume) or replace (--overwrite)."""
    if resume and overwrite:
        raise RunError("--resume continues the run in --out and --overwrite replaces it; give one of them")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise RunError(f"--out {out}: {existing} is a file, not a directory; name a directory")
    if reuse is not None and out.resolve() == reuse.resolve():
        raise RunError(f"--reuse-vae {reuse} is --out too; write the run to another directory")
    held = [name for name in RUN_FILES if (out / name).exists()]
    if held and not (resume or overwrite):
        raise RunError(f"--out {out} holds an earlier run ({', '.join(held)}); "
                       + ("continue it with --resume, or " if "resume.pt" in held else "")
                       + "replace it with --overwrite, or choose another --out")


# The files the tokenizer and VAE stages leave in a model directory
FINISHED = ("t5/spiece.model", "vae.pth", "vae_config.json")


def read_finished(src: Path, recipe: Recipe, where: str, advice: str,
                  with_vae: bool = True) -> tuple[Tokenizer, BSQVAE | None]:
    """The tokenizer (and VAE) that finished stages left in the model directory `src`, read and checked
    against the recipe; RunError "{where}: ...; {advice}" if they are missing, broken or do not fit."""
    missing = [name for name in (FINISHED if with_vae else FINISHED[:1]) if not (src / name).is_file()]
    if missing:
        raise RunError(f"{where}: {src} has no {', '.join(missing)}; {advice}")
    try:
        tok = Tokenizer(src / "t5" / "spiece.model")
        vae = load_vae(src / "vae.pth", src / "vae_config.json") if with_vae else None  # fp32, eval, no gradients
    except (ValueError, OSError) as e:  # CheckpointError: a truncated or foreign file
        raise RunError(f"{where}: {' '.join(str(e).split())}; {advice}") from None
    ours = (recipe.vae.codebook_dim, recipe.vae.patch_size)
    if vae is not None and (vae.cfg.codebook_dim, vae.cfg.patch_size) != ours:
        raise RunError(f"{where}: its VAE has {vae.cfg.codebook_dim} bits per token and {vae.cfg.patch_size}-pixel "
                       f"patches, the recipe {recipe.vae.codebook_dim} and {recipe.vae.patch_size}; "
                       "--set vae.codebook_dim and vae.patch_size to match, or drop --reuse-vae")
    return tok, vae


def read_init(src: Path, recipe: Recipe) -> dict[str, dict]:
    """The transformer and T5 weights of the model directory `src` (--init), checked against the
    recipe's shapes: {"infinity": state dict, "t5": state dict}; RunError, one line, if they do not fit."""
    where, advice = f"--init {src}", "point it at a model directory this recipe trained, or drop --init"
    missing = [name for name in ("infinity.pth", "t5/config.json") if not (src / name).is_file()]
    if missing:
        raise RunError(f"{where}: {src} has no {', '.join(missing)}; {advice}")
    cfg = replace(recipe.infinity, d_vae=recipe.vae.codebook_dim)
    try:
        infinity = load_infinity(src / "infinity.pth", cfg).state_dict()
        t5 = load_t5(src / "t5").state_dict()
        shapes = T5Encoder(replace(recipe.t5, vocab_size=t5["shared.weight"].shape[0])).state_dict()
        wrong = [k for k, v in shapes.items() if k not in t5 or t5[k].shape != v.shape]
        if wrong:
            raise ValueError(f"its T5 differs from the recipe's t5 at {wrong[0]}")
    except (ValueError, OSError) as e:  # CheckpointError: a missing, truncated or differently shaped model
        raise RunError(f"{where}: {' '.join(str(e).split())[:300]}; {advice}") from None
    return {"infinity": infinity, "t5": t5}


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def run(recipe: Recipe, out: Path, dtype: torch.dtype = torch.bfloat16, reuse: Path | None = None,
        checkpoint_every: int = 0, resume: bool = False, overwrite: bool = False) -> dict[str, float]:
    """All three stages into the model directory `out`, or (with `reuse`, a model directory) only the
    transformer and T5 on top of that directory's tokenizer and VAE; returns the seconds each took.

    With `checkpoint_every` N, out/resume.pt is written every N steps (see Checkpoint); `resume`
    continues from it (skipping the finished stages, whose files are in `out`) and ends with the
    weights an uninterrupted run with the same arguments and thread count would have. An `out` that
    holds an earlier run is refused unless `resume` or `overwrite` (start afresh, replacing its files).
    Everything is read and checked (ValueError, RunError) before anything in `out` is written.
    """
    check_recipe(recipe)
    check_out(out, reuse, resume, overwrite)
    log = Log(out / "train_log.jsonl")
    ckpt = Checkpoint(out, recipe, checkpoint_every, reuse, log)
    begin = ckpt.read() if resume else "tokenizer"          # "tokenizer", "vae" or "infinity"
    tok = vae = None
    if begin != "tokenizer":                                  # resumed: the finished stages' files are in `out`
        tok, vae = read_finished(out, recipe, "--resume", AFRESH, with_vae=begin == "infinity")
    elif reuse is not None:
        given = "--init" if recipe.init is not None and Path(recipe.init) == Path(reuse) else "--reuse-vae"
        tok, vae = read_finished(reuse, recipe, f"{given} {reuse}",
                                 "point it at a model directory the toy training wrote, or drop it")
    start_from = read_init(Path(recipe.init), recipe) if recipe.init else None
    if start_from and tok is not None and start_from["t5"]["shared.weight"].shape[0] != tok.vocab_size:
        raise RunError(f"--init {recipe.init}: its T5 reads {start_from['t5']['shared.weight'].shape[0]} token ids, "
                       f"the run's tokenizer {tok.vocab_size}; use the tokenizer it was trained with (--reuse-vae)")
    if not resume:
        ckpt.start()
    out.mkdir(parents=True, exist_ok=True)
    if reuse is not None and begin == "tokenizer":            # copied byte for byte
        (out / "t5").mkdir(exist_ok=True)
        for name in FINISHED:
            shutil.copyfile(reuse / name, out / name)
    if vae is None:
        if tok is None:
            tok = train_tokenizer(recipe, out / "t5")
            ckpt.clock.lap("tokenizer")
        vae = train_vae(recipe, log, ckpt)
        save_vae(vae, out, dtype)
        vae.load_state_dict(storage(vae.state_dict(), dtype))  # the transformer learns the VAE as stored
    ckpt.clock.lap("vae")
    model, t5 = train_infinity(recipe, vae, tok, log, ckpt, start_from)
    # The transformer is stored in float32 (the VAE as `dtype`): minivar's KV cache follows the weights'
    # storage dtype, and the toy's scores are measured with the float32 cache it computes with.
    save_infinity(model, recipe, out, torch.float32)
    save_t5(t5, out / "t5")
    seconds = dict(ckpt.clock.lap("infinity"))
    seconds["total"] = sum(seconds.values())
    log(stage="done", seconds=seconds, threads=torch.get_num_threads(), reused=str(reuse) if reuse else None)
    ckpt.remove()
    return seconds


# The flags' values beyond their type: flag -> (accepts, advice), as pipeline.py's ARGUMENTS
FLAGS = {"threads": (lambda v: v >= 1, "use 1 or more"),
         "steps": (lambda v: v is None or v >= 1, "use 1 or more"),
         "eval": (lambda v: v >= 0, "use 0 (no scoring) or more prompts"),
         "checkpoint_every": (lambda v: v >= 0, "use N >= 1 steps, or 0 for no checkpoints")}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m minivar.toy.train", description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", nargs="?", default="toy", choices=sorted(RECIPES),
                   help="'toy' makes the shipped toy (minivar/toy/weights); 'tiny' is a seconds-long smoke run "
                        "(default: toy)")
    p.add_argument("--out", type=Path, required=True,
                   help="model directory to write: a new one, or with --resume or --overwrite one holding a run")
    p.add_argument("--threads", type=int, default=2,
                   help="torch CPU threads (default: %(default)s; results are bit-exact for a given thread count)")
    p.add_argument("--reuse-vae", type=Path, default=None, metavar="DIR",
                   help="keep DIR's tokenizer and VAE, train only the transformer and T5")
    p.add_argument("--init", type=Path, default=None, metavar="DIR",
                   help="start the transformer and T5 from DIR's weights (a model directory of this recipe) instead "
                        "of a fresh init; implies --reuse-vae DIR unless that is given")
    p.add_argument("--steps", type=int, default=None, help="transformer + T5 steps (default: the recipe's)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", dest="overrides",
                   help="change one recipe field, e.g. t5.num_layers=4 or layout=random (repeatable)")
    p.add_argument("--eval", type=int, default=0, metavar="N", help="score N mini-GenEval prompts at the end")
    p.add_argument("--checkpoint-every", type=int, default=100, metavar="N",
                   help="write OUT/resume.pt every N steps of the VAE and transformer stages (0: never; "
                        "default: %(default)s)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/resume.pt: the same command plus --resume ends with the weights of an "
                        "uninterrupted run (same --threads)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an OUT that holds an earlier run, replacing its files (without --resume "
                        "or --overwrite, such an OUT is refused)")
    args = p.parse_args(argv)
    for name, (accepts, advice) in FLAGS.items():
        if not accepts(getattr(args, name)):
            p.error(str(bad(f"--{name.replace('_', '-')}", getattr(args, name), advice)))
    recipe = RECIPES[args.recipe]
    try:
        for assignment in args.overrides:
            recipe = override(recipe, assignment)
        if args.steps is not None:
            recipe = replace(recipe, gpt_stage=replace(recipe.gpt_stage, steps=args.steps))
        if args.init is not None:
            recipe = replace(recipe, init=str(args.init))
        check_recipe(recipe)
    except ValueError as e:
        p.error(str(e))
    torch.set_num_threads(args.threads)
    try:
        seconds = run(recipe, args.out, reuse=args.reuse_vae or args.init, checkpoint_every=args.checkpoint_every,
                      resume=args.resume, overwrite=args.overwrite)
    except RunError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    if args.eval:
        from .geneval import main as geneval

        geneval([str(args.out), "--n", str(args.eval), "--json", str(args.out / "geneval.json")])


if __name__ == "__main__":
    main()
