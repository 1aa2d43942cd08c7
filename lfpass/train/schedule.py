"""The retraining schedule: how many stages, how long each retrains, and how.

The paper compresses in steps during retraining rather than at once: each
stage fuses a little more and retrains with the ties kept, so the network
adapts to one fusion before the next. :class:`Schedule` holds every knob of
that loop (the fusion itself is a :class:`~lfpass.core.config.FusionConfig`), is
checked on construction like the config, and round-trips through a dict so a
checkpoint can refuse to resume under a different schedule.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

from lfpass.core.errors import ConfigError

OPTIMIZERS = ("adamw", "adam", "sgd")
SPACINGS = ("geometric", "linear")
DECAYS = ("cosine", "constant")
NORM_STATS = ("auto", "update", "frozen")


def _number(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def _count(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, int) and v >= 0


@dataclass(frozen=True)
class Schedule:
    """Reach the fusion target in ``stages`` steps, retraining ``steps_per_stage`` after each.

    ``spacing`` places the stage targets between 1 and the final ratio:
    ``"geometric"`` (the default: every stage multiplies the ratio by the same
    factor, so each removes the same share of what is left) or ``"linear"``.
    ``batch_size`` is the global batch: under torchrun each rank takes an
    equal part of it. The learning rate warms up linearly over ``warmup``
    steps, then follows ``decay`` within each stage. For the first
    ``freeze_steps`` of a stage the tensors that stage fused get no updates
    while the rest of the network adapts to them (the paper's freezing).
    Quality is measured after every ``eval_every`` stages (0: only at the
    start and the end; every stage when ``max_drop`` is set); with
    ``max_drop`` a stage whose quality falls more than that below the
    original (in the task's own units) is rolled back and the run stops.
    ``norm_stats``: whether BatchNorm running statistics are re-estimated while
    retraining (``"update"``) or stay the original's, those layers kept in eval
    mode (``"frozen"``); ``"auto"`` freezes them when distilling on calibration
    inputs (a few small batches estimate them worse than the original's
    training did) and updates them when retraining on a task's training data.
    """

    stages: int = 4
    steps_per_stage: int = 100
    lr: float = 1e-3
    batch_size: int = 32
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    warmup: int = 0
    decay: str = "cosine"
    freeze_steps: int = 0
    max_drop: float | None = None
    eval_every: int = 1
    spacing: str = "geometric"
    seed: int = 0
    norm_stats: str = "auto"

    def __post_init__(self) -> None:
        for name in ("stages", "batch_size"):
            if not (_count(getattr(self, name)) and getattr(self, name) >= 1):
                raise ConfigError(f"{name}: must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("steps_per_stage", "warmup", "freeze_steps", "eval_every", "seed"):
            if not _count(getattr(self, name)):
                raise ConfigError(f"{name}: must be an integer >= 0, got {getattr(self, name)!r}")
        if not (_number(self.lr) and self.lr > 0):
            raise ConfigError(f"lr: must be a finite number > 0, got {self.lr!r}")
        if not (_number(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"weight_decay: must be a finite number >= 0, got {self.weight_decay!r}")
        if self.max_drop is not None and not (_number(self.max_drop) and self.max_drop >= 0):
            raise ConfigError(f"max_drop: must be a finite number >= 0, got {self.max_drop!r}")
        for name, known in (("optimizer", OPTIMIZERS), ("spacing", SPACINGS), ("decay", DECAYS),
                            ("norm_stats", NORM_STATS)):
            if getattr(self, name) not in known:
                raise ConfigError(f"{name}: must be one of {', '.join(known)}, got {getattr(self, name)!r}")

    def targets(self, final: float) -> list[float]:
        """The ratio (against the original model) each stage reaches, the last being ``final``."""
        k = self.stages
        if self.spacing == "geometric":
            return [final ** (i / k) for i in range(1, k + 1)]
        return [1.0 + (final - 1.0) * i / k for i in range(1, k + 1)]

    def evaluates(self, stage: int) -> bool:
        """Whether quality is measured after ``stage`` (1-based)."""
        if self.max_drop is not None or stage == self.stages:
            return True
        return self.eval_every > 0 and stage % self.eval_every == 0

    def lr_at(self, step: int) -> float:
        """The learning rate for ``step`` (0-based) of a stage: warm-up, then the decay."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.decay == "constant":
            return self.lr
        span = max(self.steps_per_stage - self.warmup, 1)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * (step - self.warmup) / span))

    def frozen_norms(self, distilling: bool) -> bool:
        """Whether BatchNorm statistics stay fixed while retraining (``auto``: when ``distilling``)."""
        return self.norm_stats == "frozen" or (self.norm_stats == "auto" and distilling)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Schedule":
        """A schedule from a mapping (a checkpoint, a pipeline's table), naming any unknown key."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"schedule: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
        return cls(**data)
