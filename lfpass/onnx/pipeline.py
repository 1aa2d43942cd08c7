"""Fusion that keeps the function, for ONNX models: calibrate in onnxruntime, plan by
measured damage, align, merge with the calibration, add per-member corrections.

The ONNX twin of :mod:`lfpass.fx.pipeline`: :class:`OnnxFuser` builds a fused
copy of one model for any plan, and the budgeted planner measures each copy
in onnxruntime (graph optimisations off) on held-out calibration feeds. Each
build copies the graph, so this path is for models that fit in memory twice
(and in one 2 GB protobuf for onnxruntime).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx_ir as ir

from lfpass.core.budget import plan_within_budget
from lfpass.core.calibration import Calibration, CalibrationError, cross_pairs
from lfpass.core.config import FusionConfig
from lfpass.core.errors import ConfigError, InputError
from lfpass.onnx.inputs import Feeds, runtime_inputs
from lfpass.onnx.load import count_params
from lfpass.onnx.sites import OnnxSites, find_sites
from lfpass.core.plan import FusionPlan, check_plan
from lfpass.core.quality import output_error

log = logging.getLogger(__name__)

LABELS = "labels"  # the reserved array name for labels in a calibration .npz
_BATCHES = 8  # a calibration .npz is cut into this many batches along its first axis


def copy_model(model: ir.Model) -> ir.Model:
    return ir.from_proto(ir.to_proto(model))


def session(model: ir.Model | Path):
    """An onnxruntime session on ``model`` (in memory, or a file), graph optimisations off."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    source = str(model) if isinstance(model, Path) else ir.to_proto(model).SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def outputs(model: ir.Model | Path, feeds: Sequence[Feeds]) -> list[np.ndarray]:
    """Every floating-point output per batch, flattened per sample and joined (float64)."""
    sess = session(model)
    out = []
    for feed in feeds:
        results = [np.asarray(r) for r in sess.run(None, feed)]
        floats = [r for r in results if r.dtype.kind == "f" and r.ndim >= 1]
        n = floats[0].shape[0]
        out.append(np.concatenate([r.reshape(n, -1).astype(np.float64) for r in floats if r.shape[0] == n], axis=1))
    return out


def split_feed(feed: Feeds, model: ir.Model, batches: int = _BATCHES) -> list[Feeds]:
    """One ``.npz`` feed (first axis: samples) cut into up to ``batches`` batches."""
    sizes = {a.shape[0] for a in feed.values() if a.ndim}
    if len(sizes) != 1:
        raise InputError("calibration inputs must share their first axis (samples); "
                         f"got first dimensions {sorted(sizes)}")
    n = sizes.pop()
    if n < 2:
        raise InputError(f"calibration needs at least 2 samples along the first axis, got {n}")
    for v in runtime_inputs(model):
        dim = v.shape[0] if v.shape is not None and len(v.shape) else None
        if isinstance(dim, int) and dim != n:
            raise InputError(f"input {v.name!r} has a fixed batch size of {dim}: calibration cuts its "
                             f"{n} samples into batches, so export the model with a dynamic batch axis")
    cuts = np.array_split(np.arange(n), min(batches, n))
    return [{k: a[idx] for k, a in feed.items()} for idx in cuts]


def split(feeds: Sequence[Feeds], holdout: float) -> tuple[list[Feeds], list[Feeds]]:
    k = min(max(1, math.ceil(holdout * len(feeds))), len(feeds) - 1)
    return list(feeds[:-k]), list(feeds[-k:])


@dataclass
class OnnxFuser:
    """Builds fused copies of ``model`` for plans."""

    model: ir.Model
    config: FusionConfig
    calibration: Calibration | None = None
    found: OnnxSites = field(init=False)

    def __post_init__(self) -> None:
        self.found = find_sites(self.model)

    def build(self, plan: FusionPlan) -> ir.Model:
        from lfpass.onnx.lowrank import attach_residuals_onnx, capture_originals_onnx
        from lfpass.onnx.rewrite import apply_plan

        model = copy_model(self.model)
        stats = self.calibration.copy() if self.calibration is not None else None
        if plan.align != "none" and plan.groups:
            from lfpass.onnx.align import align_onnx

            align_onnx(model, plan, plan.align, calibration=stats)
        found = find_sites(model)
        check_plan(plan, found.by_name())
        originals = capture_originals_onnx(found, plan) if plan.residual_rank else None
        apply_plan(model, found, plan, stats=stats)
        if plan.residual_rank and plan.groups:
            attach_residuals_onnx(model, plan, originals, plan.residual_rank, calibration=stats, sites=found)
        return model


def keeps_function(config: FusionConfig) -> bool:
    """Whether ``config`` asks for the calibrated path (statistics, alignment, corrections or a budget)."""
    return config.needs_calibration or config.align != "none" or config.residual_rank > 0


@dataclass
class Kept:
    """A fused model, its plan (with the held-out error), and what the error was measured on."""

    model: ir.Model
    plan: FusionPlan
    held: list[Feeds]
    reference: list[np.ndarray] | None
    labels: list[np.ndarray] | None

    def error_of(self, path) -> float | None:
        """The error of the model written at ``path`` on the held-out feeds (None without any)."""
        if self.reference is None:
            return None
        return output_error(self.reference, outputs(Path(path), self.held), self.plan.error_metric or "cosine",
                            self.labels)


def fuse_keeping(model: ir.Model, config: FusionConfig, feed: Feeds | None, plan: FusionPlan | None = None,
                 progress: bool = False) -> Kept:
    """Plan (by measured damage under a budget) and build; the held-out error is in the plan.

    ``feed`` is the calibration ``.npz``'s arrays (first axis: samples; an
    array named ``labels`` holds labels for the ``accuracy`` metric)."""
    from dataclasses import replace

    from lfpass.core.budget import with_options
    from lfpass.core.planner import plan_fusion

    if feed is None:
        if config.needs_calibration or (plan is not None and plan.needs_statistics):
            raise ConfigError("these options (max_error, align='activations', merge='regmean' or metric='output') "
                              "need calibration inputs: pass --inputs CALIB.npz")
        stats, held, labels = None, [], None
    else:
        feed = dict(feed)
        label_array = feed.pop(LABELS, None)
        feeds = split_feed(feed, model)
        calib, held = split(feeds, config.holdout)
        labels = None
        if label_array is not None:
            cuts = np.array_split(label_array, len(feeds))
            labels = cuts[len(calib):]
        stats = None
        if config.uses_statistics or (plan is not None and plan.keeps_function):
            from lfpass.onnx.calibrate import calibrate_onnx

            align_config = config if plan is None else config.replace(align=plan.align)
            stats = calibrate_onnx(model, calib, cross=cross_pairs(find_sites(model).sites, align_config),
                                   progress=progress)
    fuser = OnnxFuser(model, config, stats)
    found = fuser.found
    scoring = {"stats": stats} if config.metric == "output" else {}
    reference = outputs(model, held) if held else None

    def evaluate(p: FusionPlan) -> float:
        return output_error(reference, outputs(fuser.build(p), held), config.error_metric, labels)

    if plan is not None:
        check_plan(plan, found.by_name())
    elif config.max_error is not None:
        plan = plan_within_budget(found.plannable, found.load, config, count_params(model), evaluate, progress,
                                  **scoring)
    else:
        plan = with_options(plan_fusion(found.plannable, found.load, config, count_params(model),
                                        progress=progress, **scoring), found.by_name(), config)
    fused = fuser.build(plan)
    if reference is not None and plan.error is None:
        plan = replace(plan, error=evaluate(plan), error_metric=config.error_metric)
    return Kept(fused, plan, held, reference, labels)


__all__ = ["CalibrationError", "Kept", "OnnxFuser", "fuse_keeping", "keeps_function", "split_feed"]
