"""Retraining recipes: a ``passes/*.toml`` pipeline with a ``[train]`` section.

The top level holds :class:`~lfpass.core.config.FusionConfig` fields (what to fuse
and how far); ``[train]`` says what to retrain on and how, validated on load
with the bad key named::

    target_ratio = 3.33
    [train]
    model = "lfpass.demo.cnn:build_cnn"   # MODULE:FACTORY, path/file.py:FACTORY, or a .onnx file
    weights = "lfpass-demo/model.pt"      # optional: a state dict to load first (the trained model)
    task = "classification"               # classification | language_modeling | distillation
    data = "mnist"                        # see TrainRecipe
    stages = 4                            # and any other lfpass.train.Schedule field
    steps_per_stage = 200
    output = "cnn.fused.onnx"             # optional: export the result, ties kept

:func:`build_task` turns a recipe into an :class:`lfpass.train.Task`;
``lfpass retrain --pipeline FILE`` runs it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from lfpass.core.config import FusionConfig, from_mapping, read_pipeline
from lfpass.core.errors import ConfigError, InputError, first_line

TASKS = ("classification", "language_modeling", "distillation")


@dataclass(frozen=True)
class TrainRecipe:
    """What ``lfpass retrain`` trains on.

    ``data`` by task: classification: ``"mnist"``, ``"digits"``, an ``.npz``
    (``x``, ``y``), a folder of images per class, or a CIFAR-10 folder
    (``cifar-10-batches-py``); language_modeling: a ``.txt`` or a folder of
    them, or a WikiText-2 folder (``wiki.train.tokens``); distillation: an
    ``.npz`` of inputs (samples along the first axis; for an ONNX model named
    after its inputs, for a factory ``x`` or ``arg0, arg1, ...``).
    ``weights``: a ``torch.save``-d state dict to load into the factory's
    model first (the trained model to compress). ``schedule`` holds the :class:`lfpass.train.Schedule` fields given."""

    model: str
    task: str
    data: str = ""
    weights: str = ""
    output: str = ""
    checkpoint_dir: str = ""
    seq_len: int = 64
    level: str = "word"
    eval_fraction: float = 0.1
    schedule: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError("train.model: must name a MODULE:FACTORY or a .onnx file")
        if self.task not in TASKS:
            raise ConfigError(f"train.task: must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.task == "distillation" and not self.data:
            raise ConfigError("train.data: distillation needs an .npz of inputs")
        if self.model.endswith(".onnx") and self.task != "distillation":
            raise ConfigError("train.task: an ONNX model has no training code here; use task = \"distillation\"")

    def make_schedule(self, **overrides: Any) -> Any:
        from lfpass.train import Schedule

        try:
            return Schedule(**{**self.schedule, **{k: v for k, v in overrides.items() if v is not None}})
        except TypeError as exc:
            raise ConfigError(f"train: {first_line(exc)}") from None


_RECIPE_FIELDS = {f.name for f in dataclasses.fields(TrainRecipe)} - {"schedule"}


def parse_recipe(data: Mapping[str, Any], source: str) -> TrainRecipe:
    """A ``[train]`` table as a :class:`TrainRecipe`; unknown keys are named."""
    from lfpass.train import Schedule

    schedule_fields = {f.name for f in dataclasses.fields(Schedule)}
    own = {k: v for k, v in data.items() if k in _RECIPE_FIELDS}
    schedule = {k: v for k, v in data.items() if k in schedule_fields}
    unknown = sorted(set(data) - set(own) - set(schedule))
    if unknown:
        known = ", ".join(sorted(_RECIPE_FIELDS | schedule_fields))
        raise ConfigError(f"{source}: [train] has an unknown key {unknown[0]!r} (known: {known})")
    try:
        recipe = TrainRecipe(**own, schedule=schedule)
        recipe.make_schedule()  # check the schedule's values now, naming the bad one
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return recipe


def load_recipe(path: str | Path) -> tuple[FusionConfig, TrainRecipe]:
    """A pipeline file with a ``[train]`` section: its fusion config and its recipe."""
    path = Path(path)
    data = read_pipeline(path)
    train = data.pop("train", None)
    if not isinstance(train, dict):
        raise ConfigError(f"{path}: no [train] section: say what to retrain on (see passes/retrain-mnist.toml)")
    data.setdefault("name", path.stem)
    return from_mapping(data, source=str(path)), parse_recipe(train, str(path))


def build_task(recipe: TrainRecipe, model: Any = None, seed: int = 0) -> Any:
    """The :class:`lfpass.train.Task` the recipe names (``model`` is the teacher to distil from)."""
    from lfpass import train

    data = recipe.data
    if recipe.task == "classification":
        if data in ("", "mnist"):
            return train.ImageClassification.mnist_digits(seed=seed)
        if data == "digits":
            from lfpass.data import sklearn_digits

            return train.ImageClassification.from_split(sklearn_digits(seed=seed))
        where = _existing(data)
        if where.suffix == ".npz":
            return train.ImageClassification.from_npz(where, seed=seed)
        if (where / "cifar-10-batches-py").is_dir() or where.name == "cifar-10-batches-py":
            return train.ImageClassification.cifar10(where)
        return train.ImageClassification.from_folder(where)
    if recipe.task == "language_modeling":
        where = _existing(data)
        if where.is_dir() and (any(where.glob("wiki.train.tokens")) or any(where.glob("*/wiki.train.tokens"))):
            return train.LanguageModeling.wikitext2(where, seq_len=recipe.seq_len)
        return train.LanguageModeling.from_text(where, level=recipe.level, seq_len=recipe.seq_len)
    inputs = load_inputs(_existing(data))
    return train.Distillation.from_model(model, inputs, eval_fraction=recipe.eval_fraction, seed=seed)


def load_inputs(path: Path) -> Any:
    """Inputs for distilling a PyTorch model: ``x`` alone, or ``arg0, arg1, ...`` as positional arguments."""
    import numpy as np
    import torch

    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable .npz of inputs ({first_line(exc)})") from None
    if set(arrays) == {"x"}:
        return torch.from_numpy(arrays["x"])
    names = [f"arg{i}" for i in range(len(arrays))]
    if sorted(arrays) != sorted(names):
        raise InputError(f"{path}: name the inputs x, or arg0, arg1, ... in call order (found {sorted(arrays)})")
    return tuple(torch.from_numpy(arrays[n]) for n in names)


def _existing(data: str) -> Path:
    if not data:
        raise ConfigError("train.data: this task needs data (a file or a folder)")
    path = Path(data)
    if not path.exists():
        raise InputError(f"train.data: {path}: no such file or folder")
    return path


def load_weights(model: Any, path: str) -> None:
    """Load a ``torch.save``-d state dict (or a checkpoint holding ``state_dict``) into ``model``."""
    import torch

    try:
        state = torch.load(_existing(path), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise InputError(f"train.weights: {path}: not a readable state dict ({first_line(exc)})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"train.weights: {path}: does not fit the model ({first_line(exc)})") from None
