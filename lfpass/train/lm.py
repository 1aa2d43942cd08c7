"""Causal language modelling on plain text: next-token cross-entropy to train, perplexity as quality.

Text comes from WikiText-2 in a local folder, or any ``.txt`` file or folder
of them (the Shakespeare plays, say), split into words (each line closed by
``<eos>``, as for WikiText) or characters. The model maps token ids
``[B, T]`` to logits ``[B, T, V]`` (or an output whose ``logits`` are those).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lfpass.core.errors import InputError
from lfpass.data import EOS, Vocab, lm_batches, wikitext2
from lfpass.train.task import device_of, main_output, share

LEVELS = ("word", "char")


class LanguageModeling:
    """Train on random windows of ``train_ids``; quality is perplexity on ``valid_ids``
    (lower is better), read in consecutive windows of ``seq_len``."""

    name = "language_modeling"
    higher_is_better = False

    def __init__(self, train_ids: torch.Tensor, valid_ids: torch.Tensor, *, seq_len: int = 64,
                 vocab: Vocab | None = None, eval_batch_size: int = 16, max_eval_tokens: int | None = None) -> None:
        if train_ids.numel() <= seq_len + 1:
            raise InputError(f"{train_ids.numel()} training tokens are too few for windows of {seq_len}")
        self.train_ids, self.valid_ids = train_ids.long().flatten(), valid_ids.long().flatten()
        if max_eval_tokens is not None:
            self.valid_ids = self.valid_ids[:max_eval_tokens]
        self.seq_len, self.vocab, self.eval_batch_size = seq_len, vocab, eval_batch_size

    @classmethod
    def wikitext2(cls, root: str | Path, split: str = "valid", **kwargs: Any) -> "LanguageModeling":
        """WikiText-2 from a local folder: train on its training split, measure on ``split``."""
        train, vocab = wikitext2(root, "train")
        valid, _ = wikitext2(root, split, vocab=vocab)
        return cls(train, valid, vocab=vocab, **kwargs)

    @classmethod
    def from_text(cls, path: str | Path, level: str = "word", valid_fraction: float = 0.1,
                  **kwargs: Any) -> "LanguageModeling":
        """A ``.txt`` file, or every ``.txt`` under a folder (in name order); the last
        ``valid_fraction`` of the tokens is held out. The vocabulary comes from the rest."""
        if level not in LEVELS:
            raise InputError(f"level: must be one of {', '.join(LEVELS)}, got {level!r}")
        if not 0.0 < valid_fraction < 1.0:
            raise InputError(f"valid_fraction: must be in (0, 1), got {valid_fraction!r}")
        tokens = _tokens(_read(Path(path)), level)
        cut = int(len(tokens) * (1.0 - valid_fraction))
        vocab = Vocab.build(tokens[:cut])
        train = torch.tensor(vocab.encode(tokens[:cut]), dtype=torch.long)
        valid = torch.tensor(vocab.encode(tokens[cut:]), dtype=torch.long)
        return cls(train, valid, vocab=vocab, **kwargs)

    def train_batches(self, batch_size: int, *, seed: int, rank: int = 0, world: int = 1) -> Iterator[Any]:
        """Windows at seeded random offsets: inputs and the same tokens one ahead."""
        mine = share(batch_size, rank, world)
        gen = torch.Generator().manual_seed(seed)
        span = torch.arange(self.seq_len + 1)
        while True:
            starts = torch.randint(0, self.train_ids.numel() - self.seq_len, (batch_size,), generator=gen)[mine]
            window = self.train_ids[starts[:, None] + span]
            yield window[:, :-1], window[:, 1:]

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        inputs, targets = batch
        logits = main_output(model(inputs))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Perplexity (``quality``) and the mean next-token loss over the held-out tokens."""
        model.eval()
        device, nll, tokens = device_of(model), 0.0, 0
        rows = max(1, min(self.eval_batch_size, self.valid_ids.numel() // 2))
        for inputs, targets in lm_batches(self.valid_ids, self.seq_len, rows):
            logits = main_output(model(inputs.to(device))).float()
            nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.to(device).reshape(-1),
                                         reduction="sum"))
            tokens += targets.numel()
        loss = nll / max(tokens, 1)
        return {"quality": math.exp(min(loss, 700.0)), "perplexity": math.exp(min(loss, 700.0)), "loss": loss}


def _read(path: Path) -> str:
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise InputError(f"{path}: no such text file, or no .txt files in this folder")
    try:
        return "\n".join(f.read_text(encoding="utf-8") for f in files)
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text ({exc.reason})") from None


def _tokens(text: str, level: str) -> list[str]:
    """Words with ``<eos>`` closing each line, or characters."""
    if level == "char":
        tokens = list(text)
    else:
        tokens = [t for line in text.splitlines() for t in (*line.split(), EOS)]
    if len(tokens) < 4:
        raise InputError("the text holds too few tokens to train on")
    return tokens
