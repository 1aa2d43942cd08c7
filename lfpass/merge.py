"""Merge rules: how the tensors of a group become the one tensor they share.

A rule is a small class in a registry (as in mergekit). It receives the
members' tensors for one slot (the weights, or the biases), stacked in member
order, each already passed through its optional per-member transform (for
example a permutation that aligns hidden units; identity when absent), plus a
per-member importance and a seeded generator.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, ClassVar, Sequence

import numpy as np

from lfpass.errors import ConfigError

Transform = Callable[[np.ndarray], np.ndarray]


class MergeRule(ABC):
    name: ClassVar[str]

    def __call__(
        self,
        tensors: Sequence[np.ndarray],
        importance: np.ndarray,
        rng: np.random.Generator,
        transforms: Sequence[Transform | None] | None = None,
    ) -> np.ndarray:
        if transforms is not None:
            tensors = [t if f is None else f(t) for t, f in zip(tensors, transforms)]
        dtype = np.float64 if any(np.asarray(t).dtype == np.float64 for t in tensors) else np.float32
        stacked = np.stack([np.asarray(t, dtype=dtype) for t in tensors])
        if all(np.array_equal(stacked[0], t) for t in stacked[1:]):
            return stacked[0].copy()  # identical members: exact, so fusing copies is lossless
        return self.merge(stacked, np.asarray(importance, dtype=np.float64), rng).astype(dtype)

    @abstractmethod
    def merge(self, stacked: np.ndarray, importance: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``stacked`` is ``[members, *shape]``; returns ``shape``."""


class Mean(MergeRule):
    """The paper's default: the plain average of the members."""

    name = "mean"

    def merge(self, stacked, importance, rng):
        return stacked.mean(axis=0)


class Weighted(MergeRule):
    """Average weighted by each member's importance (its weight norm by default)."""

    name = "weighted"

    def merge(self, stacked, importance, rng):
        total = importance.sum()
        if not np.isfinite(total) or total <= 0:
            return stacked.mean(axis=0)
        w = (importance / total).astype(np.float32)
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
