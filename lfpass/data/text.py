"""WikiText-2 from a local folder, its vocabulary, and language-model batching."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from lfpass.core.errors import InputError

WIKITEXT2_DIRS = ("wikitext-2", "wikitext-2-raw", "wikitext-2-v1", "wikitext-2-raw-v1")
WIKITEXT2_SPLITS = {"train": "train", "valid": "valid", "validation": "valid", "test": "test"}
UNK, EOS = "<unk>", "<eos>"


@dataclass
class Vocab:
    """Word <-> id. Built vocabularies start with ``<unk>`` then ``<eos>``; words the
    vocabulary lacks map to ``<unk>``."""

    itos: list[str]
    stoi: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.itos = list(self.itos)
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise InputError("vocabulary has repeated words")

    def __len__(self) -> int:
        return len(self.itos)

    @classmethod
    def build(cls, tokens: Iterable[str]) -> "Vocab":
        """Specials first, then words in order of first appearance."""
        seen = dict.fromkeys([UNK, EOS])
        seen.update(dict.fromkeys(tokens))
        return cls(list(seen))

    def encode(self, tokens: Iterable[str]) -> list[int]:
        stoi, unk = self.stoi, self.stoi.get(UNK)
        out = []
        for t in tokens:
            i = stoi.get(t, unk)
            if i is None:
                raise InputError(f"word {t!r} is not in the vocabulary, which has no {UNK} to stand for it")
            out.append(i)
        return out


def _wikitext_file(root: Path, split: str) -> Path:
    if split not in WIKITEXT2_SPLITS:
        raise InputError(f"wikitext2: unknown split {split!r} (known: train, valid, test)")
    if not root.is_dir():
        raise InputError(f"{root}: no such folder (WikiText-2 is read locally; lfpass never downloads)")
    name = WIKITEXT2_SPLITS[split]
    for folder in (root, *(root / d for d in WIKITEXT2_DIRS)):
        for ext in ("tokens", "raw"):
            path = folder / f"wiki.{name}.{ext}"
            if path.is_file():
                return path
    raise InputError(
        f"{root}: no wiki.{name}.tokens (or .raw) here or in {'/, '.join(WIKITEXT2_DIRS)}/"
    )


def _tokens(path: Path) -> Iterator[str]:
    """Whitespace tokens with ``<eos>`` closing every line, blank lines included
    (the convention of PyTorch's word_language_model example)."""
    try:
        with io.open(path, encoding="utf-8") as f:
            for line in f:
                yield from line.split()
                yield EOS
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def wikitext2(
    root: str | Path, split: str = "train", vocab: Vocab | Sequence[str] | None = None
) -> tuple[torch.Tensor, Vocab]:
    """WikiText-2 from a local folder: the split's token ids (1-D int64) and the vocabulary.

    ``root`` holds ``wiki.{train,valid,test}.tokens`` (or ``.raw``), directly
    or in a ``wikitext-2/`` or ``wikitext-2-raw/`` subfolder. Without
    ``vocab`` the vocabulary is built from the training split, so the ids of
    every split agree.
    """
    root = Path(root)
    path = _wikitext_file(root, split)
    if vocab is None:
        vocab = Vocab.build(_tokens(_wikitext_file(root, "train")))
    elif not isinstance(vocab, Vocab):
        vocab = Vocab(list(vocab))
    ids = vocab.encode(_tokens(path))
    if not any(i != vocab.stoi.get(EOS) for i in ids):
        raise InputError(f"{path}: no words in this file")
    return torch.tensor(ids, dtype=torch.long), vocab


def batchify(ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Cut a token stream into ``batch_size`` equal rows ``[batch_size, n]``; the
    leftover tail is dropped. Row ``b`` continues where it left off in each window."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = ids.numel() // batch_size
    if n < 2:
        raise InputError(f"{ids.numel()} tokens are too few for {batch_size} rows of at least 2")
    return ids[: n * batch_size].reshape(batch_size, n)


def lm_batches(ids: torch.Tensor, seq_len: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Language-model windows over a token stream: ``(inputs, targets)`` each
    ``[batch_size, <= seq_len]``, targets shifted one token ahead. Windows do not
    overlap; the last may be shorter."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    rows = batchify(ids, batch_size)
    for start in range(0, rows.shape[1] - 1, seq_len):
        end = min(start + seq_len, rows.shape[1] - 1)
        yield rows[:, start:end], rows[:, start + 1 : end + 1]
