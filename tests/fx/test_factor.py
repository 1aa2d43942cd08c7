"""Shared bases and per-layer low rank written in PyTorch (called modules and torch.export graphs).

Each rewrite test asserts what changed (which layers, one basis Parameter read by every member),
the structure (unique parameters equal to the plan's, ``graph.lint``), the numbers (a full-rank
basis gives the original back within float32 round-off), and a case that is refused."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lfpass
from lfpass.core.config import FusionConfig
from lfpass.core.errors import PlanError
from lfpass.core.keep import Fuser
from lfpass.core.plan import Factored, FusionPlan
from lfpass.fx.api import fuse, unique_parameters
from lfpass.fx.frontend import FxFrontend
from lfpass.fx.lowrank import LowRank
from tests.conftest import ConvStack, Stack


def batches(shape, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def full_rank(plan: FusionPlan) -> FusionPlan:
    """The plan with every factored group at the largest rank its layers allow."""
    return replace(plan, factors=tuple(replace(f, rank=min(f.in_, len(f.members) * f.out)) for f in plan.factors))


def only(plan: FusionPlan, action: str) -> list[Factored]:
    return [f for f in plan.factors if f.action == action]


@pytest.fixture
def stack() -> Stack:
    torch.manual_seed(0)
    return Stack(depth=4, width=16).eval()


def test_a_shared_basis_is_one_parameter_and_the_count_is_the_plans(stack):
    fused, plan = fuse(stack, FusionConfig(target_ratio=1.6, actions="basis"), calibration=batches((16, 8)))
    shared = only(plan, "basis")
    assert shared, plan.explain()
    assert unique_parameters(fused) == plan.params_after and plan.ratio >= 1.6
    for entry in shared:
        downs = {id(fused.get_submodule(m).down.weight) for m in entry.members}
        assert len(downs) == 1  # one basis Parameter, read by every member
        for m in entry.members:
            assert isinstance(fused.get_submodule(m), LowRank)
            assert fused.get_submodule(m).up.bias is not None  # each member keeps its own bias
    assert all(isinstance(m, nn.Linear) for m in stack.blocks)  # the input model is untouched


def test_a_full_rank_basis_gives_the_model_back(stack):
    calib = batches((16, 8))
    _, plan = fuse(stack, FusionConfig(target_ratio=1.6, actions="basis"), calibration=calib)
    front = FxFrontend(stack)
    rebuilt = Fuser(front, front.calibrate(calib, [])).build(full_rank(plan))
    x = batches((5, 8), 1, seed=3)[0]
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), stack(x), atol=1e-5, rtol=1e-5)


def test_convolutions_share_a_kxk_basis_with_1x1_coefficients():
    torch.manual_seed(0)
    model = ConvStack(depth=3, ch=8).eval()
    calib = batches((4, 3, 8, 8))
    fused, plan = fuse(model, FusionConfig(target_ratio=1.3, actions="basis,lowrank"), calibration=calib)
    assert plan.factors and unique_parameters(fused) == plan.params_after
    layer = fused.get_submodule(plan.factors[0].members[0])
    assert layer.down.kernel_size == (3, 3) and layer.down.padding == (1, 1) and layer.up.kernel_size == (1, 1)
    front = FxFrontend(model)
    rebuilt = Fuser(front, front.calibrate(calib, [])).build(full_rank(plan))
    x = batches((2, 3, 8, 8), 1, seed=5)[0]
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), atol=1e-5, rtol=1e-5)


class Gpt2Mlp(nn.Module):
    """transformers' Conv1D layers ([in, out] weights) in a residual stack."""

    def __init__(self, depth=3, width=12):
        super().__init__()
        self.fc = nn.ModuleList(Conv1D(width, width) for _ in range(depth))

    def forward(self, x):
        for layer in self.fc:
            x = x + torch.tanh(layer(x))
        return x


def test_transformers_conv1d_layers_are_factored_as_matrices_out_in():
    torch.manual_seed(0)
    model = Gpt2Mlp().eval()
    calib = batches((10, 12))
    fused, plan = fuse(model, FusionConfig(target_ratio=1.2, actions="basis"), calibration=calib)
    assert only(plan, "basis") and unique_parameters(fused) == plan.params_after
    front = FxFrontend(model)
    rebuilt = Fuser(front, front.calibrate(calib, [])).build(full_rank(plan))
    x = batches((3, 12), 1, seed=2)[0]
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), atol=1e-5, rtol=1e-5)


def test_torch_export_graphs_are_factored_node_by_node(stack):
    x0 = batches((16, 8), 1)[0]
    gm = torch.export.export(stack, (x0,)).module()  # batch 16 fixed
    calib = batches((16, 8))
    fused, plan = fuse(gm, FusionConfig(target_ratio=1.6, actions="basis"), calibration=calib)
    assert only(plan, "basis") and isinstance(fused, torch.fx.GraphModule)
    fused.graph.lint()
    assert unique_parameters(fused) == plan.params_after
    bases = [n for n in fused.graph.nodes if n.op == "get_attr" and "lfpass_basis" in str(n.target)]
    assert bases and len({n.target for n in bases}) == len(only(plan, "basis"))  # one tensor per basis
    front = FxFrontend(gm, example_inputs=calib[0])
    rebuilt = Fuser(front, front.calibrate(calib, [])).build(full_rank(plan))
    x = batches((16, 8), 1, seed=4)[0]
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), gm(x), atol=1e-5, rtol=1e-5)


def test_the_exported_onnx_stores_each_basis_once_and_agrees(stack, tmp_path):
    fused, plan = fuse(stack, FusionConfig(target_ratio=1.6, actions="basis"), calibration=batches((16, 8)))
    x = batches((3, 8), 1, seed=6)[0]
    result = lfpass.export(fused, x, tmp_path / "f.onnx")  # checks onnxruntime against PyTorch (1e-4)
    import onnx

    model = onnx.load(tmp_path / "f.onnx")
    assert sum(int(np.prod(t.dims)) for t in model.graph.initializer) == plan.params_after
    assert result.max_abs <= 1e-4 * max(1.0, float(fused(x).abs().max()))


def test_gradients_from_every_member_reach_the_one_basis(stack):
    fused, plan = fuse(stack, FusionConfig(target_ratio=1.6, actions="basis"), calibration=batches((16, 8)))
    entry = only(plan, "basis")[0]
    basis = fused.get_submodule(entry.members[0]).down.weight
    fused.train()
    fused(batches((4, 8), 1, seed=8)[0]).sum().backward()
    assert basis.grad is not None and basis.grad.abs().sum() > 0
    assert sum(1 for p in fused.parameters() if p is basis) == 1  # counted once by the optimiser too


def test_a_grouped_convolution_is_refused_in_one_line_and_nothing_changes():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 3, groups=2)).eval()
    before = copy.deepcopy(model.state_dict())
    front = FxFrontend(model)
    sites = front.found.by_name()
    key = sites["0"].class_key()
    plan = FusionPlan((), "cosine", "model", 0, 0, 0, 0, 1.0, factors=(Factored(("0", "1"), 2, key, 4, 18),))
    with pytest.raises(PlanError, match="grouped convolution") as info:
        Fuser(front).build(plan)
    assert "\n" not in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
