"""The merge rules of lfpass.core.merge on small arrays with hand-computed results."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from lfpass.core.dtypes import bit_equal
from lfpass.core.errors import ConfigError, PlanError
from lfpass.core.rules import MERGE_RULES, get_rule

ONES = np.ones(2)


def _merge(rule: str, *members, importance=None, seed: int = 0, **kwargs) -> np.ndarray:
    importance = ONES[: len(members)] if importance is None else np.asarray(importance, dtype=np.float64)
    return get_rule(rule)(list(members), importance, np.random.default_rng(seed), **kwargs)


A = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
B = np.array([[3.0, 6.0], [5.0, 0.0]], dtype=np.float32)


def test_registry_and_unknown_rule():
    assert sorted(MERGE_RULES) == ["keep", "mean", "mix", "regmean", "weighted"]
    with pytest.raises(ConfigError, match="unknown merge rule 'avg'"):
        get_rule("avg")


def test_mean():
    out = _merge("mean", A, B)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [[2.0, 4.0], [4.0, 2.0]])


def test_weighted_by_importance():
    out = _merge("weighted", A, B, importance=[1.0, 3.0])  # (1 * A + 3 * B) / 4
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [[2.5, 5.0], [4.5, 1.0]])


@pytest.mark.parametrize("importance", [[0.0, 0.0], [np.inf, 1.0]])
def test_weighted_without_usable_importance_is_the_mean(importance):
    np.testing.assert_array_equal(_merge("weighted", A, B, importance=importance), [[2.0, 4.0], [4.0, 2.0]])


def test_keep_returns_the_first_member():
    out = _merge("keep", B, A)
    assert bit_equal(out, B) and out is not B


def test_mix_takes_each_entry_from_one_member_seeded():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(8, 8)).astype(np.float32)
    b = rng.normal(size=(8, 8)).astype(np.float32)
    assert (a != b).all()  # so each entry of the result tells which member it came from
    out = _merge("mix", a, b, seed=7)
    from_a, from_b = out == a, out == b
    assert (from_a ^ from_b).all()  # every entry is one member's, never a blend
    assert 10 < from_a.sum() < 54  # both members contribute (64 fair coin flips)
    assert bit_equal(_merge("mix", a, b, seed=7), out)  # the seed fixes the mask
    assert not bit_equal(_merge("mix", a, b, seed=8), out)


@pytest.mark.parametrize("rule", sorted(MERGE_RULES))
def test_identical_members_come_back_bit_for_bit(rule):
    """The largest float64s: a float64 mean of copies would overflow to Inf; copies are returned as they are."""
    big = np.array([np.finfo(np.float64).max, -np.finfo(np.float64).max, -0.0, 5e-324])
    out = _merge(rule, big, big.copy(), big.copy(), importance=[1.0, 1.0, 1.0])
    assert bit_equal(out, big) and out is not big


def test_transforms_align_members_before_merging():
    """``b`` is ``a`` with its output units (rows) permuted; the transform that
    undoes the permutation makes the mean of the two ``a`` itself."""
    a = np.arange(12, dtype=np.float32).reshape(4, 3)
    perm = np.array([2, 0, 3, 1])
    b = a[perm]
    undo = np.argsort(perm)
    aligned = _merge("mean", a, b, transforms=[None, lambda t: t[undo]])
    assert bit_equal(aligned, a)
    assert not np.array_equal(_merge("mean", a, b), a)  # unaligned, the mean blends different units


def test_float16_mean_rounds_once_to_nearest_even():
    ulp = 2.0**-10  # float16's spacing at 1
    lo = np.array([1.0, 1.0 + ulp], dtype=np.float16)
    hi = np.array([1.0 + ulp, 1.0 + 2 * ulp], dtype=np.float16)
    out = _merge("mean", lo, hi)  # 1 + ulp/2 and 1 + 3ulp/2 are ties: to the even one
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, np.array([1.0, 1.0 + 2 * ulp], dtype=np.float16))


def test_bfloat16_rounds_once_not_through_float32():
    """The exact result 1 + 2^-8 + 2^-30 lies just above the tie between 1 and
    1 + 2^-7 in bfloat16, so it rounds up; rounding through float32 first would
    drop the 2^-30 and make a tie that rounds down to 1."""
    one = np.array([1.0], dtype=ml_dtypes.bfloat16)
    up = np.array([1.0 + 2.0**-7], dtype=ml_dtypes.bfloat16)
    out = _merge("weighted", one, up, importance=[0.5 - 2.0**-23, 0.5 + 2.0**-23])
    assert out.dtype == ml_dtypes.bfloat16
    assert float(out[0]) == 1.0 + 2.0**-7


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("rule", sorted(MERGE_RULES))
def test_non_finite_member_is_refused_by_name(rule, bad):
    b = B.copy()
    b[1, 0] = bad
    with pytest.raises(PlanError, match=r"cannot merge 'blocks.1': its tensor holds NaN or Inf"):
        _merge(rule, A, b, names=["blocks.0", "blocks.1"])


def test_mixed_dtypes_are_refused():
    with pytest.raises(PlanError, match="cannot merge '#1': it is float64, the group's first member is float32"):
        _merge("mean", A, B.astype(np.float64))


def test_integer_members_are_refused():
    with pytest.raises(PlanError, match="cannot merge '#0': it is int32, not a floating-point tensor"):
        _merge("mean", A.astype(np.int32), B.astype(np.int32))


def test_a_result_past_the_dtype_range_is_refused():
    big = np.array([np.finfo(np.float16).max], dtype=np.float16)
    zero = np.zeros(1, dtype=np.float16)
    with pytest.raises(PlanError, match="turned finite members 'a', 'b' into NaN or Inf in float16"):
        _merge("weighted", big, zero, importance=[3.0, -1.0], names=["a", "b"])  # 1.5 * max overflows
