"""``lfpass.fuse(model, config, calibration=...)``: the PyTorch path that keeps the function.

A residual MLP whose blocks 1 and 2 are near-copies (sharing them is cheap) and
whose other blocks are unrelated (sharing them is not): planning by measured
damage must find the cheap pair and keep the held-out error within the budget,
the data-aware merge must beat the plain mean on the members' own inputs, and
every figure the plan reports must be the built model's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lfpass
from lfpass.core.errors import ConfigError
from lfpass.core.quality import output_error
from lfpass.fx.frontend import outputs


class _Mlp(nn.Module):
    def __init__(self, width: int = 16, depth: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(8, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        with torch.no_grad():
            self.blocks[2].weight.copy_(self.blocks[1].weight + 1e-3 * torch.randn(width, width))
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = x + torch.tanh(b(x))
        return self.head(x)


@pytest.fixture()
def batches():
    g = torch.Generator().manual_seed(1)
    scale = torch.linspace(0.2, 3.0, 8)  # anisotropic inputs: where a data-aware merge differs from the mean
    return [torch.randn(16, 8, generator=g) * scale for _ in range(8)]


def test_budget_keeps_the_error_and_finds_the_cheap_pair(batches):
    model = _Mlp().eval()
    fused, plan = lfpass.fuse(model, target_ratio=None, max_error=1e-3, calibration=batches, actions=["tie"])
    assert [set(g.members) for g in plan.groups] == [{"blocks.1", "blocks.2"}]
    assert lfpass.unique_parameters(fused) == plan.params_after < lfpass.unique_parameters(model)
    held = batches[-2:]  # holdout 0.25 of 8 batches
    error = output_error(outputs(model, held), outputs(fused, held))
    assert plan.error == pytest.approx(error, abs=1e-12) and error <= 1e-3
    assert fused.blocks[1].weight is fused.blocks[2].weight
    assert any("over the budget" in why for *_, why in plan.decisions)


def test_regmean_beats_the_mean_at_the_same_plan(batches):
    model = _Mlp().eval()
    common = dict(target_ratio=None, threshold=-1.0, cross_role=False, include=("blocks.0", "blocks.3"))
    mean, p1 = lfpass.fuse(model, calibration=batches, merge="mean", **common)
    data, p2 = lfpass.fuse(model, calibration=batches, merge="regmean", **common)
    assert [g.members for g in p1.groups] == [g.members for g in p2.groups] == [("blocks.0", "blocks.3")]
    assert p2.error < p1.error  # measured on held-out batches, by the pipeline
    assert data.blocks[0].weight is data.blocks[3].weight


def test_options_that_need_data_say_so():
    with pytest.raises(ConfigError, match="calibration"):
        lfpass.fuse(_Mlp(), merge="regmean")
    with pytest.raises(ConfigError, match="calibration"):
        lfpass.fuse(_Mlp(), target_ratio=None, max_error=0.01)


def test_corrections_are_counted_and_pay_for_themselves(batches):
    model = _Mlp().eval()
    common = dict(target_ratio=None, threshold=-1.0, include=("blocks.0", "blocks.3"), merge="regmean", align="none")
    plain, p0 = lfpass.fuse(model, calibration=batches, **common)
    corrected, p1 = lfpass.fuse(model, calibration=batches, residual_rank=2, **common)
    assert lfpass.unique_parameters(corrected) == p1.params_after
    assert p1.params_after == p0.params_after + 2 * (2 * (16 + 16) + 16)  # per member: factors and own bias
    assert p1.error < p0.error
    # rank 4 costs 2 * (4 * 32 + 16) = 288 against the 272 sharing saves: the pair is kept apart, said
    costly, p2 = lfpass.fuse(model, calibration=batches, residual_rank=4, **common)
    assert not p2.groups and "cost as much as sharing saves" in p2.message
    assert lfpass.unique_parameters(costly) == lfpass.unique_parameters(model) and p2.error < 1e-12  # unchanged, to rounding


def test_budget_counts_corrections(batches):
    model = _Mlp().eval()
    fused, plan = lfpass.fuse(model, target_ratio=None, max_error=1e-3, residual_rank=1, calibration=batches)
    assert lfpass.unique_parameters(fused) == plan.params_after
    assert all(g.extra == len(g.members) * (1 * 32 + 16) for g in plan.groups)


class _Ffn(nn.Module):
    """Residual FFN blocks; block 1 is block 0 with its hidden units shuffled (the same function)."""

    def __init__(self, width: int = 8, hidden: int = 32, depth: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.ModuleDict({"fc1": nn.Linear(width, hidden), "fc2": nn.Linear(hidden, width)})
                                    for _ in range(depth))
        perm = torch.randperm(hidden)
        with torch.no_grad():
            b0, b1 = self.blocks[0], self.blocks[1]
            b1["fc1"].weight.copy_(b0["fc1"].weight[perm])
            b1["fc1"].bias.copy_(b0["fc1"].bias[perm])
            b1["fc2"].weight.copy_(b0["fc2"].weight[:, perm])
            b1["fc2"].bias.copy_(b0["fc2"].bias)

    def forward(self, x):
        for b in self.blocks:
            x = x + b["fc2"](torch.nn.functional.gelu(b["fc1"](x)))
        return x


@pytest.mark.parametrize("align", ["weights", "activations"])
def test_alignment_makes_a_shuffled_copy_free_to_share(align):
    model = _Ffn().eval()
    g = torch.Generator().manual_seed(2)
    data = [torch.randn(16, 8, generator=g) for _ in range(8)]
    common = dict(target_ratio=None, threshold=-1.0, include=("blocks.0.*", "blocks.1.*"), granularity="block",
                  merge="mean")
    plain, p0 = lfpass.fuse(model, calibration=data, align="none", **common)
    aligned, p1 = lfpass.fuse(model, calibration=data, align=align, **common)
    assert [len(g.members) for g in p1.groups] == [2] and p1.align == align
    assert p0.error > 1e-3  # averaging the shuffled copy with its original breaks it
    assert p1.error < 1e-10  # aligned first, the two are one tensor: sharing is lossless
    assert lfpass.unique_parameters(aligned) == p1.params_after
    _, p2 = lfpass.fuse(model, calibration=data, **common)  # with data, alignment is on by default
    assert p2.align == "weights" and p2.error < 1e-10


def test_a_plan_from_fuse_applies_again_to_the_same_model(batches):
    model = _Ffn().eval()
    g = torch.Generator().manual_seed(3)
    data = [torch.randn(16, 8, generator=g) for _ in range(8)]
    fused, plan = lfpass.fuse(model, calibration=data, target_ratio=None, threshold=-1.0, align="activations",
                              merge="regmean", residual_rank=2, include=("blocks.0.*", "blocks.2.*"))
    again = lfpass.apply(model, lfpass.FusionPlan.from_json(plan.to_json()), calibration=data[:-2])
    x = torch.randn(4, 8)
    assert torch.equal(fused(x), again(x))
    assert lfpass.unique_parameters(again) == plan.params_after
    with pytest.raises(ConfigError, match="calibration"):
        lfpass.apply(model, plan)
