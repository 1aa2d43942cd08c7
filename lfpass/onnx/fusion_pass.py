"""Layer fusion as an onnx-ir pass: usable in an ``onnx_ir.passes.PassManager`` beside
onnxscript's optimizer, and the core of ``lfpass optimize``.

``LayerFusionPass(config)(model)`` plans with the shared planner and re-points
each group's members to one merged initializer, in place. ``plan_for(model)``
is the analysis alone (the pass calls it; ``optimize`` calls it first to
report or dry-run). Given a ``plan``, the pass applies that plan instead.

Preconditions: a given plan fits the model (``requires``). Postconditions:
the model's unique float parameters equal the plan's prediction, and no
node reads a value that nothing defines (``ensures``). The pass is
idempotent: a model it has fused is left as it is on a second call.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import replace

import onnx_ir as ir

from lfpass.core.calibration import Calibration
from lfpass.core.config import FusionConfig
from lfpass.core.errors import PlanError
from lfpass.core.plan import FusionPlan, check_plan
from lfpass.core.planner import plan_fusion
from lfpass.onnx.load import count_params
from lfpass.onnx.rewrite import Store, apply_plan, in_memory
from lfpass.onnx.sites import OnnxSites, find_sites

log = logging.getLogger(__name__)


class LayerFusionPass(ir.passes.InPlacePass):
    """Share the merged weights of similar layers (in place). After a call, ``plan`` is
    the plan applied and ``sites`` the layers it was planned over. ``store`` keeps each
    merged initializer (in memory by default; see :func:`lfpass.onnx.rewrite.apply_plan`)."""

    def __init__(self, config: FusionConfig | None = None, plan: FusionPlan | None = None,
                 progress: bool = False, stats: Calibration | None = None, store: Store = in_memory) -> None:
        super().__init__()
        self.stats = stats  # calibration, for the 'output' metric and the 'regmean' rule
        self.store = store
        self.config = config or FusionConfig()
        self.plan = plan
        self.sites: OnnxSites | None = None
        self.progress = progress
        self._given = plan is not None
        self._planned: weakref.ref[ir.Model] | None = None  # the model ``plan``/``sites`` are for
        self._fused: weakref.WeakSet[ir.Model] = weakref.WeakSet()

    def plan_for(self, model: ir.Model) -> FusionPlan:
        """The plan this pass applies to ``model`` (the given one, checked; else a new one)."""
        self.sites = find_sites(model)
        self._planned = weakref.ref(model)
        if self._given:  # a plan from a file may have been edited: its figures are recounted here
            check_plan(self.plan, self.sites.by_name())
            before, saved = count_params(model), sum(g.saved for g in self.plan.groups)
            layers = self.plan.layer_params_before
            self.plan = replace(self.plan, params_before=before, params_after=before - saved,
                                layer_params_after=layers - saved)
        else:
            self.plan = plan_fusion(self.sites.plannable, self.sites.load, self.config, count_params(model),
                                    progress=self.progress, stats=self.stats)
        return self.plan

    def requires(self, model: ir.Model) -> None:
        if model not in self._fused and (self._planned is None or self._planned() is not model):
            self.plan_for(model)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if model in self._fused or self.plan.empty:
            return ir.passes.PassResult(model, modified=False)
        apply_plan(model, self.sites, self.plan, stats=self.stats, store=self.store)
        self._fused.add(model)
        self._planned = None  # the graph changed: its sites are no longer these
        return ir.passes.PassResult(model, modified=True)

    def ensures(self, model: ir.Model) -> None:
        if model not in self._fused:
            return
        params = count_params(model)
        if params != self.plan.params_after:
            raise PlanError(f"the fused model has {params:,} unique parameters, the plan predicted "
                            f"{self.plan.params_after:,}")
        for node in model.graph:
            for value in node.inputs:
                if value is not None and value.producer() is None and not (
                        value.is_graph_input() or value.is_initializer()):
                    raise PlanError(f"after fusion, node {node.name or node.op_type!r} reads {value.name!r}, "
                                    "which nothing defines")
