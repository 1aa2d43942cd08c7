"""Retrain and distil with the ties kept, on one machine or many.

The paper's iterative schedule: reach the fusion target in stages, each
planning on the current weights, fusing the next groups and retraining with
every fused tensor shared (one ``nn.Parameter`` held by several layers).

- :func:`retrain` runs the whole schedule (checkpoints, resume, ``max_drop``
  roll-back, torchrun/DDP) and returns a :class:`RetrainResult`;
- :class:`Schedule` holds the knobs (stages, steps, optimizer, freezing, ...);
- tasks: :class:`ImageClassification`, :class:`LanguageModeling`,
  :class:`Distillation` (from the original model, no labels needed), or any
  object with the :class:`Task` methods;
- the pieces, for toolchains: :func:`plan_stage`, :func:`fuse_stage` (the
  count-weighted merge), :func:`rebuild` (plans replayed onto the original),
  :func:`train_steps` (the generic loop), :func:`load_run` (a checkpoint).
"""

from lfpass.train.checkpoint import load as load_run
from lfpass.train.classify import ImageClassification
from lfpass.train.distil import Distillation, frozen_copy
from lfpass.train.errors import TrainingError
from lfpass.train.lm import LanguageModeling
from lfpass.train.loop import TrainStats, make_optimizer, train_steps
from lfpass.train.retrain import RetrainResult, StageRow, retrain, retrain_fused
from lfpass.train.schedule import Schedule
from lfpass.train.stages import fuse_stage, layer_counts, plan_stage, rebuild, scope_params
from lfpass.train.task import Task

__all__ = [
    "Distillation",
    "ImageClassification",
    "LanguageModeling",
    "RetrainResult",
    "Schedule",
    "StageRow",
    "retrain_fused",
    "Task",
    "TrainStats",
    "TrainingError",
    "frozen_copy",
    "fuse_stage",
    "layer_counts",
    "load_run",
    "make_optimizer",
    "plan_stage",
    "rebuild",
    "retrain",
    "scope_params",
    "train_steps",
]
