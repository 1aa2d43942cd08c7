"""Iterative fusion with retraining (the paper's schedule), on one process or under torchrun.

``retrain`` reaches the fusion target in ``schedule.stages`` stages. Each
stage plans on the current weights (a fused tensor is one site), fuses the
next groups weighting each fused tensor by the layers it stands for, retrains
with the ties kept, measures quality, and writes a checkpoint. With
``max_drop`` a stage that costs too much quality is rolled back and the run
stops there. The result is the fused model with the plan of every stage,
ready for :func:`lfpass.apply` replays and export.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lfpass.core.config import FusionConfig
from lfpass.core.errors import ConfigError, OutputError
from lfpass.core.plan import FusionPlan
from lfpass.fx.sites import unique_parameters
from lfpass.train import checkpoint
from lfpass.train.distil import Distillation
from lfpass.train.distributed import Env, setup
from lfpass.train.errors import TrainingError
from lfpass.train.loop import TrainStats, carry_state, make_optimizer, train_steps
from lfpass.train.schedule import Schedule
from lfpass.train.stages import fuse_stage, layer_counts, plan_stage, rebuild, scope_params
from lfpass.train.task import Task

log = logging.getLogger(__name__)


@dataclass
class StageRow:
    """One stage: what it aimed at and reached, and what it cost.

    Ratios are against the original model: ``model_ratio`` over its unique
    parameters, ``layer_ratio`` over the layers the config may fuse.
    ``quality_fused`` is measured right after fusing, ``quality`` after
    retraining (None on stages the schedule does not evaluate); ``train_loss``
    is the mean loss of the stage's last tenth of steps (the global batch's,
    under DDP; NaN when it trained no step)."""

    stage: int
    target_ratio: float
    groups: int
    model_ratio: float
    layer_ratio: float
    unique_params: int
    quality_fused: float | None
    quality: float | None
    metrics: dict[str, float]
    train_loss: float
    steps: int
    seconds: float
    rolled_back: bool = False


@dataclass
class RetrainResult:
    """The fused, retrained model, the plan of every kept stage (in order), and the history."""

    model: nn.Module
    plans: list[FusionPlan]
    history: list[StageRow]
    metrics_original: dict[str, float]
    params_original: int
    stopped: str = ""  # why the run ended before its last stage ("" when it did not)

    @property
    def quality_original(self) -> float | None:
        return self.metrics_original.get("quality")

    @property
    def unique_params(self) -> int:
        return self.plans[-1].params_after if self.plans else self.params_original

    @property
    def ratio(self) -> float:
        """Unique parameters of the original model over the fused one's."""
        return self.params_original / max(self.unique_params, 1)

    def to_dict(self) -> dict[str, Any]:
        """Everything but the model, as strict JSON-ready data (plans as :meth:`FusionPlan.to_json`
        objects; a NaN, such as the loss of a stage that trained no step, becomes None)."""
        history = [{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in asdict(r).items()}
                   for r in self.history]
        return {"ratio": self.ratio, "unique_params": self.unique_params, "params_original": self.params_original,
                "metrics_original": self.metrics_original, "stopped": self.stopped,
                "history": history, "plans": [json.loads(p.to_json()) for p in self.plans]}


@dataclass
class _State:
    model: nn.Module
    plans: list[FusionPlan]
    history: list[StageRow]
    metrics_original: dict[str, float]
    optimizer: torch.optim.Optimizer | None = None
    stopped: str = ""
    done: bool = False


def _seed(*parts: int) -> int:
    """A 32-bit seed mixed from ``parts`` (the run's seed, the stage, the rank)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _drop(task: Task, original: float, now: float) -> float:
    """How far ``now`` is below ``original`` in the task's direction (inf for NaN)."""
    if not math.isfinite(now):
        return math.inf
    return original - now if task.higher_is_better else now - original


class _Run:
    """One retraining run: what it was given, where this process stands in it, and its steps."""

    def __init__(self, model: nn.Module, task: Task, fusion: FusionConfig, schedule: Schedule, env: Env,
                 checkpoint_dir: str | Path | None, progress: bool) -> None:
        self.original, self.task, self.fusion, self.schedule, self.env = model, task, fusion, schedule, env
        self.checkpoint_dir, self.progress = checkpoint_dir, progress and env.main
        self.scope_original = scope_params(model, fusion)
        self.params_original = unique_parameters(model)
        self.layers_original = scope_params(model, fusion.replace(ratio_scope="layers"))
        self.targets = schedule.targets(fusion.target_ratio)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """The task's metrics, measured on rank 0 and shared with the others."""
        metrics = self.task.evaluate(model) if self.env.main else None
        metrics = self.env.broadcast(metrics)
        if "quality" not in metrics:
            raise ConfigError(f"task {self.task.name!r}: evaluate() must return a 'quality' entry")
        return {k: float(v) for k, v in metrics.items()}

    def start(self, resume: bool) -> _State:
        """A fresh run, or the one the checkpoint folder holds (with ``resume``)."""
        folder = self.checkpoint_dir
        if not checkpoint.exists(folder):
            model = copy.deepcopy(self.original).to(self.env.device)
            return _State(model, [], [], self.evaluate(model))
        if not resume:
            raise OutputError(f"{folder}: holds a retraining run already; pass resume=True to continue it, "
                              "or choose another folder")
        saved = checkpoint.load(folder, self.fusion, self.schedule, self.params_original)
        model = rebuild(self.original, saved.plans).to(self.env.device)
        model.load_state_dict(saved.state["model"])
        optimizer = None
        if saved.state["optimizer"] is not None:
            optimizer = self.make_optimizer(model)
            optimizer.load_state_dict(saved.state["optimizer"])
        if len(saved.state["rng"]) == self.env.world:
            checkpoint.set_rng_state(saved.state["rng"][self.env.rank])
        history = [StageRow(**row) for row in saved.history]
        log.info("resuming after stage %d of %d from %s", saved.stage, self.schedule.stages, folder)
        return _State(model, saved.plans, history, saved.metrics_original, optimizer, saved.stopped, saved.done)

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        s = self.schedule
        return make_optimizer(s.optimizer, model.parameters(), s.lr, s.weight_decay)

    def save(self, state: _State) -> None:
        """Checkpoint ``state`` (rank 0 writes; every rank's RNG state goes in)."""
        if self.checkpoint_dir is None:
            return
        rngs = self.env.gather(checkpoint.rng_state())
        if self.env.main:
            saved = checkpoint.Saved(len(state.history), state.plans, [asdict(r) for r in state.history],
                                     state.metrics_original, state.done, state.stopped)
            optimizer = None if state.done else state.optimizer
            checkpoint.save(self.checkpoint_dir, saved, self.fusion, self.schedule, self.params_original,
                            state.model, optimizer, rngs)
        self.env.barrier()

    def stage(self, k: int, state: _State) -> StageRow:
        """Plan, fuse, retrain and judge stage ``k`` (1-based), updating ``state``; then checkpoint."""
        started = time.perf_counter()
        snapshot = copy.deepcopy(state.model) if self.schedule.max_drop is not None else None  # ties kept
        plan, frozen = self.fuse(k, state)
        evaluates = self.schedule.evaluates(k)
        fused = self.evaluate(state.model)["quality"] if evaluates else None
        optimizer = self.make_optimizer(state.model)
        carry_state(state.optimizer, optimizer)  # tensors this stage left alone keep their moments
        stats = self.train(k, state.model, optimizer, frozen, plan)
        metrics = self.evaluate(state.model) if evaluates and not stats.diverged else {}
        row = StageRow(k, self.targets[k - 1], len(plan.groups), self.params_original / max(plan.params_after, 1),
                       self.layers_original / max(plan.layer_params_after, 1), plan.params_after, fused,
                       metrics.get("quality"), metrics, stats.loss, stats.steps, 0.0)
        reason = self.judge(k, row, stats, state.metrics_original["quality"])
        if reason:
            log.warning("%s", reason)
            state.model, state.done, state.stopped, row.rolled_back = snapshot, True, reason, True
        else:
            state.plans.append(plan)
            state.optimizer = optimizer
        row.seconds = time.perf_counter() - started
        state.history.append(row)
        self.save(state)
        return row

    def fuse(self, k: int, state: _State) -> tuple[FusionPlan, list[nn.Parameter]]:
        """Stage ``k``'s plan (made on rank 0, applied on every rank) and the tensors it shared."""
        plan = plan_stage(state.model, self.fusion, self.targets[k - 1], self.scope_original) if self.env.main else None
        plan = self.env.broadcast(plan)
        shared = fuse_stage(state.model, plan, layer_counts(state.plans))
        if unique_parameters(state.model) != plan.params_after:
            raise TrainingError(f"stage {k}: the fused model has {unique_parameters(state.model)} unique "
                                f"parameters, its plan says {plan.params_after}")
        return plan, shared

    def train(self, k: int, model: nn.Module, optimizer: torch.optim.Optimizer, frozen: list[nn.Parameter],
              plan: FusionPlan) -> TrainStats:
        """Retrain stage ``k`` in a fresh DDP wrapper (fusion replaced parameters), seeded per stage:
        the data by (seed, stage) alone, so every world size draws the same global batches."""
        s, env = self.schedule, self.env
        torch.manual_seed(_seed(s.seed, k, env.rank))
        batches = self.task.train_batches(s.batch_size, seed=_seed(s.seed, k), rank=env.rank, world=env.world)
        shown = {"ratio": f"{self.params_original / max(plan.params_after, 1):.3g}"}
        return train_steps(env.wrap(model), batches, self.task.loss, optimizer, s.steps_per_stage,
                           lr_at=s.lr_at, frozen=frozen, freeze_steps=s.freeze_steps, device=env.device,
                           progress=self.progress, desc=f"stage {k}/{s.stages}", postfix=shown,
                           reduce_loss=env.mean, frozen_norms=s.frozen_norms(isinstance(self.task, Distillation)))

    def judge(self, k: int, row: StageRow, stats: TrainStats, original: float) -> str:
        """Why stage ``k`` must be rolled back ("" to keep it). A NaN/Inf loss without
        ``max_drop`` is an error: there is no earlier stage the user asked to fall back to."""
        max_drop = self.schedule.max_drop
        if stats.diverged:
            if max_drop is None:
                raise TrainingError(f"stage {k}: the loss became NaN or Inf after {stats.steps} steps; lower lr "
                                    f"(now {self.schedule.lr:g}), or set max_drop to roll such a stage back")
            return f"stage {k}: the loss became NaN or Inf; rolled back to stage {k - 1}"
        if max_drop is None or row.quality is None:
            return ""
        drop = _drop(self.task, original, row.quality)
        if drop <= max_drop:
            return ""
        return (f"stage {k}: quality {row.quality:.4g} is {drop:.4g} below the original {original:.4g} "
                f"(max_drop {max_drop:g}); rolled back to stage {k - 1}")

    def result(self, state: _State) -> RetrainResult:
        if state.plans and unique_parameters(state.model) != state.plans[-1].params_after:
            raise TrainingError("the retrained model's ties differ from its last plan")
        return RetrainResult(state.model, state.plans, state.history, state.metrics_original,
                             self.params_original, state.stopped)


def retrain(
    model: nn.Module,
    task: Task,
    fusion: FusionConfig,
    schedule: Schedule,
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    device: str | torch.device | None = None,
    find_unused_parameters: bool = False,
    on_stage: Callable[[StageRow], None] | None = None,
    calibration: Sequence[Any] | None = None,
    output_fn: Any = None,
) -> RetrainResult:
    """Fuse ``model`` to ``fusion.target_ratio`` (over ``fusion.ratio_scope``, against the original)
    in ``schedule.stages`` stages, retraining on ``task`` after each. ``model`` is not modified.

    With ``checkpoint_dir`` a checkpoint is written after every stage;
    ``resume=True`` continues the run found there (a run found there without
    it is an error, so a finished run is never overwritten by accident).
    Under torchrun (or in a process group the caller joined) every rank runs
    this same call: rank 0 plans, evaluates, writes and shows progress, and
    every rank returns the same model (save it from rank 0). A group this call
    joined from torchrun's environment it leaves when it returns; one the
    caller joined stays joined. ``on_stage(row)`` is called on every rank
    after each stage's checkpoint.

    With ``calibration`` (batches of the model's inputs), the model is fused once by the
    keep-function pipeline (:func:`lfpass.core.keep.fuse_keeping`: the plan menu of ties,
    residuals, shared bases and per-layer low rank, a ``max_error`` budget too), then
    retrained from that start with its ties kept (:func:`retrain_fused`; ``output_fn`` says
    what the budget's error is measured on). That run has one stage and one process.
    """
    if calibration is not None:
        return _from_plan(model, task, fusion, schedule, list(calibration), output_fn, checkpoint_dir, progress)
    if fusion.target_ratio is None:
        raise ConfigError("target_ratio: iterative retraining needs a target ratio to spread over its stages")
    env = setup(device, find_unused_parameters)
    run = _Run(model, task, fusion, schedule, env, checkpoint_dir, progress)
    state = run.start(resume)
    bar = tqdm(total=schedule.stages, initial=len(state.history), desc="stages", unit="stage",
               file=sys.stderr, disable=not run.progress)
    for k in range(len(state.history) + 1, schedule.stages + 1):
        if state.done:
            break
        row = run.stage(k, state)
        bar.update(1)
        quality = "-" if row.quality is None else f"{row.quality:.4g}"
        bar.set_postfix(ratio=f"{row.model_ratio:.3g}", quality=quality)
        log.info("stage %d: ratio %.3f, %d unique parameters, quality %s -> %s, loss %.4g",
                 k, row.model_ratio, row.unique_params, row.quality_fused, row.quality, row.train_loss)
        if on_stage is not None:
            on_stage(row)
    bar.close()
    result = run.result(state)
    env.close()  # only on success: leaving the group while another rank is mid-collective would hang it
    return result


def _from_plan(model: nn.Module, task: Task, fusion: FusionConfig, schedule: Schedule, batches: list[Any],
               output_fn: Any, checkpoint_dir: Any, progress: bool) -> RetrainResult:
    """Fuse once by the keep-function pipeline on ``batches``, then retrain from there."""
    from lfpass.core.keep import fuse_keeping
    from lfpass.fx.frontend import FxFrontend

    if schedule.stages != 1:
        raise ConfigError(f"calibration fuses once (by the plan menu or a budget), then retrains: pass stages=1, "
                          f"or drop calibration for the {schedule.stages}-stage schedule by weight similarity")
    if checkpoint_dir is not None or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("a run fused once from calibration retrains in one process, without stage checkpoints")
    if not batches:
        raise ConfigError("calibration: no batches given")
    kept = fuse_keeping(FxFrontend(model, example_inputs=batches[0], output_fn=output_fn), fusion, batches,
                        progress=progress)
    log.info("fused by the keep-function pipeline: %s", kept.plan.message)
    return retrain_fused(kept.model, kept.plan, model, task, schedule, progress=progress)


def retrain_fused(model: nn.Module, plan: FusionPlan, original: nn.Module, task: Task, schedule: Schedule, *,
                  progress: bool = True) -> RetrainResult:
    """Retrain ``model``, already fused by ``plan`` in one stage (by the keep-function pipeline:
    aligned, merged by data, corrected, under a budget), for ``schedule.steps_per_stage`` steps
    on ``task`` with its ties kept; one process. ``original`` (the unfused model) gives the
    quality the history starts from; ``model`` is retrained in place and returned in the result.
    Retraining that lowers the held-out quality is undone (the fused weights are kept, and said)."""
    if unique_parameters(model) != plan.params_after:
        raise TrainingError(f"the fused model has {unique_parameters(model)} unique parameters, "
                            f"its plan says {plan.params_after}")
    started = time.perf_counter()
    params_original, metrics_original = unique_parameters(original), task.evaluate(original)
    fused = task.evaluate(model)["quality"]
    before = copy.deepcopy(model.state_dict())
    torch.manual_seed(_seed(schedule.seed, 1, 0))
    optimizer = make_optimizer(schedule.optimizer, model.parameters(), schedule.lr, schedule.weight_decay)
    batches = task.train_batches(schedule.batch_size, seed=_seed(schedule.seed, 1))
    stats = train_steps(model, batches, task.loss, optimizer, schedule.steps_per_stage, lr_at=schedule.lr_at,
                        progress=progress, desc="retrain", postfix={"ratio": f"{plan.model_ratio:.3g}"},
                        frozen_norms=schedule.frozen_norms(isinstance(task, Distillation)))
    if stats.diverged:
        raise TrainingError(f"the loss became NaN or Inf after {stats.steps} steps; lower lr (now {schedule.lr:g})")
    metrics = task.evaluate(model)
    stopped = ""
    if _drop(task, fused, metrics["quality"]) > 0:  # retraining lost what the fused model had: keep that
        model.load_state_dict(before)
        stopped = (f"retraining lowered the held-out quality from {fused:.4g} to {metrics['quality']:.4g}; "
                   "the fused weights are kept")
        log.warning("%s", stopped)
        metrics = {**task.evaluate(model), "quality_retrained": metrics["quality"]}
    row = StageRow(1, plan.target_ratio or plan.model_ratio, len(plan.groups),
                   params_original / max(plan.params_after, 1), plan.layer_ratio, plan.params_after, fused,
                   metrics["quality"], metrics, stats.loss, stats.steps, time.perf_counter() - started)
    if unique_parameters(model) != plan.params_after:
        raise TrainingError("the retrained model's ties differ from its plan")
    return RetrainResult(model, [plan], [row], metrics_original, params_original, stopped)
