"""Write an ONNX model atomically, inline or with its tensors in one external data file.

A model and its data file are never left mismatched, whenever the writer stops
(a crash, ``kill -9``, a full disk, Ctrl-C, SIGTERM). The order:

1. the data file is written under a name nothing references yet: ``NAME.data``
   when no such file exists, else a fresh ``NAME.XXXXXXXX.data`` (claimed with
   an exclusive create, so two writers never share one);
2. the model is written to a hidden temporary file beside ``NAME``, where the
   caller can check it (onnxruntime resolves the data file relative to it);
3. the model is renamed onto ``NAME``: the one instant the output changes,
   from the old model with its old data to the new model with its new data;
4. the data file the old model read is removed, when it is one of lfpass's own
   names for this output and no input reads it.

Before step 3 a stop leaves the old output whole (and, after ``kill -9``, at
most an unreferenced new data file); after it, the new output whole. No
staging folder is made. A model that would not fit the 2 GB protobuf limit
inline is always written with external data.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from lfpass.core.errors import OutputError
from lfpass.core.fileio import check_writable, ordinary_mode, same_file, temporary

PROTOBUF_LIMIT = 2**31 - 1
_INLINE_HEADROOM = 64 << 20  # node and graph protos beside the tensors
_EXTERNAL_MIN_BYTES = 1024  # smaller tensors stay in the model file, as onnx's own helpers keep them


@dataclass(frozen=True)
class Staged:
    """Where a model is being written: ``model`` (and ``data``, when external) are
    temporary paths until the ``staged`` block ends."""

    model: Path
    data: Path | None
    data_name: str | None


def tensor_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for g in (model.graph, *model.graph.subgraphs())
               for v in g.initializers.values() if v.const_value is not None)


def needs_external(model: ir.Model) -> bool:
    return tensor_bytes(model) + _INLINE_HEADROOM > PROTOBUF_LIMIT


@contextlib.contextmanager
def staged(path: Path, external: bool, keep: Sequence[Path] = ()) -> Iterator[Staged]:
    """Yield temporary paths to write ``path`` (and its data file) to; when the block ends
    without error, put the model in place and remove the data file it replaces.

    ``keep``: files that must survive (the inputs), even if the old output read them."""
    path = Path(path)
    check_writable("output", path)
    data = _claim_data_file(path) if external else None
    placed = False
    try:
        with temporary(path, ".onnx") as tmp:
            yield Staged(tmp, data, data.name if data else None)
            for written in (data, tmp):
                if written is not None:
                    _fsync(written)
            old = _old_data_files(path)
            ordinary_mode(tmp)
            os.replace(tmp, path)
            placed = True
    except BaseException:
        if data is not None and not placed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(data)
        raise
    for stale in old:
        if (data is None or not same_file(stale, data)) and not any(same_file(stale, k) for k in keep):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(stale)


def _claim_data_file(path: Path) -> Path:
    """An empty data file for ``path`` under a name no existing file has (exclusive create)."""
    folder = path.parent if str(path.parent) else Path(".")
    data = folder / f"{path.name}.data"
    try:
        os.close(os.open(data, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        return data
    except FileExistsError:
        fd, name = tempfile.mkstemp(prefix=f"{path.name}.", suffix=".data", dir=folder)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write its data file ({exc.strerror})") from None
    os.close(fd)
    ordinary_mode(name)
    return Path(name)


def _fsync(path: Path) -> None:
    """Make ``path``'s bytes durable before a rename makes them reachable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _old_data_files(path: Path) -> list[Path]:
    """The data files the model now at ``path`` reads that are lfpass's own names for it
    (``NAME.data``, ``NAME.XXXXXXXX.data``): what replacing it leaves unread."""
    folder = path.parent if str(path.parent) else Path(".")
    if not path.is_file() or not any(folder.glob(f"{glob.escape(path.name)}*.data")):
        return []  # no file bears one of our names: nothing to parse the old model for
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - an unreadable old output reads nothing we could remove
        return []
    ours = re.compile(re.escape(path.name) + r"(\.[A-Za-z0-9_]{1,16})?\.data")
    found = set()
    for tensor in _external_tensors(proto.graph):
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if ours.fullmatch(location):
            found.add(location)
    return [folder / name for name in sorted(found)]


def _external_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    for tensor in graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _external_tensors(sub)


def write(model: ir.Model, where: Staged, value_info: frozenset[str] | None = None) -> None:
    """Serialise ``model`` to ``where`` (every tensor of 1 KiB or more in the data file
    when external; tensors still on disk are streamed, not loaded whole). With
    ``value_info``, initializers get a ``value_info`` entry only where it names one."""
    try:
        if where.data is not None:
            _unload(model, where)
        else:  # tensors still in the input's data file come inline, or the output would point there
            ir.external_data.load_to_model(model)
        proto = ir.serde.serialize_model(model)
        if value_info is not None:
            _drop_added_value_info(proto.graph, value_info)
        onnx.save(proto, str(where.model))
    except OSError as exc:
        raise OutputError(f"{where.model.parent}: cannot write the model ({exc.strerror or exc})") from None


class DataFile:
    """Appends tensors to a staged data file as they are made, each becoming an
    ``ExternalTensor`` there: a rewrite then holds one merged tensor in memory at a
    time, and :func:`write` leaves what is already in the file where it is. A
    tensor under 1 KiB stays in memory (it goes inline, as :func:`write` keeps it)."""

    def __init__(self, where: Staged) -> None:
        if where.data is None:
            raise ValueError("DataFile needs a staged data file (an external output)")
        self.where = where

    def __call__(self, array: np.ndarray, name: str) -> ir.TensorProtocol:
        array = np.ascontiguousarray(array)
        if array.nbytes < _EXTERNAL_MIN_BYTES:
            return ir.Tensor(array, name=name)
        try:
            with open(self.where.data, "ab") as out:
                offset = out.tell()
                out.write(array.reshape(-1).view(np.uint8).data)
        except OSError as exc:
            raise OutputError(f"{self.where.data}: cannot write the data file ({exc.strerror or exc})") from None
        return ir.ExternalTensor(self.where.data_name, offset, array.nbytes, ir.DataType.from_numpy(array.dtype),
                                 shape=ir.Shape(array.shape), name=name, base_dir=str(self.where.model.parent))


def _unload(model: ir.Model, where: Staged) -> None:
    """Move every initializer of 1 KiB or more into ``where.data``, one tensor at a time,
    after what a :class:`DataFile` already put there (left as it is), and bring smaller ones
    the input held externally inline: every tensor ends next to the output. A tensor still in
    the input's data file is copied file to file (``copy_file_range`` where the system
    has it), never read into memory or left mapped.

    Written here rather than by ``onnx_ir.external_data.unload_from_model``, which
    stages its file in a folder of its own that a killed writer would leave behind."""
    written: dict[int, tuple[int, int]] = {}
    target = os.path.realpath(where.data)
    with open(where.data, "r+b") as out:  # not "ab": copy_file_range refuses a file opened to append
        offset = out.seek(0, os.SEEK_END)
        for graph in (model.graph, *model.graph.subgraphs()):
            for value in graph.initializers.values():
                tensor = value.const_value
                if tensor is None:
                    continue
                if tensor.nbytes < _EXTERNAL_MIN_BYTES:  # inline, even when the input held it externally
                    if isinstance(tensor, ir.ExternalTensor) and os.path.realpath(tensor.path) != target:
                        value.const_value = ir.Tensor(tensor.numpy().copy(), name=tensor.name or value.name)
                    continue
                if isinstance(tensor, ir.ExternalTensor) and os.path.realpath(tensor.path) == target:
                    continue  # already in the output's data file
                if id(tensor) not in written:
                    if isinstance(tensor, ir.ExternalTensor) and tensor.raw is None:
                        tensor.tofile(out)  # raises OSError when the input's data file falls short
                        length = out.tell() - offset
                    else:
                        data = tensor.tobytes()
                        out.write(data)
                        length = len(data)
                        del data
                    written[id(tensor)] = (offset, length)
                    offset += length
                start, length = written[id(tensor)]
                value.const_value = ir.ExternalTensor(where.data_name, start, length, tensor.dtype, shape=tensor.shape,
                                                      name=tensor.name or value.name, base_dir=str(where.model.parent))


def _drop_added_value_info(graph: onnx.GraphProto, keep: frozenset[str]) -> None:
    initializers = {t.name for t in graph.initializer}
    for i in reversed(range(len(graph.value_info))):
        name = graph.value_info[i].name
        if name in initializers and name not in keep:
            del graph.value_info[i]
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                _drop_added_value_info(sub, keep)
