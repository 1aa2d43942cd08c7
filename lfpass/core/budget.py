"""Quality-budgeted planning: choose groups by what they do to the outputs.

Weight similarity is a poor guide on pretrained models: same-role layers are
nearly orthogonal, and one merge of 1% of the parameters may wreck a model
while another costs nothing. So this planner measures. Given ``evaluate``
(the output error, on held-out calibration inputs, of the model fused by a
plan, built with the configured merge, alignment and corrections):

1. every compatible pair is fused alone and its damage measured;
2. pairs are taken in order of parameters saved per damage (ties: weight
   similarity); each is joined to the groups kept so far (two groups holding
   its members become one) and the whole plan measured again;
3. a step that takes the error past ``max_error`` is rolled back and the
   next pair tried (a pair whose damage alone is past it is not tried);
   planning stops at ``target_ratio`` when one is set.

With a budget and no target, the plan is the largest ratio found that keeps
the budget; with a target and no budget, it is the target reached in
damage order, and the plan says what it costs. The core knows no IR: the
frontends supply ``evaluate``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Callable, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from lfpass.core.config import FusionConfig
from lfpass.core.lowrank import residual_params
from lfpass.core.plan import FusionGroup, FusionPlan
from lfpass.core.planner import LoadTensor, plan_fusion
from lfpass.core.quality import describe
from lfpass.core.sites import Site

log = logging.getLogger(__name__)

Evaluate = Callable[[FusionPlan], float]
NEVER = 1e300  # a threshold no pair reaches: the weight planner scores and classifies, and merges nothing


def correction_params(site: Site, rank: int) -> int:
    """Parameters a rank-``rank`` correction adds to a member: ``rank * (out + in)`` per layer
    (a convolution's ``in`` per patch) plus its own bias given back (see :func:`lfpass.core.lowrank.residual_params`)."""
    return residual_params(site, rank, bias=True)


def with_groups(base: FusionPlan, groups: Sequence[FusionGroup], **fields) -> FusionPlan:
    """``base`` (a plan with no groups) holding ``groups``, its figures recounted."""
    saved = sum(g.saved for g in groups)
    return replace(base, groups=tuple(groups), params_after=base.params_before - saved,
                   layer_params_after=base.layer_params_before - saved, **fields)


def with_options(plan: FusionPlan, sites: Mapping[str, Site], config: FusionConfig) -> FusionPlan:
    """A weight-similarity plan carrying ``config``'s alignment and corrections, its figures recounted
    (each member's correction is counted against the group's saving)."""
    groups = [replace(g, extra=sum(correction_params(sites[m], config.residual_rank) for m in g.members))
              for g in plan.groups]
    costly = [g for g in groups if g.saved <= 0]
    planned = with_groups(replace(plan, groups=()), [g for g in groups if g.saved > 0], align=config.alignment,
                          residual_rank=config.residual_rank)
    if costly:
        note = (f"{len(costly)} group(s) kept apart: their members' rank-{config.residual_rank} corrections cost as "
                f"much as sharing saves (a smaller residual_rank keeps them)")
        planned = replace(planned, message="; ".join(m for m in (planned.message, note) if m))
    return planned


class _Groups:
    """The groups kept so far, as members -> group, with one anchor each."""

    def __init__(self) -> None:
        self.groups: list[list[str]] = []

    def find(self, name: str) -> int | None:
        return next((i for i, g in enumerate(self.groups) if name in g), None)

    def joined(self, a: str, b: str) -> tuple[list[list[str]], list[str]] | None:
        """The groups with ``a`` and ``b`` joined (and the joined group), or None when they already are."""
        ia, ib = self.find(a), self.find(b)
        if ia is not None and ia == ib:
            return None
        ga = self.groups[ia] if ia is not None else [a]
        gb = self.groups[ib] if ib is not None else [b]
        first, second = (ga, gb) if len(ga) >= len(gb) else (gb, ga)  # the larger group's anchor stays
        joined = first + second
        rest = [g for i, g in enumerate(self.groups) if i not in (ia, ib)]
        return [*rest, joined], joined


class _Builder:
    """FusionGroups for member lists, with their class, size, corrections, similarity and merge rule."""

    def __init__(self, base: FusionPlan, sites: Mapping[str, Site], config: FusionConfig,
                 rules: Sequence[str]) -> None:
        self.sites, self.config, self.rules = sites, config, tuple(rules)
        self.key = {name: key for key, names in base.classes for name in names}
        self.score = {(c.a, c.b): c.score for c in base.candidates}
        self.score.update({(c.b, c.a): c.score for c in base.candidates})
        self.damage: dict[tuple[str, ...], float] = {}
        self.rule: dict[tuple[str, ...], str] = {}  # the rule each group kept so far merges by

    def group(self, members: Sequence[str], rule: str | None = None) -> FusionGroup:
        site = self.sites[members[0]]
        pairs = [self.score.get((a, b), math.nan) for i, a in enumerate(members) for b in members[i + 1:]]
        extra = sum(correction_params(self.sites[m], self.config.residual_rank) for m in members)
        rule = rule or self.rule.get(tuple(members), self.rules[0])
        return FusionGroup(tuple(members), rule, float(np.nanmean(pairs)) if pairs else math.nan,
                           self.key[members[0]], site.numel, extra, self.damage.get(tuple(members)))

    def least(self, groups: list[list[str]], joined: list[str], order: Sequence[str],
              measure: Callable[[FusionPlan], float], base: FusionPlan,
              good_enough: Callable[[float], bool]) -> tuple[str, float]:
        """The rule (tried in ``order``, stopping at the first ``good_enough``) that gives the least
        error when ``joined`` merges by it among ``groups``, and that error."""
        best: tuple[str, float] | None = None
        for rule in order:
            self.rule[tuple(joined)] = rule
            error = measure(with_groups(base, _plan_groups(self, groups)))
            if best is None or error < best[1]:
                best = (rule, error)
            if good_enough(error):
                break
        assert best is not None
        self.rule[tuple(joined)] = best[0]
        return best


def plan_within_budget(sites: Sequence[Site], load: LoadTensor, config: FusionConfig, params_total: int,
                       evaluate: Evaluate, progress: bool = False, rules: Sequence[str] | None = None,
                       **scoring) -> FusionPlan:
    """Plan by measured damage (see the module docstring); ``evaluate(plan)`` is the error
    of the model that plan makes. ``scoring`` goes to the weight planner (e.g. ``stats``).

    ``rules``: the merge rules a group may use (default ``config``'s one). With several, each
    pair is measured under each and keeps the one that damages least; a joined group tries its
    rules in that order until one keeps the budget, and keeps the best it measured."""
    base = plan_fusion(sites, load, config.replace(target_ratio=None, threshold=NEVER, max_overshoot=None),
                       params_total, progress=progress, **scoring)
    base = replace(base, target_ratio=config.target_ratio, threshold=None, max_overshoot=None,
                   align=config.alignment, residual_rank=config.residual_rank, error_metric=config.error_metric,
                   max_error=config.max_error, message="")
    by_name = {s.name: s for s in sites}
    build = _Builder(base, by_name, config, rules or (config.merge_rule,))
    pairs = [(c.a, c.b) for c in base.candidates]
    if not pairs:
        return replace(base, error=0.0, message=_note(base, config, 0, 0, 0.0))
    singles, costly = [], []
    for a, b in tqdm(pairs, desc="damage", unit="pair", disable=not progress, leave=False):
        group = build.group([a, b])
        if group.saved <= 0:
            costly.append((a, b, "kept apart: the members' corrections cost as much as sharing saves"))
            continue
        damage = build.least([[a, b]], [a, b], build.rules, evaluate, base, lambda e: False)[1]
        build.damage[(a, b)] = damage
        singles.append((a, b, group.saved, damage))
    order = sorted(singles, key=lambda p: (-p[2] / max(p[3], 1e-12), -build.score[(p[0], p[1])], p[0], p[1]))
    return _accumulate(base, build, order, evaluate, config, progress, costly)


def _accumulate(base: FusionPlan, build: _Builder, order, evaluate: Evaluate, config: FusionConfig,
                progress: bool, decisions: list[tuple[str, str, str]]) -> FusionPlan:
    kept, curve, error, rolled = _Groups(), [], 0.0, 0
    target, budget = config.target_ratio, config.max_error
    bar = tqdm(order, desc="budget", unit="pair", disable=not progress, leave=False)
    for a, b, _, damage in bar:
        alone = f"damage alone {damage:.4g}"
        if target is not None and with_groups(base, _plan_groups(build, kept.groups)).ratio >= target:
            decisions.append((a, b, f"kept apart: target {target:g} reached before this pair ({alone})"))
            continue
        if budget is not None and damage > budget:  # alone it already breaks the budget: not measured again
            decisions.append((a, b, f"kept apart: its damage alone ({damage:.4g}) is over the budget {budget:g}"))
            continue
        step = kept.joined(a, b)
        if step is None:
            decisions.append((a, b, f"fused: already in one group ({alone})"))
            continue
        groups, joined = step
        if config.max_group_size is not None and len(joined) > config.max_group_size:
            decisions.append((a, b, f"kept apart: the joined group would exceed max_group_size "
                                    f"{config.max_group_size} ({alone})"))
            continue
        first = build.rule.get((a, b), build.rules[0])
        tries = [first, *(r for r in build.rules if r != first)]
        rule, measured = build.least(groups, joined, tries, evaluate, base, lambda e: budget is None or e <= budget)
        by = f" merged by {rule}" if len(build.rules) > 1 else ""
        plan = with_groups(base, _plan_groups(build, groups))
        if budget is not None and measured > budget:
            rolled += 1
            decisions.append((a, b, f"rolled back: error {measured:.4g} with it is over the budget {budget:g} "
                                    f"({alone})"))
            continue
        kept.groups, error = groups, measured
        curve.append((plan.ratio, measured))
        decisions.append((a, b, f"fused{by}: error {measured:.4g} after it ({alone})"))
    plan = with_groups(base, _plan_groups(build, kept.groups), error=error, curve=tuple(curve),
                       decisions=tuple(decisions))
    return replace(plan, message=_note(plan, config, len(order), rolled, error))


def _plan_groups(build: _Builder, groups: list[list[str]]) -> list[FusionGroup]:
    return [build.group(g) for g in groups]


def _note(plan: FusionPlan, config: FusionConfig, measured: int, rolled: int, error: float) -> str:
    what = describe(config.error_metric, error)
    head = f"measured {measured} pairs on held-out inputs"
    if config.max_error is not None:
        budget = describe(config.error_metric, config.max_error)
        if config.target_ratio is not None and plan.ratio >= config.target_ratio:
            return (f"{head}; the target {config.target_ratio:g} is reached at ratio {plan.ratio:.3f} ({plan.scope}) "
                    f"and costs {what} (error {error:.4g}), within the budget {config.max_error:g}")
        line = (f"{head}; the largest ratio found within the budget (error <= {config.max_error:g}, "
                f"{budget}) is {plan.ratio:.3f} ({plan.scope}), at {what}")
        if rolled:
            line += f"; {rolled} pair(s) rolled back for breaking the budget"
        if config.target_ratio is not None:
            line += f"; the target {config.target_ratio:g} is out of reach within the budget"
        return line
    if config.target_ratio is not None and plan.ratio < config.target_ratio:
        return f"{head}; every pair fused reaches only {plan.ratio:.3f}, short of the target {config.target_ratio:g}"
    return f"{head}; ratio {plan.ratio:.3f} ({plan.scope}) costs {what} (error {error:.4g})"
