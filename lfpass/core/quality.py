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
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from lfpass.core.errors import ConfigError

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


def _top1(batches: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(b).argmax(axis=-1).reshape(-1) for b in batches])


def output_error(reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray], metric: str = "cosine",
                 labels: Sequence[np.ndarray] | None = None) -> float:
    """The error of ``outputs`` against ``reference`` (lower is better; 0 = unchanged).

    NaN or Inf in ``outputs`` is the largest error the metric has (2 for cosine,
    1 for the others): a broken model never passes a budget."""
    if not len(reference):
        raise ValueError("no held-out outputs to measure the error on")
    if not all(np.isfinite(np.asarray(o)).all() for o in outputs):
        return 2.0 if metric == "cosine" else 1.0
    if metric == "cosine":
        return float(1.0 - cosines(reference, outputs).mean())
    if metric == "top1":
        return float(1.0 - np.mean(_top1(reference) == _top1(outputs)))
    if metric == "accuracy":
        if labels is None:
            raise ConfigError("error_metric 'accuracy' needs labels with the calibration inputs")
        truth = np.concatenate([np.asarray(y).reshape(-1) for y in labels])
        return float(np.mean(_top1(reference) == truth) - np.mean(_top1(outputs) == truth))
    raise ConfigError(f"error_metric: unknown {metric!r} (known: cosine, top1, accuracy)")


def describe(metric: str, error: float) -> str:
    """The error as a person reads it: ``cosine 0.9912``, ``top-1 agreement 0.987``, ``accuracy -0.4 points``."""
    if metric == "cosine":
        return f"output cosine {1.0 - error:.4f}"
    if metric == "top1":
        return f"top-1 agreement {1.0 - error:.4f}"
    return f"accuracy {-100.0 * error:+.2f} points"
