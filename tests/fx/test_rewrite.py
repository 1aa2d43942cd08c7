import numpy as np
import pytest
import torch
from torch import nn
from torch.fx.passes.infra.pass_manager import PassManager

import lfpass
from lfpass.core.errors import PlanError, TraceError
from lfpass.fx import find_sites

LOSSLESS = lfpass.FusionConfig(metric="euclidean", merge="mean", target_ratio=None, threshold=1.0 - 1e-9)


def _x():
    torch.manual_seed(1)
    return torch.randn(5, 8)


@pytest.mark.parametrize("frontend", ["symbolic_trace", "export", "module"])
def test_bit_identical_layers_fuse_losslessly(copies, frontend):
    x = _x()
    if frontend == "symbolic_trace":
        model = lfpass.trace(copies)
    elif frontend == "export":
        model = torch.export.export(copies, (x,)).module()
    else:
        model = copies
    plan = lfpass.analyze(model, LOSSLESS)
    assert [g.members for g in plan.groups] == [("blocks.0", "blocks.1", "blocks.3")]
    fused = lfpass.apply(model, plan)
    assert torch.equal(fused(x), copies(x))  # outputs equal, bit for bit
    before = lfpass.unique_parameters(model)
    assert lfpass.unique_parameters(fused) == plan.params_after == before - 2 * (16 * 16 + 16)
    if isinstance(fused, torch.fx.GraphModule):
        fused.graph.lint()
    assert lfpass.unique_parameters(model) == before  # input untouched


def test_shared_parameter_gets_gradients_from_every_use(copies):
    gm = lfpass.trace(copies)
    fused = lfpass.apply(gm, lfpass.analyze(gm, LOSSLESS))
    shared = fused.get_submodule("blocks.0").weight
    assert fused.get_submodule("blocks.1").weight is shared and fused.get_submodule("blocks.3").weight is shared
    fused(_x()).sum().backward()
    expected = torch.zeros_like(shared)
    for i in (0, 1, 3):  # the sum of each use's gradient, taken alone
        solo = lfpass.trace(copies)
        solo.zero_grad()
        solo(_x()).sum().backward()
        expected += solo.get_submodule(f"blocks.{i}").weight.grad
    torch.testing.assert_close(shared.grad, expected, rtol=1e-5, atol=1e-6)


def test_inplace_only_when_asked(stack):
    gm = lfpass.trace(stack)
    plan = lfpass.analyze(gm, lfpass.FusionConfig(target_ratio=1.3))
    assert lfpass.apply(gm, plan) is not gm
    assert lfpass.unique_parameters(gm) == plan.params_before
    assert lfpass.apply(gm, plan, inplace=True) is gm
    assert lfpass.unique_parameters(gm) == plan.params_after


@pytest.mark.parametrize("rule", ["mean", "weighted", "keep", "mix"])
def test_merge_rules(stack, rule):
    gm = lfpass.trace(stack)
    plan = lfpass.analyze(gm, lfpass.FusionConfig(target_ratio=1.2, merge=rule, seed=7))
    group = plan.groups[0]
    ws = [gm.get_submodule(m).weight.detach() for m in group.members]
    fused = lfpass.apply(gm, plan)
    got = fused.get_submodule(group.members[0]).weight.detach()
    stacked = torch.stack(ws)
    if rule == "mean":
        torch.testing.assert_close(got, stacked.mean(0))
    elif rule == "weighted":
        norms = torch.stack([w.norm() for w in ws])
        torch.testing.assert_close(got, (norms[:, None, None] * stacked).sum(0) / norms.sum())
    elif rule == "keep":
        assert torch.equal(got, ws[0])
    else:
        assert all(bool(((got == ws[0]) | (got == ws[1])).all()) for _ in [0])
        assert not torch.equal(got, ws[0]) and not torch.equal(got, ws[1])
        again = lfpass.apply(gm, plan).get_submodule(group.members[0]).weight
        assert torch.equal(got, again)  # seeded


class Mixed(nn.Module):
    """Same-shaped weights that must never share: strides, groups, dilation, layout differ."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1, stride=2)
        self.c = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.d = nn.Conv2d(8, 4, 3, padding=1, groups=2)  # weight (4, 4, 3, 3)
        self.e = nn.Conv2d(8, 4, 3, padding=1, groups=1, bias=False)
        self.f = nn.ConvTranspose2d(8, 8, 3, padding=1)
        self.g = nn.Linear(6, 6)
        self.h = nn.Linear(6, 6, bias=False)
        self.w_in_out = nn.Parameter(torch.randn(6, 6))  # used as x @ W: layout in_out

    def forward(self, x, v):
        y = self.a(x) + self.c(x) + self.f(x)
        z = self.b(x).sum() + self.d(x).sum() + self.e(x).sum()
        return y.sum() + z + self.g(v).sum() + self.h(v).sum() + (v @ self.w_in_out).sum()


def test_incompatible_layers_are_never_fused():
    torch.manual_seed(0)
    m = Mixed()
    with torch.no_grad():  # make them all alike so only the signatures keep them apart
        for conv in (m.b, m.c, m.f):
            conv.weight.copy_(m.a.weight)
        m.h.weight.copy_(m.g.weight)
        m.w_in_out.copy_(m.g.weight)
    gm = lfpass.trace(m)
    sites = {s.name: s for s in find_sites(gm).sites}
    assert sites["w_in_out"].signature_dict()["layout"] == "in_out"
    assert sites["f"].kind == "conv_transpose"
    plan = lfpass.analyze(gm, lfpass.FusionConfig(target_ratio=10, cross_role=True, kinds=("linear", "conv", "conv_transpose")))
    assert plan.groups == ()
    assert lfpass.unique_parameters(lfpass.apply(gm, plan)) == lfpass.unique_parameters(m)


def test_module_called_twice_and_tied_parameter_are_one_site():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight  # tied

        def forward(self, x):
            return self.a(self.a(x)) + self.b(x)

    sites = find_sites(lfpass.trace(Twice())).sites
    assert [s.name for s in sites] == ["a"]  # b's weight is a's: one tensor, one site
    assert sites[0].location == "a,a_1,b"


def test_plan_that_does_not_fit(stack, convs):
    plan = lfpass.analyze(lfpass.trace(stack), lfpass.FusionConfig(target_ratio=1.2))
    with pytest.raises(PlanError, match="has no layer"):
        lfpass.apply(lfpass.trace(nn.Sequential(nn.Linear(2, 2))), plan)
    with pytest.raises(PlanError, match="changed shape"):
        lfpass.apply(lfpass.trace(convs), plan)  # blocks.0 is a conv there
    bigger = type(stack)(width=32)
    with pytest.raises(PlanError, match="changed shape"):
        lfpass.apply(lfpass.trace(bigger), plan)


def test_plan_applies_after_weights_change(stack):
    gm = lfpass.trace(stack)
    plan = lfpass.analyze(gm, lfpass.FusionConfig(target_ratio=1.3))
    with torch.no_grad():
        for p in gm.parameters():
            p.mul_(2)
    fused = lfpass.apply(gm, plan)
    assert lfpass.unique_parameters(fused) == plan.params_after


def test_layer_fusion_pass_in_pass_manager(stack):
    gm = lfpass.trace(stack)
    fusion = lfpass.LayerFusionPass(target_ratio=1.3)
    result = PassManager(passes=[fusion], run_checks_after_each_pass=True)(gm)
    assert result.modified
    assert lfpass.unique_parameters(result.graph_module) == fusion.plan.params_after
    assert fusion.plan.ratio >= 1.3
    nothing = lfpass.LayerFusionPass(lfpass.FusionConfig(threshold=2.0, target_ratio=None))(gm)
    assert not nothing.modified and nothing.graph_module is gm


def test_trace_errors_name_both_failures():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(2, 2)

        def forward(self, x):
            if x.shape[-1] == 2:  # control flow on a shape: symbolic_trace fails, export specialises
                return self.l(x)
            return x

    with pytest.raises(TraceError, match="symbolic_trace failed.*needs example inputs"):
        lfpass.trace(Branchy())
    gm = lfpass.trace(Branchy(), (torch.ones(1, 2),))
    assert isinstance(gm, torch.fx.GraphModule)
    assert [s.role for s in find_sites(gm).sites] == ["l"]
    with pytest.raises(TraceError, match="torch.export failed"):
        lfpass.trace(Branchy(), ("not a tensor",))


def test_unique_parameters_counts_shared_once(stack):
    n = lfpass.unique_parameters(stack)
    stack.blocks[1].weight = stack.blocks[0].weight
    assert lfpass.unique_parameters(stack) == n - 16 * 16
    assert np.isclose(n, sum(p.numel() for p in type(stack)().parameters()))


def test_fuse_is_analyze_then_apply(stack):
    fused, plan = lfpass.fuse(stack, target_ratio=1.3, merge="keep")
    assert plan.ratio >= 1.3 and plan.groups[0].rule == "keep"
    assert lfpass.unique_parameters(fused) == plan.params_after < lfpass.unique_parameters(stack)
