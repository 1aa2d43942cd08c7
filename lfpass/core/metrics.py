"""Similarity of weight tensors, all pairs of one compatibility class at once.

Every metric takes the ``n`` weight tensors of a class (same shape) and returns
an ``n x n`` float64 matrix on one scale: **higher means more alike**, and a
tensor compared with an exact copy of itself scores 1. Distances are turned
into similarities here, so the planner can never keep the least similar pairs
by reading a distance as a similarity (the authors' code does exactly that).

- ``cosine``: cosine of the flattened weights, in [-1, 1].
- ``euclidean``: ``1 - ||a - b|| / mean(||a||, ||b||)``, in [-1, 1].
- ``cov``: the paper's default: Frobenius norm of the covariance of the
  standardised weight matrix, compared as ``1 - |na - nb| / mean(na, nb)``.
- ``wasserstein``: 1-D earth mover's distance between the two weight-value
  distributions (on shared quantiles), over their mean standard deviation,
  as ``1 - W1 / mean(sa, sb)``. Blind to where each value sits.
- ``kl``: ``exp(-KL_sym)`` between histograms of weight values on shared bins.
- ``output``: how little the layers' outputs change when both take their mean
  weight, on each one's own calibration inputs: ``1 - (err_i + err_j) / 2``
  with ``err_i = tr((M - W_i) G_i (M - W_i)^T) / tr(W_i G_i W_i^T)``,
  ``M = (W_i + W_j) / 2``, ``W`` as ``[out, in]`` with the bias appended and
  ``G_i`` the input's (augmented) second moment. It needs calibration
  (``needs_stats``); the planner passes each layer's matrices and moments.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from lfpass.core.errors import ConfigError

Metric = Callable[[Sequence[np.ndarray]], np.ndarray]

_QUANTILES = 1024
_BINS = 64
_EPS = 1e-12
_CHUNK = 1 << 16  # columns per block of the cosine Gram matrix (n x 64K float64)


def _score_dtype(weights: Sequence[np.ndarray]) -> type[np.floating]:
    """float64 when any tensor is float64 (a float32 view would call near-copies equal), else float32.

    float16 and bfloat16 (ml_dtypes) widen to float32 exactly."""
    return np.float64 if any(np.asarray(w).dtype == np.float64 for w in weights) else np.float32


def _stack(weights: Sequence[np.ndarray]) -> np.ndarray:
    dtype = _score_dtype(weights)
    return np.stack([np.asarray(w).astype(dtype, copy=False).reshape(-1) for w in weights])


def _rel_gap(values: np.ndarray) -> np.ndarray:
    """``1 - |a - b| / mean(a, b)`` for all pairs of a vector of non-negative values."""
    gap = np.abs(values[:, None] - values[None, :])
    scale = (values[:, None] + values[None, :]) / 2.0
    return 1.0 - np.divide(gap, scale, out=np.zeros_like(gap), where=scale > _EPS)


def _gram(weights: Sequence[np.ndarray], chunk: int = _CHUNK) -> np.ndarray:
    """``X @ X.T`` of the flattened weights, accumulated in float64 a block of columns at a
    time: no float64 copy of the whole class is made, and each block stays in cache
    (24x faster than converting every row first, on twelve 768x3072 weights)."""
    dtype = _score_dtype(weights)
    rows = [np.asarray(w).astype(dtype, copy=False).reshape(-1) for w in weights]
    n, d = len(rows), rows[0].size if rows else 0
    gram = np.zeros((n, n))
    block = np.empty((n, min(chunk, d)))
    for start in range(0, d, chunk):
        stop = min(start + chunk, d)
        view = block[:, : stop - start]
        for i, row in enumerate(rows):
            view[i] = row[start:stop]
        gram += view @ view.T
    return gram


def cosine(weights: Sequence[np.ndarray]) -> np.ndarray:
    gram = _gram(weights)
    norms = np.sqrt(np.diag(gram).copy())
    safe = np.where(norms > _EPS, norms, 1.0)
    sim = gram / safe[:, None] / safe[None, :]
    both_zero = (norms[:, None] <= _EPS) & (norms[None, :] <= _EPS)
    sim[both_zero] = 1.0
    np.fill_diagonal(sim, 1.0)
    return np.clip(sim, -1.0, 1.0)


def euclidean(weights: Sequence[np.ndarray]) -> np.ndarray:
    x = _stack(weights)
    n = len(x)
    dist = np.zeros((n, n))
    for i in range(n - 1):  # one pass per row, exact differences (no Gram cancellation)
        dist[i, i + 1 :] = np.linalg.norm(x[i + 1 :] - x[i], axis=1)
    dist = dist + dist.T
    norms = np.linalg.norm(x, axis=1).astype(np.float64)
    scale = (norms[:, None] + norms[None, :]) / 2.0
    return 1.0 - np.divide(dist, scale, out=np.zeros_like(dist), where=scale > _EPS)


def _cov_norm(w: np.ndarray) -> float:
    m = np.asarray(w, dtype=np.float64).reshape(w.shape[0], -1)
    z = (m - m.mean()) / max(float(m.std()), _EPS)
    small = z @ z.T if z.shape[0] <= z.shape[1] else z.T @ z  # same Frobenius norm
    return float(np.linalg.norm(small)) / max(z.shape[0] - 1, 1)


def cov(weights: Sequence[np.ndarray]) -> np.ndarray:
    return _rel_gap(np.array([_cov_norm(w) for w in weights]))


def wasserstein(weights: Sequence[np.ndarray]) -> np.ndarray:
    x = np.sort(_stack(weights), axis=1)
    d = x.shape[1]
    idx = np.linspace(0, d - 1, min(d, _QUANTILES)).round().astype(np.int64)
    q = x[:, idx].astype(np.float64)
    w1 = np.abs(q[:, None, :] - q[None, :, :]).mean(axis=2)
    std = x.std(axis=1).astype(np.float64)
    scale = (std[:, None] + std[None, :]) / 2.0
    return 1.0 - np.divide(w1, scale, out=np.zeros_like(w1), where=scale > _EPS)


def kl(weights: Sequence[np.ndarray]) -> np.ndarray:
    x = _stack(weights)
    n = len(x)
    lo, hi = float(x.min()), float(x.max())
    width = (hi - lo) or 1.0
    bins = np.clip(((x - lo) / width * _BINS).astype(np.int64), 0, _BINS - 1)
    bins += np.arange(n)[:, None] * _BINS
    counts = np.bincount(bins.ravel(), minlength=n * _BINS).reshape(n, _BINS)
    p = (counts + 1e-3) / (counts + 1e-3).sum(axis=1, keepdims=True)
    logp = np.log(p)
    entropy_term = (p * logp).sum(axis=1)
    kl_pq = entropy_term[:, None] - p @ logp.T  # KL(p_i || p_j)
    sym = np.maximum((kl_pq + kl_pq.T) / 2.0, 0.0)
    return np.exp(-sym)


class OutputMetric:
    """The ``output`` metric: relative output error of sharing the pair's mean weight.

    Called as ``metric(weights, moments)``: ``weights`` are ``[out, d]`` matrices
    (``[W b]``), ``moments`` each member's ``[d, d]`` input second moment, or None
    for a member without one (its inputs taken as white: the error in weight space).
    All pairs at once: ``tr(A_j G_i A_j^T) = <G_i, A_j^T A_j>`` needs one ``d x d``
    product per member, not per pair."""

    needs_stats = True

    def __call__(self, weights: Sequence[np.ndarray], moments: Sequence[np.ndarray | None] | None = None) -> np.ndarray:
        mats = [np.asarray(w, dtype=np.float64).reshape(np.shape(w)[0], -1) for w in weights]
        n = len(mats)
        moments = list(moments) if moments is not None else [None] * n
        flat = np.stack([m.reshape(-1) for m in mats])
        driven = np.stack([(m if g is None else m @ g).reshape(-1) for m, g in zip(mats, moments)])
        cross = driven @ flat.T  # cross[i, j] = tr(A_i G_i A_j^T)
        energy = np.empty((n, n))  # energy[i, j] = tr(A_j G_i A_j^T)
        for j, m in enumerate(mats):
            outer = m.T @ m
            energy[:, j] = [np.trace(outer) if g is None else np.vdot(g, outer) for g in moments]
        own = np.diag(energy).copy()
        gap = np.maximum(energy - 2.0 * cross + own[:, None], 0.0) / 4.0  # tr(D G_i D^T), D = M - A_i
        err = np.divide(gap, own[:, None], out=np.where(gap > _EPS, 1.0, 0.0), where=own[:, None] > _EPS)
        sim = 1.0 - (err + err.T) / 2.0
        np.fill_diagonal(sim, 1.0)
        return sim


output = OutputMetric()

METRICS: dict[str, Metric] = {
    "cosine": cosine,
    "cov": cov,
    "euclidean": euclidean,
    "wasserstein": wasserstein,
    "kl": kl,
    "output": output,
}


def get_metric(name: str) -> Metric:
    try:
        return METRICS[name]
    except KeyError:
        raise ConfigError(f"unknown metric {name!r} (known: {', '.join(METRICS)})") from None
