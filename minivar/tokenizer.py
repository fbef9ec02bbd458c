"""The T5 tokenizer: a sentencepiece unigram model plus T5's special tokens, padded to a fixed length.

It reproduces Hugging Face's `T5Tokenizer(legacy=True)` called with `padding="max_length",
truncation=True`, which is what Infinity feeds its T5 encoder:

    "a red apple" -> pieces ▁a ▁re d ▁apple -> ids 3 150 68 185 1 0 0 ... (EOS 1, then pad 0 up to max_length;
                                                                      ids of the tiny test vocabulary)

The special tokens (`</s>`, `<pad>`, `<unk>` and the 100 sentinels `<extra_id_N>`) are matched in the raw
text first; the text between them is handed to sentencepiece chunk by chunk, so each chunk gets its own
dummy-prefix "▁". Sentencepiece does the rest: NFKC normalisation, whitespace collapsing, unknown -> id 2.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch

from .weights import CheckpointError, read_json_object


class Tokenizer:
    def __init__(self, model_file: str | Path, extra_ids: int = 100):
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"{model_file} is not a sentencepiece model ({str(e).strip()[:160]}); "
                                  "re-download the tokenizer") from None
        self.extra_ids = extra_ids
        self.special = self._special_tokens()
        # longest first, so that a token is never matched by a shorter one that is its prefix
        alternatives = sorted(self.special, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load `path/spiece.model`; `path/tokenizer_config.json`, when present, sets the number of sentinels."""
        path = Path(path).expanduser()
        if not path.is_dir():
            raise CheckpointError(f"tokenizer directory not found: {path} "
                                  "(check the path, or run `minivar download MODEL`)")
        model_file = path / "spiece.model"
        if not model_file.is_file():
            raise CheckpointError(f"tokenizer directory {path} has no spiece.model (is it a T5 model directory?)")
        extra_ids = 100
        config_file = path / "tokenizer_config.json"
        if config_file.is_file():
            extra_ids = read_json_object(config_file, "tokenizer config").get("extra_ids", 100)
            if isinstance(extra_ids, bool) or not isinstance(extra_ids, int) or not 0 <= extra_ids <= 10_000:
                raise CheckpointError(f"tokenizer config {config_file}: extra_ids={extra_ids!r} is invalid: it must "
                                      "be an integer in 0..10000")
        return cls(model_file, extra_ids)

    def _special_tokens(self) -> dict[str, int]:
        # sentinels sit above the sentencepiece vocabulary in reverse: <extra_id_0> is the last id
        special = {self.sp.id_to_piece(i): i for i in (self.pad_id, self.eos_id, self.sp.unk_id())}
        special |= {f"<extra_id_{n}>": self.vocab_size - 1 - n for n in range(self.extra_ids)}
        return special

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size() + self.extra_ids

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without EOS and without truncation."""
        ids = []
        for i, chunk in enumerate(self._split.split(text)):
            if i % 2:  # re.split puts the matched separators at odd positions
                ids.append(self.special[chunk])
            elif chunk:
                ids += self.sp.encode(chunk)
        return ids

    def __call__(self, texts: str | list[str], max_length: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize a prompt or a batch of prompts -> (input_ids (B, max_length), attention_mask (B, max_length)).

        Each row is the prompt's ids, cut to max_length - 1 when too long, then EOS, then padding. The mask is 1
        on the ids and the EOS, 0 on the padding. Both are int64.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        input_ids = torch.full((len(texts), max_length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(texts), max_length), dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self._truncate(self.encode(text), max_length)
            input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, :len(ids)] = 1
        return input_ids, attention_mask

    def _truncate(self, ids: list[int], max_length: int) -> list[int]:
        if len(ids) + 1 > max_length:
            warnings.warn(f"T5 prompt truncated: {len(ids) + 1} tokens (with EOS) exceed max_length {max_length}; "
                          f"the last {len(ids) + 1 - max_length} were dropped", stacklevel=3)
            ids = ids[:max_length - 1]
        return ids + [self.eos_id]
