"""The baselines fusion is compared against: each lands at or below its target, within one step,
leaves its input alone, and changes nothing where it removed nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lfpass
from lfpass.baselines import SkipBlock, drop_layers, low_rank, magnitude_prune, random_fusion, random_plan
from lfpass.core.config import FusionConfig
from lfpass.core.errors import PlanError
from lfpass.fx.api import unique_parameters
from lfpass.fx.lowrank import LowRank
from tests.conftest import Stack

ATOL = 1e-5


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


# -- random fusion -------------------------------------------------------------------------------

def test_random_fusion_keeps_the_plans_group_sizes_and_classes():
    torch.manual_seed(0)
    model = Stack(depth=8, width=16).eval()
    before = _state(model)
    plan = lfpass.analyze(model, FusionConfig(target_ratio=1.6))
    assert plan.groups
    fused, info = random_fusion(model, plan, seed=3)
    assert _same_state(model, before)
    assert unique_parameters(fused) == info["params"] == plan.params_after
    groups = random_plan(plan, seed=3).groups
    assert [list(g.members) for g in groups] == info["groups"]
    assert [len(g.members) for g in groups] == [len(g.members) for g in plan.groups]
    assert [g.cls for g in groups] == [g.cls for g in plan.groups]
    members = dict(plan.classes)
    for g in groups:
        assert set(g.members) <= set(members[g.cls]) and g.rule == "mean"
    drawn = [m for g in groups for m in g.members]
    assert len(drawn) == len(set(drawn))  # no layer in two groups
    again, info2 = random_fusion(model, plan, seed=3)
    assert info2["groups"] == info["groups"]  # seeded
    x = torch.randn(4, 8)
    torch.testing.assert_close(again(x), fused(x))
    others = {tuple(map(tuple, random_fusion(model, plan, seed=s)[1]["groups"])) for s in range(6)}
    assert len(others) > 1  # the draw does depend on the seed


def test_random_fusion_of_an_empty_plan_changes_nothing(stack):
    plan = lfpass.analyze(stack, FusionConfig(target_ratio=None, threshold=2.0))
    assert not plan.groups
    fused, info = random_fusion(stack, plan, seed=0)
    x = torch.randn(5, 8)
    torch.testing.assert_close(fused(x), stack(x), atol=0, rtol=0)
    assert info["params"] == unique_parameters(stack)


# -- magnitude pruning ---------------------------------------------------------------------------

def test_magnitude_prune_lands_exactly_at_the_target_and_keeps_biases(stack):
    before = _state(stack)
    total = unique_parameters(stack)
    target = int(total * 0.6)
    pruned, info = magnitude_prune(stack, target)
    assert _same_state(stack, before)
    assert info["params"] == target  # one weight at a time: exactly
    assert info["dense_params"] == unique_parameters(pruned) == total  # dense size unchanged
    zeros = sum(int((m.weight == 0).sum()) for m in pruned.modules() if isinstance(m, nn.Linear))
    assert zeros == total - target
    for name, p in pruned.named_parameters():
        if name.endswith("bias"):
            assert torch.equal(p, stack.get_parameter(name))
    # global: the largest kept magnitude beats every pruned one, in every layer together
    kept = torch.cat([m.weight.detach()[m.weight != 0].abs() for m in pruned.modules() if isinstance(m, nn.Linear)])
    assert float(kept.min()) >= info["threshold"]


def test_magnitude_prune_at_the_full_count_changes_nothing_and_refuses_the_impossible(stack):
    total = unique_parameters(stack)
    pruned, info = magnitude_prune(stack, total)
    x = torch.randn(5, 8)
    torch.testing.assert_close(pruned(x), stack(x), atol=0, rtol=0)
    assert info["params"] == total and info["pruned"] == 0
    biases = sum(m.bias.numel() for m in stack.modules() if isinstance(m, nn.Linear))
    with pytest.raises(PlanError, match="cannot prune"):
        magnitude_prune(stack, biases - 1)
    only, info = magnitude_prune(stack, total - 10, layers=["blocks.0"])
    assert int((only.blocks[0].weight == 0).sum()) == 10 and torch.equal(only.blocks[1].weight, stack.blocks[1].weight)


# -- layer dropping ------------------------------------------------------------------------------

class ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class ResMLP(nn.Module):
    def __init__(self, depth: int = 6, width: int = 16):
        super().__init__()
        self.inp = nn.Linear(8, width)
        self.blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        x = self.inp(x)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


@pytest.fixture
def resmlp() -> ResMLP:
    """Blocks 1 and 4 barely change their input: the ones block influence drops first."""
    torch.manual_seed(0)
    m = ResMLP().eval()
    with torch.no_grad():
        for i in (1, 4):
            m.blocks[i].fc2.weight.mul_(1e-3)
            m.blocks[i].fc2.bias.mul_(1e-3)
    return m


def test_drop_layers_drops_the_least_influential_blocks_first(resmlp):
    before = _state(resmlp)
    block = sum(p.numel() for p in resmlp.blocks[0].parameters())
    total = unique_parameters(resmlp)
    batches = [torch.randn(32, 8) for _ in range(2)]
    dropped, info = drop_layers(resmlp, total - 2 * block, resmlp.blocks, batches)
    assert _same_state(resmlp, before)
    assert info["dropped"] == [1, 4] and info["params"] == unique_parameters(dropped) == total - 2 * block
    assert sorted(range(6), key=lambda i: info["influence"][i])[:2] == [1, 4]
    assert isinstance(dropped.blocks[1], SkipBlock) and isinstance(resmlp.blocks[1], ResBlock)
    x = batches[0]
    y = resmlp(x)
    assert (dropped(x) - y).norm() / y.norm() < 1e-2  # near-identity blocks: little lost
    # one parameter under two blocks' worth takes a third block: within one block of the target
    target = total - 2 * block - 1
    third, info = drop_layers(resmlp, target, "blocks", batches)
    assert len(info["dropped"]) == 3 and info["params"] <= target < info["params"] + block


def test_drop_layers_at_the_full_count_changes_nothing_and_refuses_the_impossible(resmlp):
    total = unique_parameters(resmlp)
    same, info = drop_layers(resmlp, total, "blocks")
    x = torch.randn(4, 8)
    torch.testing.assert_close(same(x), resmlp(x), atol=0, rtol=0)
    assert info["dropped"] == []
    with pytest.raises(PlanError, match="cannot drop"):
        drop_layers(resmlp, 100, "blocks")
    _, info = drop_layers(resmlp, total - 1, "blocks")  # no data: deepest first, the final block last
    assert info["dropped"] == [4]


def test_drop_layers_on_a_tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    layer = sum(p.numel() for p in model.encoder.layer[0].parameters())
    total = unique_parameters(model)
    batch = {"input_ids": torch.randint(0, 100, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    dropped, info = drop_layers(model, total - layer, model.encoder.layer, [batch])
    assert len(info["dropped"]) == 1 and info["params"] == total - layer
    assert len(info["influence"]) == 4 and all(v > 0 for v in info["influence"])
    out = dropped(**batch).last_hidden_state
    assert out.shape == (2, 12, 32) and torch.isfinite(out).all()
    # a dropped layer passes its input through: the same as the model run without it
    kept = [i for i in range(4) if i not in info["dropped"]]
    reference = transformers.BertModel(config).eval()
    reference.load_state_dict(model.state_dict())
    reference.encoder.layer = nn.ModuleList(reference.encoder.layer[i] for i in kept)
    torch.testing.assert_close(out, reference(**batch).last_hidden_state, atol=ATOL, rtol=0)
    blind, info = drop_layers(model, total - layer, "encoder.layer")  # no data: the output kind from annotations
    assert info["dropped"] == [2] and torch.isfinite(blind(**batch).last_hidden_state).all()
    unchanged, _ = drop_layers(model, total, "encoder.layer", [batch])
    torch.testing.assert_close(unchanged(**batch).last_hidden_state, model(**batch).last_hidden_state,
                               atol=0, rtol=0)


class TupleBlock(ResBlock):
    """A block returning ``(hidden_states,)``, as older transformers layers do."""

    def forward(self, x) -> tuple[torch.Tensor]:
        return (super().forward(x),)


class TupleMLP(ResMLP):
    def __init__(self):
        super().__init__(depth=3)
        self.blocks = nn.ModuleList(TupleBlock(16) for _ in range(3))

    def forward(self, x):
        x = self.inp(x)
        for b in self.blocks:
            x = b(x)[0]
        return self.head(x)


@pytest.mark.parametrize("calibrated", [False, True])
def test_drop_layers_keeps_a_tuple_output(calibrated):
    torch.manual_seed(0)
    model = TupleMLP().eval()
    x = torch.randn(4, 8)
    block = sum(p.numel() for p in model.blocks[0].parameters())
    dropped, info = drop_layers(model, unique_parameters(model) - block, "blocks", [x] if calibrated else None)
    (i,) = info["dropped"]
    assert dropped.blocks[i](x)[0] is x
    assert dropped(x).shape == (4, 3)


# -- low rank ------------------------------------------------------------------------------------

@pytest.mark.parametrize("calibrated", [False, True])
def test_low_rank_lands_within_a_rank_step(calibrated):
    torch.manual_seed(0)
    model = Stack(depth=4, width=32, inp=32).eval()
    before = _state(model)
    x = torch.randn(256, 32)
    total = unique_parameters(model)
    target = int(total * 0.6)
    out, info = low_rank(model, target, [x] if calibrated else None)
    assert _same_state(model, before)
    assert info["activation_aware"] is calibrated
    assert info["params"] == unique_parameters(out) <= target
    step = sum(m.down.in_features + m.up.out_features for m in out.modules() if isinstance(m, LowRank))
    assert info["params"] + step > target
    assert info["ranks"] and 0 < info["fraction"] < 1


def test_low_rank_at_the_full_count_changes_nothing(stack):
    out, info = low_rank(stack, unique_parameters(stack))
    assert not info["ranks"]
    x = torch.randn(3, 8)
    torch.testing.assert_close(out(x), stack(x), atol=0, rtol=0)
