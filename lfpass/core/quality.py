"""Output error: how far a fused model's outputs are from the original's.

What a budget is measured in, for every frontend alike: the frontends run
both models on the same held-out inputs and hand the outputs here as numpy
arrays, one ``[batch, ...]`` array per batch (a model with several outputs
has them flattened and joined per sample first).

- ``cosine``: ``1 - mean cosine`` between the two outputs of each sample
  (0 when identical; an embedding model's usual fidelity measure);
- ``top1``: ``1 - agreement`` of the argmax over the last axis, at every
  position (a classifier's or a language model's next-token choice);
- ``accuracy``: the drop in accuracy against ``labels`` (which the original
  model's accuracy is measured on too), in accuracy points as a fraction.

Each is a mean over samples (:func:`sample_errors`), so a budget can be kept
with a margin of standard errors (:func:`upper_bound`). What the error is
measured on is a :class:`Readout`: one named output or all of them, pooled
over positions as the user pools them (a sentence embedding is the masked
mean of the hidden states, not the hidden states).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from lfpass.core.errors import ConfigError

MASK_INPUT = "attention_mask"  # the input a "mean" readout pools over, where the model has one

_TINY = 1e-30


def _rows(batches: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(b, dtype=np.float64).reshape(len(b), -1) for b in batches])


def cosines(reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> np.ndarray:
    """Per sample: the cosine between its flattened reference and fused outputs (1 when
    both are zero, 0 when only one is)."""
    a, b = _rows(reference), _rows(outputs)
    if a.shape != b.shape:
        raise ValueError(f"outputs of shape {b.shape} do not match the reference's {a.shape}")
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dot = np.einsum("ij,ij->i", a, b)
    cos = dot / np.maximum(na * nb, _TINY)
    cos[(na == 0) & (nb == 0)] = 1.0
    return np.clip(cos, -1.0, 1.0)


def relative_change(reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> float:
    """The mean over samples of ``||output - reference||^2 / ||reference||^2``: a smooth measure of
    how far outputs moved, whatever the error metric (the plan menu's sensitivity probes)."""
    a, b = _rows(reference), _rows(outputs)
    if not np.isfinite(b).all():
        return math.inf
    return float((np.sum((b - a) ** 2, axis=1) / np.maximum(np.sum(a * a, axis=1), _TINY)).mean())


def _top1(batches: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(b).argmax(axis=-1).reshape(-1) for b in batches])


def _per_sample(batches: Sequence[np.ndarray], values: np.ndarray) -> np.ndarray:
    """``values`` (one per position, batch after batch) averaged per sample."""
    out, start = [], 0
    for b in map(np.asarray, batches):
        n = len(b)
        size = int(np.prod(b.shape[:-1])) if b.ndim > 1 else n
        out.append(values[start:start + size].reshape(n, -1).mean(axis=1))
        start += size
    return np.concatenate(out)


def sample_errors(reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray], metric: str = "cosine",
                  labels: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """The error of ``outputs`` against ``reference`` per sample (lower is better; 0 = unchanged);
    :func:`output_error` is their mean.

    NaN or Inf in ``outputs`` is the largest error the metric has (2 for cosine,
    1 for the others): a broken model never passes a budget."""
    if not len(reference):
        raise ValueError("no held-out outputs to measure the error on")
    if metric not in ("cosine", "top1", "accuracy"):
        raise ConfigError(f"error_metric: unknown {metric!r} (known: cosine, top1, accuracy)")
    if not all(np.isfinite(np.asarray(o)).all() for o in outputs):
        return np.full(sum(len(r) for r in reference), 2.0 if metric == "cosine" else 1.0)
    if metric == "cosine":
        return 1.0 - cosines(reference, outputs)
    if metric == "top1":
        return _per_sample(reference, (_top1(reference) != _top1(outputs)).astype(np.float64))
    if labels is None:
        raise ConfigError("error_metric 'accuracy' needs labels with the calibration inputs")
    truth = np.concatenate([np.asarray(y).reshape(-1) for y in labels])
    drop = (_top1(reference) == truth).astype(np.float64) - (_top1(outputs) == truth)
    return _per_sample(reference, drop)


def output_error(reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray], metric: str = "cosine",
                 labels: Sequence[np.ndarray] | None = None) -> float:
    """The mean of :func:`sample_errors`."""
    return float(sample_errors(reference, outputs, metric, labels).mean())


def upper_bound(errors: np.ndarray, margin: float) -> float:
    """The mean of per-sample ``errors`` plus ``margin`` standard errors of that mean (the mean
    alone for one sample): what a budget is compared with, so that it holds beyond the samples."""
    mean = float(np.mean(errors))
    if margin == 0 or len(errors) < 2:
        return mean
    return mean + margin * float(np.std(errors, ddof=1)) / math.sqrt(len(errors))


@dataclass(frozen=True)
class Readout:
    """What an error is measured on, from a model's named outputs on one batch: ``output``
    (one by name; default every floating-point output) pooled over its second axis by
    ``pooling``: ``"none"``, ``"mean"`` (over the ``attention_mask`` input where the batch
    has one), ``"cls"`` (the first position), or a callable ``(output, mask) -> array``.
    The result is one row per sample (float64), outputs flattened and joined."""

    output: str | None = None
    pooling: Any = "none"

    @classmethod
    def of(cls, config: Any) -> "Readout":
        """The readout a :class:`~lfpass.core.config.FusionConfig` asks for."""
        return cls(config.error_output, config.pooling)

    def __call__(self, named: Mapping[str, np.ndarray], mask: np.ndarray | None = None) -> np.ndarray:
        if self.output is not None:
            if self.output not in named:
                raise ConfigError(f"error_output: the model has no output {self.output!r} "
                                  f"(its outputs: {', '.join(named)})")
            picked = [np.asarray(named[self.output])]
        else:
            picked = [np.asarray(a) for a in named.values()
                      if np.asarray(a).dtype.kind == "f" and np.asarray(a).ndim >= 1]
        if not picked:
            raise ConfigError("the model returns no floating-point output to measure its error on")
        pooled = [self._pool(a, mask) for a in picked]
        n = pooled[0].shape[0]
        return np.concatenate([p.reshape(n, -1).astype(np.float64) for p in pooled if p.shape[0] == n], axis=1)

    def _pool(self, a: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        if callable(self.pooling):
            return np.asarray(self.pooling(a, mask))
        if self.pooling == "none":
            return a
        if a.ndim < 3:
            if self.output is None:
                return a  # a [batch, features] output beside per-position ones: nothing to pool
            raise ConfigError(f"pooling {self.pooling!r} pools over positions, but output {self.output!r} has "
                              f"shape {a.shape} (no positions axis); use pooling 'none'")
        if self.pooling == "cls":
            return a[:, 0]
        if mask is not None and np.asarray(mask).shape == a.shape[:2]:
            w = np.asarray(mask, np.float64).reshape(*a.shape[:2], *([1] * (a.ndim - 2)))
            return (a * w).sum(axis=1) / np.maximum(w.sum(axis=1), 1e-12)
        return a.mean(axis=1)


def describe(metric: str, error: float) -> str:
    """The error as a person reads it: ``cosine 0.9912``, ``top-1 agreement 0.987``, ``accuracy -0.4 points``."""
    if metric == "cosine":
        return f"output cosine {1.0 - error:.4f}"
    if metric == "top1":
        return f"top-1 agreement {1.0 - error:.4f}"
    return f"accuracy {-100.0 * error:+.2f} points"
