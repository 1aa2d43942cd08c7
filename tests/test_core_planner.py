import json

import numpy as np
import pytest

from lfpass.config import FusionConfig
from lfpass.errors import PlanError
from lfpass.plan import FusionPlan
from lfpass.planner import plan_fusion
from lfpass.sites import Site, make_signature, role_of


def _site(name, role, shape=(4, 4), **sig):
    return Site(name, "linear", role, make_signature(shape=shape, bias=False, **sig), (f"{name}.w",), int(np.prod(shape)))


@pytest.fixture
def world():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(4, 4))
    tensors = {
        "a.w": base,
        "b.w": base + 0.01,
        "c.w": rng.normal(size=(4, 4)),
        "d.w": rng.normal(size=(4, 4)),
        "x.w": base,
    }
    sites = [_site(n, "blk.*") for n in "abcd"] + [_site("x", "other")]
    return sites, tensors


def test_role_of():
    assert role_of("encoder.layer.3.attention.self.query") == "encoder.layer.*.attention.self.query"
    assert role_of("/encoder/layer.3/attention/self/query/MatMul") == "encoder/layer.*/attention/self/query/MatMul"
    assert role_of("layer1.0.conv1") == "layer1.*.conv1"


def test_most_similar_pair_first_and_deterministic(world):
    sites, tensors = world
    config = FusionConfig(target_ratio=1.01)
    plan = plan_fusion(sites, tensors.__getitem__, config, params_total=80)
    assert [g.members for g in plan.groups] == [("a", "b")]
    assert plan_fusion(sites, tensors.__getitem__, config, 80) == plan


def test_per_role_by_default_and_cross_role_when_asked(world):
    sites, tensors = world
    per_role = plan_fusion(sites, tensors.__getitem__, FusionConfig(threshold=0.99, target_ratio=None), 80)
    assert all("x" not in g.members for g in per_role.groups)
    cross = plan_fusion(sites, tensors.__getitem__, FusionConfig(threshold=0.99, target_ratio=None, cross_role=True), 80)
    assert any("x" in g.members for g in cross.groups)


def test_target_ratio_met_within_one_group(world):
    sites, tensors = world
    for target in (1.1, 1.3, 1.6):
        plan = plan_fusion(sites, tensors.__getitem__, FusionConfig(target_ratio=target), 80)
        assert plan.ratio >= target
        assert plan.params_before / (plan.params_after + 16) < target  # one fewer merge would miss


def test_unreachable_ratio_says_how_far(world):
    sites, tensors = world
    plan = plan_fusion(sites, tensors.__getitem__, FusionConfig(target_ratio=50), 80)
    assert not plan.reached
    assert plan.ratio == pytest.approx(plan.max_ratio)
    assert "out of reach" in plan.message and f"{plan.max_ratio:.3f}" in plan.message


def test_layers_scope(world):
    sites, tensors = world
    plan = plan_fusion(sites, tensors.__getitem__, FusionConfig(target_ratio=2, ratio_scope="layers"), 10_000)
    assert plan.layer_ratio >= 2 and plan.model_ratio < 1.01


def test_max_group_size(world):
    sites, tensors = world
    plan = plan_fusion(sites, tensors.__getitem__, FusionConfig(target_ratio=50, max_group_size=2), 80)
    assert all(len(g.members) <= 2 for g in plan.groups)
    assert "max_group_size" in plan.explain() or len(plan.groups) == 2


def test_different_signatures_never_share(world):
    _, tensors = world
    sites = [
        _site("a", "r"),
        _site("b", "r", layout="in_out"),
        Site("c", "conv", "r", make_signature(shape=(4, 4), bias=False), ("c.w",), 16),
        _site("d", "r", shape=(2, 8)),
    ]
    tensors = {**tensors, "d.w": tensors["a.w"].reshape(2, 8), "b.w": tensors["a.w"]}
    plan = plan_fusion(sites, tensors.__getitem__, FusionConfig(target_ratio=10, cross_role=True), 64)
    assert plan.groups == ()
    assert plan.candidates == ()


def test_threshold_only_merges_pairs_above_it(world):
    sites, tensors = world
    plan = plan_fusion(sites, tensors.__getitem__, FusionConfig(threshold=0.999, target_ratio=None), 80)
    assert [g.members for g in plan.groups] == [("a", "b")]
    assert all(g.score >= 0.999 for g in plan.groups)


def test_json_round_trip(world):
    sites, tensors = world
    plan = plan_fusion(sites, tensors.__getitem__, FusionConfig(target_ratio=1.5, merge="mix", seed=3), 80)
    again = FusionPlan.from_json(plan.to_json())
    assert again == plan
    assert json.loads(plan.to_json())["ratio"] == pytest.approx(plan.ratio)
    assert again.take(1).groups == plan.groups[:1]


def test_bad_plan_json():
    with pytest.raises(PlanError, match="version"):
        FusionPlan.from_json('{"groups": []}')
    with pytest.raises(PlanError, match="not a valid"):
        FusionPlan.from_json("[1, 2")


def test_explain_gives_a_reason_for_every_pair(world):
    sites, tensors = world
    plan = plan_fusion(sites, tensors.__getitem__, FusionConfig(target_ratio=1.01), 80)
    lines = plan.explain().splitlines()[1:]
    assert len(lines) == len(plan.candidates) == 6
    assert any("fused: group 0" in l for l in lines)
    assert sum("kept apart" in l for l in lines) == 5
