"""The low-rank core: whitening, activation-aware SVD against plain SVD, residuals, counting."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from lfpass.core.calibration import accumulate
from lfpass.core.errors import PlanError
from lfpass.core.lowrank import (activation_svd, factor_params, layer_dims, output_error, plain_svd, rank_for, residual,
                                 uniform_ranks, whiten)
from lfpass.core.sites import make_signature


def _anisotropic(n=2000, d=24, seed=0, spread=3.0):
    """Inputs whose scale falls by ``10**spread`` across (rotated) directions."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    x = rng.standard_normal((n, d)) * np.logspace(0, -spread, d)
    return x @ q.T


def test_whiten_squares_to_the_regularised_second_moment():
    x = _anisotropic()
    stats = accumulate(None, x)
    s, s_inv = whiten(stats)
    m = x.T @ x / len(x)
    ridge = 1e-6 * np.trace(m) / m.shape[0]
    np.testing.assert_allclose(s @ s.T, m + ridge * np.eye(len(m)), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(s @ s_inv, np.eye(len(m)), atol=1e-8)


def test_whiten_falls_back_when_not_positive_definite():
    stats = accumulate(None, np.eye(4))
    stats.gram[:] = np.diag([1.0, 1.0, 1.0, -0.5])  # not a Gram any more: Cholesky fails
    s, s_inv = whiten(stats)
    assert np.isfinite(s).all() and np.isfinite(s_inv).all()
    np.testing.assert_allclose(s @ s_inv, np.eye(4), atol=1e-8)


@pytest.mark.parametrize("shape", [(32, 24), (16, 24)])
def test_full_rank_reproduces_the_weight(shape):
    rng = np.random.default_rng(1)
    w = rng.standard_normal(shape)
    stats = accumulate(None, _anisotropic(d=shape[1]))
    for u, v in (activation_svd(w, stats, min(shape)), plain_svd(w, min(shape))):
        assert u.shape == (shape[0], min(shape)) and v.shape == (min(shape), shape[1])
        np.testing.assert_allclose(u @ v, w, atol=1e-6)


def test_activation_svd_beats_plain_svd_on_the_calibration_inputs():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((32, 24))
    stats = accumulate(None, _anisotropic())
    for rank in (2, 4, 8, 16):
        a = output_error(w, np.matmul(*activation_svd(w, stats, rank)), stats)
        p = output_error(w, np.matmul(*plain_svd(w, rank)), stats)
        assert a < 0.8 * p, (rank, a, p)  # strictly, by a margin, on anisotropic inputs


def test_activation_svd_is_no_worse_on_white_inputs():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((32, 24))
    stats = accumulate(None, rng.standard_normal((20000, 24)))
    for rank in (4, 12):
        a = output_error(w, np.matmul(*activation_svd(w, stats, rank)), stats)
        p = output_error(w, np.matmul(*plain_svd(w, rank)), stats)
        assert a <= p + 1e-12


def test_activation_svd_is_optimal_against_random_factors():
    """No rank-r pair near the ASVD one does better on the inputs (a local check of optimality)."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((12, 10))
    stats = accumulate(None, _anisotropic(d=10, spread=2))
    u, v = activation_svd(w, stats, 3)
    best = output_error(w, u @ v, stats)
    for _ in range(50):
        du, dv = rng.standard_normal(u.shape) * 1e-3, rng.standard_normal(v.shape) * 1e-3
        assert output_error(w, (u + du) @ (v + dv), stats) >= best - 1e-12


def test_residual_full_rank_restores_the_member():
    rng = np.random.default_rng(5)
    member, shared = rng.standard_normal((16, 20)), rng.standard_normal((16, 20))
    stats = accumulate(None, _anisotropic(d=20))
    for s in (stats, None):
        u, v = residual(member, shared, s, 16)
        np.testing.assert_allclose(shared + u @ v, member, atol=1e-6)
    u, v = residual(member, shared, stats, 4)
    assert output_error(member, shared + u @ v, stats) < output_error(member, shared, stats)
    with pytest.raises(PlanError, match="does not share"):
        residual(member, shared[:, :4], None, 2)
    with pytest.raises(PlanError, match="rank"):
        residual(member, shared, None, 0)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, ml_dtypes.bfloat16])
def test_factors_come_back_in_the_weight_dtype(dtype):
    rng = np.random.default_rng(6)
    w = rng.standard_normal((8, 6)).astype(dtype)
    u, v = activation_svd(w, accumulate(None, _anisotropic(d=6)), 6)
    assert u.dtype == np.dtype(dtype) and v.dtype == np.dtype(dtype)
    tol = {np.float16: 2e-2, np.float32: 1e-5}.get(dtype, 1e-1)
    np.testing.assert_allclose(u.astype(np.float64) @ v.astype(np.float64), w.astype(np.float64), atol=tol * 8)


def test_wrong_statistics_are_refused():
    with pytest.raises(PlanError, match="do not fit"):
        activation_svd(np.ones((4, 5)), accumulate(None, np.ones((3, 6))), 2)


def test_counting_helpers():
    assert factor_params(64, 32, 4) == 4 * 96
    assert rank_for(4 * 96 + 95, 64, 32) == 4 and rank_for(10, 64, 32) == 0
    assert layer_dims("linear", make_signature(shape=(64, 32), layout="out_in")) == (64, 32)
    assert layer_dims("linear", make_signature(shape=(32, 64), layout="in_out")) == (64, 32)  # HF Conv1D
    assert layer_dims("linear", make_signature(shape=(32, 64), side="right", via=())) == (64, 32)  # ONNX MatMul
    assert layer_dims("linear", make_signature(shape=(64, 32), side="right", via=("Transpose(perm=(1, 0))",))) \
        == (64, 32)
    assert layer_dims("linear", make_signature(shape=(64, 32), transB=1)) == (64, 32)  # Gemm
    assert layer_dims("conv", make_signature(shape=(8, 4, 3, 3))) == (8, 36)


def test_uniform_ranks_land_at_or_below_the_budget_within_one_step():
    dims = {"a": (64, 32), "b": (64, 64), "c": (16, 48)}
    for budget in (300, 1000, 2500, 5000, 9000):
        ranks, f = uniform_ranks(dims, budget)
        cost = sum(factor_params(*dims[n], r) for n, r in ranks.items()) + sum(
            o * i for n, (o, i) in dims.items() if n not in ranks)
        assert cost <= budget
        step = sum(o + i for o, i in dims.values())
        assert budget - cost < step or len(ranks) < len(dims)  # one more rank everywhere would not fit
    with pytest.raises(PlanError, match="rank 1"):
        uniform_ranks(dims, 100)
