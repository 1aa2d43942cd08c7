import json
import re

import numpy as np
import pytest

from lfpass.core.config import FusionConfig
from lfpass.core.errors import PlanError
from lfpass.core.plan import FusionPlan
from lfpass.core.planner import plan_fusion
from lfpass.core.sites import Site, make_signature, role_of


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


@pytest.mark.parametrize("cap, groups", [(2, [("a", "b"), ("c", "d")]), (3, [("a", "b", "c")])])
def test_max_group_size(world, cap, groups):
    """An unreachable target with a cap: the class of four packs into groups of at most ``cap``."""
    sites, tensors = world
    plan = plan_fusion(sites, tensors.__getitem__, FusionConfig(target_ratio=50, max_group_size=cap), 80)
    assert [g.members for g in plan.groups] == groups
    assert plan.params_after == 80 - 16 * sum(len(g) - 1 for g in groups) == 48
    assert plan.max_ratio == pytest.approx(80 / 48)  # under the cap, no plan fuses more
    fused = {frozenset(g) for g in groups}
    pairs = [m for m in map(_LINE.match, plan.explain().splitlines()) if m]
    apart = [m["why"] for m in pairs if not any({m["a"], m["b"]} <= g for g in fused)]
    assert len(pairs) == 6 and len(apart) == 6 - sum(len(g) * (len(g) - 1) // 2 for g in groups)
    assert set(apart) == {f"kept apart: joined groups would exceed max_group_size {cap}"}


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


_LINE = re.compile(r"^  (?P<score>[+-]\d\.\d{4})  (?P<a>\S+) ~ (?P<b>\S+): (?P<why>.*)$")


def _check_reason(plan: FusionPlan, a: str, b: str, score: float, why: str) -> None:
    """``why`` is true of the plan: the pair's groups, scores and the plan's limits say so."""
    where = plan.group_of()
    if m := re.fullmatch(r"fused: group (\d+)", why):
        assert {a, b} <= set(plan.groups[int(m[1])].members)
        return
    assert where.get(a, a) != where.get(b, b), "a pair kept apart is in one group"
    ga = plan.groups[where[a]].members if a in where else (a,)
    gb = plan.groups[where[b]].members if b in where else (b,)
    scores = {frozenset((c.a, c.b)): c.score for c in plan.candidates}
    if m := re.fullmatch(r"kept apart: joined groups would exceed max_group_size (\d+)", why):
        assert int(m[1]) == plan.max_group_size < len(ga) + len(gb)
    elif m := re.fullmatch(r"kept apart: below threshold (\S+)", why):
        assert len(ga) == len(gb) == 1 and float(m[1]) == plan.threshold and score < plan.threshold
    elif m := re.fullmatch(r"kept apart: its groups' average similarity (\S+) is below threshold (\S+)", why):
        link = np.mean([scores[frozenset((x, y))] for x in ga for y in gb])
        assert float(m[1]) == pytest.approx(link, abs=5e-5) and float(m[2]) == plan.threshold and link < plan.threshold
    elif why == "kept apart: target reached before this pair":
        assert plan.target_ratio is not None and plan.ratio >= plan.target_ratio
    elif m := re.fullmatch(r"kept apart: merging would take the ratio past target \+ max_overshoot \((\S+)\)", why):
        limit = plan.target_ratio + plan.max_overshoot
        assert float(m[1]) == pytest.approx(limit, abs=5e-4)
        one_more = plan.params_before / (plan.params_after - 16)  # each merge here saves one 4x4 weight
        assert one_more > limit
    else:
        pytest.fail(f"unexpected reason for {a} ~ {b}: {why}")


@pytest.mark.parametrize(
    "config, fused, reasons",
    [
        (FusionConfig(target_ratio=1.01), [("a", "b")], {"target reached"}),
        (FusionConfig(threshold=0.999, target_ratio=None), [("a", "b")], {"below threshold", "average similarity"}),
        (FusionConfig(target_ratio=50, max_group_size=2), [("a", "b"), ("c", "d")], {"max_group_size"}),
        (FusionConfig(threshold=0.999, target_ratio=None, max_group_size=3), [("a", "b")], {"average similarity"}),
        (FusionConfig(target_ratio=50, threshold=0.0), [("a", "b", "c")], {"average similarity"}),
        (FusionConfig(target_ratio=1.9, max_overshoot=0.0), [("a", "b", "c")], {"max_overshoot"}),
    ],
    ids=["target", "threshold", "max_group_size", "threshold, at the cap", "target+threshold", "max_overshoot"],
)
def test_explain_gives_the_true_reason_for_every_pair(world, config, fused, reasons):
    sites, tensors = world
    plan = plan_fusion(sites, tensors.__getitem__, config, 80)
    assert [g.members for g in plan.groups] == fused
    lines = [_LINE.match(line) for line in plan.explain().splitlines()[1:] if line.startswith("  ")]
    assert all(lines)
    assert sorted(sorted((m["a"], m["b"])) for m in lines) == sorted(sorted((c.a, c.b)) for c in plan.candidates)
    assert len(lines) == 6  # the pairs of a, b, c, d (x is alone in its role)
    scores = {frozenset((c.a, c.b)): c.score for c in plan.candidates}
    for m in lines:
        score = scores[frozenset((m["a"], m["b"]))]
        assert float(m["score"]) == pytest.approx(score, abs=5e-5)
        _check_reason(plan, m["a"], m["b"], score, m["why"])
    stated = {m["why"] for m in lines if m["why"].startswith("kept apart")}
    assert all(any(r in why for why in stated) for r in reasons)  # the case reaches the reason it is for
