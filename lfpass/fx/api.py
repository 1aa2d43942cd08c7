"""The Python API over PyTorch models: analyze, apply, fuse (and ``unique_parameters``).

``fuse`` with calibration inputs, alignment or per-member parts runs the one
keep-function pipeline (:mod:`lfpass.core.keep`) over the FX frontend."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from lfpass.core.config import FusionConfig
from lfpass.core.errors import ConfigError
from lfpass.core.keep import Fuser, calibrate, fuse_keeping, require_data
from lfpass.core.plan import FusionPlan
from lfpass.core.planner import plan_fusion
from lfpass.core.quality import Readout
from lfpass.fx.frontend import FxFrontend, OutputFn, readout_fn
from lfpass.fx.rewrite import apply_plan
from lfpass.fx.sites import find_sites, unique_parameters


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
        if counts:
            raise ConfigError("a plan that aligns, corrects or merges by data is applied in one stage (no counts)")
        batches = list(calibration or ())
        require_data(FusionConfig(), plan, bool(batches), FxFrontend.hint)
        front = FxFrontend(model, example_inputs=batches[0] if batches else None)
        config = FusionConfig(align=plan.align, residual_rank=plan.residual_rank)
        stats = calibrate(front, batches, config) if batches else None
        return Fuser(front, stats).build(plan, inplace=inplace)
    with torch.no_grad():
        return apply_plan(model, plan, inplace=inplace, counts=counts)


def fuse(model: nn.Module, config: FusionConfig | None = None, *, calibration: Sequence[Any] | None = None,
         labels: Sequence[Any] | None = None, output_fn: OutputFn | None = None,
         progress: bool = False, **overrides: Any) -> tuple[nn.Module, FusionPlan]:
    """Plan and apply: the fused copy and its plan.

    ``calibration`` is a sequence of batches (a tensor, a tuple of positional
    inputs or a dict of keyword inputs each) that data-aware options need:
    ``max_error`` (planning by measured damage on the held-out share of the
    batches, with ``labels`` per batch for the ``accuracy`` metric),
    ``align = "activations"``, ``merge = "regmean"`` and ``metric = "output"``.
    ``output_fn(output, batch)`` picks what the error is measured on (default:
    ``config``'s ``error_output`` and ``pooling``, else every floating-point
    output, flattened per sample). With calibration batches, ``"auto"`` merge
    and alignment are the data-aware ones. Without batches or data-aware
    options this is ``analyze`` then ``apply``."""
    config = (config or FusionConfig()).replace(**overrides)
    batches = list(calibration or ())
    require_data(config, None, bool(batches), FxFrontend.hint)
    if not batches and not config.keeps_function and not config.uses_menu(False):
        plan = analyze(model, config)
        return apply(model, plan), plan
    arrays = [np.asarray(torch.as_tensor(y).cpu()) for y in labels] if labels is not None else None
    front = FxFrontend(model, example_inputs=batches[0] if batches else None,
                       output_fn=output_fn or readout_fn(Readout.of(config)))
    kept = fuse_keeping(front, config, batches, labels=arrays, progress=progress)
    return kept.model, kept.plan
