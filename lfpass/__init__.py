"""lfpass: compress neural networks by layer fusion (O'Neill et al., arXiv 2007.14917).

Find layers of the same shape and role whose weights are alike, merge their
weights, and let them share the merged tensor.

Names are imported on first use, so ``lfpass optimize model.onnx`` never pays
for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "analyze": "lfpass.api",
    "apply": "lfpass.api",
    "export": "lfpass.onnx_export",
    "fuse": "lfpass.api",
    "unique_parameters": "lfpass.api",
    "FusionConfig": "lfpass.config",
    "load_pipeline": "lfpass.config",
    "ConfigError": "lfpass.errors",
    "InputError": "lfpass.errors",
    "LfpassError": "lfpass.errors",
    "PlanError": "lfpass.errors",
    "TraceError": "lfpass.errors",
    "ValidationFailed": "lfpass.errors",
    "trace": "lfpass.fx.trace",
    "LayerFusionPass": "lfpass.passes",
    "FusionGroup": "lfpass.plan",
    "FusionPlan": "lfpass.plan",
    "Site": "lfpass.sites",
    "optimize": "lfpass.onnx",
    "analyze_onnx": "lfpass.onnx",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from lfpass.api import analyze, apply, fuse, unique_parameters
    from lfpass.config import FusionConfig, load_pipeline
    from lfpass.errors import ConfigError, InputError, LfpassError, PlanError, TraceError, ValidationFailed
    from lfpass.fx.trace import trace
    from lfpass.onnx import analyze_onnx, optimize
    from lfpass.onnx_export import export
    from lfpass.passes import LayerFusionPass
    from lfpass.plan import FusionGroup, FusionPlan
    from lfpass.sites import Site


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lfpass' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
