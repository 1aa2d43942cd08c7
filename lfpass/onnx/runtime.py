"""onnxruntime sessions as lfpass runs them: graph optimisations off, so the runtime hides no difference."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import onnx_ir as ir


def session(model: ir.Model | Path | bytes, base: str | None = None):
    """An onnxruntime session on ``model`` (in memory, serialised, or a file), graph optimisations
    off; ``base``: the folder an in-memory model's external data is read from."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    if base:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", base)
    source = str(model) if isinstance(model, Path) else model if isinstance(model, bytes) \
        else ir.to_proto(model).SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def exposing(model: ir.Model, values: Mapping[ir.Value, ir.DataType]) -> bytes:
    """``model`` serialised with ``values`` as extra graph outputs (an untyped one given the
    dtype it maps to), the model itself left as it was: what calibration and block influence
    read from a run."""
    graph = model.graph
    added, typed = [], []
    for value, dtype in values.items():
        if value in graph.outputs or value in graph.inputs or value in added:
            continue
        if value.type is None:
            value.type = ir.TensorType(dtype)
            typed.append(value)
        graph.outputs.append(value)
        added.append(value)
    try:
        return ir.to_proto(model).SerializeToString()
    finally:
        for value in added:
            graph.outputs.remove(value)
        for value in typed:
            value.type = None
