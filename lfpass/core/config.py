"""One options object for the Python API, the CLI and ``passes/*.toml``.

A pipeline file is flat TOML whose keys are the fields of :class:`FusionConfig`
(plus ``name`` and ``description``). Loading validates every key and value and
names the bad one, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from lfpass.core.errors import ConfigError, first_line
from lfpass.core.metrics import METRICS
from lfpass.core.rules import MERGE_RULES

SCOPES = ("model", "layers")
KINDS = ("linear", "conv", "conv_transpose", "attention", "mlp")
GRANULARITIES = ("tensor", "block")
QUANTIZE = ("none", "int8", "int8-weights", "int4")  # after fusion, onnxruntime's quantizers (lfpass.onnx.quantize)
ALIGNMENTS = ("none", "weights", "activations")
ERROR_METRICS = ("cosine", "top1", "accuracy")
POOLINGS = ("none", "mean", "cls")
AUTO = "auto"
# what "auto" becomes: without calibration inputs, and with them (measured in docs/BUDGET_REAL.md)
PLAIN_DEFAULTS = {"merge": "mean", "align": "none"}
DATA_DEFAULTS = {"merge": "regmean", "align": "weights"}
MEASURED_MERGES = ("regmean", "mean")  # under a budget, an "auto" merge is measured per group among these
MEASURED_ALIGNS = ("weights", "none")  # ... and an "auto" alignment per plan among these
COLLAPSE = "collapse"  # remove whole residual blocks (lfpass.core.collapse): asked for, never auto
ACTIONS = ("tie", "residual", "basis", "lowrank")  # the plan menu (lfpass.core.menu); "tie" alone: the tie planners
_META_KEYS = ("name", "description")
_MEASURING = ("error_output", "pooling", "margin")
_TUPLE_FIELDS = ("kinds", "include", "exclude")
_STR_FIELDS = ("metric", "merge", "ratio_scope", "granularity", "align", "error_metric", "quantize", "name")


def _is_number(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, int)


@dataclass(frozen=True)
class FusionConfig:
    """What to fuse and how far.

    ``target_ratio`` is unique parameters before / after over ``ratio_scope``
    (the whole model, or only the fusable layers). With ``threshold`` set,
    no pair less similar than it is merged; with only ``threshold``, every pair
    above it is merged. ``cross_role`` lets any same-signature layers share.
    ``max_overshoot`` bounds how far past ``target_ratio`` the plan may land
    (in ratio units over the scope); unset, an overshoot is reported.
    ``granularity`` is ``"tensor"`` (each projection by role, the paper's way)
    or ``"block"`` (one decision fuses a whole attention or MLP unit).
    Output heads (``lm_head``, ``classifier``, ``pooler``, ``head``) are left
    alone unless ``heads``.

    Keeping the function (these need calibration inputs): ``max_error`` is a
    budget on the output error measured on held-out calibration inputs
    (``error_metric``: ``"cosine"``, 1 - mean output cosine; ``"top1"``,
    1 - top-1 agreement; ``"accuracy"``, the drop in accuracy when labels are
    given); planning then picks groups by measured damage per parameter saved
    and stops at the budget (or at ``target_ratio``, if set, saying what it
    costs). ``holdout`` is the share of calibration batches kept apart to
    measure the error. ``align`` moves each member into its anchor's
    coordinates first by transforms that leave the function unchanged
    (``"weights"`` or ``"activations"`` matching). ``residual_rank`` > 0 gives
    every member its own rank-r correction to the shared tensor, counted in
    the ratio. ``merge`` and ``align`` are ``"auto"`` unless set: the plain
    mean and no alignment without calibration inputs; with them RegMean and
    alignment by weights (:meth:`resolved`), and under a budget each group's
    merge and the plan's alignment are chosen by measured error.

    ``actions`` is the plan menu (:mod:`lfpass.core.menu`): ``"tie"`` (today's
    fusion), ``"residual"`` (a tie plus each member's own low-rank part),
    ``"basis"`` (a shared basis with per-member coefficients) and
    ``"lowrank"`` (per-layer activation-aware SVD); the planner spends the
    ratio or the budget on the least damage per parameter saved among them.
    ``"collapse"`` removes whole residual blocks, least influential first
    (:mod:`lfpass.core.collapse`), so inference runs fewer layers; it needs
    calibration inputs. Alone, it reaches the ratio or the budget by blocks;
    with other actions (and ``max_error``, which it then needs) it removes as
    many blocks as keep the budget while the other actions still reach the
    target within it on the layers left, and plans those.
    ``"auto"``: the full menu when calibration inputs come and a ratio or a
    budget is asked for, unless an option only the tie planners honour is
    set (``align`` other than auto, ``residual_rank``, ``metric='output'``,
    ``granularity='block'``); else ties alone.

    ``quantize`` (``"int8"``, ``"int8-weights"``, ``"int4"``; ``"none"`` by
    default) quantizes the written ONNX model after fusion with onnxruntime's
    quantizers, each shared tensor once (:mod:`lfpass.onnx.quantize`); under
    ``max_error`` the budget holds for the fused and quantized model, each
    weight at its own width.

    What the error is measured on: ``error_output`` (one output by name;
    default every floating-point output) pooled by ``pooling`` over its second
    axis (``"mean"`` over the ``attention_mask`` input where there is one,
    ``"cls"`` the first position, ``"none"``, or a callable
    ``(output, mask) -> array``). A budget is kept with a ``margin``: the
    planner accepts a step only while the error it measured plus ``margin``
    standard errors (over the samples it chooses on) is within ``max_error``.

    Every field is checked on construction, from Python as from a pipeline
    file: a wrong type is a :class:`ConfigError` naming the field, never a
    failure later in planning.
    """

    metric: str = "cosine"
    merge: str = AUTO
    target_ratio: float | None = 2.0
    threshold: float | None = None
    ratio_scope: str = "model"
    cross_role: bool = False
    max_group_size: int | None = None
    max_overshoot: float | None = None
    granularity: str = "tensor"
    heads: bool = False
    max_error: float | None = None
    error_metric: str = "cosine"
    holdout: float = 0.25
    margin: float = 1.645
    error_output: str | None = None
    pooling: Any = "none"
    align: str = AUTO
    residual_rank: int = 0
    actions: Any = AUTO
    quantize: str = "none"
    kinds: tuple[str, ...] = KINDS
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    min_params: int = 0
    seed: int = 0
    atol: float = 1e-3
    rtol: float = 1e-2
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        for name in _TUPLE_FIELDS:  # a list from Python or TOML becomes a tuple; a bare string is a mistake
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(
                isinstance(v, str) for v in value
            ):
                raise ConfigError(f"{name}: must be a list of strings, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        for name in _STR_FIELDS:
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name}: must be a string, got {getattr(self, name)!r}")
        for name in ("cross_role", "heads"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}: must be true or false, got {getattr(self, name)!r}")
        if self.quantize not in QUANTIZE:
            raise ConfigError(f"quantize: must be one of {', '.join(QUANTIZE)}, got {self.quantize!r}")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"granularity: must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.metric not in METRICS:
            raise ConfigError(f"metric: unknown {self.metric!r} (known: {', '.join(METRICS)})")
        if self.merge != AUTO and self.merge not in MERGE_RULES:
            raise ConfigError(f"merge: unknown rule {self.merge!r} (known: {AUTO}, {', '.join(MERGE_RULES)})")
        if self.target_ratio is not None and not (_is_number(self.target_ratio) and self.target_ratio >= 1.0):
            raise ConfigError(f"target_ratio: must be a finite number >= 1 (1: fuse nothing), got "
                              f"{self.target_ratio!r}")
        if self.threshold is not None and not _is_number(self.threshold):
            raise ConfigError(f"threshold: must be a finite number, got {self.threshold!r}")
        if self.target_ratio is None and self.threshold is None and self.max_error is None:
            raise ConfigError("target_ratio, threshold and max_error: set at least one")
        if self.max_error is not None and not (_is_number(self.max_error) and self.max_error >= 0):
            raise ConfigError(f"max_error: must be a finite number >= 0, got {self.max_error!r}")
        if self.error_metric not in ERROR_METRICS:
            raise ConfigError(f"error_metric: must be one of {ERROR_METRICS}, got {self.error_metric!r}")
        top = 2.0 if self.error_metric == "cosine" else 1.0  # 1 - cosine reaches 2; a share of samples, 1
        if self.max_error is not None and self.max_error > top:
            raise ConfigError(f"max_error: {self.max_error:g} is past any error error_metric {self.error_metric!r} "
                              f"can measure (its errors lie in [0, {top:g}]); give a budget of at most {top:g}")
        if not (_is_number(self.holdout) and 0 < self.holdout < 1):
            raise ConfigError(f"holdout: must be a number between 0 and 1, got {self.holdout!r}")
        if self.align != AUTO and self.align not in ALIGNMENTS:
            raise ConfigError(f"align: must be one of {(AUTO, *ALIGNMENTS)}, got {self.align!r}")
        if not (_is_number(self.margin) and self.margin >= 0):
            raise ConfigError(f"margin: must be a finite number >= 0 (standard errors), got {self.margin!r}")
        if self.error_output is not None and not (isinstance(self.error_output, str) and self.error_output):
            raise ConfigError(f"error_output: must be an output's name, got {self.error_output!r}")
        if not (callable(self.pooling) or self.pooling in POOLINGS):
            raise ConfigError(f"pooling: must be one of {POOLINGS} or a callable (output, mask) -> array, "
                              f"got {self.pooling!r}")
        if self.actions != AUTO:
            value = self.actions.split(",") if isinstance(self.actions, str) else self.actions
            if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"actions: must be {AUTO!r} or a list of {ACTIONS}, got {self.actions!r}")
            value = tuple(v.strip() for v in value)
            bad = [v for v in value if v not in (*ACTIONS, COLLAPSE)]
            if bad:
                raise ConfigError(f"actions: unknown {bad[0]!r} (known: {', '.join((*ACTIONS, COLLAPSE))})")
            if COLLAPSE in value and len(set(value)) > 1 and self.max_error is None:
                raise ConfigError(f"actions: {COLLAPSE!r} with {', '.join(v for v in value if v != COLLAPSE)} "
                                  f"removes as many blocks as a budget keeps, then plans the rest: give max_error")
            object.__setattr__(self, "actions", tuple(dict.fromkeys(value)))
        if not (_is_int(self.residual_rank) and self.residual_rank >= 0):
            raise ConfigError(f"residual_rank: must be an integer >= 0, got {self.residual_rank!r}")
        if self.ratio_scope not in SCOPES:
            raise ConfigError(f"ratio_scope: must be one of {SCOPES}, got {self.ratio_scope!r}")
        if self.max_group_size is not None and not (_is_int(self.max_group_size) and self.max_group_size >= 2):
            raise ConfigError(f"max_group_size: must be an integer >= 2, got {self.max_group_size!r}")
        if self.max_overshoot is not None and not (_is_number(self.max_overshoot) and self.max_overshoot >= 0):
            raise ConfigError(f"max_overshoot: must be a finite number >= 0, got {self.max_overshoot!r}")
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ConfigError(f"kinds: unknown {bad or 'empty list'} (known: {', '.join(KINDS)})")
        for name in ("atol", "rtol"):
            v = getattr(self, name)
            if not (_is_number(v) and v >= 0):
                raise ConfigError(f"{name}: must be a finite number >= 0, got {v!r}")
        if not (_is_int(self.min_params) and self.min_params >= 0):
            raise ConfigError(f"min_params: must be an integer >= 0, got {self.min_params!r}")
        if not (_is_int(self.seed) and 0 <= self.seed < 2**63):
            raise ConfigError(f"seed: must be an integer from 0 to 2**63 - 1, got {self.seed!r}")

    @property
    def merge_rule(self) -> str:
        """The merge rule used: ``merge``, with ``"auto"`` read as it is without calibration inputs."""
        return PLAIN_DEFAULTS["merge"] if self.merge == AUTO else self.merge

    @property
    def alignment(self) -> str:
        """The alignment used: ``align``, with ``"auto"`` read as it is without calibration inputs."""
        return PLAIN_DEFAULTS["align"] if self.align == AUTO else self.align

    def resolved(self, has_data: bool) -> "FusionConfig":
        """This config with ``"auto"`` made concrete: the data-aware merge and alignment when
        calibration inputs come (``has_data``), else the plain ones. Set fields stay as set."""
        defaults = DATA_DEFAULTS if has_data else PLAIN_DEFAULTS
        auto = {k: v for k, v in defaults.items() if getattr(self, k) == AUTO}
        return self.replace(**auto) if auto else self

    def menu(self, has_data: bool) -> tuple[str, ...]:
        """The plan actions to choose among (``actions``, with ``"auto"`` made concrete; depth
        collapse is planned before them, not among them)."""
        if self.actions != AUTO:
            return tuple(a for a in self.actions if a != COLLAPSE)
        tie_only = (self.align not in (AUTO, "none") or self.residual_rank > 0 or self.metric == "output"
                    or self.granularity == "block" or (self.target_ratio is None and self.max_error is None))
        return ("tie",) if not has_data or tie_only else ACTIONS

    def uses_menu(self, has_data: bool) -> bool:
        """Whether planning goes through the menu (any action beside ties, and something to aim at)."""
        return bool(set(self.menu(has_data)) - {"tie"}) and (self.target_ratio is not None
                                                            or self.max_error is not None)

    @property
    def collapses(self) -> bool:
        """Whether the plan removes whole residual blocks (``"collapse"`` among the ``actions``)."""
        return self.actions != AUTO and COLLAPSE in self.actions

    @property
    def auto_fields(self) -> tuple[str, ...]:
        """The fields left to ``"auto"``."""
        return tuple(k for k in (*DATA_DEFAULTS, "actions") if getattr(self, k) == AUTO)

    @property
    def measuring(self) -> tuple[str, ...]:
        """The options set here that say how an output error is measured (they need calibration inputs)."""
        return tuple(f for f in _MEASURING if getattr(self, f) != _FIELDS[f].default)

    @property
    def needs_calibration(self) -> bool:
        """Whether these options need calibration inputs (statistics or measured error)."""
        return (self.max_error is not None or self.alignment == "activations" or self.metric == "output"
                or self._merges_by_data or self.collapses)

    @property
    def keeps_function(self) -> bool:
        """Whether these options ask for the calibrated path: statistics, alignment,
        per-member corrections or a budget (see :mod:`lfpass.core.keep`)."""
        return self.needs_calibration or self.alignment != "none" or self.residual_rank > 0

    @property
    def uses_statistics(self) -> bool:
        """Whether building a fused model reads the layers' input statistics (else calibration
        inputs only measure the error)."""
        return (self.alignment == "activations" or self._merges_by_data or self.metric == "output"
                or self.residual_rank > 0)

    @property
    def _merges_by_data(self) -> bool:
        """Whether the merge rule weighs members by their calibration statistics (as RegMean does)."""
        rule = MERGE_RULES.get(self.merge_rule)
        return rule is not None and rule.uses_stats

    def replace(self, **changes: Any) -> "FusionConfig":
        """A copy with ``changes`` applied, checked like any config. ``None`` is a value
        (``target_ratio=None`` unsets the target); only the CLI reads ``None`` as "not given"."""
        return from_mapping({**self.to_dict(), **changes}, source="config")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


_FIELDS = {f.name: f for f in dataclasses.fields(FusionConfig)}
_OPTIONAL_FIELDS = {"target_ratio", "threshold", "max_group_size", "max_overshoot", "max_error", "error_output"}  # TOML has no null: "none" or false


def from_mapping(data: Mapping[str, Any], source: str = "config") -> FusionConfig:
    """Build a config from a mapping, naming any unknown key or mistyped value."""
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key == "description":
            continue
        if key not in _FIELDS:
            raise ConfigError(f"{source}: unknown key {key!r} (known: {', '.join(sorted(_FIELDS))})")
        if key in _OPTIONAL_FIELDS and (value is False or value == "none"):
            value = None
        kwargs[key] = value
    try:
        return FusionConfig(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def read_pipeline(path: Path) -> dict[str, Any]:
    """A pipeline file's TOML as a dict, or one :class:`ConfigError` line saying why not."""
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a pipeline file")
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such pipeline file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the pipeline ({exc.strerror or exc})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({first_line(exc)})") from None
    return data


def load_pipeline(path: str | Path) -> FusionConfig:
    """Read a ``passes/*.toml`` pipeline into a validated :class:`FusionConfig`."""
    path = Path(path)
    data = read_pipeline(path)
    if isinstance(data.get("train"), dict):
        del data["train"]  # a retraining recipe (lfpass.recipe), read by `lfpass retrain`
    data.setdefault("name", path.stem)
    return from_mapping(data, source=str(path))
