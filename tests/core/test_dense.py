"""Candidates measured without a rebuild (:mod:`lfpass.core.dense`): the original model holding
a plan's values computes what the built plan computes, in FX (called modules, transformers'
Conv1D, convolutions, torch.export graphs) and in ONNX (plain and transposed weights); the model
is left bit for bit as it was; what does not reduce to values (alignment) says so."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lfpass
from lfpass.core.config import FusionConfig
from lfpass.core.dense import plan_values
from lfpass.core.keep import Fuser, fuse_keeping
from lfpass.fx.frontend import FxFrontend
from lfpass.onnx.frontend import OnnxFrontend, split_feed
from tests.conftest import ConvStack, Stack
from tests.onnx.test_factor import WIDTH, mlp

SAME = 2e-5  # float32: the dense product against the factored layers' two products

PLANS = {
    "ties": FusionConfig(target_ratio=1.5, actions="tie", align="none", merge="mean"),
    "regmean + residual": FusionConfig(target_ratio=1.3, actions="tie", align="none", merge="regmean",
                                       residual_rank=2),
    "bases and low rank": FusionConfig(target_ratio=1.6, actions="basis,lowrank"),
    "the menu": FusionConfig(target_ratio=1.4),
}


def batches(shape, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def check_same(front, config, calib, held, changed_something=True):
    kept = fuse_keeping(front, config, calib)
    fuser = Fuser(front, front.calibrate(calib[:-1], []))
    values = plan_values(kept.plan, front.found, fuser.calibration)
    assert values is not None, kept.plan.explain()
    assert bool(values) == changed_something
    built = front.outputs(fuser.build(kept.plan), held)
    dense = fuser.outputs(kept.plan, held)
    for a, b in zip(built, dense):
        np.testing.assert_allclose(b, a, atol=SAME, rtol=SAME)
    return kept.plan


class Conv1DStack(nn.Module):  # GPT-2's layers store their weight [in, out]
    def __init__(self, depth=4, width=12):
        super().__init__()
        self.blocks = nn.ModuleList(Conv1D(width, width) for _ in range(depth))

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block(x))
        return x


@pytest.mark.parametrize("which", PLANS)
def test_fx_modules_holding_a_plans_values_compute_the_built_plan(which):
    torch.manual_seed(0)
    model = Stack(depth=4, width=16).eval()
    before = state(model)
    check_same(FxFrontend(model), PLANS[which], batches((16, 8)), batches((6, 8), 2, seed=5))
    after = state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # restored bit for bit


@pytest.mark.parametrize("which", ["regmean + residual", "bases and low rank"])
def test_convolutions_and_conv1d_and_export_graphs_too(which):
    torch.manual_seed(0)
    convs = ConvStack(depth=3, ch=8).eval()
    check_same(FxFrontend(convs), PLANS[which], batches((4, 3, 8, 8)), batches((3, 3, 8, 8), 2, seed=5))
    gpt = Conv1DStack().eval()
    check_same(FxFrontend(gpt), PLANS[which], batches((16, 12)), batches((5, 12), 2, seed=5))
    torch.manual_seed(1)
    stack = Stack(depth=4, width=16).eval()
    exported = torch.export.export(stack, (torch.randn(16, 8),)).module()  # a static batch of 16
    check_same(FxFrontend(exported), PLANS[which], batches((16, 8)), batches((16, 8), 2, seed=5))


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("which", PLANS)
def test_onnx_holding_a_plans_values_computes_the_built_plan(which, transposed):
    model = mlp(depth=4, transposed=transposed)
    x = np.random.default_rng(0).standard_normal((96, WIDTH)).astype(np.float32)
    front = OnnxFrontend(model)
    feeds = split_feed({"x": x}, model)
    held = [{"x": np.random.default_rng(1).standard_normal((7, WIDTH)).astype(np.float32)}]
    before = {v.name: v.const_value.numpy().copy() for v in model.graph.initializers.values()}
    check_same(front, PLANS[which], feeds, held)
    assert front._overrides is not None and front._overrides[1]  # one session, tensors fed
    assert all(np.array_equal(model.graph.initializers[k].const_value.numpy(), v) for k, v in before.items())


def test_an_aligned_plan_is_built_instead():
    torch.manual_seed(0)
    model = Stack(depth=4, width=16).eval()
    calib = batches((16, 8))
    front = FxFrontend(model)
    kept = fuse_keeping(front, FusionConfig(target_ratio=1.5, actions="tie", align="weights"), calib)
    assert kept.plan.align == "weights" and kept.plan.groups
    fuser = Fuser(front, front.calibrate(calib, []))
    assert plan_values(kept.plan, front.found, fuser.calibration) is None
    held = batches((6, 8), 1, seed=5)
    np.testing.assert_allclose(fuser.outputs(kept.plan, held)[0], front.outputs(fuser.build(kept.plan), held)[0])


def test_a_budget_measures_without_copying(monkeypatch):
    """Under a budget the menu measures candidates on the model itself: the frontend copies the
    model once, to build the plan it keeps."""
    torch.manual_seed(0)
    model = Stack(depth=4, width=16).eval()
    front = FxFrontend(model)
    copies = []
    real = front.copy
    monkeypatch.setattr(front, "copy", lambda: copies.append(1) or real())
    config = FusionConfig(max_error=0.02, error_metric="cosine")
    kept = fuse_keeping(front, config, batches((16, 8), 12))
    assert kept.plan.ratio > 1.0 and kept.plan.error is not None
    assert len(copies) == 1
    _, plan = lfpass.fuse(model, config, calibration=batches((16, 8), 12))
    assert plan.params_after == kept.plan.params_after  # the same plan through the public API
