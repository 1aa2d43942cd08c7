"""The PyTorch adapter: ``nn.Module``, ``torch.fx`` and ``torch.export`` graphs.

It implements the core's frontend contract (:class:`lfpass.fx.frontend.FxFrontend`):
sites (``sites``), the plan written as shared ``nn.Parameter``\\s (``rewrite``),
calibration by hooks (``calibrate``), alignment spaces from the traced data flow
(``align``), per-member parts (``lowrank``); the Python API (``api``) and the
``torch.fx`` pass (``fusion_pass``) sit on top of it."""

from lfpass.fx.rewrite import apply_plan
from lfpass.fx.sites import FxSites, find_sites
from lfpass.fx.trace import trace

__all__ = ["FxSites", "apply_plan", "find_sites", "trace"]
