"""Layer fusion as a torch.fx pass that runs inside torch's PassManager.

The pass is idempotent: on a graph that already shares what its plan fuses
(its own output, or a copy of it) it changes nothing and says so, so
``PassManager(steps=n)`` fuses once however many steps it runs.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from lfpass.core.config import FusionConfig
from lfpass.core.errors import ConfigError, PlanError, first_line
from lfpass.core.plan import FusionPlan, check_plan
from lfpass.fx import FxSites, find_sites
from lfpass.fx.api import analyze, apply
from lfpass.fx.sites import unique_parameters

log = logging.getLogger(__name__)


class LayerFusionPass(PassBase):
    """``GraphModule -> PassResult``: share the merged tensors of a plan.

    Built from a config (``LayerFusionPass(config, **overrides)``), the pass
    plans each graph it has not fused yet; built from a ready plan
    (``LayerFusionPass(plan=plan)``), it applies that plan. Either way it
    rewrites a copy and returns it (``modified`` is whether any group was
    fused), and the plan it used is kept in ``self.plan``.

    ``requires`` checks that a given plan fits the graph; ``ensures`` checks
    the result: ``graph.lint()`` passes and its unique parameter count is the
    plan's ``params_after``. Both raise :class:`PlanError`.
    """

    def __init__(
        self, config: FusionConfig | None = None, *, plan: FusionPlan | None = None, **overrides: Any
    ) -> None:
        super().__init__()
        if plan is not None and (config is not None or overrides):
            raise ConfigError("LayerFusionPass: give a config (or options) or a plan, not both")
        self.config = None if plan is not None else (config or FusionConfig()).replace(**overrides)
        self._given = plan
        self.plan: FusionPlan | None = plan

    def __call__(self, graph_module: fx.GraphModule) -> PassResult:
        """``requires``, ``call``, then ``ensures`` on the module ``call`` returned.

        ``PassBase.__call__`` checks the module it was given; this pass returns
        a fused copy, so its postconditions are checked on that copy."""
        self.requires(graph_module)
        result = self.call(graph_module)
        self.ensures(result.graph_module)
        return result

    def requires(self, graph_module: fx.GraphModule) -> None:
        """A given plan names this graph's layers, with their signatures and parameter count."""
        plan = self._given
        if plan is None:
            return
        found = find_sites(graph_module)
        if is_applied(plan, graph_module, found):
            return
        check_plan(plan, found.by_name())
        params = unique_parameters(graph_module)
        if params != plan.params_before:
            raise PlanError(
                f"plan does not fit this model: it was made for {plan.params_before:,} unique parameters, "
                f"this model has {params:,}"
            )

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        if self.plan is not None and is_applied(self.plan, graph_module, find_sites(graph_module)):
            log.info("layer fusion: the graph already shares what the plan fuses; nothing to do")
            return PassResult(graph_module, False)
        self.plan = self._given if self._given is not None else analyze(graph_module, self.config)
        if self.plan.empty:
            return PassResult(graph_module, False)
        return PassResult(apply(graph_module, self.plan), True)

    def ensures(self, graph_module: fx.GraphModule) -> None:
        """The graph is well formed and has as many unique parameters as the plan says."""
        if isinstance(graph_module, fx.GraphModule):
            try:
                graph_module.graph.lint()
            except Exception as exc:  # lint raises RuntimeError, AssertionError or others
                raise PlanError(f"layer fusion left a malformed graph: {first_line(exc)}") from exc
        if self.plan is None:
            return
        params = unique_parameters(graph_module)
        if params != self.plan.params_after:
            raise PlanError(
                f"layer fusion left {params:,} unique parameters, the plan says {self.plan.params_after:,}: "
                f"the plan's figures do not match this model"
            )


def is_applied(plan: FusionPlan, module: nn.Module, found: FxSites) -> bool:
    """Whether ``module`` already shares what ``plan`` fuses.

    A fused member shares its anchor's tensors (or, in an exported graph, reads
    them), so it is no site of its own: each group's anchor is a site with its
    planned signature, no other member is, and the unique parameter count is the
    plan's. A plan with no groups is never taken as applied (planning it again
    is as cheap and changes nothing)."""
    if not plan.groups:
        return False
    sites = found.by_name()
    planned = dict(plan.signatures)
    for group in plan.groups:
        anchor = sites.get(group.members[0])
        if anchor is None or any(m in sites for m in group.members[1:]):
            return False
        if anchor.name in planned and str(planned[anchor.name]) != str(anchor.class_key(True)):
            return False
    return unique_parameters(module) == plan.params_after
