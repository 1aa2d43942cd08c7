"""Write an ONNX model atomically, inline or with its tensors in one external data file.

The model is written beside its final name first, where it can be checked
(onnxruntime resolves external data relative to the model file, so a model
and its data file are staged together in a temporary folder next to the
target). Only when the caller's block succeeds is it renamed into place, data
file first; on any failure nothing is left behind. A model that would not fit
the 2 GB protobuf limit inline is always written with external data.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import onnx
import onnx_ir as ir

from lfpass.errors import OutputError
from lfpass.fileio import atomic_path

PROTOBUF_LIMIT = 2**31 - 1
_INLINE_HEADROOM = 64 << 20  # node and graph protos beside the tensors


@dataclass(frozen=True)
class Staged:
    """Where a model is being written: ``model`` (and ``data``, when external) are
    temporary paths until the ``staged`` block ends."""

    model: Path
    data: Path | None
    data_name: str | None


def check_output(path: Path, inputs: list[Path]) -> None:
    """Fail early when ``path`` cannot be written, or would overwrite an input."""
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"{path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: cannot write to folder {folder}")
    if path.exists() and path.is_dir():
        raise OutputError(f"{path}: is a folder")
    for source in inputs:
        if _same(path, source) or _same(Path(f"{path}.data"), source):
            raise OutputError(f"{path}: would overwrite the input {source}; choose another output path")


def _same(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def tensor_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for g in (model.graph, *model.graph.subgraphs())
               for v in g.initializers.values() if v.const_value is not None)


def needs_external(model: ir.Model) -> bool:
    return tensor_bytes(model) + _INLINE_HEADROOM > PROTOBUF_LIMIT


@contextlib.contextmanager
def staged(path: Path, external: bool) -> Iterator[Staged]:
    """Yield temporary paths to write ``path`` (and ``path.data``) to; rename them into
    place when the block ends without error."""
    path = Path(path)
    if not external:
        with atomic_path(path, suffix=".onnx") as tmp:
            yield Staged(tmp, None, None)
        return
    folder = path.parent if str(path.parent) else Path(".")
    try:
        stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=folder))
    except OSError as exc:
        raise OutputError(f"{path}: cannot write there ({exc.strerror})") from None
    data_name = f"{path.name}.data"
    try:
        yield Staged(stage / path.name, stage / data_name, data_name)
        os.replace(stage / data_name, folder / data_name)
        os.replace(stage / path.name, path)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def write(model: ir.Model, where: Staged, value_info: frozenset[str] | None = None) -> None:
    """Serialise ``model`` to ``where`` (every tensor of 1 KiB or more in the data file
    when external; tensors still on disk are streamed, not loaded whole). With
    ``value_info``, initializers get a ``value_info`` entry only where it names one."""
    try:
        if where.data_name is not None:
            model = ir.external_data.unload_from_model(model, str(where.model.parent), where.data_name,
                                                       size_threshold_bytes=1023)
        else:  # tensors still in the input's data file come inline, or the output would point there
            ir.external_data.load_to_model(model)
        proto = ir.serde.serialize_model(model)
        if value_info is not None:
            _drop_added_value_info(proto.graph, value_info)
        onnx.save(proto, str(where.model))
    except OSError as exc:
        raise OutputError(f"{where.model.parent}: cannot write the model ({exc.strerror or exc})") from None


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
