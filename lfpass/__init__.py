"""lfpass: compress neural networks by layer fusion (O'Neill et al., arXiv 2007.14917).

Find layers of the same shape and role whose weights are alike, merge their
weights, and let them share the merged tensor.
"""

from lfpass.api import analyze, apply, fuse, unique_parameters
from lfpass.config import FusionConfig, load_pipeline
from lfpass.errors import ConfigError, InputError, LfpassError, PlanError, TraceError
from lfpass.fx.trace import trace
from lfpass.passes import LayerFusionPass
from lfpass.plan import FusionGroup, FusionPlan
from lfpass.sites import Site

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "FusionConfig",
    "FusionGroup",
    "FusionPlan",
    "InputError",
    "LayerFusionPass",
    "LfpassError",
    "PlanError",
    "Site",
    "TraceError",
    "analyze",
    "apply",
    "fuse",
    "load_pipeline",
    "trace",
    "unique_parameters",
]
