"""The ONNX adapter (onnx-ir): find sites, apply a plan, write and validate the result.

It implements the core's frontend contract (:class:`lfpass.onnx.frontend.OnnxFrontend`,
imported when the keep-function path is taken) and never imports torch: it reads graphs
(external data left on disk), re-points node inputs to shared initializers, and checks
the result in onnxruntime. ``optimize`` is the deployment entry point; ``fusion_pass``
the onnx-ir pass.
"""

from lfpass.onnx.fusion_pass import LayerFusionPass
from lfpass.onnx.optimize import OptimizeResult, analyze_onnx, default_output, optimize
from lfpass.onnx.rewrite import apply_plan
from lfpass.onnx.sites import OnnxSites, find_sites
from lfpass.onnx.validate import Validation, validate

__all__ = [
    "LayerFusionPass",
    "OnnxSites",
    "OptimizeResult",
    "Validation",
    "analyze_onnx",
    "apply_plan",
    "default_output",
    "find_sites",
    "optimize",
    "validate",
]
