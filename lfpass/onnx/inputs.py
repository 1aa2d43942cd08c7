"""Inputs to run a model on: generated from its signature, or read from an ``.npz`` file.

Generated inputs have the graph's dtypes. A dimension the model leaves open
(a name, no name at all, or a negative size such as ``-1``, which some
exporters write for "any") takes, in order: the shape given for that input
(``--input-shape ids:1x16``); the value already chosen for a dimension of the
same name on another input (so ``input_ids`` and ``attention_mask`` agree on
``seq``); the size a consumer fixes (the rows of a constant ``MatMul``/``Gemm``
weight for the last axis, a ``Conv`` kernel's input channels for axis 1), so
an unnamed hidden width still runs; or a default: 1 for the first (batch)
dimension, 224 for the two spatial dimensions of a 4-D input, 16 otherwise.
Sizes are never negative. A size of 0 (given, or fixed by the model, which
onnxruntime then holds it to) is refused: an empty input leaves nothing to
compare. One generated feed may take at most :data:`MAX_GENERATED_BYTES`
(refused before allocating, naming the bytes it would take).

Values: floats are standard normal; integer inputs whose name says ``mask``
are ones, other integers are drawn below the row count of the embedding table
they index (found by following the input to a ``Gather``), or from {0, 1}
when there is none; booleans are true. Random values are a smoke test, not a
measurement, for image and token models: :func:`random_input_note` says so.

An ``.npz`` is checked against the model's declared inputs (names, dtypes,
ranks, fixed sizes, shared dimension names) before anything runs, so a wrong
file is reported as a wrong file rather than as a model onnxruntime rejects.
"""

from __future__ import annotations

import math
import re
import zipfile
import zlib
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence, Union

import numpy as np
import onnx_ir as ir

from lfpass.core.errors import ConfigError, InputError, first_line

Feeds = dict[str, np.ndarray]
_FOLLOW = ("Cast", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Identity")
_SAME_SHAPE = ("Cast", "Identity")
_PLACEHOLDER = re.compile(r"^[\W_]*$|^-?\d+$")  # "?", "", "-1": no name
MAX_GENERATED_BYTES = 2 * 1024**3
"""The most one generated feed (all inputs of one sample together) may take: 2 GiB."""
LABELS = "labels"  # the reserved array name for labels in a calibration .npz
_NPZ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


class Samples(list):
    """Feeds to run, and where they came from: ``origin`` is the ``.npz`` path,
    or ``None`` when they were generated. Validation uses it to blame the
    inputs (not the model) when onnxruntime cannot run the original on them."""

    def __init__(self, feeds: Iterable[Feeds] = (), origin: str | None = None):
        super().__init__(feeds)
        self.origin = origin


def parse_input_shapes(specs: Sequence[str] | None) -> dict[str, tuple[int, ...]]:
    """``["x:1x3x224x224", "ids:2x16"]`` -> ``{"x": (1, 3, 224, 224), "ids": (2, 16)}``.

    A size of 0 is refused: an empty input leaves nothing to compare."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs or ():
        name, sep, dims = spec.rpartition(":")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x")) if dims else ()
        except ValueError:
            shape = ()
        if not sep or not name or not shape or any(d < 0 for d in shape):
            raise ConfigError(f"--input-shape {spec!r}: expected NAME:DIMxDIM..., e.g. input:1x3x224x224")
        if 0 in shape:
            raise ConfigError(f"--input-shape {spec!r}: a dimension of 0 gives nothing to compare")
        shapes[name] = shape
    return shapes


def runtime_inputs(model: ir.Model) -> list[ir.Value]:
    """The inputs a caller must feed (an initializer listed as an input has a default)."""
    return [v for v in model.graph.inputs if not v.is_initializer()]


def _fixed(dim: object) -> int | None:
    """A dimension's size when the model fixes it; ``None`` when it is open (named,
    unnamed, or negative: ``-1`` is how some exporters say "any"). onnxruntime
    holds a declared 0 to 0, so 0 counts as fixed."""
    return dim if isinstance(dim, int) and dim >= 0 else None


def _dim_name(dim: object) -> str:
    """The name that ties an open dimension to others of that name; "" for a placeholder such
    as a converter's ``?`` for every unknown size (it names nothing, so it ties nothing)."""
    name = "" if isinstance(dim, int) else str(getattr(dim, "value", None) or "")
    return "" if _PLACEHOLDER.match(name) else name


def _describe_shape(value: ir.Value) -> str:
    """The declared shape for a message, open dimensions by name: ``(batch, 16)``."""
    if value.shape is None:
        return "(unknown rank)"
    dims = [str(d) if _fixed(d) is not None else (_dim_name(d) or "?") for d in value.shape.dims]
    return "(" + ", ".join(dims) + ")"


def _const_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    if value is None or value.const_value is None:
        return None
    return tuple(int(d) for d in value.const_value.shape)


def _readers(value: ir.Value, through: tuple[str, ...]) -> Iterator[tuple[ir.Node, int]]:
    """Each ``(node, input index)`` reading ``value``, looking through the ops in ``through``."""
    work, seen = [value], set()
    while work:
        for use in work.pop().uses():
            node = use.node
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type in through and use.idx == 0:
                work.extend(node.outputs)
            else:
                yield node, use.idx


def _consumer_sizes(value: ir.Value, rank: int) -> dict[int, int]:
    """Axis -> size that a consumer with a constant weight requires of ``value``."""
    sizes: dict[int, int] = {}
    for node, index in _readers(value, _SAME_SHAPE):
        for axis, size in _required(node, index, rank):
            sizes.setdefault(axis % rank, size)
    return sizes


def _required(node: ir.Node, idx: int, rank: int) -> list[tuple[int, int]]:
    """(axis, size) pairs that ``node`` needs of its input ``idx`` to run."""
    attrs = node.attributes
    if node.op_type == "MatMul" and rank >= 2:
        other = _const_shape(node.inputs[1 - idx])
        if other is not None and len(other) >= 2:
            return [(-1, other[-2])] if idx == 0 else [(-2, other[-1])]
    if node.op_type == "Gemm" and idx == 0 and rank == 2:
        weight = _const_shape(node.inputs[1])
        trans_a = attrs["transA"].as_int() if "transA" in attrs else 0
        trans_b = attrs["transB"].as_int() if "transB" in attrs else 0
        if weight is not None and len(weight) == 2:
            return [(0 if trans_a else 1, weight[1 if trans_b else 0])]
    if node.op_type == "Conv" and idx == 0 and rank >= 3:
        kernel = _const_shape(node.inputs[1])
        group = attrs["group"].as_int() if "group" in attrs else 1
        if kernel is not None and len(kernel) == rank:
            return [(1, kernel[1] * group)]
    return []


def _shape(value: ir.Value, given: tuple[int, ...] | None, bound: dict[str, int]) -> tuple[int, ...]:
    dims = list(value.shape.dims) if value.shape is not None else None
    if given is not None:
        return _given_shape(value, dims, given, bound)
    if dims is None:
        raise ConfigError(f"input {value.name!r} has no known rank: give it with --input-shape {value.name}:DIMxDIM")
    needed = _consumer_sizes(value, len(dims))
    shape = []
    for i, dim in enumerate(dims):
        fixed = _fixed(dim)
        if fixed is not None:
            shape.append(fixed)
            continue
        key = _dim_name(dim)
        size = (bound.get(key) if key else None) or needed.get(i) or _default_size(i, len(dims))
        if key:
            bound.setdefault(key, size)
        shape.append(size)
    return tuple(shape)


def _default_size(axis: int, rank: int) -> int:
    """1 for the batch axis, 224 for an image's spatial axes, 16 otherwise."""
    return 1 if axis == 0 else 224 if rank == 4 and axis >= 2 else 16


def _given_shape(value: ir.Value, dims: list | None, given: tuple[int, ...], bound: dict[str, int]
                 ) -> tuple[int, ...]:
    """``given`` (from ``--input-shape``), once it agrees with the model's rank and fixed sizes."""
    if dims is not None and len(dims) != len(given):
        raise ConfigError(f"--input-shape {value.name}: the model's input has {len(dims)} dimensions, got {len(given)}")
    for dim, size in zip(dims or (), given):
        fixed = _fixed(dim)
        if fixed is not None and fixed != size:
            raise ConfigError(f"--input-shape {value.name}: dimension fixed at {fixed} in the model, got {size}")
        if fixed is None and _dim_name(dim):
            bound.setdefault(_dim_name(dim), size)
    return tuple(given)


def _index_bound(value: ir.Value) -> int | None:
    """Rows of the smallest constant table this input indexes through ``Gather``."""
    bounds = []
    for node, index in _readers(value, _FOLLOW):
        if node.op_type == "Gather" and index == 1:
            table = node.inputs[0]
            if table is not None and table.const_value is not None:
                axis = node.attributes["axis"].as_int() if "axis" in node.attributes else 0
                bounds.append(int(table.const_value.shape[axis]))
    return min(bounds) if bounds else None


def _check_size(plan: list[tuple[ir.Value, tuple[int, ...]]]) -> None:
    """Refuse, before allocating, a generated feed over :data:`MAX_GENERATED_BYTES`."""
    sizes = [(v, shape, math.prod(shape) * _itemsize(v)) for v, shape in plan]
    total = sum(n for _, _, n in sizes)
    if total <= MAX_GENERATED_BYTES:
        return
    v, shape, n = max(sizes, key=lambda s: s[2])
    raise ConfigError(
        f"generated inputs would take {total:,} bytes per sample ({v.name}:{'x'.join(map(str, shape))} alone "
        f"{n:,}); the limit is {MAX_GENERATED_BYTES:,} bytes (2 GiB): give smaller --input-shape sizes"
    )


def _itemsize(value: ir.Value) -> int:
    if value.dtype is None:
        raise ConfigError(f"input {value.name!r} has no element type")
    return max(1, math.ceil(value.dtype.itemsize))


def generate(model: ir.Model, shapes: Mapping[str, tuple[int, ...]] | None = None, samples: int = 2,
             seed: int = 0) -> Samples:
    """``samples`` feeds for ``model``'s runtime inputs (``origin`` ``None``: generated)."""
    if samples < 1:
        raise ConfigError(f"samples must be at least 1, got {samples}")
    shapes = dict(shapes or {})
    inputs = runtime_inputs(model)
    unknown = sorted(set(shapes) - {v.name for v in inputs})
    if unknown:
        known = ", ".join(v.name for v in inputs)
        raise ConfigError(f"--input-shape: the model has no input {unknown[0]!r} (inputs: {known})")
    empty = [f"{name}:{'x'.join(map(str, s))}" for name, s in shapes.items() if 0 in s]
    if empty:
        raise ConfigError(f"--input-shape {empty[0]}: a dimension of 0 gives nothing to compare")
    bound: dict[str, int] = {}
    for v in inputs:  # given shapes bind their dimension names first
        if v.name in shapes:
            _shape(v, shapes[v.name], bound)
    plan = [(v, _shape(v, shapes.get(v.name), bound)) for v in inputs]
    for v, shape in plan:
        if 0 in shape:
            raise ConfigError(f"input {v.name!r}: the model fixes its shape at {_describe_shape(v)}; "
                              f"an empty input gives nothing to compare")
    _check_size(plan)
    rng = np.random.default_rng(seed)
    return Samples(({v.name: _values(v, shape, rng) for v, shape in plan} for _ in range(samples)), origin=None)


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


def random_input_note(model: ir.Model, feeds_were_generated: bool) -> str | None:
    """One line to show when random inputs stand in for an image or token model, whose
    outputs on noise say little about real inputs; ``None`` otherwise."""
    if not feeds_were_generated:
        return None
    kinds = []
    for v in runtime_inputs(model):
        rank = len(v.shape.dims) if v.shape is not None else None
        if v.dtype is not None and v.dtype.is_floating_point() and rank == 4:
            kinds.append("an image model: N(0,1) pixels")
        elif v.dtype is not None and v.dtype.is_integer() and _index_bound(v) is not None:
            kinds.append("a token model: uniform random token ids")
    if not kinds:
        return None
    return (f"inputs were random ({kinds[0]}); pass --inputs FILE.npz with real inputs "
            f"for a meaningful check")


class Given(dict):
    """Arrays named after a model's inputs, made from something other than an ``.npz``: a folder
    of images, a text file (:mod:`lfpass.data.calibration`), batches from Python; ``origin``
    names it in messages."""

    def __init__(self, arrays: Mapping[str, np.ndarray], origin: str) -> None:
        super().__init__(arrays)
        self.origin = origin


Source = Union[str, Path, Mapping[str, np.ndarray], Iterable]  # what load_npz reads inputs from


def source_path(source: object) -> Path | None:
    """The file ``source`` names (None for arrays or batches given in Python)."""
    return Path(source) if isinstance(source, (str, Path)) else None


def from_batches(batches: Iterable, model: ir.Model) -> Given:
    """Batches from Python (dicts by input name, or tuples in the model's input order; numpy
    arrays or anything ``numpy.asarray`` takes, torch tensors and a ``DataLoader``'s batches
    included) as one feed, concatenated along the first axis."""
    names = [v.name for v in runtime_inputs(model)]
    parts: dict[str, list[np.ndarray]] = {}
    for i, batch in enumerate(batches):
        if isinstance(batch, Mapping):
            items = dict(batch)
        elif isinstance(batch, (tuple, list)):
            if len(batch) != len(names):
                raise InputError(f"batch {i} holds {len(batch)} arrays but the model has {len(names)} inputs "
                                 f"({', '.join(names)})")
            items = dict(zip(names, batch))
        else:
            if len(names) != 1:
                raise InputError(f"batch {i} is one array but the model has {len(names)} inputs ({', '.join(names)}): "
                                 "give dicts by name or tuples in that order")
            items = {names[0]: batch}
        for name, value in items.items():
            parts.setdefault(name, []).append(np.asarray(value.detach().cpu() if hasattr(value, "detach") else value))
    if not parts:
        raise InputError("the calibration batches are empty")
    try:
        return Given({k: np.concatenate(v) for k, v in parts.items()}, "the given batches")
    except ValueError as exc:
        raise InputError(f"the given batches do not stack along their first axis ({first_line(exc)})") from None


def load_npz(path: Source, model: ir.Model, allow: tuple[str, ...] = ()) -> Samples:
    """One feed from an ``.npz`` file whose arrays are named after the model's inputs (or from
    arrays already made: a :class:`Given` or any mapping; or Python batches, see
    :func:`from_batches`), checked against the model's declared inputs (``origin``: where
    they came from). Arrays named in ``allow`` (calibration ``labels``) may be there too,
    unchecked."""
    if isinstance(path, Mapping):
        feed, path = {k: np.asarray(v) for k, v in path.items()}, getattr(path, "origin", "the given inputs")
    elif source_path(path) is None:
        given = from_batches(path, model)
        feed, path = dict(given), given.origin
    else:
        path = Path(path)
        feed = _read_npz(path)
    inputs = runtime_inputs(model)
    names = {v.name for v in inputs} | (set(allow) & set(feed))
    missing, extra = sorted(names - set(feed)), sorted(set(feed) - names)
    if missing or extra:
        raise InputError(
            f"{path}: inputs do not match the model (missing: {missing or 'none'}, unknown: {extra or 'none'})"
        )
    bound: dict[str, tuple[str, int]] = {}
    for v in inputs:
        _check_array(path, v, feed[v.name], bound)
    for name in set(allow) & set(feed):
        if feed[name].ndim == 0:
            raise InputError(f"{path}: {name!r} must have a first axis of samples")
    return Samples([feed], origin=str(path))


def _read_npz(path: Path) -> Feeds:
    """The arrays of an ``.npz``; one :class:`InputError` line for anything else."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: a directory, not an .npz file") from None
    except _NPZ_ERRORS as exc:
        raise InputError(f"{path}: not a readable .npz file ({first_line(exc)})") from None
    if isinstance(loaded, np.ndarray):
        raise InputError(f"{path}: a .npy file (one unnamed array), not an .npz; "
                         f"save the inputs by name with numpy.savez(FILE, NAME=array, ...)")
    try:
        with loaded as data:
            feed = {k: data[k] for k in data.files}
    except _NPZ_ERRORS as exc:
        raise InputError(f"{path}: not a readable .npz file ({first_line(exc)})") from None
    if not feed:
        raise InputError(f"{path}: holds no arrays; nothing to compare")
    return feed


def _check_array(path: Path | str, value: ir.Value, array: np.ndarray, bound: dict[str, tuple[str, int]]) -> None:
    """Blame ``path`` when ``array`` cannot feed ``value``: empty, wrong dtype, rank,
    fixed size, or a named dimension that disagrees with another input's."""
    name = value.name
    if array.size == 0:
        raise InputError(f"{path}: {name} has shape {array.shape}: nothing to compare")
    if value.dtype is not None and value.dtype != ir.DataType.STRING:
        expected = np.dtype(value.dtype.numpy())
        if array.dtype != expected:
            raise InputError(f"{path}: {name} is {array.dtype} but the model expects {expected}")
    if value.shape is None:
        return
    dims = list(value.shape.dims)
    wrong = len(dims) != array.ndim or any(_fixed(d) not in (None, n) for d, n in zip(dims, array.shape))
    if wrong:
        raise InputError(f"{path}: {name} has shape {array.shape} but the model expects {_describe_shape(value)}")
    for axis, (dim, size) in enumerate(zip(dims, array.shape)):
        key = _dim_name(dim) if _fixed(dim) is None else ""
        if not key:
            continue
        other, seen = bound.setdefault(key, (name, size))
        if seen != size:
            raise InputError(f"{path}: {name} has {key} = {size} (axis {axis}) but {other} has {key} = {seen}")
