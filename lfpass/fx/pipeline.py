"""Fusion that keeps the function, for PyTorch models: calibrate, plan, align, merge, correct.

:class:`FxFuser` holds one model, its options and its calibration, and builds
fused copies of it for any plan: each member moved into its anchor's
coordinates (``align``), the groups merged (by the plan's rule, data-aware
ones with the calibration statistics), and each member given its own low-rank
correction (``residual_rank``). The budgeted planner calls :meth:`build` for
every candidate it measures, so what it measures is exactly what it returns.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from lfpass.core.budget import plan_within_budget, with_options
from lfpass.core.calibration import Calibration, CalibrationError, cross_pairs
from lfpass.core.config import FusionConfig
from lfpass.core.errors import ConfigError
from lfpass.fx.sites import FxSites, find_sites
from lfpass.core.plan import FusionPlan
from lfpass.core.quality import output_error

log = logging.getLogger(__name__)

OutputFn = Callable[[Any, Any], torch.Tensor]  # (model output, the batch it ran on) -> [batch, ...]


def call(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on one batch: a tensor, a tuple of positional inputs, or a dict of keyword inputs."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def default_output(output: Any, batch: Any) -> torch.Tensor:
    """Every floating-point tensor the model returns, flattened per sample and joined."""
    leaves = [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not leaves:
        raise ConfigError("the model returns no floating-point tensor to measure its error on")
    n = leaves[0].shape[0] if leaves[0].dim() else 1
    return torch.cat([t.reshape(n, -1).float() for t in leaves if t.dim() and t.shape[0] == n], dim=1)


def outputs(model: nn.Module, batches: Iterable[Any], output_fn: OutputFn | None = None) -> list[np.ndarray]:
    """``model``'s outputs on ``batches`` (eval mode, no gradients), one float64 array per batch."""
    output_fn = output_fn or default_output
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return [output_fn(call(model, b), b).detach().double().cpu().numpy() for b in batches]
    finally:
        model.train(was)


def split(batches: Sequence[Any], holdout: float) -> tuple[list[Any], list[Any]]:
    """``(calibration, held out)``: the last ``ceil(holdout * n)`` batches are held out."""
    batches = list(batches)
    if len(batches) < 2:
        raise CalibrationError(f"measuring the error needs at least 2 calibration batches (one held out); "
                               f"got {len(batches)}")
    k = min(max(1, math.ceil(holdout * len(batches))), len(batches) - 1)
    return batches[:-k], batches[-k:]


@dataclass
class FxFuser:
    """Builds fused copies of ``model`` for plans, keeping what calibration learned."""

    model: nn.Module
    config: FusionConfig
    calibration: Calibration | None = None
    example_inputs: Any = None
    found: FxSites = field(init=False)
    _graph: fx.GraphModule | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.found = find_sites(self.model)

    def graph(self) -> fx.GraphModule:
        """The model's graph, traced once (``torch.export`` on the example inputs where
        ``symbolic_trace`` fails): alignment reads its data flow for every build."""
        if self._graph is None:
            from lfpass.fx.trace import trace

            self._graph = trace(self.model, self.example_inputs)
        return self._graph

    def build(self, plan: FusionPlan, inplace: bool = False) -> nn.Module:
        """A fused copy of the model (the model itself when ``inplace``): aligned, merged and
        corrected as ``plan`` says."""
        from lfpass.fx.lowrank import attach_residuals, capture_originals
        from lfpass.fx.rewrite import apply_plan

        module = self.model if inplace else copy.deepcopy(self.model)
        stats = self.calibration.copy() if self.calibration is not None else None
        with torch.no_grad():
            if plan.align != "none" and plan.groups:
                from lfpass.fx.align import align_fx

                align_fx(module, plan, plan.align, calibration=stats, gm=self.graph())
            sites = find_sites(module) if plan.residual_rank else None
            originals = capture_originals(module, plan) if plan.residual_rank else None
            apply_plan(module, plan, inplace=True, stats=stats)
            if plan.residual_rank and plan.groups:
                attach_residuals(module, plan, originals, plan.residual_rank, calibration=stats, sites=sites)
        return module


def calibrate(model: nn.Module, batches: Sequence[Any], config: FusionConfig, progress: bool = False) -> Calibration:
    """Input statistics of ``model``'s layers on ``batches`` (paired ones too when ``align`` is by activations)."""
    from lfpass.fx.calibrate import calibrate_fx

    return calibrate_fx(model, batches, cross=cross_pairs(find_sites(model).sites, config), progress=progress)


def fuse_keeping(model: nn.Module, config: FusionConfig, batches: Sequence[Any], *,
                 labels: Sequence[Any] | None = None, output_fn: OutputFn | None = None,
                 progress: bool = False) -> tuple[nn.Module, FusionPlan]:
    """Plan and build with calibration: by measured damage when a budget (or data-aware
    options) ask for it, else by weight similarity; the error on held-out batches is in the plan."""
    from lfpass.fx.api import unique_parameters
    from lfpass.core.planner import plan_fusion

    batches = list(batches)
    measure = config.max_error is not None
    calib, held = split(batches, config.holdout) if measure or len(batches) >= 2 else (batches, [])
    held_labels = None
    if labels is not None:
        labels = [np.asarray(torch.as_tensor(y).cpu()) for y in labels]
        held_labels = labels[len(calib):]
    stats = calibrate(model, calib, config, progress) if calib and config.uses_statistics else None
    example = calib[0] if calib else None
    fuser = FxFuser(model, config, stats, example_inputs=example)
    found = fuser.found
    scoring = {"stats": stats} if config.metric == "output" else {}
    total = unique_parameters(model)
    reference = outputs(model, held, output_fn) if held else None
    if measure:

        def evaluate(plan: FusionPlan) -> float:
            return output_error(reference, outputs(fuser.build(plan), held, output_fn), config.error_metric,
                                held_labels)

        with torch.no_grad():
            plan = plan_within_budget(found.plannable, found.load, config, total, evaluate, progress, **scoring)
    else:
        with torch.no_grad():
            plan = plan_fusion(found.plannable, found.load, config, total, progress=progress, **scoring)
        plan = with_options(plan, found.by_name(), config)
    fused = fuser.build(plan)
    if held and plan.error is None:
        plan = replace(plan, error=output_error(reference, outputs(fused, held, output_fn), config.error_metric,
                                                held_labels), error_metric=config.error_metric)
    return fused, plan
