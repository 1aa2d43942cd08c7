"""Shared bases: the algebra's exact limits, the closed-form damage, and the counts."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lfpass.core.bases import basis_params, break_even, fit_basis, relative_error, residual_curve
from lfpass.core.calibration import accumulate
from lfpass.core.errors import PlanError
from lfpass.core.lowrank import activation_svd, residual


def stats_of(x: np.ndarray):
    return accumulate(None, x)


def members(k: int, out: int, in_: int, seed: int = 0, shared: float = 0.0):
    """``k`` weights; ``shared`` of each is one common input-side structure."""
    rng = np.random.default_rng(seed)
    common = rng.standard_normal((out, in_))
    return [shared * common + rng.standard_normal((out, in_)) for _ in range(k)]


def inputs(n: int, in_: int, seed: int = 1, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((in_, in_)) * np.linspace(1.0, 0.05, in_)  # correlated, uneven inputs
    return [scale * rng.standard_normal((n, in_)) @ mix for _ in range(1)][0]


@settings(max_examples=25, deadline=None)
@given(k=st.integers(1, 4), out=st.integers(1, 9), in_=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_a_full_rank_basis_reproduces_every_member(k, out, in_, seed):
    weights = members(k, out, in_, seed)
    stats = [stats_of(inputs(40, in_, seed + i)) for i in range(k)]
    fit = fit_basis(weights, stats)
    basis, coeffs = fit.factors(fit.max_rank, np.dtype(np.float64))
    assert basis.shape == (min(in_, k * out), in_)
    for w, c in zip(weights, coeffs):
        np.testing.assert_allclose(c @ basis, w, atol=1e-5 * max(1.0, np.abs(w).max()))
    np.testing.assert_allclose(fit.damage(fit.max_rank), 0.0, atol=1e-10)


def test_a_group_of_one_is_per_layer_activation_aware_svd_bit_for_bit():
    w = members(1, 12, 10)[0].astype(np.float32)
    stats = stats_of(inputs(64, 10))
    for rank in (1, 3, 10):
        u, v = activation_svd(w, stats, rank)
        basis, (coeff,) = fit_basis([w.astype(np.float64)], [stats]).factors(rank, np.dtype(np.float32))
        np.testing.assert_array_equal(basis, v)
        np.testing.assert_array_equal(coeff, u)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_the_closed_form_damage_is_each_members_own_output_error(k):
    weights = members(k, 6, 8, shared=1.0)
    stats = [stats_of(inputs(50, 8, seed=10 + i, scale=1.0 + i)) for i in range(k)]  # members see other inputs
    fit = fit_basis(weights, stats)
    for rank in range(0, fit.max_rank + 1):
        if rank == 0:
            expected = [1.0] * k
        else:
            basis, coeffs = fit.factors(rank, np.dtype(np.float64))
            expected = [relative_error(w, c @ basis, s) for w, c, s in zip(weights, coeffs, stats)]
        np.testing.assert_allclose(fit.damage(rank), expected, rtol=1e-8 if k > 1 else 1e-3, atol=1e-9)
    assert np.all(np.diff(fit.relative.sum(axis=0)) <= 1e-12)  # more rank never costs more in total


def test_the_residual_curve_is_the_residuals_own_error():
    w, shared = members(2, 7, 9, seed=4)
    stats = stats_of(inputs(60, 9, seed=5))
    curve = residual_curve(w, shared, stats)
    for rank in (1, 4, 7):
        u, v = residual(w, shared, stats, rank)
        assert curve[rank] == pytest.approx(relative_error(w, shared + u @ v, stats), rel=1e-3)  # to the ridge
    assert curve[0] == pytest.approx(relative_error(w, shared, stats), rel=1e-10)


def test_layers_that_share_input_structure_lose_less_at_equal_parameters():
    """The point of a shared basis: at the same parameter count, layers built on one input
    subspace keep more through one basis than each through its own factors."""
    out, in_, k = 16, 32, 4
    rng = np.random.default_rng(0)
    subspace = rng.standard_normal((6, in_))
    weights = [rng.standard_normal((out, 6)) @ subspace + 0.05 * rng.standard_normal((out, in_))
               for _ in range(k)]
    stats = [stats_of(rng.standard_normal((200, in_))) for _ in range(k)]
    shared = fit_basis(weights, stats)
    own = [fit_basis([w], [s]) for w, s in zip(weights, stats)]
    budget = basis_params(k, out, in_, 6)  # a rank-6 basis for all four
    per_layer_rank = budget // (k * (out + in_))  # the same parameters spent per layer
    assert per_layer_rank >= 1
    assert shared.damage(6).sum() < sum(f.damage(per_layer_rank)[0] for f in own) / 5


def test_counts_and_break_even():
    assert basis_params(3, 10, 20, 4) == 4 * (20 + 30)
    r = break_even(3, 10, 20)
    assert basis_params(3, 10, 20, r) < 3 * 10 * 20 <= basis_params(3, 10, 20, r + 1)
    assert break_even(1, 1, 1) == 0  # a 1x1 layer is never smaller factored


def test_bad_ranks_and_shapes_are_one_line_errors():
    fit = fit_basis(members(2, 3, 4))
    with pytest.raises(PlanError, match="a rank must be a whole number >= 1"):
        fit.factors(0, np.dtype(np.float32))
    with pytest.raises(PlanError, match="members of one \\[out, in\\] shape"):
        fit_basis([np.ones((3, 4)), np.ones((4, 3))])
    with pytest.raises(PlanError, match="statistics over 5 inputs do not fit a weight taking 4"):
        fit_basis(members(1, 3, 4), [stats_of(np.ones((10, 5)))])


def test_calibration_smaller_than_the_input_width_is_regularised():
    """Fewer samples than inputs: the whitening's ridge keeps it solvable, and the factors
    still reproduce the member on the inputs it saw."""
    w = members(1, 5, 40)[0]
    x = inputs(8, 40)
    fit = fit_basis([w], [stats_of(x)])
    basis, (coeff,) = fit.factors(8, np.dtype(np.float64))
    assert np.isfinite(basis).all() and np.isfinite(coeff).all()
    np.testing.assert_allclose(x @ (coeff @ basis).T, x @ w.T, rtol=1e-3, atol=1e-3 * np.abs(x @ w.T).max())
