"""One stage of iterative fusion: targets against the original, the n:1 weighting, the counts, replays."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lfpass
from lfpass.train import Schedule, fuse_stage, layer_counts, plan_stage, rebuild, scope_params
from lfpass.train.stages import stage_config


class Blocks(nn.Module):
    """``depth`` same-shaped linear blocks between an input layer and a head."""

    def __init__(self, depth: int = 4, width: int = 8):
        super().__init__()
        self.inp = nn.Linear(4, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        x = self.inp(x)
        for b in self.blocks:
            x = torch.relu(b(x))
        return self.head(x)


def near_copies(depth: int = 3) -> Blocks:
    """Block 1 is block 0 plus tiny noise (the most alike pair); block 2 is unrelated."""
    torch.manual_seed(0)
    m = Blocks(depth)
    with torch.no_grad():
        m.blocks[1].weight.copy_(m.blocks[0].weight + 1e-3 * torch.randn_like(m.blocks[0].weight))
        m.blocks[1].bias.copy_(m.blocks[0].bias)
    return m


def test_schedule_targets_geometric_and_linear():
    assert Schedule(stages=3).targets(8.0) == pytest.approx([2.0, 4.0, 8.0])
    assert Schedule(stages=4, spacing="linear").targets(3.0) == pytest.approx([1.5, 2.0, 2.5, 3.0])
    with pytest.raises(lfpass.ConfigError, match="spacing"):
        Schedule(spacing="log")
    with pytest.raises(lfpass.ConfigError, match="steps_per_stage"):
        Schedule(steps_per_stage=-1)


def test_stage_target_is_against_the_original():
    """A model already at 1.5x asked for 2x overall needs 2/1.5 of itself."""
    cfg = lfpass.FusionConfig(target_ratio=4.0, max_overshoot=0.3)
    stage = stage_config(cfg, target=2.0, current=600, original=900)
    assert stage.target_ratio == pytest.approx(2.0 * 600 / 900)
    assert stage.max_overshoot == pytest.approx(0.3 * 600 / 900)
    assert stage_config(cfg, target=1.4, current=600, original=900) is None  # already past it


def test_two_stages_reach_the_target_over_the_original():
    model = Blocks(depth=6)
    cfg = lfpass.FusionConfig(target_ratio=2.0, ratio_scope="layers")
    original = scope_params(model, cfg)
    plans = []
    for target in Schedule(stages=2).targets(2.0):
        plans.append(plan_stage(model, cfg, target, original))
        fuse_stage(model, plans[-1], layer_counts(plans[:-1]))
        assert original / scope_params(model, cfg) >= target - 1e-9
    assert plans[1].params_before == plans[0].params_after  # stage 2 planned on the fused model
    assert lfpass.unique_parameters(model) == plans[-1].params_after


def test_a_stage_already_reached_has_the_empty_plan():
    model = Blocks(depth=6)
    cfg = lfpass.FusionConfig(target_ratio=3.0, ratio_scope="layers")
    original = scope_params(model, cfg)
    fuse_stage(model, plan_stage(model, cfg, 2.0, original), {})
    plan = plan_stage(model, cfg, 1.5, original)
    assert plan.groups == () and plan.params_after == plan.params_before == lfpass.unique_parameters(model)
    assert "already reaches" in plan.message and plan.reached
    fuse_stage(model, plan, {})  # applies as a no-op
    assert lfpass.unique_parameters(model) == plan.params_after


def test_counts_must_name_sites():
    model = Blocks()
    plan = plan_stage(model, lfpass.FusionConfig(target_ratio=1.2), 1.2, lfpass.unique_parameters(model))
    with pytest.raises(lfpass.PlanError, match="no site"):
        fuse_stage(model, plan, {"blocks.9": 2})


@pytest.mark.parametrize("rule", ["mean", "weighted", "mix"])
def test_a_fused_tensor_weighs_as_many_layers_as_it_stands_for(rule):
    """(b0 + b1) fused, then fused with b2: mean weighs it 2:1, so the result is the mean of all three."""
    model = near_copies()
    w = [b.weight.detach().double().clone() for b in model.blocks]
    cfg = lfpass.FusionConfig(target_ratio=1.01, include=("blocks.*",), merge=rule)
    first = lfpass.analyze(model, cfg)
    assert [g.members for g in first.groups] == [("blocks.0", "blocks.1")]
    fuse_stage(model, first, {})
    second = lfpass.analyze(model, cfg.replace(target_ratio=1.5))
    assert [g.members for g in second.groups] == [("blocks.0", "blocks.2")]
    counts = layer_counts([first])
    assert counts == {"blocks.0": 2}
    naive = lfpass.apply(model, second)  # what plain apply gives: 1:1
    fuse_stage(model, second, counts)
    merged = model.blocks[2].weight.detach().double()
    assert model.blocks[0].weight is model.blocks[1].weight is model.blocks[2].weight
    if rule == "mean":
        torch.testing.assert_close(merged, (w[0] + w[1] + w[2]) / 3, atol=1e-6, rtol=0)  # float32 rounding
        torch.testing.assert_close(naive.blocks[2].weight.detach().double(), (w[0] + w[1]) / 4 + w[2] / 2,
                                   atol=1e-6, rtol=0)
    elif rule == "weighted":  # norm x count: the fused tensor's norm counted twice
        shared = (w[0] + w[1]) / 2  # stage one's weighted merge of near-copies is ~ their mean
        n0, n2 = 2 * shared.norm(), w[2].norm()
        torch.testing.assert_close(merged, (n0 * shared + n2 * w[2]) / (n0 + n2), atol=1e-4, rtol=0)
    else:  # mix picks each entry from a member with probability count / total: ~2/3 from the fused tensor
        from_fused = (merged - w[0]).abs() < 1e-2
        assert 0.5 < from_fused.double().mean() < 0.85


def test_counts_follow_anchors_across_stages():
    p1 = lfpass.FusionPlan((lfpass.FusionGroup(("a", "b"), "mean", 1.0, None, 1),
                            lfpass.FusionGroup(("c", "d", "e"), "mean", 1.0, None, 1)), "cosine", "model",
                           10, 7, 10, 7, 5.0)
    p2 = lfpass.FusionPlan((lfpass.FusionGroup(("a", "c", "f"), "mean", 1.0, None, 1),), "cosine", "model",
                           7, 5, 7, 5, 5.0)
    assert layer_counts([p1]) == {"a": 2, "c": 3}
    assert layer_counts([p1, p2]) == {"a": 6}


def test_rebuild_recreates_the_ties():
    model = Blocks(depth=6)
    cfg = lfpass.FusionConfig(target_ratio=2.0, ratio_scope="layers")
    fused, plans = Blocks(depth=6), []
    fused.load_state_dict(model.state_dict())
    original = scope_params(model, cfg)
    for target in Schedule(stages=2).targets(2.0):
        plans.append(plan_stage(fused, cfg, target, original))
        fuse_stage(fused, plans[-1], layer_counts(plans[:-1]))
    again = rebuild(model, plans)
    assert lfpass.unique_parameters(again) == lfpass.unique_parameters(fused) == plans[-1].params_after
    again.load_state_dict(fused.state_dict())
    x = torch.randn(5, 4)
    torch.testing.assert_close(again(x), fused(x), atol=0, rtol=0)
    assert lfpass.unique_parameters(model) == original + 3 * 8 + 3  # the original is untouched (head left out)
