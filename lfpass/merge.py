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

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar, Iterator, Mapping, Sequence

import numpy as np

from lfpass.errors import ConfigError, PlanError
from lfpass.layers import Layer, augmented, from_matrix, input_moment, layers_of, layout_of, to_matrix

if TYPE_CHECKING:
    from lfpass.calibration import Calibration
    from lfpass.plan import FusionPlan
    from lfpass.sites import Site, Slot

log = logging.getLogger(__name__)

Transform = Callable[[np.ndarray], np.ndarray]
LoadExact = Callable[[str], np.ndarray]  # a tensor's values by name, in its own dtype

_TINY = 1e-300  # a member whose outputs are all zero weighs as if its energy were this
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
    uses_stats: ClassVar[bool] = False  # whether it merges whole layers with their calibration statistics

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
        return _rounded(self.name, merged, dtype, labels)

    @abstractmethod
    def merge(self, stacked: np.ndarray, importance: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``stacked`` is ``[members, *shape]`` in float32 or float64 (16-bit members widened
        exactly); returns ``shape``, computed in float64 where it is arithmetic."""


def _rounded(rule: str, merged: np.ndarray, dtype: np.dtype, labels: Sequence[str]) -> np.ndarray:
    """The float64 ``merged`` rounded once into ``dtype``; a :class:`PlanError` if that is not finite."""
    out = round_to(np.asarray(merged, dtype=np.float64), dtype)
    if not np.isfinite(out).all():
        raise PlanError(
            f"merge rule {rule!r} turned finite members {', '.join(map(repr, labels))} "
            f"into NaN or Inf in {dtype.name}; use the 'keep' rule for this group"
        )
    return out


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


class RegMean(MergeRule):
    """Data-aware merging (after RegMean, Jin et al. 2023): the one ``[W b]`` whose outputs
    are closest, over every member's own calibration inputs, to each member's outputs,
    each member's error taken relative to its own output energy:

        W* = (sum_i W_i G_i / e_i) (sum_i G_i / e_i + ridge * mean(diag) I)^-1,
        e_i = tr(W_i G_i W_i^T)

    with ``W_i`` as ``[out, in]`` (bias appended as a last column) and ``G_i`` the
    member's input second moment per sample, augmented with the constant 1 (so
    members calibrated on more samples do not weigh more). Weighting by ``1/e_i``
    matters wherever a normalisation follows the layer (BatchNorm, LayerNorm), which
    is nearly always: unweighted, the member fed the larger inputs (later in a
    residual stream) takes the merge, and the other's relative error is what its
    normalisation then amplifies. Measured with no retraining: on the demo CNN (MNIST)
    at 2.28x, accuracy 96.3% against 92.6% for the plain mean (in another training run
    the unweighted form gave 64% where the mean gave 86%); on MiniLM with three shared
    FFN pairs, embedding cosine 0.64 against 0.39 for the mean (unweighted: 0.66). The
    ridge keeps the solve well posed where inputs span few directions (0.03: between
    the CNN's best, 0.01, and MiniLM's, 0.1). Whole layers are merged at once (:func:`merged_slots`); a slot
    given alone, or a layer without statistics or a ``[out, in]`` matrix, gets the mean.
    """

    name = "regmean"
    uses_stats = True
    ridge: ClassVar[float] = 0.03

    def merge(self, stacked, importance, rng):
        return stacked.mean(axis=0, dtype=np.float64)

    def solve(self, matrices: Sequence[np.ndarray], moments: Sequence[np.ndarray]) -> np.ndarray:
        """The merged ``[out, d]`` (float64) of members ``matrices`` (``[out, d]``) with input
        moments ``moments`` (``[d, d]``). Raises ``numpy.linalg.LinAlgError`` when singular."""
        weighted = [g / max(float(np.einsum("ij,jk,ik->", m, g, m)), _TINY) for m, g in zip(matrices, moments)]
        total = np.sum(weighted, axis=0)
        lhs = total + self.ridge * float(np.trace(total)) / total.shape[0] * np.eye(total.shape[0])
        rhs = np.sum([m @ g for m, g in zip(matrices, weighted)], axis=0)
        return np.linalg.solve(lhs, rhs.T).T  # lhs is symmetric: X lhs = rhs


MERGE_RULES: dict[str, type[MergeRule]] = {r.name: r for r in (Mean, Weighted, Keep, Mix, RegMean)}


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
                 counts: Mapping[str, int] | None = None,
                 stats: Calibration | None = None) -> Iterator[MergedSlot]:
    """The merge of ``plan``, slot by slot: the one place groups are merged, for every frontend.

    ``load(tensor_name)`` gives a tensor in its own dtype. Per group: the rule
    it names, seeded with ``(plan.seed, group index)``, and each member's
    importance (the norm of its compared slots); slots in the anchor's order.
    ``counts`` says how many original layers a member already stands for (a
    tensor fused in an earlier stage): it enters the rule that many times, so
    a mean is weighted n:1. One slot's tensors are in memory at a time (one
    layer's for a rule that uses ``stats``, the calibration of the model), so
    a frontend can write each result into its graph before the next is made."""
    for index, group in enumerate(plan.groups):
        members = [sites[m] for m in group.members]
        rule = get_rule(group.rule)
        if rule.uses_stats and stats is None:
            raise PlanError(f"merge rule {rule.name!r} needs calibration inputs: calibrate the model "
                            "(calibrate_fx / calibrate_onnx) and pass its statistics, or use merge='mean'")
        rng = np.random.default_rng([plan.seed, index])
        importance = (np.sqrt(sum(norms([load(s.slot(x.name).tensor) for s in members]) ** 2
                                  for x in members[0].compared))
                      if rule.uses_importance else np.ones(len(members)))
        repeat = np.repeat(np.arange(len(members)), [(counts or {}).get(m, 1) for m in group.members])
        if rule.uses_stats:
            assert stats is not None
            yield from _merged_layers(index, members, rule, load, repeat, stats)
            continue
        for x in members[0].slots:
            slots = tuple(s.slot(x.name) for s in members)
            arrays = [load(y.tensor) for y in slots]
            merged = rule([arrays[i] for i in repeat], importance[repeat], rng,
                          names=[_label(s, x.name) for s in (members[i] for i in repeat)])
            yield MergedSlot(index, x.name, slots, merged)


def _label(site: Site, slot: str) -> str:
    return site.name if slot == "weight" else f"{site.name} ({slot})"


def _merged_layers(index: int, members: Sequence[Site], rule: MergeRule, load: LoadExact,
                   repeat: np.ndarray, stats: Calibration) -> Iterator[MergedSlot]:
    """A data-aware rule's merge of one group, layer by layer, yielded in the anchor's slot order."""
    done: dict[str, np.ndarray] = {}
    layers = [layers_of(s) for s in members]
    by_slot = {x.name: k for k, layer in enumerate(layers[0]) for x in (layer.weight, layer.bias) if x is not None}
    for x in members[0].slots:
        if x.name not in done:
            k = by_slot[x.name]
            done.update(_merge_layer(rule, [members[i] for i in repeat], [layers[i][k] for i in repeat], load, stats))
        yield MergedSlot(index, x.name, tuple(s.slot(x.name) for s in members), done.pop(x.name))


def _merge_layer(rule: MergeRule, sites: Sequence[Site], layers: Sequence[Layer], load: LoadExact,
                 stats: Calibration) -> dict[str, np.ndarray]:
    """One layer of every member (repeated as counted) merged by ``rule``: slot name -> tensor.

    Bit-identical members come back bit for bit; a layer the rule cannot weigh by
    its inputs (no statistics, no ``[out, in]`` matrix) is merged by the mean."""
    first = layers[0]
    slots = [first.weight] + ([first.bias] if first.bias is not None else [])
    labels = {x.name: [_label(s, x.name) for s in sites] for x in slots}
    weights = [load(l_.weight.tensor) for l_ in layers]
    biases = [load(l_.bias.tensor) for l_ in layers] if first.bias is not None else None  # type: ignore[union-attr]
    dtype = _check_members(weights, labels[first.weight.name])
    if biases is not None:
        _check_members(biases, labels[first.bias.name])  # type: ignore[union-attr]
    same = all(bit_equal(weights[0], w) for w in weights[1:]) and (
        biases is None or all(bit_equal(biases[0], b) for b in biases[1:]))
    if same:  # identical members: exact, so fusing copies is lossless
        out = {first.weight.name: weights[0].copy()}
        if biases is not None:
            out[first.bias.name] = biases[0].copy()  # type: ignore[union-attr]
        return out
    layout, why = layout_of(first)
    matrices, moments = [], []
    if layout is not None:
        for l_, w, b in zip(layers, weights, biases or [None] * len(layers)):
            matrix = augmented(to_matrix(w, layout), b)
            moment, why = input_moment(stats, l_, matrix.shape[1] - (b is not None))
            if moment is None:
                break
            matrices.append(matrix)
            moments.append(moment)
    if layout is None or len(moments) < len(layers):
        log.info("merge rule %r: layer %s: %s; merged by the mean", rule.name, first.label(sites[0].name), why)
        return _mean_layer(slots, weights, biases, labels)
    try:
        solved = rule.solve(matrices, moments)  # type: ignore[attr-defined]
    except np.linalg.LinAlgError:
        log.info("merge rule %r: layer %s: its inputs are all zero; merged by the mean", rule.name,
                 first.label(sites[0].name))
        return _mean_layer(slots, weights, biases, labels)
    d = solved.shape[1] - (biases is not None)
    out = {first.weight.name: _rounded(rule.name, from_matrix(solved[:, :d], layout, weights[0].shape), dtype,
                                       labels[first.weight.name])}
    if biases is not None:
        bias = solved[:, d].reshape(biases[0].shape)
        out[first.bias.name] = _rounded(rule.name, bias, biases[0].dtype, labels[first.bias.name])  # type: ignore
    return out


def _mean_layer(slots, weights, biases, labels) -> dict[str, np.ndarray]:
    mean, rng, ones = Mean(), np.random.default_rng(0), np.ones(len(weights))
    out = {slots[0].name: mean(weights, ones, rng, names=labels[slots[0].name])}
    if biases is not None:
        out[slots[1].name] = mean(biases, ones, rng, names=labels[slots[1].name])
    return out
