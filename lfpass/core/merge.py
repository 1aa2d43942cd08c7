"""The plan-driven merge: every group of a plan, slot by slot, for every frontend.

Each group is merged by the rule it names (:mod:`lfpass.core.rules`); a
data-aware rule merges whole layers at once with their calibration
statistics. The frontends only write the results into their graphs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, Sequence

import numpy as np

from lfpass.core.dtypes import bit_equal, check_members, norms, rounded
from lfpass.core.errors import PlanError
from lfpass.core.layers import Layer, augmented, from_matrix, input_moment, layers_of, layout_of, to_matrix
from lfpass.core.rules import Mean, MergeRule, get_rule

if TYPE_CHECKING:
    from lfpass.core.calibration import Calibration
    from lfpass.core.plan import FusionPlan
    from lfpass.core.sites import Site, Slot

log = logging.getLogger(__name__)

LoadExact = Callable[[str], np.ndarray]  # a tensor's values by name, in its own dtype


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
    dtype = check_members(weights, labels[first.weight.name])
    if biases is not None:
        check_members(biases, labels[first.bias.name])  # type: ignore[union-attr]
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
    out = {first.weight.name: rounded(rule.name, from_matrix(solved[:, :d], layout, weights[0].shape), dtype,
                                       labels[first.weight.name])}
    if biases is not None:
        bias = solved[:, d].reshape(biases[0].shape)
        out[first.bias.name] = rounded(rule.name, bias, biases[0].dtype, labels[first.bias.name])  # type: ignore
    return out


def _mean_layer(slots, weights, biases, labels) -> dict[str, np.ndarray]:
    mean, rng, ones = Mean(), np.random.default_rng(0), np.ones(len(weights))
    out = {slots[0].name: mean(weights, ones, rng, names=labels[slots[0].name])}
    if biases is not None:
        out[slots[1].name] = mean(biases, ones, rng, names=labels[slots[1].name])
    return out
