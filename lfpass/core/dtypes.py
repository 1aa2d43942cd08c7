"""The dtypes lfpass merges, and exact arithmetic on them.

Members are merged in float64 and the result is rounded once back to the
members' own dtype (float16, bfloat16, float32 or float64), so merging copies
returns their bits unchanged and a mean of float16 members is the float64 mean,
correctly rounded. Only floating-point tensors are merged, and never one
holding NaN or Inf.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from lfpass.core.errors import PlanError

MERGEABLE = ("float16", "bfloat16", "float32", "float64")  # the dtypes lfpass merges (numpy/ml_dtypes names)


def is_mergeable(dtype: np.dtype | str) -> bool:
    """Whether tensors of ``dtype`` may be merged: float16, bfloat16, float32, float64.

    Integers and bools hold indices, masks or quantized codes, where an average
    means nothing; float8/float4 are quantized formats lfpass does not merge."""
    return (dtype if isinstance(dtype, str) else np.dtype(dtype).name).lower() in MERGEABLE


def bits(array: np.ndarray) -> np.ndarray:
    """``array``'s raw bits as unsigned integers, so ``-0.0`` differs from ``0.0`` and NaN equals its own copy."""
    array = np.ascontiguousarray(array)
    if array.dtype == np.bool_:
        return array.view(np.uint8)
    return array.view(np.dtype(f"u{array.dtype.itemsize}"))


def bit_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Same dtype, shape and bits."""
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(bits(a), bits(b))


def norms(tensors: Sequence[np.ndarray]) -> np.ndarray:
    """Each tensor's Frobenius norm, in float64 (a float16 norm overflows; a bfloat16 one loses digits)."""
    return np.array([np.linalg.norm(np.asarray(t).astype(np.float64, copy=False).reshape(-1)) for t in tensors])


def round_to(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """float64 ``values`` rounded once, to nearest even, into ``dtype``.

    numpy rounds float64 straight to float16 and float32; ml_dtypes goes to
    bfloat16 through float32, which rounds twice. Rounding to float32 by
    round-to-odd first keeps the second rounding exact (24 bits > 8 + 2)."""
    dtype = np.dtype(dtype)
    with np.errstate(over="ignore"):  # past the dtype's range is Inf, as rounding says; the caller checks
        if dtype in (np.float64, np.float32, np.float16):
            return values.astype(dtype)
        near = values.astype(np.float32)
    raw = near.view(np.uint32)
    back = near.astype(np.float64)
    inexact = back != values
    raw[inexact & (np.abs(back) > np.abs(values))] -= 1  # toward zero: truncation ...
    raw[inexact] |= 1  # ... then odd when inexact
    return near.astype(dtype)


def rounded(rule: str, merged: np.ndarray, dtype: np.dtype, labels: Sequence[str]) -> np.ndarray:
    """The float64 ``merged`` rounded once into ``dtype``; a :class:`PlanError` if that is not finite."""
    out = round_to(np.asarray(merged, dtype=np.float64), dtype)
    if not np.isfinite(out).all():
        raise PlanError(
            f"merge rule {rule!r} turned finite members {', '.join(map(repr, labels))} "
            f"into NaN or Inf in {dtype.name}; use the 'keep' rule for this group"
        )
    return out


def widened(t: np.ndarray) -> np.ndarray:
    """float16 and bfloat16 as float32 (exact); float32 and float64 as they are (no copy):
    rules accumulate in float64 without a float64 copy of every member."""
    return t.astype(np.float32) if t.dtype.itemsize < 4 else t


def check_members(arrays: Sequence[np.ndarray], labels: Sequence[str]) -> np.dtype:
    """The members' one dtype; a :class:`PlanError` naming the first member that may not be merged."""
    dtype = arrays[0].dtype
    for label, t in zip(labels, arrays):
        if t.dtype != dtype:
            raise PlanError(f"cannot merge {label!r}: it is {t.dtype.name}, the group's first member is {dtype.name}")
        if not is_mergeable(t.dtype):
            raise PlanError(f"cannot merge {label!r}: it is {t.dtype.name}, not a floating-point tensor")
        if not np.isfinite(t).all():
            raise PlanError(f"cannot merge {label!r}: its tensor holds NaN or Inf; leave that layer out of the plan")
    return dtype
