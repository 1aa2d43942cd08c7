"""CIFAR-10 from a local copy of the python version (``cifar-10-batches-py``), unpickled
with only numpy arrays allowed, so a stray or hostile pickle in the folder cannot run code."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from lfpass.core.errors import InputError

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_DIR = "cifar-10-batches-py"


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
