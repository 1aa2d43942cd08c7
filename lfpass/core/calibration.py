"""Calibration statistics: what the layers' inputs look like, kept small.

Keeping a model's function while sharing its weights needs to know what each
layer is fed. Calibration streams batches through the model once and keeps,
per layer, the second moment of its input as the weight sees it, never the
activations themselves:

- ``gram``: ``sum_n x_n x_n^T`` in float64, ``[d, d]`` where ``d`` is the
  weight's input size (a linear layer's ``in_features``; a convolution's
  patch size ``in_channels / groups * prod(kernel)``, patches flattened in the
  weight's own ``(channel, *kernel)`` order);
- ``total``: ``sum_n x_n`` (``[d]``) and ``count``, so a bias can be handled
  as a weight on a constant 1 input (the augmented Gram);
- optionally ``cross[(a, b)]``: ``sum_n x_a,n x_b,n^T`` of two layers' inputs
  at the same sample positions, over their channels (a linear layer's
  features; a convolution's input channels, per pixel), which matching by
  activations needs.

The memory is ``O(d^2)`` per layer whatever the number of samples. Layers are
keyed by their weight tensor's name, the name sites use in every frontend, so
one :class:`Calibration` serves the FX and the ONNX paths alike.

A function-preserving transform of a layer's input coordinates (a permutation
of hidden units, a rotation inside attention heads) moves its statistics with
it: :meth:`Calibration.permute_input` and :meth:`Calibration.transform_input`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterator, Mapping

import numpy as np

from lfpass.core.errors import LfpassError

log = logging.getLogger(__name__)


class CalibrationError(LfpassError):
    """Calibration data that cannot be used (no samples, a layer never ran, wrong shapes)."""


@dataclass
class LayerStats:
    """Input statistics of one layer. ``kernel`` is the convolution's kernel size product
    (1 for a linear layer): ``gram`` is over ``channels * kernel`` patch entries."""

    gram: np.ndarray  # float64 [d, d]
    total: np.ndarray  # float64 [d]
    count: int
    kernel: int = 1

    def __post_init__(self) -> None:
        d = self.total.shape[0]
        if self.gram.shape != (d, d):
            raise CalibrationError(f"a Gram matrix of shape {self.gram.shape} does not match {d} input features")
        if d % self.kernel:
            raise CalibrationError(f"{d} patch entries are not a whole number of kernels of {self.kernel}")

    @property
    def dim(self) -> int:
        return self.total.shape[0]

    @property
    def channels(self) -> int:
        return self.dim // self.kernel

    def augmented(self) -> np.ndarray:
        """``[[G, s], [s^T, n]]``: the Gram of the input with a constant 1 appended, so
        ``[W b]`` acts on it as ``W x + b`` does."""
        d = self.dim
        out = np.empty((d + 1, d + 1))
        out[:d, :d] = self.gram
        out[:d, d] = out[d, :d] = self.total
        out[d, d] = self.count
        return out

    def mean_gram(self) -> np.ndarray:
        """``G / n``: the input's second moment per sample."""
        return self.gram / max(self.count, 1)

    def merge(self, other: "LayerStats") -> "LayerStats":
        """The statistics of both sets of samples (for batches gathered apart, or per rank)."""
        if other.gram.shape != self.gram.shape or other.kernel != self.kernel:
            raise CalibrationError("cannot add statistics of layers of different input sizes")
        return LayerStats(self.gram + other.gram, self.total + other.total, self.count + other.count, self.kernel)


def _patch_index(perm: np.ndarray, kernel: int) -> np.ndarray:
    """A channel permutation as a permutation of ``(channel, kernel)`` patch entries."""
    perm = np.asarray(perm)
    return (perm[:, None] * kernel + np.arange(kernel)[None, :]).reshape(-1)


@dataclass
class Calibration(Mapping[str, LayerStats]):
    """Per-layer input statistics, keyed by weight tensor name, with the number of
    batches and samples they came from. Read-only as a mapping; frontends build it."""

    layers: dict[str, LayerStats] = field(default_factory=dict)
    cross: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    batches: int = 0

    def __getitem__(self, name: str) -> LayerStats:
        try:
            return self.layers[name]
        except KeyError:
            raise KeyError(f"no calibration statistics for {name!r}: the layer never ran on the calibration "
                           "inputs") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def cross_of(self, a: str, b: str) -> np.ndarray | None:
        """``sum x_a x_b^T`` over channels, either order; None when not gathered."""
        if (a, b) in self.cross:
            return self.cross[(a, b)]
        if (b, a) in self.cross:
            return self.cross[(b, a)].T
        return None

    # -- function-preserving transforms of a layer's input ---------------------------
    def permute_input(self, name: str, perm: np.ndarray) -> None:
        """The layer's input channels were reordered: new channel ``i`` is old ``perm[i]``."""
        stats = self.layers.get(name)
        if stats is not None:
            index = _patch_index(perm, stats.kernel)
            stats.gram = stats.gram[np.ix_(index, index)]
            stats.total = stats.total[index]
        perm = np.asarray(perm)
        for (a, b), c in list(self.cross.items()):
            if a == name:
                c = c[perm, :]
            if b == name:
                c = c[:, perm]
            self.cross[(a, b)] = c

    def transform_input(self, name: str, matrix: np.ndarray) -> None:
        """The layer's input became ``M x`` (a rotation; linear layers only): the
        statistics become ``M G M^T`` and ``M s``."""
        matrix = np.asarray(matrix, dtype=np.float64)
        stats = self.layers.get(name)
        if stats is not None:
            if stats.kernel != 1:
                raise CalibrationError(f"{name!r}: only a linear layer's input can be rotated")
            stats.gram = matrix @ stats.gram @ matrix.T
            stats.total = matrix @ stats.total
        for (a, b), c in list(self.cross.items()):
            if a == name:
                c = matrix @ c
            if b == name:
                c = c @ matrix.T
            self.cross[(a, b)] = c

    def copy(self) -> "Calibration":
        return Calibration(
            {k: LayerStats(v.gram.copy(), v.total.copy(), v.count, v.kernel) for k, v in self.layers.items()},
            {k: v.copy() for k, v in self.cross.items()}, self.batches,
        )

    # -- files ------------------------------------------------------------------------
    def save(self, path) -> None:
        """As an ``.npz`` (float64 arrays, names kept), for a calibration reused across runs."""
        arrays: dict[str, np.ndarray] = {"__batches__": np.array(self.batches)}
        for i, (name, s) in enumerate(self.layers.items()):
            arrays[f"layer{i}/name"] = np.array(name)
            arrays[f"layer{i}/gram"], arrays[f"layer{i}/total"] = s.gram, s.total
            arrays[f"layer{i}/count"], arrays[f"layer{i}/kernel"] = np.array(s.count), np.array(s.kernel)
        for i, ((a, b), c) in enumerate(self.cross.items()):
            arrays[f"cross{i}/a"], arrays[f"cross{i}/b"], arrays[f"cross{i}/value"] = np.array(a), np.array(b), c
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path) -> "Calibration":
        with np.load(path, allow_pickle=False) as data:
            out = cls(batches=int(data["__batches__"]))
            i = 0
            while f"layer{i}/name" in data:
                out.layers[str(data[f"layer{i}/name"])] = LayerStats(
                    data[f"layer{i}/gram"], data[f"layer{i}/total"], int(data[f"layer{i}/count"]),
                    int(data[f"layer{i}/kernel"]))
                i += 1
            i = 0
            while f"cross{i}/a" in data:
                out.cross[(str(data[f"cross{i}/a"]), str(data[f"cross{i}/b"]))] = data[f"cross{i}/value"]
                i += 1
        return out


def accumulate(stats: LayerStats | None, x: np.ndarray, kernel: int = 1) -> LayerStats:
    """``stats`` with the rows of ``x`` (``[samples, d]``) added, in float64."""
    x = np.asarray(x, dtype=np.float64).reshape(-1, x.shape[-1])
    gram, total = x.T @ x, x.sum(axis=0)
    if stats is None:
        return LayerStats(gram, total, x.shape[0], kernel)
    stats.gram += gram
    stats.total += total
    stats.count += x.shape[0]
    return stats


def output_energy(w: np.ndarray, moment: np.ndarray) -> float:
    """``tr(W M W^T)``: the summed squared outputs of ``y = W x`` over inputs of second moment ``M``
    (per sample, or summed when ``M`` is a Gram). Two products, not a three-operand einsum
    (which numpy runs as a loop: 100x slower at a width of 1536)."""
    return float(np.sum((w @ moment) * w))
