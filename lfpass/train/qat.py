"""Quantization-aware retraining: the weights learn to live on the grid the quantizer will put them on.

Rounding every weight to 4 bits at once (round-to-nearest, what onnxruntime's
``MatMulNBitsQuantizer`` does) moves a small transformer's outputs by several
points of cosine; retraining with the rounding in the forward pass lets the
other weights make up for it. The forward pass reads each chosen weight through
:func:`fake_quantize` (rounded to its grid; the gradient passes straight through
to the float weight, Bengio et al.'s straight-through estimator), the loss is the
task's (distillation from the original, for the ONNX path), and at the end every
chosen weight is replaced by its rounded value. Rounding those again with the
same grid is exact, so the file a quantizer writes from them computes what was
retrained.

The grid is the quantizer's own, symmetric and block-wise: along ``axis``, blocks
of ``block`` weights share one scale, ``s = v / -2^(bits-1)`` where ``v`` is the
block's weight of greatest magnitude (its sign kept), and a weight becomes
``s * clamp(round(w / s), -2^(bits-1), 2^(bits-1) - 1)`` (onnxruntime's
``MlasQuantizeBlockwise``; ``tests/train/test_qat.py`` checks the file matches
to the bit). A weight several layers share is one ``nn.Parameter`` rounded once.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn
from torch.func import functional_call

from lfpass.train.distil import Distillation
from lfpass.train.errors import TrainingError
from lfpass.train.loop import TrainStats, make_optimizer, train_steps
from lfpass.train.schedule import Schedule
from lfpass.train.task import Task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Grid:
    """Where a weight's values may lie: ``bits`` per weight, blocks of ``block`` along ``axis``."""

    bits: int
    block: int
    axis: int = 0


def rounded(weight: torch.Tensor, grid: Grid) -> torch.Tensor:
    """``weight`` rounded to ``grid`` (no gradient through the rounding)."""
    w = weight.movedim(grid.axis, 0)
    k = w.shape[0]
    rest = w.shape[1:]
    blocks = nn.functional.pad(w.reshape(k, -1), (0, 0, 0, (-k) % grid.block)).reshape(-1, grid.block,
                                                                                       w[0].numel())
    peak = torch.gather(blocks, 1, blocks.abs().argmax(dim=1, keepdim=True))
    top = 2 ** (grid.bits - 1)
    scale = peak / -top
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round(blocks / scale), -top, top - 1) * scale
    return q.reshape(-1, w[0].numel())[:k].reshape(k, *rest).movedim(0, grid.axis)


def fake_quantize(weight: torch.Tensor, grid: Grid) -> torch.Tensor:
    """``weight`` rounded to ``grid`` in the forward pass, the identity in the backward pass."""
    return weight + (rounded(weight.detach(), grid) - weight).detach()


class QuantAware(nn.Module):
    """``model`` computing with the weights named in ``grids`` fake-quantized (its own parameters
    are the float weights the optimizer updates; tied names are rounded as one)."""

    def __init__(self, model: nn.Module, grids: Mapping[str, Grid]) -> None:
        super().__init__()
        self.model, self.grids = model, _once(model, grids)
        self._params = dict(model.named_parameters(remove_duplicate=False))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        values = {name: fake_quantize(self._params[name], grid) for name, grid in self.grids.items()}
        return functional_call(self.model, values, args, kwargs, tie_weights=True)


def snap(model: nn.Module, grids: Mapping[str, Grid]) -> None:
    """Every weight named in ``grids`` replaced, in place, by its value on the grid."""
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, grid in _once(model, grids).items():
            params[name].copy_(rounded(params[name], grid))


def _once(model: nn.Module, grids: Mapping[str, Grid]) -> dict[str, Grid]:
    """``grids`` with one name per parameter (a tied weight is rounded once; its names must agree)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    seen: dict[int, tuple[str, Grid]] = {}
    for name, grid in grids.items():
        first = seen.setdefault(id(params[name]), (name, grid))
        if first[1] != grid:
            raise TrainingError(f"{name!r} and {first[0]!r} are one tensor on two grids ({grid} and {first[1]})")
    return {name: grid for name, grid in seen.values()}


@dataclass
class QatResult:
    """What quantization-aware retraining did: held-out quality with the weights rounded before
    retraining (round-to-nearest alone) and after, the training's statistics, and whether the
    retrained weights were kept (not when they measured worse than rounding alone)."""

    quality_rounded: float
    quality: float
    stats: TrainStats
    kept: bool
    seconds: float

    def summary(self) -> str:
        kept = "" if self.kept else "; retraining lowered it, so the weights are rounded without retraining"
        return (f"quantization-aware retraining: held-out quality {self.quality_rounded:.4g} with the weights "
                f"rounded, {self.quality:.4g} after {self.stats.steps} steps{kept}")


def retrain_quantized(model: nn.Module, grids: Mapping[str, Grid], task: Task, schedule: Schedule, *,
                      progress: bool = True) -> QatResult:
    """Retrain ``model`` in place for ``schedule.steps_per_stage`` steps on ``task`` with the weights
    named in ``grids`` fake-quantized, then round them onto their grids (buffers ``grids`` names, the
    tables a conversion keeps as constants, are rounded while it trains and is measured, then put
    back: the quantizer rounds them the same way). Retraining that measures
    worse on ``task``'s held-out samples than rounding alone is undone (the rounded original
    weights are kept, and said)."""
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    buffers = dict(model.named_buffers(remove_duplicate=False))
    missing = sorted(set(grids) - params - set(buffers))
    if missing:
        raise TrainingError(f"quantization-aware retraining: {missing[0]!r} is not a parameter of the model")
    if not set(grids) & params:
        raise TrainingError("quantization-aware retraining: no weight to quantize")
    started = time.perf_counter()
    tables = {name: buffers[name].detach().clone() for name in set(grids) & set(buffers)}
    with torch.no_grad():  # constants (an ONNX file's embedding tables) are not trained: on their grid meanwhile
        for name, value in tables.items():
            buffers[name].copy_(rounded(value, grids[name]))
    grids = {n: g for n, g in grids.items() if n in params}
    try:
        return _retrain(model, grids, task, schedule, progress, started)
    finally:  # as they were: the quantizer rounds them the same way, and the file keeps them as they came
        with torch.no_grad():
            for name, value in tables.items():
                buffers[name].copy_(value)


def _retrain(model: nn.Module, grids: Mapping[str, Grid], task: Task, schedule: Schedule, progress: bool,
             started: float) -> QatResult:
    """:func:`retrain_quantized` once the constants are on their grids (``grids``: the parameters')."""
    before = copy.deepcopy(model.state_dict())
    snap(model, grids)
    quality_rounded = task.evaluate(model)["quality"]
    model.load_state_dict(before)
    optimizer = make_optimizer(schedule.optimizer, model.parameters(), schedule.lr, schedule.weight_decay)
    stats = train_steps(QuantAware(model, grids), task.train_batches(schedule.batch_size, seed=schedule.seed),
                        task.loss, optimizer, schedule.steps_per_stage, lr_at=schedule.lr_at, progress=progress,
                        desc="quantization-aware", frozen_norms=schedule.frozen_norms(isinstance(task, Distillation)))
    if stats.diverged:
        raise TrainingError(f"the loss became NaN or Inf after {stats.steps} steps; lower lr (now {schedule.lr:g})")
    snap(model, grids)
    quality = task.evaluate(model)["quality"]
    higher = getattr(task, "higher_is_better", True)
    kept = quality >= quality_rounded if higher else quality <= quality_rounded
    if not kept:
        model.load_state_dict(before)
        snap(model, grids)
        log.warning("quantization-aware retraining lowered the held-out quality from %.4g to %.4g; rounded alone",
                    quality_rounded, quality)
    return QatResult(quality_rounded, quality, stats, kept, time.perf_counter() - started)
