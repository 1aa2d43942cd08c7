"""Checkpoints after every stage, written so that a kill at any instant leaves a usable one.

A checkpoint folder holds ``run.json`` (what the run is: its fusion config,
schedule, the stage plans so far, the history, the original quality) and one
``stage-NNN.pt`` (the fused model's state dict, the optimizer's state, every
rank's RNG state). The state file is written first under its own new name,
then ``run.json`` is replaced to point at it (both atomically), then older
state files are removed: ``run.json`` always names a complete state file.

Resuming rebuilds the model from the original by re-applying the stage plans
in order (that recreates the ties), then loads the state dict into it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lfpass.core.config import FusionConfig, from_mapping
from lfpass.core.errors import ConfigError, InputError, OutputError, PlanError
from lfpass.core.fileio import atomic_path, write_text
from lfpass.core.plan import FusionPlan
from lfpass.train.schedule import Schedule

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
VERSION = 1


@dataclass
class Saved:
    """A run as its checkpoint holds it."""

    stage: int  # stages finished (a rolled-back stage counts: it was decided)
    plans: list[FusionPlan]
    history: list[dict[str, Any]]
    metrics_original: dict[str, float]
    done: bool = False
    stopped: str = ""
    state: dict[str, Any] = field(default_factory=dict)  # model, optimizer, rng


def rng_state() -> dict[str, Any]:
    """This process's torch RNG states (CPU and, where present, CUDA)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(folder: str | Path, saved: Saved, fusion: FusionConfig, schedule: Schedule, params_original: int,
         model: nn.Module, optimizer: torch.optim.Optimizer | None, rngs: list[dict[str, Any]]) -> Path:
    """Write the checkpoint of ``saved`` (call on one rank only); returns ``run.json``'s path."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot create the checkpoint folder ({exc.strerror})") from None
    name = f"stage-{saved.stage:03d}.pt"
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict() if optimizer else None, "rng": rngs}
    with atomic_path(folder / name) as tmp:
        torch.save(state, tmp)
    run = {
        "version": VERSION, "stage": saved.stage, "state": name, "done": saved.done, "stopped": saved.stopped,
        "fusion": {k: v for k, v in fusion.to_dict().items() if k != "name"}, "schedule": schedule.to_dict(),
        "params_original": params_original, "metrics_original": saved.metrics_original,
        "plans": [json.loads(p.to_json()) for p in saved.plans], "history": saved.history,
    }
    path = write_text(folder / RUN_FILE, json.dumps(run, indent=1))
    for old in folder.glob("stage-*.pt"):
        if old.name != name:
            old.unlink(missing_ok=True)
    log.info("checkpoint: stage %d in %s", saved.stage, folder)
    return path


def exists(folder: str | Path | None) -> bool:
    return folder is not None and (Path(folder) / RUN_FILE).is_file()


def load(folder: str | Path, fusion: FusionConfig, schedule: Schedule, params_original: int,
         map_location: torch.device | str = "cpu") -> Saved:
    """Read a checkpoint, refusing one made for another config, schedule or model."""
    folder = Path(folder)
    try:
        run = json.loads((folder / RUN_FILE).read_text())
        if run.get("version") != VERSION:
            raise InputError(f"{folder / RUN_FILE}: checkpoint version {run.get('version')!r}, expected {VERSION}")
        _check_same(run, fusion, schedule, params_original, folder)
        plans = [FusionPlan.from_json(json.dumps(p)) for p in run["plans"]]
        state = torch.load(folder / run["state"], map_location=map_location, weights_only=True)
    except (OSError, ValueError, KeyError, TypeError, PlanError) as exc:
        raise InputError(f"{folder}: not a readable lfpass checkpoint ({exc})") from None
    return Saved(run["stage"], plans, run["history"], run["metrics_original"], run["done"], run["stopped"], state)


def _check_same(run: dict[str, Any], fusion: FusionConfig, schedule: Schedule, params: int, folder: Path) -> None:
    if from_mapping(run["fusion"], source=str(folder)) != fusion:
        raise ConfigError(f"{folder}: the checkpoint was made with another fusion config; resume with the same one")
    if Schedule.from_dict(run["schedule"]) != schedule:
        raise ConfigError(f"{folder}: the checkpoint was made with another schedule; resume with the same one")
    if run["params_original"] != params:
        raise ConfigError(f"{folder}: the checkpoint was made for a model of {run['params_original']} parameters, "
                          f"not this one of {params}")
