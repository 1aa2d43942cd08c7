"""lfpass: compress neural networks by layer fusion (O'Neill et al., arXiv 2007.14917).

Find layers of the same shape and role whose weights are alike, merge their
weights, and let them share the merged tensor.

Names are imported on first use, so ``lfpass optimize model.onnx`` never pays
for importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lfpass import _lazy, _moved

__version__ = "0.1.0"

_moved.install()  # lfpass.merge, lfpass.config, ... still import, with a DeprecationWarning

_EXPORTS = {
    "analyze": "lfpass.fx.api",
    "apply": "lfpass.fx.api",
    "export": "lfpass.bridge.export",
    "fuse": "lfpass.fx.api",
    "unique_parameters": "lfpass.fx.sites",
    "FusionConfig": "lfpass.core.config",
    "load_pipeline": "lfpass.core.config",
    "ConfigError": "lfpass.core.errors",
    "InputError": "lfpass.core.errors",
    "LfpassError": "lfpass.core.errors",
    "PlanError": "lfpass.core.errors",
    "TraceError": "lfpass.core.errors",
    "ValidationFailed": "lfpass.core.errors",
    "trace": "lfpass.fx.trace",
    "LayerFusionPass": "lfpass.fx.fusion_pass",
    "FusionGroup": "lfpass.core.plan",
    "FusionPlan": "lfpass.core.plan",
    "Site": "lfpass.core.sites",
    "optimize": "lfpass.onnx",
    "save_pretrained": "lfpass.pretrained",
    "load_pretrained": "lfpass.pretrained",
    "analyze_onnx": "lfpass.onnx",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from lfpass.bridge.export import export
    from lfpass.core.config import FusionConfig, load_pipeline
    from lfpass.core.errors import ConfigError, InputError, LfpassError, PlanError, TraceError, ValidationFailed
    from lfpass.core.plan import FusionGroup, FusionPlan
    from lfpass.core.sites import Site
    from lfpass.fx.api import analyze, apply, fuse
    from lfpass.fx.fusion_pass import LayerFusionPass
    from lfpass.fx.sites import unique_parameters
    from lfpass.fx.trace import trace
    from lfpass.onnx import analyze_onnx, optimize
    from lfpass.pretrained import load_pretrained, save_pretrained


__getattr__ = _lazy.exports("lfpass", globals(), _EXPORTS)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
