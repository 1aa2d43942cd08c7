"""onnxruntime sessions as lfpass runs them: graph optimisations off, so the runtime hides no difference."""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir


def session(model: ir.Model | Path | bytes):
    """An onnxruntime session on ``model`` (in memory, serialised, or a file), graph optimisations off."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    source = str(model) if isinstance(model, Path) else model if isinstance(model, bytes) \
        else ir.to_proto(model).SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
