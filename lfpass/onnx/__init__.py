"""The ONNX frontend: find sites in an ONNX graph, apply a plan, write and validate the result.

The core (sites, similarity, planner, merge rules) is reused unchanged; this
package only reads graphs (onnx-ir, external data left on disk), re-points
node inputs to shared initializers, and checks the result in onnxruntime.
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
