"""One stage of iterative fusion: plan on the current weights, then fuse with the ties kept.

On a partly fused model a tensor shared by several layers is one site, so
planning on the current model sees each fused group as a single member. Two
things then need care, and both are done here:

- the target: stage targets are ratios against the *original* model, so the
  planner is asked for ``target * current / original`` over its scope (it
  measures against the model it is given);
- the weighting: a fused tensor stands for the ``n`` layers it replaced, so
  merging it with a plain layer must weigh it ``n:1``, as merging the ``n``
  layers themselves would. :func:`fuse_stage` passes each member's count to
  :func:`lfpass.apply` (the core's merge enters a member that many times: a
  count-weighted mean for ``mean``, norm x count for ``weighted``,
  count-proportional picks for ``mix``; ``keep`` is unchanged). The counts
  follow from the plans alone (:func:`layer_counts`), so replaying the plans
  rebuilds them.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Mapping, Sequence

from torch import nn

from lfpass.core.config import FusionConfig
from lfpass.core.errors import ConfigError, PlanError
from lfpass.core.plan import FusionPlan, check_plan
from lfpass.core.planner import select_sites
from lfpass.fx.api import analyze, apply
from lfpass.fx.sites import find_sites, unique_parameters

_EPS = 1e-9  # a stage target this close to the current ratio is already reached


def scope_params(model: nn.Module, config: FusionConfig) -> int:
    """Unique parameters over the config's scope: the whole model, or the layers it may fuse
    (a tensor several layers share counts once, as the planner counts it)."""
    if config.ratio_scope == "model":
        return unique_parameters(model)
    return sum(s.numel for s in select_sites(find_sites(model).plannable, config))


def layer_counts(plans: Sequence[FusionPlan]) -> dict[str, int]:
    """How many original layers each fused site stands for, after ``plans`` in order.

    A fused tensor is named, on the next stage's model, by its group's anchor
    (``members[0]``, the first holder in model order), so the anchor inherits
    its members' counts. Sites not named here stand for one layer."""
    counts: dict[str, int] = {}
    for plan in plans:
        for group in plan.groups:
            total = sum(counts.pop(m, 1) for m in group.members)
            counts[group.members[0]] = total
    return counts


def stage_config(config: FusionConfig, target: float, current: int, original: int) -> FusionConfig | None:
    """The planner's config for a stage reaching ``target`` against the original model,
    given ``current`` and ``original`` unique parameters over the scope; None when the
    current model is already there."""
    if config.target_ratio is None:
        raise ConfigError("target_ratio: iterative retraining needs a target ratio to spread over its stages")
    planner_target = target * current / original
    if planner_target <= 1.0 + _EPS:
        return None
    overshoot = None if config.max_overshoot is None else config.max_overshoot * current / original
    return config.replace(target_ratio=planner_target, max_overshoot=overshoot)


def plan_stage(model: nn.Module, config: FusionConfig, target: float, original: int) -> FusionPlan:
    """The plan taking ``model`` to ``target`` (against ``original`` scope parameters).

    Planning already reached is the empty plan of this model (no groups), so a
    stage always has a plan whose ``params_after`` is the model it leaves."""
    current = scope_params(model, config)
    stage = stage_config(config, target, current, original)
    if stage is None:
        plan = analyze(model, config.replace(target_ratio=1.0 + 1e-6, max_overshoot=None)).take(0)
        return replace(plan, target_ratio=None, message="the model already reaches this stage's target; nothing fused")
    return analyze(model, stage)


def fuse_stage(model: nn.Module, plan: FusionPlan, counts: Mapping[str, int]) -> list[nn.Parameter]:
    """Apply ``plan`` to ``model`` in place, each member weighted by the layers it stands for.

    Returns the tensors the stage made shared (one per slot of each group)."""
    found = find_sites(model)
    sites = found.by_name()
    check_plan(plan, sites)
    lost = sorted(set(counts) - set(sites))
    if lost:  # a fused tensor no longer named by its anchor: its weight would silently fall to 1
        raise PlanError(f"fused layer {lost[0]!r} is no site of this model; apply the stage plans in order")
    anchors = [x.tensor for g in plan.groups for x in sites[g.members[0]].slots]  # attribute paths apply keeps
    apply(model, plan, inplace=True, counts=counts)
    return [model.get_parameter(path) for path in anchors]


def rebuild(original: nn.Module, plans: Sequence[FusionPlan]) -> nn.Module:
    """A copy of ``original`` with ``plans`` applied in order: the ties of a run, for loading
    its state dict into (the merged values themselves are overwritten by it)."""
    model = copy.deepcopy(original)
    for i, plan in enumerate(plans):
        fuse_stage(model, plan, layer_counts(plans[:i]))
    return model
