"""Merge rules: how the tensors of a group become the one tensor they share.

A rule is a small class in a registry (as in mergekit). It receives the
members' tensors for one slot (the weights, or the biases), stacked in member
order, each already passed through its optional per-member transform (for
example a permutation that aligns hidden units; identity when absent), plus a
per-member importance and a seeded generator.

Exact stays exact, in every dtype: members are merged in float64 and the
result is rounded once back to the members' own dtype (float16, bfloat16,
float32 or float64), so merging copies returns their bits unchanged and a
mean of float16 members is the float64 mean, correctly rounded. Only
floating-point tensors are merged, and never one holding NaN or Inf.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar, Iterator, Mapping, Sequence

import numpy as np

from lfpass.errors import ConfigError, PlanError

if TYPE_CHECKING:
    from lfpass.plan import FusionPlan
    from lfpass.sites import Site, Slot

Transform = Callable[[np.ndarray], np.ndarray]
LoadExact = Callable[[str], np.ndarray]  # a tensor's values by name, in its own dtype

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


class MergeRule(ABC):
    name: ClassVar[str]
    uses_importance: ClassVar[bool] = False  # whether ``importance`` matters (else it is not computed)

    def __call__(
        self,
        tensors: Sequence[np.ndarray],
        importance: np.ndarray,
        rng: np.random.Generator,
        transforms: Sequence[Transform | None] | None = None,
        names: Sequence[str] | None = None,
    ) -> np.ndarray:
        """The merged tensor, in the members' own dtype; ``names`` label members in errors.

        Bit-identical members come back bit for bit. Raises :class:`PlanError`
        for a member that is not a float16/bfloat16/float32/float64 tensor or
        that holds NaN or Inf (a plan read from JSON may ask for either)."""
        if transforms is not None:
            tensors = [t if f is None else f(t) for t, f in zip(tensors, transforms)]
        arrays = [np.asarray(t) for t in tensors]
        labels = list(names) if names is not None else [f"#{i}" for i in range(len(arrays))]
        dtype = _check_members(arrays, labels)
        if all(bit_equal(arrays[0], t) for t in arrays[1:]):
            return arrays[0].copy()  # identical members: exact, so fusing copies is lossless
        stacked = np.stack([_widened(t) for t in arrays])
        merged = self.merge(stacked, np.asarray(importance, dtype=np.float64), rng)
        del stacked
        out = round_to(np.asarray(merged, dtype=np.float64), dtype)
        if not np.isfinite(out).all():
            raise PlanError(
                f"merge rule {self.name!r} turned finite members {', '.join(map(repr, labels))} "
                f"into NaN or Inf in {dtype.name}; use the 'keep' rule for this group"
            )
        return out

    @abstractmethod
    def merge(self, stacked: np.ndarray, importance: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``stacked`` is ``[members, *shape]`` in float32 or float64 (16-bit members widened
        exactly); returns ``shape``, computed in float64 where it is arithmetic."""


def _widened(t: np.ndarray) -> np.ndarray:
    """float16 and bfloat16 as float32 (exact); float32 and float64 as they are (no copy):
    rules accumulate in float64 without a float64 copy of every member."""
    return t.astype(np.float32) if t.dtype.itemsize < 4 else t


def _check_members(arrays: Sequence[np.ndarray], labels: Sequence[str]) -> np.dtype:
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


class Mean(MergeRule):
    """The paper's default: the plain average of the members."""

    name = "mean"

    def merge(self, stacked, importance, rng):
        return stacked.mean(axis=0, dtype=np.float64)


class Weighted(MergeRule):
    """Average weighted by each member's importance (its weight norm by default)."""

    name = "weighted"
    uses_importance = True

    def merge(self, stacked, importance, rng):
        total = importance.sum()
        if not np.isfinite(total) or total <= 0:
            return stacked.mean(axis=0, dtype=np.float64)
        w = importance / total
        return np.tensordot(w, stacked, axes=1)


class Keep(MergeRule):
    """Keep the first member's tensor: the others are frozen onto it (the paper's freezing)."""

    name = "keep"

    def merge(self, stacked, importance, rng):
        return stacked[0].copy()


class Mix(MergeRule):
    """The paper's random mask: each entry comes from one member, chosen uniformly (seeded)."""

    name = "mix"

    def merge(self, stacked, importance, rng):
        pick = rng.integers(0, stacked.shape[0], size=stacked.shape[1:])
        return np.take_along_axis(stacked, pick[None], axis=0)[0]


MERGE_RULES: dict[str, type[MergeRule]] = {r.name: r for r in (Mean, Weighted, Keep, Mix)}


def get_rule(name: str) -> MergeRule:
    try:
        return MERGE_RULES[name]()
    except KeyError:
        raise ConfigError(f"unknown merge rule {name!r} (known: {', '.join(MERGE_RULES)})") from None


@dataclass(frozen=True)
class MergedSlot:
    """One slot of one planned group, merged: each member's slot (anchor first) and the
    tensor they will all share, in the members' own dtype."""

    group: int
    slot: str
    members: tuple[Slot, ...]
    array: np.ndarray


def merged_slots(plan: FusionPlan, sites: Mapping[str, Site], load: LoadExact,
                 counts: Mapping[str, int] | None = None) -> Iterator[MergedSlot]:
    """The merge of ``plan``, slot by slot: the one place groups are merged, for every frontend.

    ``load(tensor_name)`` gives a tensor in its own dtype. Per group: the rule
    it names, seeded with ``(plan.seed, group index)``, and each member's
    importance (the norm of its compared slots); slots in the anchor's order.
    ``counts`` says how many original layers a member already stands for (a
    tensor fused in an earlier stage): it enters the rule that many times, so
    a mean is weighted n:1. One slot's tensors are in memory at a time, so a
    frontend can write each result into its graph before the next is made."""
    for index, group in enumerate(plan.groups):
        members = [sites[m] for m in group.members]
        rule = get_rule(group.rule)
        rng = np.random.default_rng([plan.seed, index])
        importance = (np.sqrt(sum(norms([load(s.slot(x.name).tensor) for s in members]) ** 2
                                  for x in members[0].compared))
                      if rule.uses_importance else np.ones(len(members)))
        repeat = np.repeat(np.arange(len(members)), [(counts or {}).get(m, 1) for m in group.members])
        for x in members[0].slots:
            slots = tuple(s.slot(x.name) for s in members)
            labels = [s.name if x.name == "weight" else f"{s.name} ({x.name})" for s in members]
            arrays = [load(y.tensor) for y in slots]
            merged = rule([arrays[i] for i in repeat], importance[repeat], rng, names=[labels[i] for i in repeat])
            yield MergedSlot(index, x.name, slots, merged)
