"""Argument checks for generation, in one place.

`Pipeline.generate`, `minivar.sample` and the CLI call `check_arguments` before any work is done, and
`generate` calls `check_against_schedule` once the scale schedule is known. A bad value raises one
ValueError line that names the argument, the value and what is allowed: never a traceback from inside
torch, and never a nonsense value accepted silently (a negative temperature flips every logit).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .model.config import BUDGETS, HIGH_RES, RES_TO_BUDGET, nearest_template
from .model.pruning import PruneSchedule, is_index, is_real

MAX_PROMPT_CHARS = 20_000  # far beyond T5's 512 tokens; longer input is almost surely a mistake
MAX_SEED = 2**64 - 1       # torch generators take a 64-bit unsigned seed
PRUNE_WORDS = ("fastvar", "stagevar", "preset")


def show(value, limit: int = 60) -> str:
    """A one-line, printable repr of a value, shortened (prompts can be long; lone surrogates escaped)."""
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def bad(name: str, value, allowed: str) -> ValueError:
    return ValueError(f"{name}={show(value)} is invalid: {allowed}")


# --------------------------------------------------------------------------------------------------
# One value at a time
# --------------------------------------------------------------------------------------------------
def check_text(name: str, text) -> None:
    if not isinstance(text, str):
        raise bad(name, text, "use a string")
    if len(text) > MAX_PROMPT_CHARS:
        raise ValueError(f"{name} of {len(text)} characters is too long (max {MAX_PROMPT_CHARS}); "
                         "T5 reads only the first 512 tokens anyway")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate, e.g. undecodable bytes from the command line
        raise bad(name, text, f"it is not valid Unicode text (character {e.start} cannot be encoded as "
                              "UTF-8); pass UTF-8 text") from None


def check_prompt_text(name: str, text) -> None:
    """A prompt: text with something to read. (An empty negative prompt is fine: it means the default.)"""
    check_text(name, text)
    if not text.strip():
        raise bad(name, text, "the prompt is empty or blank; describe the image to generate")


def check_prompt(name: str, prompt) -> None:
    if isinstance(prompt, (list, tuple)) and prompt:
        for i, p in enumerate(prompt):
            check_prompt_text(f"{name}[{i}]", p)
    elif isinstance(prompt, str):
        check_prompt_text(name, prompt)
    else:
        raise bad(name, prompt, "use a string or a non-empty list of strings")


def check_negative_prompt(name: str, value) -> None:
    if value is not None:
        check_text(name, value)


def per_scale_check(test: Callable[[object], bool], allowed: str) -> Callable[[str, object], None]:
    """A check for cfg/tau: one number, or a list of one number per scale (lengths: `check_against_schedule`)."""
    def check(name: str, value) -> None:
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if not values:
            raise bad(name, value, f"use {allowed}, or a list of one per scale")
        for v in values:
            if not (is_real(v) and test(v)):
                raise bad(name, value, f"use {allowed}, or a list of one per scale")
    return check


def check_top_k(name: str, value) -> None:
    if not is_index(value) or value < 0:
        raise bad(name, value, "use an integer >= 0 (0 turns the top-k filter off)")


def check_top_p(name: str, value) -> None:
    if not is_real(value) or not 0 <= value <= 1:
        raise bad(name, value, "use a number in [0, 1] (0 or 1 turn the top-p filter off, as upstream's 0 does)")


def check_seed(name: str, value) -> None:
    if value is not None and (not is_index(value) or not 0 <= value <= MAX_SEED):
        raise bad(name, value, f"use an integer in 0..2**64-1 ({MAX_SEED}), or None for a random seed")


def check_progress(name: str, value) -> None:
    if not (value is None or isinstance(value, bool) or callable(value)):
        raise bad(name, value, "use True, False or a callable that wraps the list of scales")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise bad(name, value, "use True or False")


def check_h_div_w(name: str, value) -> None:
    nearest_template(value)  # raises its own line, with the trained templates


def check_res(name: str, value) -> None:
    budgets = list(BUDGETS) + list(HIGH_RES)
    if not (value is None or is_index(value) or value in budgets):
        raise bad(name, value, f"use a side in pixels ({sorted(RES_TO_BUDGET)} for 16-pixel tokens), "
                  f"a pixel budget {budgets}, or None")


def check_output_type(name: str, value) -> None:
    if value not in ("pil", "latent"):
        raise bad(name, value, "use 'pil' or 'latent'")


def check_prune(name: str, value) -> None:
    """The form of `prune`; the schedule it gives is validated against the scale schedule later."""
    word = isinstance(value, str) and value in PRUNE_WORDS
    if word or value is None or isinstance(value, (bool, dict, PruneSchedule)):
        return
    raise bad(name, value, "use False, True, 'fastvar', 'stagevar', a dict of PruneSchedule fields or a PruneSchedule")


def check_index_or_none(name: str, value) -> None:
    if value is not None and not is_index(value):
        raise bad(name, value, "use a scale index (an integer) or None")


def check_insertion_type(name: str, value) -> None:
    if not is_index(value):
        raise bad(name, value, "use 0 (guide logits), 1 (no guidance mixing) or a negative layer offset")


CHECKS: dict[str, Callable[[str, object], None]] = {
    "prompt": check_prompt,
    "negative_prompt": check_negative_prompt,
    "res": check_res,
    "h_div_w": check_h_div_w,
    "cfg": per_scale_check(math.isfinite, "a finite number"),
    "tau": per_scale_check(lambda v: v > 0, "a finite number > 0"),
    "top_k": check_top_k,
    "top_p": check_top_p,
    "seed": check_seed,
    "cfg_insertion_layer": check_insertion_type,
    "cfg_stop_scale": check_index_or_none,
    "trace": check_bool,
    "prune": check_prune,
    "progress": check_progress,
    "output_type": check_output_type,
}


def check_arguments(**values) -> None:
    """Check the generation arguments given (by their `Pipeline.generate` names); others pass through."""
    for name, value in values.items():
        if name in CHECKS:
            CHECKS[name](name, value)


# --------------------------------------------------------------------------------------------------
# Against the scale schedule and the model
# --------------------------------------------------------------------------------------------------
def check_against_schedule(*, cfg, tau, cfg_stop_scale: int | None, cfg_insertion_layer: int, force_bits,
                           scales: list[tuple[int, int]], prune: PruneSchedule, depth: int, d_bits: int,
                           batch: int) -> None:
    """What only the schedule and the model can judge: list lengths, indices, the prune schedule, forced bits."""
    n = len(scales)
    for name, value in (("cfg", cfg), ("tau", tau)):
        if isinstance(value, (list, tuple)) and len(value) != n:
            raise ValueError(f"{name} has {len(value)} per-scale values, but the scale schedule has {n} scales: "
                             f"give one number or exactly {n}")
    if cfg_stop_scale is not None and not 0 <= cfg_stop_scale <= n:
        raise bad("cfg_stop_scale", cfg_stop_scale, f"use a scale index 0..{n - 1}, {n} or None (no stop)")
    if not (cfg_insertion_layer in (0, 1) or -depth < cfg_insertion_layer < 0):
        raise bad("cfg_insertion_layer", cfg_insertion_layer, f"use 0 (guide logits), 1 (no guidance mixing) "
                  f"or a negative layer offset in -{depth - 1}..-1")
    prune.validate(n, depth)
    ran = [scales[si] for si in prune.ran(n)]
    check_force_bits(force_bits, [(batch, h, w, d_bits) for h, w in ran])


def check_force_bits(force_bits, shapes: list[tuple[int, int, int, int]]) -> None:
    """Forced bits: a list over the scales that run (the first ones), each (B, h, w, d) of 0 and 1, or None."""
    if force_bits is None:
        return
    if not isinstance(force_bits, (list, tuple)) or len(force_bits) > len(shapes):
        count = f"{len(force_bits)} entries" if isinstance(force_bits, (list, tuple)) else show(force_bits)
        raise ValueError(f"force_bits={count} is invalid: use a list of at most {len(shapes)} tensors "
                         "(one per scale that runs, from the first) or None")
    for step, bits in enumerate(force_bits):
        name = f"force_bits[{step}]"
        if bits is None:
            continue
        if not isinstance(bits, torch.Tensor) or bits.is_floating_point() or bits.is_complex():
            raise bad(name, bits, "use an integer or bool tensor of 0 and 1")
        if tuple(bits.shape) != shapes[step]:
            raise bad(name, bits, f"expected shape {shapes[step]} (batch, h, w, bits) at this scale")
        if bits.numel() and not ((bits == 0) | (bits == 1)).all():
            raise bad(name, bits, "every value must be 0 or 1")
