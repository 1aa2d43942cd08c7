"""Inputs to run a model on: generated from its signature, or read from an ``.npz`` file.

Generated inputs have the graph's dtypes. A dynamic dimension takes, in
order: the shape given for that input (``--input-shape ids:1x16``), the value
already chosen for a dimension of the same name on another input (so
``input_ids`` and ``attention_mask`` agree on ``seq``), or a default: 1 for
the first (batch) dimension, 224 for the two spatial dimensions of a 4-D
input, 16 otherwise. Values: floats are standard normal; integer inputs whose
name says ``mask`` are ones, other integers are drawn below the row count of
the embedding table they index (found by following the input to a
``Gather``), or from {0, 1} when there is none; booleans are true.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from lfpass.errors import ConfigError, InputError

Feeds = dict[str, np.ndarray]
_FOLLOW = ("Cast", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Identity")


def parse_input_shapes(specs: Sequence[str] | None) -> dict[str, tuple[int, ...]]:
    """``["x:1x3x224x224", "ids:2x16"]`` -> ``{"x": (1, 3, 224, 224), "ids": (2, 16)}``."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs or ():
        name, sep, dims = spec.rpartition(":")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x")) if dims else ()
        except ValueError:
            shape = ()
        if not sep or not name or not shape or any(d < 0 for d in shape):
            raise ConfigError(f"--input-shape {spec!r}: expected NAME:DIMxDIM..., e.g. input:1x3x224x224")
        shapes[name] = shape
    return shapes


def runtime_inputs(model: ir.Model) -> list[ir.Value]:
    """The inputs a caller must feed (an initializer listed as an input has a default)."""
    return [v for v in model.graph.inputs if not v.is_initializer()]


def _shape(value: ir.Value, given: tuple[int, ...] | None, bound: dict[str, int]) -> tuple[int, ...]:
    dims = list(value.shape.dims) if value.shape is not None else None
    if given is not None:
        if dims is not None and len(dims) != len(given):
            raise ConfigError(
                f"--input-shape {value.name}: the model's input has {len(dims)} dimensions, got {len(given)}"
            )
        for dim, size in zip(dims or (), given):
            if isinstance(dim, int) and dim != size:
                raise ConfigError(f"--input-shape {value.name}: dimension fixed at {dim} in the model, got {size}")
            if not isinstance(dim, int) and getattr(dim, "value", None):
                bound.setdefault(str(dim.value), size)
        return tuple(given)
    if dims is None:
        raise ConfigError(f"input {value.name!r} has no known rank: give it with --input-shape {value.name}:DIMxDIM")
    shape = []
    for i, dim in enumerate(dims):
        if isinstance(dim, int):
            shape.append(dim)
            continue
        key = str(getattr(dim, "value", None) or "")
        default = 1 if i == 0 else 224 if len(dims) == 4 and i >= 2 else 16
        size = bound.setdefault(key, default) if key else default
        shape.append(size)
    return tuple(shape)


def _index_bound(value: ir.Value) -> int | None:
    """Rows of the smallest constant table this input indexes through ``Gather``."""
    bounds, seen, work = [], set(), [value]
    while work:
        v = work.pop()
        for use in v.uses():
            node = use.node
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type == "Gather" and use.idx == 1:
                table = node.inputs[0]
                if table is not None and table.const_value is not None:
                    axis = node.attributes["axis"].as_int() if "axis" in node.attributes else 0
                    bounds.append(int(table.const_value.shape[axis]))
            elif node.op_type in _FOLLOW and use.idx == 0:
                work.extend(node.outputs)
    return min(bounds) if bounds else None


def generate(model: ir.Model, shapes: Mapping[str, tuple[int, ...]] | None = None, samples: int = 2,
             seed: int = 0) -> list[Feeds]:
    """``samples`` feeds for ``model``'s runtime inputs."""
    shapes = dict(shapes or {})
    inputs = runtime_inputs(model)
    unknown = sorted(set(shapes) - {v.name for v in inputs})
    if unknown:
        known = ", ".join(v.name for v in inputs)
        raise ConfigError(f"--input-shape: the model has no input {unknown[0]!r} (inputs: {known})")
    bound: dict[str, int] = {}
    for v in inputs:  # given shapes bind their dimension names first
        if v.name in shapes:
            _shape(v, shapes[v.name], bound)
    plan = [(v, _shape(v, shapes.get(v.name), bound)) for v in inputs]
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(samples):
        feed: Feeds = {}
        for v, shape in plan:
            feed[v.name] = _values(v, shape, rng)
        feeds.append(feed)
    return feeds


def _values(value: ir.Value, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if value.dtype is None:
        raise ConfigError(f"input {value.name!r} has no element type")
    dtype = value.dtype.numpy()
    if value.dtype == ir.DataType.BOOL:
        return np.ones(shape, dtype=bool)
    if value.dtype.is_floating_point():
        return rng.standard_normal(shape).astype(dtype)
    if value.dtype.is_integer():
        if "mask" in value.name.lower():
            return np.ones(shape, dtype=dtype)
        high = _index_bound(value) or 2
        return rng.integers(0, high, size=shape).astype(dtype)
    raise ConfigError(
        f"input {value.name!r}: cannot generate values of type {value.dtype.name}; give --inputs FILE.npz"
    )


def load_npz(path: str | Path, model: ir.Model) -> list[Feeds]:
    """One feed from an ``.npz`` file whose arrays are named after the model's inputs."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            feed = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable .npz file ({exc})") from None
    names = {v.name for v in runtime_inputs(model)}
    missing, extra = sorted(names - set(feed)), sorted(set(feed) - names)
    if missing or extra:
        raise InputError(
            f"{path}: inputs do not match the model (missing: {missing or 'none'}, unknown: {extra or 'none'})"
        )
    return [feed]
