"""The torch.fx frontend: find sites in a GraphModule (or any nn.Module) and apply a plan."""

from lfpass.fx.rewrite import apply_plan
from lfpass.fx.sites import FxSites, find_sites
from lfpass.fx.trace import trace

__all__ = ["FxSites", "apply_plan", "find_sites", "trace"]
