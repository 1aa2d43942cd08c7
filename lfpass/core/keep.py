"""Fusion that keeps the function: one pipeline over any frontend.

Given calibration batches, :func:`fuse_keeping` gathers the layers' input
statistics, plans (by measured output damage under a budget, else by weight
similarity), and builds the fused model with :class:`Fuser`: each member moved
into its anchor's coordinates (``align``), the groups merged (data-aware rules
with the statistics), each member given its own low-rank correction
(``residual_rank``). The error on the held-out batches goes into the plan.

The budgeted planner measures every candidate through :meth:`Fuser.outputs`:
the original model holding the candidate's values where the plan reduces to
them (:mod:`lfpass.core.dense`), else the model :meth:`Fuser.build` makes;
the plan it keeps is built once and verified as built. Everything here is
IR-neutral; the frontend (:mod:`lfpass.core.frontend`) runs and rewrites.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import numpy as np

from lfpass.core.align import AlignReport, Skipped, align_spaces, cross_pairs, links_from_plan
from lfpass.core.bases import BasisFit, plan_factors
from lfpass.core.budget import NEVER, plan_within_budget, with_options
from lfpass.core.calibration import Calibration, CalibrationError
from lfpass.core.collapse import dropping, plan_collapse
from lfpass.core.config import AUTO, MEASURED_ALIGNS, MEASURED_MERGES, FusionConfig
from lfpass.core.dense import plan_values
from lfpass.core.errors import ConfigError
from lfpass.core.frontend import Frontend
from lfpass.core.lowrank import capture_originals, residual_parts
from lfpass.core.menu import plan_menu
from lfpass.core.plan import FusionPlan, check_plan
from lfpass.core.planner import plan_fusion
from lfpass.core.quality import describe, output_error, relative_change, sample_errors, upper_bound

log = logging.getLogger(__name__)

DATA_OPTIONS = "max_error, align='activations', merge='regmean', metric='output' or actions='collapse'"


def require_data(config: FusionConfig, plan: FusionPlan | None, has_data: bool, hint: str) -> None:
    """A :class:`ConfigError` when ``config`` (or ``plan``) needs calibration inputs and none came."""
    if not has_data and (config.needs_calibration or (plan is not None and plan.needs_statistics)):
        raise ConfigError(f"these options ({DATA_OPTIONS}) need calibration inputs: {hint}")


def split(batches: Sequence[Any], holdout: float) -> tuple[list[Any], list[Any]]:
    """``(calibration, held out)``: the last ``ceil(holdout * n)`` batches are held out."""
    batches = list(batches)
    if len(batches) < 2:
        raise CalibrationError(f"measuring the error needs at least 2 calibration batches (one held out); "
                               f"got {len(batches)}")
    k = min(max(1, math.ceil(holdout * len(batches))), len(batches) - 1)
    return batches[:-k], batches[-k:]


def align_model(frontend: Frontend, model: Any, plan: FusionPlan, mode: str = "weights",
                calibration: Calibration | None = None, seed: int = 0) -> AlignReport:
    """Move each planned member of ``model`` (a frontend's copy) into its anchor's coordinates,
    in place: the frontend finds the spaces and holds the tensors; the decisions are here.
    ``calibration``, when given, is moved alike so it still describes the model."""
    skipped: list[Skipped] = []
    spaces, sites = frontend.spaces(model, skipped)
    links = links_from_plan(plan, sites, spaces)
    tensors = frontend.read(model, sorted({m.tensor for s in spaces for m in s.moves}))
    report = align_spaces(spaces, links, tensors, mode, calibration, seed, skipped)
    frontend.write(model, {name: tensors[name] for name in report.changed})
    return report


@dataclass
class Fuser:
    """Builds fused copies of a frontend's model for plans, keeping what calibration learned."""

    frontend: Frontend
    calibration: Calibration | None = None
    fits: dict[tuple[str, ...], BasisFit] = field(default_factory=dict, repr=False)  # SVDs, for every candidate

    def build(self, plan: FusionPlan, inplace: bool = False) -> Any:
        """A fused copy of the model (the model itself when ``inplace``): aligned, merged and
        corrected as ``plan`` says."""
        front = self.frontend
        model = front.model if inplace else front.copy()
        stats = self.calibration.copy() if self.calibration is not None else None
        aligned = plan.align != "none" and bool(plan.groups)
        if aligned:
            align_model(front, model, plan, plan.align, calibration=stats)
        found = front.find_sites(model)
        check_plan(plan, found.by_name())
        ranks = [g.rank if g.rank is not None else plan.residual_rank for g in plan.groups]
        originals = capture_originals(found, plan) if any(ranks) else None
        factors = plan_factors(plan, found, stats, None if aligned else self.fits) if plan.factors else []
        front.apply(model, found, plan, stats)
        if originals is not None:
            parts = residual_parts(plan, originals, stats, found)
            for rank in sorted(set(ranks) - {0}):  # a menu plan gives each tie its own rank
                front.attach_parts(model, [p for p in parts if ranks[p.member.group] == rank], rank)
        if factors:
            front.factor(model, factors)
        if plan.dropped:
            front.collapse(model, plan.dropped)
        return model

    def outputs(self, plan: FusionPlan, batches: Sequence[Any]) -> list[np.ndarray]:
        """The outputs on ``batches`` of the model ``plan`` builds: measured on the original
        model holding the plan's values where the plan reduces to them (no copy, no rewrite;
        :mod:`lfpass.core.dense`), else on the built model."""
        values = None if plan.dropped else plan_values(plan, self.frontend.found, self.calibration, self.fits)
        if values is None:
            return self.frontend.outputs(self.build(plan), batches)
        return self.frontend.outputs_with(values, batches)


@dataclass
class Kept:
    """A fused model, its plan (with the held-out error), and what the error was measured on."""

    model: Any
    plan: FusionPlan
    frontend: Frontend
    held: list[Any]
    reference: list[np.ndarray] | None
    labels: list[np.ndarray] | None
    choose: list[Any] = field(default_factory=list)  # the share the planner chose on (a budget's)
    chosen_on: list[np.ndarray] | None = None  # the original's outputs there
    choose_labels: list[np.ndarray] | None = None
    margin: float = 0.0

    def chosen_error(self, model: Any) -> float:
        """The error of ``model`` on the share the planner chose on, with the budget's margin: what a
        later step that must keep the budget (quantization) decides by, leaving the held-out share
        to verify on."""
        if self.chosen_on is None:
            raise ValueError("no budget: nothing was chosen on")
        errors = sample_errors(self.chosen_on, self.frontend.outputs(model, self.choose),
                               self.plan.error_metric or "cosine", self.choose_labels)
        return upper_bound(errors, self.margin)

    def error_of(self, model: Any) -> float | None:
        """The error of ``model`` (anything the frontend runs: a written file too) on the
        held-out batches (None without any)."""
        if self.reference is None:
            return None
        return output_error(self.reference, self.frontend.outputs(model, self.held),
                            self.plan.error_metric or "cosine", self.labels)


def calibrate(frontend: Frontend, batches: Sequence[Any], config: FusionConfig,
              progress: bool = False) -> Calibration:
    """The frontend's model's input statistics on ``batches`` (paired ones too when ``align``
    is by activations)."""
    return frontend.calibrate(batches, cross_pairs(frontend.found.sites, config), progress)


def fuse_keeping(frontend: Frontend, config: FusionConfig, batches: Sequence[Any], *,
                 labels: Sequence[np.ndarray] | None = None, plan: FusionPlan | None = None,
                 progress: bool = False) -> Kept:
    """Plan (by measured damage when a budget asks for it, else by weight similarity; or take
    ``plan``) and build; the error on held-out batches is in the plan.

    ``batches``: calibration batches as the frontend runs them; ``labels``: one array per
    batch, for the ``accuracy`` metric. A budget splits them three ways: statistics, the
    batches the planner chooses on, and the batches the result is verified on, which the
    planner never saw: the plan's ``error`` (and :meth:`Kept.error_of`) is on those. The
    planner keeps the budget with ``config.margin`` standard errors to spare. ``"auto"``
    merge and alignment become the data-aware ones when batches come; under a budget, an
    ``"auto"`` merge is chosen per group by measurement (:data:`MEASURED_MERGES`), an
    ``"auto"`` alignment per plan (:data:`MEASURED_ALIGNS`)."""
    batches = list(batches)
    measured_merges = MEASURED_MERGES if config.merge == AUTO and batches else None
    measured_aligns = MEASURED_ALIGNS if config.align == AUTO and batches else None
    actions = config.menu(bool(batches))
    menu = config.uses_menu(bool(batches)) and plan is None
    config = config.resolved(bool(batches))
    if menu:
        config = config.replace(align="none")  # the menu's ties are priced without alignment
    require_data(config, plan, bool(batches), frontend.hint)
    measure = config.max_error is not None and plan is None
    if measure:
        calib, choose, held = split_three(batches, config.holdout)
    else:
        calib, held = split(batches, config.holdout) if len(batches) >= 2 else (batches, [])
        choose = held
    cut = lambda part, start: list(labels[start:start + len(part)]) if labels is not None else None  # noqa: E731
    choose_labels, held_labels = cut(choose, len(calib)), cut(held, len(batches) - len(held))
    stats = None
    if calib and (config.uses_statistics or menu or (plan is not None and plan.keeps_function)):
        stats = calibrate(frontend, calib, config if plan is None else config.replace(align=plan.align), progress)
    fuser = Fuser(frontend, stats)
    found = frontend.found
    scoring = {"stats": stats} if config.metric == "output" else {}
    reference = frontend.outputs(frontend.model, held) if held else None
    chosen_on = frontend.outputs(frontend.model, choose) if measure else reference  # no budget: the held share
    if measure:
        measurable(chosen_on + reference, config.error_metric)

    def evaluate(candidate: FusionPlan) -> float:  # the error, and the margin a budget keeps beyond it
        errors = sample_errors(chosen_on, fuser.outputs(candidate, choose), config.error_metric, choose_labels)
        return upper_bound(errors, config.margin)

    def probe(candidate: FusionPlan) -> float:  # how far the outputs move: the menu's sensitivity probes
        return relative_change(chosen_on, fuser.outputs(candidate, choose))

    total = frontend.count(frontend.model)
    if plan is not None:
        check_plan(plan, found.by_name())
    elif config.collapses and menu:
        plan = _collapsed_then_menu(frontend, config, total, calib, stats, actions, evaluate, probe, progress)
    elif config.collapses:
        plan = _collapsed(frontend, config, total, calib, evaluate if chosen_on is not None else None, progress)
    elif menu:
        plan = plan_menu(found.plannable, found.load, config, total, stats, actions,
                         evaluate if chosen_on is not None else None, progress,
                         probe if chosen_on is not None else None)
    elif measure:
        plan = _budgeted(found, config, total, evaluate, progress, measured_merges, measured_aligns, scoring)
    else:
        plan = with_options(plan_fusion(found.plannable, found.load, config, total, progress=progress, **scoring),
                            found.by_name(), config)
    fused = fuser.build(plan)
    if reference is not None and (plan.error is None or measure):
        error = output_error(reference, frontend.outputs(fused, held), config.error_metric, held_labels)
        if measure:
            margin = f" with a margin of {config.margin:g} standard errors" if config.margin else ""
            plan = replace(plan, message=f"{plan.message}; chosen on {samples(choose)} samples{margin}, verified on "
                                         f"{samples(held)} the planner never saw: "
                                         f"{describe(config.error_metric, error)}")
        plan = replace(plan, error=error, error_metric=config.error_metric)
    log.info("kept: %d groups, ratio %.3f, held-out error %s", len(plan.groups), plan.model_ratio, plan.error)
    return Kept(fused, plan, frontend, held, reference, held_labels, choose if measure else [],
                chosen_on if measure else None, choose_labels if measure else None, config.margin)


def _collapsed(frontend: Frontend, config: FusionConfig, total: int, batches: Sequence[Any],
               evaluate: Any, progress: bool) -> FusionPlan:
    """The depth-collapse plan: the frontend's blocks by their influence on ``batches``."""
    found = frontend.found
    base = plan_fusion(found.plannable, found.load, config.replace(target_ratio=None, threshold=NEVER,
                                                                   max_overshoot=None), total, progress=progress)
    base = replace(base, target_ratio=config.target_ratio, threshold=None, max_overshoot=None, align="none",
                   error_metric=config.error_metric, max_error=config.max_error, message="")
    return plan_collapse(base, frontend.blocks(), frontend.influence(batches), config, evaluate)


def _collapsed_then_menu(frontend: Frontend, config: FusionConfig, total: int, batches: Sequence[Any],
                         stats: Calibration | None, actions: Sequence[str], evaluate: Any, probe: Any,
                         progress: bool) -> FusionPlan:
    """Depth first, then the menu: whole blocks removed as depth collapse removes them (in the
    order it measures, while the error keeps the budget, up to the target); when they fall short
    of the target, as many of them as still let the menu reach it within the budget on the
    layers left (found by bisection over how many: one budgeted menu plan per step), and the
    menu's plan for those. Without a target, the most blocks the budget allows, then the menu
    as far as the budget goes. Speed before size: each block removed is work no inference does."""
    found = frontend.found
    depth = _collapsed(frontend, config, total, batches, evaluate, progress)
    if config.target_ratio is not None and depth.ratio + 1e-12 >= config.target_ratio:
        return replace(depth, message=f"depth first: the blocks removed reach the target within the budget, "
                                      f"nothing else planned; {depth.message}")
    blocks = {b.name: b for b in frontend.blocks()}
    order = [blocks[name] for name in depth.dropped]

    def menu_after(k: int) -> FusionPlan:  # the menu's plan with the first k blocks of the order removed
        removed = order[:k]
        return plan_menu(found.plannable, found.load, config, total, stats, actions, evaluate, progress, probe,
                         start=dropping(depth, removed), skip={n for b in removed for n in b.layers})

    def reaches(plan: FusionPlan) -> bool:
        return config.target_ratio is None or plan.ratio + 1e-12 >= config.target_ratio

    tried: dict[int, FusionPlan] = {len(order): menu_after(len(order))}
    k = len(order)
    if not reaches(tried[k]):
        lo, hi = -1, len(order)  # lo reaches (or none does), hi does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            tried[mid] = menu_after(mid)
            lo, hi = (mid, hi) if reaches(tried[mid]) else (lo, mid)
        k = max(lo, 0)
        if k not in tried:
            tried[k] = menu_after(k)
    plan = tried[k]
    steps = ", ".join(f"{n} block(s): ratio {tried[n].ratio:.3f}" for n in sorted(tried))
    head = (f"depth first: {len(order)} block(s) removable within the budget ({depth.message}); the menu on the "
            f"layers left, per count of blocks removed ({steps}): kept {k} removed"
            + (f" ({', '.join(b.name for b in order[:k])})" if k else ""))
    return replace(plan, message=f"{head}; then {plan.message}")


def _budgeted(found: Any, config: FusionConfig, total: int, evaluate: Any, progress: bool,
              rules: Sequence[str] | None, aligns: Sequence[str] | None, scoring: Mapping[str, Any]) -> FusionPlan:
    """The budgeted plan; with ``aligns`` (an ``"auto"`` alignment), one per alignment and the one
    reaching the larger ratio (then the smaller error) kept, the choice said in its message."""
    plans = [plan_within_budget(found.plannable, found.load, config.replace(align=a), total, evaluate, progress,
                                rules=rules, **scoring) for a in (aligns or (config.alignment,))]
    best = max(plans, key=lambda p: (round(p.ratio, 9), -(p.error or 0.0)))
    if len(plans) > 1:
        tried = ", ".join(f"{p.align} {p.ratio:.4f}" for p in plans)
        best = replace(best, message=f"{best.message}; alignment measured (ratio within the budget: {tried}), "
                                     f"kept {best.align}")
    return best


def split_three(batches: Sequence[Any], holdout: float) -> tuple[list[Any], list[Any], list[Any]]:
    """``(calibration, chosen on, verified on)``: ``ceil(holdout * n)`` batches each for choosing
    and verifying (the last ones), the rest for the statistics."""
    batches = list(batches)
    if len(batches) < 3:
        raise CalibrationError(f"a budget needs at least 3 calibration batches (statistics, choosing, verifying "
                               f"on inputs the planner never saw); got {len(batches)}: give more samples")
    k = min(max(1, math.ceil(holdout * len(batches))), (len(batches) - 1) // 2)
    return batches[:-2 * k], batches[-2 * k:-k], batches[-k:]


def samples(batches: Sequence[Any]) -> int:
    """Samples in ``batches`` (the first axis of each batch's first array)."""
    total = 0
    for batch in batches:
        first = batch
        while isinstance(first, (Mapping, list, tuple)):
            first = next(iter(first.values())) if isinstance(first, Mapping) else first[0]
        shape = getattr(first, "shape", ())
        total += int(shape[0]) if len(shape) else 1
    return total


def measurable(outputs: Sequence[np.ndarray], metric: str) -> None:
    """A :class:`CalibrationError` when the original model's outputs on the calibration inputs
    cannot measure an error: not finite, or the same for every sample (constant inputs, say)."""
    joined = np.concatenate([np.asarray(o, dtype=np.float64).reshape(len(o), -1) for o in outputs])
    if not np.isfinite(joined).all():
        raise CalibrationError("the model's outputs on the calibration inputs are not finite (NaN or Inf): "
                               "they cannot measure an error")
    if metric != "accuracy" and np.ptp(joined, axis=0).max(initial=0.0) == 0.0:
        raise CalibrationError("the model's outputs are the same for every calibration sample (constant or "
                               "all-zero inputs?): they cannot measure an error; give real inputs")
