"""The Python API: trace, analyze, apply, unique_parameters."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from lfpass.core.config import FusionConfig
from lfpass.core.errors import ConfigError
from lfpass.fx import apply_plan, find_sites
from lfpass.core.plan import FusionPlan
from lfpass.core.planner import plan_fusion


def unique_parameters(module: nn.Module) -> int:
    """Parameters of ``module``, counting a tensor shared by several layers once."""
    seen: set[tuple] = set()
    total = 0
    for p in module.parameters():  # already unique by object
        key = (p.untyped_storage().data_ptr(), p.storage_offset(), tuple(p.shape), tuple(p.stride()), p.device)
        if key in seen:
            continue
        seen.add(key)
        total += p.numel()
    return total


def analyze(model: nn.Module, config: FusionConfig | None = None, progress: bool = False) -> FusionPlan:
    """Plan layer fusion for ``model`` (a GraphModule or any nn.Module). Mutates nothing."""
    config = config or FusionConfig()
    found = find_sites(model)
    with torch.no_grad():
        return plan_fusion(found.plannable, found.load, config, unique_parameters(model), progress=progress)


def apply(model: nn.Module, plan: FusionPlan, inplace: bool = False,
          counts: Mapping[str, int] | None = None, calibration: Sequence[Any] | None = None) -> nn.Module:
    """Rewrite ``model`` so each group of ``plan`` shares one merged tensor.

    The input is copied unless ``inplace=True``. The result's unique parameter
    count equals ``plan.params_after`` when ``plan`` was made for this model.
    ``counts`` weighs members that already stand for several layers (a model
    fused in stages): a member standing for n layers enters the merge n times.
    A plan that aligns, corrects or merges by data (from ``fuse`` with
    calibration) is built the same way again; a data-aware one needs
    ``calibration`` batches to gather its statistics from.
    """
    if plan.keeps_function:
        from lfpass.fx.pipeline import FxFuser, calibrate

        if counts:
            raise ConfigError("a plan that aligns, corrects or merges by data is applied in one stage (no counts)")
        if plan.needs_statistics and not calibration:
            raise ConfigError("this plan merges or aligns by data: pass calibration=[batch, ...]")
        config = FusionConfig(align=plan.align, residual_rank=plan.residual_rank)
        stats = calibrate(model, list(calibration), config) if calibration else None
        example = next(iter(calibration)) if calibration else None
        return FxFuser(model, config, stats, example_inputs=example).build(plan, inplace=inplace)
    with torch.no_grad():
        return apply_plan(model, plan, inplace=inplace, counts=counts)


def fuse(model: nn.Module, config: FusionConfig | None = None, *, calibration: Sequence[Any] | None = None,
         labels: Sequence[Any] | None = None, output_fn: Callable[[Any, Any], torch.Tensor] | None = None,
         progress: bool = False, **overrides: Any) -> tuple[nn.Module, FusionPlan]:
    """Plan and apply: the fused copy and its plan.

    ``calibration`` is a sequence of batches (a tensor, a tuple of positional
    inputs or a dict of keyword inputs each) that data-aware options need:
    ``max_error`` (planning by measured damage on the held-out share of the
    batches, with ``labels`` per batch for the ``accuracy`` metric),
    ``align = "activations"``, ``merge = "regmean"`` and ``metric = "output"``.
    ``output_fn(output, batch)`` picks what the error is measured on (default:
    every floating-point output, flattened per sample). Without any of those
    options this is ``analyze`` then ``apply``."""
    config = (config or FusionConfig()).replace(**overrides)
    if config.needs_calibration and not calibration:
        raise ConfigError("these options (max_error, align='activations', merge='regmean' or metric='output') "
                          "need calibration inputs: pass calibration=[batch, ...]")
    if calibration or config.align != "none" or config.residual_rank:
        from lfpass.fx.pipeline import fuse_keeping

        return fuse_keeping(model, config, list(calibration or ()), labels=labels, output_fn=output_fn,
                            progress=progress)
    plan = analyze(model, config)
    return apply(model, plan), plan
