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

from lfpass.errors import ConfigError
from lfpass.merge import MERGE_RULES
from lfpass.metrics import METRICS

SCOPES = ("model", "layers")
KINDS = ("linear", "conv", "conv_transpose")
_META_KEYS = ("name", "description")


@dataclass(frozen=True)
class FusionConfig:
    """What to fuse and how far.

    ``target_ratio`` is unique parameters before / after over ``ratio_scope``
    (the whole model, or only the fusable layers). With ``threshold`` set,
    no pair less similar than it is merged; with only ``threshold``, every pair
    above it is merged. ``cross_role`` lets any same-signature layers share.
    """

    metric: str = "cosine"
    merge: str = "mean"
    target_ratio: float | None = 2.0
    threshold: float | None = None
    ratio_scope: str = "model"
    cross_role: bool = False
    max_group_size: int | None = None
    kinds: tuple[str, ...] = KINDS
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    min_params: int = 0
    seed: int = 0
    atol: float = 1e-3
    rtol: float = 1e-2
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ConfigError(f"metric: unknown {self.metric!r} (known: {', '.join(METRICS)})")
        if self.merge not in MERGE_RULES:
            raise ConfigError(f"merge: unknown rule {self.merge!r} (known: {', '.join(MERGE_RULES)})")
        if self.target_ratio is not None:
            r = self.target_ratio
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r <= 1.0:
                raise ConfigError(f"target_ratio: must be a finite number > 1, got {r!r}")
        if self.threshold is not None and (
            isinstance(self.threshold, bool)
            or not isinstance(self.threshold, (int, float))
            or not math.isfinite(self.threshold)
        ):
            raise ConfigError(f"threshold: must be a finite number, got {self.threshold!r}")
        if self.target_ratio is None and self.threshold is None:
            raise ConfigError("target_ratio and threshold: set at least one")
        if self.ratio_scope not in SCOPES:
            raise ConfigError(f"ratio_scope: must be one of {SCOPES}, got {self.ratio_scope!r}")
        if self.max_group_size is not None and (
            isinstance(self.max_group_size, bool) or not isinstance(self.max_group_size, int) or self.max_group_size < 2
        ):
            raise ConfigError(f"max_group_size: must be an integer >= 2, got {self.max_group_size!r}")
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ConfigError(f"kinds: unknown {bad or 'empty list'} (known: {', '.join(KINDS)})")
        for name in ("atol", "rtol"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"{name}: must be a finite number >= 0, got {v!r}")
        if isinstance(self.min_params, bool) or not isinstance(self.min_params, int) or self.min_params < 0:
            raise ConfigError(f"min_params: must be an integer >= 0, got {self.min_params!r}")

    def replace(self, **changes: Any) -> "FusionConfig":
        """A copy with ``changes`` applied; ``None`` values are ignored (unset CLI flags)."""
        return from_mapping({**self.to_dict(), **{k: v for k, v in changes.items() if v is not None}})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


_FIELDS = {f.name: f for f in dataclasses.fields(FusionConfig)}
_TUPLE_FIELDS = {"kinds", "include", "exclude"}
_BOOL_FIELDS = {"cross_role"}
_STR_FIELDS = {"metric", "merge", "ratio_scope", "name"}
_OPTIONAL_FIELDS = {"target_ratio", "threshold", "max_group_size"}  # TOML has no null: "none" or false


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
        elif key in _TUPLE_FIELDS:
            if isinstance(value, str) or not isinstance(value, (list, tuple)):
                raise ConfigError(f"{source}: {key} must be a list of strings, got {value!r}")
            value = tuple(str(v) for v in value)
        elif key in _BOOL_FIELDS and not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
        elif key in _STR_FIELDS and not isinstance(value, str):
            raise ConfigError(f"{source}: {key} must be a string, got {value!r}")
        kwargs[key] = value
    try:
        return FusionConfig(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_pipeline(path: str | Path) -> FusionConfig:
    """Read a ``passes/*.toml`` pipeline into a validated :class:`FusionConfig`."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such pipeline file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    data.setdefault("name", path.stem)
    return from_mapping(data, source=str(path))
