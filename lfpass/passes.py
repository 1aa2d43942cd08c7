"""Layer fusion as a torch.fx pass that runs inside torch's PassManager."""

from __future__ import annotations

from typing import Any

from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from lfpass.api import analyze, apply
from lfpass.config import FusionConfig
from lfpass.plan import FusionPlan


class LayerFusionPass(PassBase):
    """``GraphModule -> PassResult``: plan with ``config``, then share the merged tensors.

    The pass rewrites a copy and returns it (``modified`` is whether any
    group was fused); the plan it used is kept in ``self.plan``.
    """

    def __init__(self, config: FusionConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        self.config = (config or FusionConfig()).replace(**overrides)
        self.plan: FusionPlan | None = None

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        self.plan = analyze(graph_module, self.config)
        if not self.plan.groups:
            return PassResult(graph_module, False)
        return PassResult(apply(graph_module, self.plan), True)
