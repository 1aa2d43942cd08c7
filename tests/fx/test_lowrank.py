"""Low-rank parts in PyTorch: per-member residuals on a fused model, and the ASVD baseline.

Each rewrite test asserts how many layers changed, the structure (unique parameters,
ties, ``graph.lint``), the numbers against the original model (full-rank residuals
give the original back within float32 round-off, 1e-5), and a case that is refused."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import lfpass
from lfpass.core.calibration import Calibration, accumulate
from lfpass.core.errors import PlanError
from lfpass.core.lowrank import capture_originals, factor_params, output_error, residual_params
from lfpass.core.plan import FusionGroup, FusionPlan
from lfpass.fx import find_sites
from lfpass.fx.api import unique_parameters
from lfpass.fx.lowrank import LowRank, ResidualLinear, attach_residuals, factorize, factorize_to_params
from tests.conftest import ConvStack, Stack

ATOL = 1e-5


def make_plan(module: nn.Module, *groups: tuple[str, ...], rule: str = "mean") -> FusionPlan:
    sites = find_sites(module).by_name()
    made = tuple(FusionGroup(tuple(g), rule, 1.0, sites[g[0]].class_key(), sites[g[0]].numel) for g in groups)
    before = unique_parameters(module)
    after = before - sum(g.saved for g in made)
    return FusionPlan(groups=made, metric="cosine", scope="model", params_before=before, params_after=after,
                      layer_params_before=before, layer_params_after=after, max_ratio=1.0)


def calibrate(module: nn.Module, batches) -> Calibration:
    """Input statistics of every Linear / Conv1D / Conv2d by weight name, taken with hooks."""
    cal = Calibration()
    hooks = []
    for name, mod in module.named_modules():
        if isinstance(mod, (nn.Linear, Conv1D)):
            def hook(m, args, key=f"{name}.weight"):
                cal.layers[key] = accumulate(cal.layers.get(key), args[0].detach().double().numpy())
        elif isinstance(mod, nn.Conv2d):
            def hook(m, args, key=f"{name}.weight"):
                k = int(np.prod(m.kernel_size))
                patches = F.unfold(args[0].detach().double(), m.kernel_size, m.dilation, m.padding, m.stride)
                rows = patches.transpose(1, 2).reshape(-1, patches.shape[1]).numpy()
                cal.layers[key] = accumulate(cal.layers.get(key), rows, kernel=k)
        else:
            continue
        hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for x in batches:
            module(x)
            cal.batches += 1
    for h in hooks:
        h.remove()
    return cal


def anisotropic(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    return (torch.randn(n, d, generator=g) * torch.logspace(0, -2, d)) @ q.T


def fuse(model: nn.Module, *groups: tuple[str, ...]):
    plan = make_plan(model, *groups)
    originals = capture_originals(find_sites(model), plan)
    return lfpass.apply(model, plan), plan, originals


@pytest.fixture
def stack() -> Stack:
    torch.manual_seed(0)
    return Stack(depth=4).eval()


@pytest.mark.parametrize("with_calibration", [False, True])
def test_full_rank_residuals_give_the_original_back(stack, with_calibration):
    x = torch.randn(64, 8)
    cal = calibrate(stack, [x]) if with_calibration else None
    fused, plan, originals = fuse(stack, ("blocks.0", "blocks.1", "blocks.2"))
    assert not torch.allclose(fused(x), stack(x), atol=1e-3)  # fusing changed it
    attach_residuals(fused, plan, originals, rank=16, calibration=cal)
    assert sum(isinstance(m, ResidualLinear) for m in fused.modules()) == 3
    torch.testing.assert_close(fused(x), stack(x), atol=ATOL, rtol=0)


def test_parameter_count_and_ties(stack):
    before = unique_parameters(stack)
    fused, plan, originals = fuse(stack, ("blocks.0", "blocks.1", "blocks.2"))
    assert unique_parameters(fused) == before - plan.groups[0].saved
    r = 3
    weights_only = copy.deepcopy(fused)
    attach_residuals(weights_only, plan, originals, rank=r, bias=False)
    site = find_sites(stack).by_name()["blocks.0"]
    assert residual_params(site, r) == r * (16 + 16)
    assert unique_parameters(weights_only) == before - plan.groups[0].saved + 3 * r * (16 + 16)
    attach_residuals(fused, plan, originals, rank=r)  # the merged biases differ: each member gets its own back
    assert residual_params(site, r, bias=True) == r * (16 + 16) + 16
    assert unique_parameters(fused) == before - plan.groups[0].saved + 3 * residual_params(site, r, bias=True)
    bases = [fused.blocks[i].base.weight for i in range(3)]
    assert bases[0] is bases[1] is bases[2]  # one shared Parameter, still
    assert fused.blocks[3].weight is not bases[0]


def test_gradients_reach_the_factors_and_the_shared_tensor(stack):
    fused, plan, originals = fuse(stack, ("blocks.0", "blocks.2"))
    attach_residuals(fused, plan, originals, rank=2)
    fused.train()
    fused(torch.randn(8, 8)).pow(2).sum().backward()
    for i in (0, 2):
        block = fused.blocks[i]
        assert block.down.weight.grad is not None and block.down.weight.grad.abs().sum() > 0
        assert block.up.weight.grad is not None and block.up.weight.grad.abs().sum() > 0
    assert fused.blocks[0].base.weight.grad.abs().sum() > 0


def test_activation_aware_residuals_beat_plain_ones_on_the_calibration_inputs():
    torch.manual_seed(1)
    model = Stack(depth=3, width=32, inp=32).eval()
    x = anisotropic(512, 32)
    cal = calibrate(model, [x])
    errors = {}
    for name, c in (("plain", None), ("asvd", cal)):
        fused, plan, originals = fuse(model, ("blocks.0", "blocks.1", "blocks.2"))
        attach_residuals(fused, plan, originals, rank=4, calibration=c)
        per_layer = []
        for i in range(3):
            block = fused.blocks[i]
            approx = (block.base.weight + block.up.weight @ block.down.weight).detach().double().numpy()
            per_layer.append(output_error(originals[f"blocks.{i}.weight"], approx, cal[f"blocks.{i}.weight"]))
        errors[name] = per_layer
    assert all(a < p for a, p in zip(errors["asvd"], errors["plain"])), errors


def test_conv_residuals():
    torch.manual_seed(0)
    model = ConvStack(depth=3).eval()
    x = torch.randn(4, 3, 10, 10)
    cal = calibrate(model, [x])
    before = unique_parameters(model)
    fused, plan, originals = fuse(model, ("blocks.0", "blocks.1", "blocks.2"))
    attach_residuals(fused, plan, originals, rank=8, calibration=cal)  # full rank: min(8, 8 * 9)
    torch.testing.assert_close(fused(x), model(x), atol=ATOL, rtol=0)
    block = fused.blocks[1]
    assert isinstance(block.down, nn.Conv2d) and block.down.kernel_size == (3, 3) and block.down.padding == (1, 1)
    assert block.up.kernel_size == (1, 1)
    site = find_sites(model).by_name()["blocks.0"]
    assert residual_params(site, 8, bias=True) == 8 * (8 * 9 + 8) + 8
    assert unique_parameters(fused) == before - plan.groups[0].saved + 3 * residual_params(site, 8, bias=True)


class HFBlocks(nn.Module):
    def __init__(self, depth=3, width=12):
        super().__init__()
        self.h = nn.ModuleList(Conv1D(width, width) for _ in range(depth))

    def forward(self, x):
        for layer in self.h:
            x = torch.tanh(layer(x))
        return x


def test_hf_conv1d_residuals():
    torch.manual_seed(0)
    model = HFBlocks().eval()
    for layer in model.h:
        nn.init.normal_(layer.weight, std=0.3)
    x = torch.randn(16, 12)
    fused, plan, originals = fuse(model, ("h.0", "h.1", "h.2"))
    attach_residuals(fused, plan, originals, rank=12, calibration=calibrate(model, [x]))
    torch.testing.assert_close(fused(x), model(x), atol=ATOL, rtol=0)


def test_exported_graph_residuals(stack):
    """A torch.export graph reads weights through get_attr: residuals are new graph nodes."""
    x = torch.randn(16, 8)
    exported = torch.export.export(stack, (x,)).module()
    plan = make_plan(exported, ("blocks.0", "blocks.1", "blocks.3"))
    originals = capture_originals(find_sites(exported), plan)
    before = unique_parameters(exported)
    fused = lfpass.apply(exported, plan)
    n_nodes = len(fused.graph.nodes)
    attach_residuals(fused, plan, originals, rank=16, calibration=calibrate(stack, [x]))
    assert len(fused.graph.nodes) == n_nodes + 3 * 6  # three get_attr (bias delta too), two linear, an add each
    fused.graph.lint()
    torch.testing.assert_close(fused(x), stack(x), atol=ATOL, rtol=0)
    assert unique_parameters(fused) == before - plan.groups[0].saved + 3 * (16 * 32 + 16)
    assert isinstance(fused.get_parameter("blocks.1.lfpass_down.weight"), nn.Parameter)


class Encoder(nn.Module):
    """Blocks with an MLP unit (``mlp.fc1``, ``mlp.fc2``)."""

    def __init__(self, depth=3, width=8, hidden=16):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"fc1": nn.Linear(width, hidden), "fc2": nn.Linear(hidden, width)})
                                    for _ in range(depth))

    def forward(self, x):
        for b in self.blocks:
            x = x + b["fc2"](torch.relu(b["fc1"](x)))
        return x


@pytest.mark.parametrize("give_sites", [True, False])
def test_block_members_get_a_residual_per_layer(give_sites):
    torch.manual_seed(0)
    model = Encoder().eval()
    found = find_sites(model)
    units = {u.name: u for u in found.units}
    assert set(units) == {"blocks.0.mlp", "blocks.1.mlp", "blocks.2.mlp"}
    sites = found.by_name()
    group = FusionGroup(("blocks.0.mlp", "blocks.2.mlp"), "mean", 1.0, units["blocks.0.mlp"].class_key(),
                        units["blocks.0.mlp"].numel)
    before = unique_parameters(model)
    plan = FusionPlan(groups=(group,), metric="cosine", scope="model", params_before=before,
                      params_after=before - group.saved, layer_params_before=before,
                      layer_params_after=before - group.saved, max_ratio=1.0)
    originals = capture_originals(find_sites(model), plan)
    fused = lfpass.apply(model, plan)
    x = torch.randn(32, 8)
    attach_residuals(fused, plan, originals, rank=8, sites=sites if give_sites else None)
    assert sum(isinstance(m, ResidualLinear) for m in fused.modules()) == 4
    torch.testing.assert_close(fused(x), model(x), atol=ATOL, rtol=0)
    assert residual_params(units["blocks.0.mlp"], 8) == 8 * (8 + 16) * 2
    added = residual_params(units["blocks.0.mlp"], 8, bias=True)
    assert added == 8 * (8 + 16) * 2 + 16 + 8
    assert unique_parameters(fused) == before - group.saved + 2 * added


def test_refusals(stack):
    fused, plan, originals = fuse(stack, ("blocks.0", "blocks.1"))
    with pytest.raises(PlanError, match="no original weight"):
        attach_residuals(copy.deepcopy(fused), plan, {}, rank=2)
    with pytest.raises(PlanError, match="does not fit"):
        attach_residuals(copy.deepcopy(fused), plan, {k: v[..., :3] for k, v in originals.items()}, rank=2)
    with pytest.raises(PlanError, match="do not fit"):
        bad = Calibration({k: accumulate(None, np.ones((2, 5))) for k in ("blocks.0.weight", "blocks.1.weight")})
        attach_residuals(copy.deepcopy(fused), plan, originals, rank=2, calibration=bad)
    attach_residuals(fused, plan, originals, rank=2)
    with pytest.raises(PlanError, match="already has a residual"):
        attach_residuals(fused, plan, originals, rank=2)


def test_export_keeps_the_shared_tensor_once_and_agrees(tmp_path):
    torch.manual_seed(0)
    model = Stack(depth=4, width=40).eval()  # 1,600-element weights: exporters do not merge them on their own
    fused, plan, originals = fuse(model, ("blocks.0", "blocks.1", "blocks.2"))
    attach_residuals(fused, plan, originals, rank=4)
    x = torch.randn(5, 8)
    result = lfpass.export(fused, x, tmp_path / "residual.onnx")
    assert result.passed
    assert result.shared == 2 and result.ties_kept == 2  # the shared weight and bias, each stored once
    assert result.params_onnx == unique_parameters(fused)


# -- the ASVD baseline ---------------------------------------------------------------------------

def test_factorize_full_rank_is_the_identity_and_low_rank_prefers_calibration():
    torch.manual_seed(2)
    model = Stack(depth=3, width=32, inp=32).eval()
    x = anisotropic(512, 32)
    cal = calibrate(model, [x])
    full = factorize(model, ["blocks.0", "blocks.1"], 32, cal)
    assert isinstance(full.blocks[0], LowRank) and not isinstance(model.blocks[0], LowRank)  # a copy
    torch.testing.assert_close(full(x), model(x), atol=ATOL, rtol=0)
    layers = ["blocks.0", "blocks.1", "blocks.2"]
    y = model(x)
    asvd = (factorize(model, layers, 6, cal)(x) - y).norm() / y.norm()
    plain = (factorize(model, layers, 6)(x) - y).norm() / y.norm()
    assert asvd < 0.7 * plain, (float(asvd), float(plain))


def test_factorize_to_params_lands_at_or_below_the_target():
    torch.manual_seed(0)
    model = Stack(depth=4, width=32, inp=32).eval()
    x = anisotropic(256, 32)
    cal = calibrate(model, [x])
    before = unique_parameters(model)
    for target in (int(before * 0.5), int(before * 0.75), int(before * 0.9)):
        out, fraction = factorize_to_params(model, target, cal)
        got = unique_parameters(out)
        assert got <= target
        # one rank step more on every factored layer would pass the target
        step = sum(m.down.in_features + m.up.out_features for m in out.modules() if isinstance(m, LowRank))
        assert got + step > target, (target, got, step)
        assert 0 < fraction <= 1
    with pytest.raises(PlanError, match="cannot factor"):
        factorize_to_params(model, 100, cal)


def test_factorize_conv_and_refuses_tied_or_missing_layers():
    torch.manual_seed(0)
    model = ConvStack(depth=2).eval()
    x = torch.randn(2, 3, 8, 8)
    cal = calibrate(model, [x])
    out = factorize(model, ["blocks.0"], 8, cal, kinds=("conv",))
    torch.testing.assert_close(out(x), model(x), atol=ATOL, rtol=0)
    assert unique_parameters(out) == unique_parameters(model) - 8 * 8 * 9 + factor_params(8, 72, 8)
    with pytest.raises(PlanError, match="no such layer"):
        factorize(model, ["nope"], 2)
