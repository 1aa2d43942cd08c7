"""LayerFusionPass in torch's PassManager: fuses once, checks its plan before and its result after."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch.fx.passes.infra.pass_manager import PassManager

import lfpass
from lfpass.core.errors import ConfigError, PlanError
from lfpass.fx.fusion_pass import LayerFusionPass

CONFIG = lfpass.FusionConfig(target_ratio=1.3)  # planning the fused graph again would fuse more
X = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture(params=["symbolic_trace", "export"])
def graph(request, stack):
    """``stack`` as ``symbolic_trace`` writes it (call_module) and as ``torch.export`` does (get_attr)."""
    if request.param == "export":
        return torch.export.export(stack, (X,)).module()
    return lfpass.trace(stack)


def test_pass_manager_fuses_once_over_steps(graph):
    once = lfpass.apply(graph, lfpass.analyze(graph, CONFIG))
    fusion = LayerFusionPass(CONFIG)
    result = PassManager(passes=[fusion], steps=3, run_checks_after_each_pass=True)(graph)
    assert result.modified and len(fusion.plan.groups) == 1
    fused = result.graph_module
    assert lfpass.unique_parameters(fused) == lfpass.unique_parameters(once) == fusion.plan.params_after
    assert lfpass.unique_parameters(fused) < lfpass.unique_parameters(graph)
    with torch.no_grad():
        assert torch.equal(fused(X), once(X))  # the same merge as one apply, bit for bit

    again = fusion(fused)
    assert not again.modified and again.graph_module is fused
    assert not fusion(copy.deepcopy(fused)).modified  # a copy shares the same tensors


def test_a_ready_plan_applies_once(graph):
    plan = lfpass.analyze(graph, CONFIG)
    fusion = LayerFusionPass(plan=plan)
    result = PassManager(passes=[fusion], steps=3)(graph)
    assert result.modified and fusion.plan is plan
    assert lfpass.unique_parameters(result.graph_module) == plan.params_after
    assert not fusion(result.graph_module).modified  # requires accepts the graph the plan made


def test_nothing_to_fuse_is_not_modified(stack):
    gm = lfpass.trace(stack)
    fusion = LayerFusionPass(threshold=2.0, target_ratio=None)  # no pair is that alike
    result = PassManager(passes=[fusion], steps=3)(gm)
    assert not result.modified and result.graph_module is gm and fusion.plan.groups == ()
    assert lfpass.unique_parameters(gm) == fusion.plan.params_after == fusion.plan.params_before


def test_ensures_catches_a_plan_whose_figures_are_off(stack):
    gm = lfpass.trace(stack)
    plan = lfpass.analyze(gm, CONFIG)
    off = dataclasses.replace(plan, params_after=plan.params_after - 1)
    with pytest.raises(PlanError, match=f"left {plan.params_after:,} unique parameters, the plan says"):
        LayerFusionPass(plan=off)(gm)
    with pytest.raises(Exception) as info:  # PassManager wraps what a pass raises
        PassManager(passes=[LayerFusionPass(plan=off)])(gm)
    assert isinstance(info.value.__cause__, PlanError)


def test_ensures_catches_a_malformed_graph(stack):
    gm = lfpass.trace(stack)
    fusion = LayerFusionPass(CONFIG)
    fusion(gm)
    broken = lfpass.trace(stack)
    first, *_, last = [n for n in broken.graph.nodes if n.op == "call_module"]
    first.args = (last,)  # read before it is written
    with pytest.raises(PlanError, match="malformed graph"):
        fusion.ensures(broken)


@pytest.mark.parametrize(
    "other, message",
    [
        ({"depth": 2}, "it has no layer 'blocks.3'"),
        ({"width": 12}, "layer 'blocks.0' changed shape or attributes"),
        ({"out": 4}, "it was made for 1,283 unique parameters, this model has 1,300"),  # head 16x4, not 16x3
    ],
    ids=["missing layer", "other shape", "other size"],
)
def test_requires_rejects_a_plan_for_another_model(stack, other, message):
    plan = lfpass.analyze(lfpass.trace(stack), CONFIG)
    assert [g.members for g in plan.groups] == [("blocks.0", "blocks.1", "blocks.3")]
    gm = lfpass.trace(type(stack)(**other))  # conftest's Stack, other sizes
    with pytest.raises(PlanError, match=f"plan does not fit this model: {message}"):
        LayerFusionPass(plan=plan)(gm)


def test_plan_or_config_not_both(stack):
    plan = lfpass.analyze(stack, CONFIG)
    with pytest.raises(ConfigError, match="not both"):
        LayerFusionPass(CONFIG, plan=plan)
    with pytest.raises(ConfigError, match="not both"):
        LayerFusionPass(plan=plan, target_ratio=1.5)
