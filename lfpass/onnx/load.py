"""Read an ONNX file into onnx-ir, with external data left on disk.

``onnx.load(..., load_external_data=False)`` parses only the protobuf; tensors
stored in external data files stay there and onnx-ir memory-maps each one
when (and only when) it is read. Inline tensors are wrapped, not copied. So a
model whose weights exceed 2 GB loads in the memory its graph needs.

Loading also rejects what would fail later in a confusing way: a missing or
empty file, bytes that are not an ONNX model, a truncated file or external
data file, and a graph with no nodes. Each becomes one :class:`InputError`
naming the file.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from lfpass.core.errors import InputError, first_line

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Mute a library logger: a broken file should give one line, not one per node."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def check_input_file(path: Path) -> None:
    """The file exists, is a regular file, and is not empty."""
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file, not an ONNX model")


def load_model(path: str | Path) -> ir.Model:
    """The model at ``path`` as an onnx-ir Model; external tensors stay on disk."""
    return read_model(path)[0]


def value_info_names(graph: onnx.GraphProto) -> set[str]:
    """Names with a ``value_info`` entry in ``graph`` and its subgraphs."""
    names = {v.name for v in graph.value_info}
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                names |= value_info_names(sub)
    return names


def read_model(path: str | Path) -> tuple[ir.Model, frozenset[str]]:
    """:func:`load_model`, and the names the file gives a ``value_info`` (onnx-ir
    writes one for every initializer; a rewrite keeps only the file's own)."""
    path = Path(path)
    check_input_file(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, TypeError) as exc:
        raise InputError(f"{path}: not an ONNX model, or truncated ({first_line(exc)})") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if proto.ir_version <= 0 or not proto.HasField("graph"):
        raise InputError(f"{path}: not an ONNX model (no IR version or no graph)")
    if len(proto.graph.node) == 0:
        raise InputError(f"{path}: the graph is empty (no nodes)")
    _check_graph(proto.graph, path)
    try:
        with _quiet("onnx_ir"):
            model = ir.serde.deserialize_model(proto)
    except Exception as exc:  # noqa: BLE001 - any deserialisation failure is a bad file
        raise InputError(f"{path}: not a valid ONNX model ({first_line(exc)})") from None
    ir.external_data.set_base_dir(model.graph, str(path.parent))
    _check_external(model, path)
    return model, frozenset(value_info_names(proto.graph))


def _check_graph(graph: onnx.GraphProto, path: Path) -> None:
    """What the ONNX spec requires of the main graph, checked whether or not anything
    would fuse: initializer names unique, each value produced once, every node
    input defined by an earlier node, an input or an initializer (so no cycle)."""
    if len(graph.sparse_initializer):
        name = graph.sparse_initializer[0].values.name
        raise InputError(f"{path}: sparse initializer {name!r} is valid ONNX that lfpass does not read; "
                         "store it as a dense initializer first")
    initializers: set[str] = set()
    for tensor in graph.initializer:
        if tensor.name in initializers:
            raise InputError(f"{path}: two initializers are named {tensor.name!r} (invalid model)")
        if tensor.data_type == onnx.TensorProto.UNDEFINED or tensor.data_type not in onnx.TensorProto.DataType.values():
            raise InputError(f"{path}: initializer {tensor.name!r} has no valid data type ({tensor.data_type}; "
                             "corrupted model)")
        initializers.add(tensor.name)
    defined = initializers | {v.name for v in graph.input}
    produced_by = {o: i for i, node in enumerate(graph.node) for o in node.output if o}
    for index, node in enumerate(graph.node):
        texts = (node.name, node.op_type, node.domain, *node.input, *node.output)
        if not all(isinstance(t, str) for t in texts):  # protobuf hands back bytes that are not UTF-8
            raise InputError(f"{path}: node #{index} has a name that is not valid UTF-8 (corrupted model)")
        label = node.name or f"{node.op_type} #{index}"
        for name in node.input:
            if not name or name in defined:
                continue
            if name not in produced_by:
                raise InputError(f"{path}: node {label!r} reads {name!r}, which nothing defines "
                                 "(truncated or broken model)")
            order = "a cycle" if _reaches(graph, produced_by, name, index) else "nodes out of topological order"
            raise InputError(f"{path}: node {label!r} reads {name!r} before it is made: {order} (invalid model)")
        for name in node.output:
            if name and name in defined:
                raise InputError(f"{path}: {name!r} is produced twice (by node {label!r}; invalid model)")
            defined.add(name)


def _reaches(graph: onnx.GraphProto, produced_by: dict[str, int], name: str, target: int) -> bool:
    """Whether the node making ``name`` depends, through any chain, on node ``target``."""
    seen, work = set(), [produced_by[name]]
    while work:
        index = work.pop()
        if index == target:
            return True
        if index in seen:
            continue
        seen.add(index)
        work.extend(produced_by[i] for i in graph.node[index].input if i in produced_by)
    return False


def external_files(model: ir.Model) -> dict[str, Path]:
    """The external data files the model's initializers live in (by resolved path)."""
    files: dict[str, Path] = {}
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                files.setdefault(os.path.realpath(tensor.path), Path(tensor.path))
    return files


def _check_external(model: ir.Model, path: Path) -> None:
    """External data files exist and hold every byte the model says they hold."""
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            tensor = value.const_value
            if not isinstance(tensor, ir.ExternalTensor):
                continue
            data = Path(tensor.path)
            folder = os.path.realpath(path.parent)
            if os.path.commonpath([folder, os.path.realpath(data)]) != folder:
                raise InputError(f"{path}: external data of {value.name!r} lies outside the model's folder; "
                                 "refused (as onnxruntime refuses it): move the data file beside the model")
            if not data.is_file():
                raise InputError(f"{path}: external data file {data.name} for {value.name!r} is missing")
            end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else tensor.nbytes)
            if data.stat().st_size < end:
                raise InputError(f"{path}: external data file {data.name} is truncated ({value.name!r} ends past it)")


def read_array(tensor: ir.TensorProtocol) -> np.ndarray:
    """A tensor's values in its own dtype. A tensor still in an external data file is
    mapped afresh, just its own bytes, and unmapped when the array is dropped: reading
    every weight of a 5 GB model then leaves the pages of none of them resident.

    (``ExternalTensor.numpy()`` maps the whole file and keeps the mapping for the
    tensor's lifetime, so each tensor read stays in the process's memory until the
    model is dropped.) Sub-byte types, and a tensor already read, go through onnx-ir."""
    if not isinstance(tensor, ir.ExternalTensor) or tensor.raw is not None or tensor.dtype.bitwidth < 8:
        return tensor.numpy()
    dtype = np.dtype(tensor.dtype.numpy()).newbyteorder("<")
    shape = tuple(tensor.shape.numpy())
    length = tensor.length if tensor.length is not None else tensor.nbytes
    if length == 0 or tensor.size == 0:
        return np.empty(shape, dtype=dtype)
    offset = tensor.offset or 0
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    with open(tensor.path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), offset + length - start, access=mmap.ACCESS_READ, offset=start)
    return np.frombuffer(mapped, dtype=dtype, count=tensor.size, offset=offset - start).reshape(shape)


def disk_bytes(path: str | Path, data_files: list[Path] | None = None) -> int:
    """Bytes on disk of an ONNX file plus the external data files it uses."""
    total = Path(path).stat().st_size
    for data in data_files or ():
        total += Path(data).stat().st_size
    return total


def stored_tensors(model: ir.Model) -> Iterator[ir.TensorProtocol]:
    """Every tensor the model stores: initializers and ``Constant`` values, subgraphs included."""
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield value.const_value
        for node in graph:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and "value" in node.attributes:
                yield node.attributes["value"].as_tensor()


def count_params(model: ir.Model) -> int:
    """Unique parameters: elements of the floating-point tensors the model stores
    (initializers and ``Constant`` nodes, subgraphs included). A tensor read by
    several nodes is stored, and counted, once."""
    return sum(t.size for t in stored_tensors(model) if t.dtype.is_floating_point())
