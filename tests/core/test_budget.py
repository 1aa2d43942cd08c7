"""Quality-budgeted planning (lfpass.core.budget) and the output error it is measured in (lfpass.core.quality).

The planner is IR-free: here ``evaluate`` is a known function of the plan's
groups, so every decision can be checked against it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lfpass.core.budget import correction_params, plan_within_budget, with_options
from lfpass.core.config import FusionConfig
from lfpass.core.errors import ConfigError
from lfpass.core.plan import FusionPlan
from lfpass.core.quality import cosines, describe, output_error
from lfpass.core.sites import Site, make_signature


def _sites(n: int = 4, shape=(8, 6)) -> tuple[list[Site], dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    sig = make_signature(shape=shape, bias=False, layout="out_in", dtype="torch.float32")
    sites, tensors = [], {}
    for i in range(n):
        name = f"blocks.{i}.fc"
        tensors[f"{name}.weight"] = rng.standard_normal(shape).astype(np.float32)
        sites.append(Site(name, "linear", "blocks.*.fc", sig, (f"{name}.weight",), int(np.prod(shape))))
    return sites, tensors


# the damage each pair does alone; a plan's error is the sum over its groups' member pairs
_DAMAGE = {frozenset({0, 1}): 0.001, frozenset({2, 3}): 0.002, frozenset({0, 2}): 0.5,
           frozenset({0, 3}): 0.6, frozenset({1, 2}): 0.7, frozenset({1, 3}): 0.8}


def _evaluate(calls: list[FusionPlan]):
    def evaluate(plan: FusionPlan) -> float:
        calls.append(plan)
        total = 0.0
        for g in plan.groups:
            idx = [int(m.split(".")[1]) for m in g.members]
            total += sum(_DAMAGE[frozenset({a, b})] for i, a in enumerate(idx) for b in idx[i + 1:])
        return total
    return evaluate


def test_budget_takes_cheap_pairs_and_rolls_back_the_rest():
    sites, tensors = _sites()
    calls: list[FusionPlan] = []
    config = FusionConfig(target_ratio=None, max_error=0.01)
    plan = plan_within_budget(sites, tensors.__getitem__, config, 4 * 48, _evaluate(calls))
    assert [set(g.members) for g in plan.groups] == [{"blocks.0.fc", "blocks.1.fc"}, {"blocks.2.fc", "blocks.3.fc"}]
    assert plan.error == pytest.approx(0.003)
    assert plan.error <= config.max_error
    assert plan.params_after == 4 * 48 - 2 * 48 and plan.model_ratio == pytest.approx(2.0)
    # six pairs measured alone, then each tried cumulatively: two kept, the rest rolled back
    assert len(calls) == 6 + 2  # each pair alone, then the two within the budget alone on top of what is kept
    reasons = {(a, b): why for a, b, why in plan.decisions}
    assert reasons[("blocks.0.fc", "blocks.1.fc")].startswith("fused")
    assert "alone (0.5) is over the budget" in reasons[("blocks.0.fc", "blocks.2.fc")]
    assert [e for _, e in plan.curve] == pytest.approx([0.001, 0.003])
    assert "within the budget" in plan.message
    assert "over the budget" in plan.explain()


def test_a_step_that_breaks_the_budget_is_rolled_back():
    sites, tensors = _sites()
    config = FusionConfig(target_ratio=None, max_error=0.0025)  # 0.001 and 0.002 fit alone, not together
    plan = plan_within_budget(sites, tensors.__getitem__, config, 4 * 48, _evaluate([]))
    assert [g.members for g in plan.groups] == [("blocks.0.fc", "blocks.1.fc")] and plan.error == pytest.approx(0.001)
    reasons = {(a, b): why for a, b, why in plan.decisions}
    assert reasons[("blocks.2.fc", "blocks.3.fc")].startswith("rolled back: error 0.003")
    assert "1 pair(s) rolled back" in plan.message


def test_a_target_stops_planning_and_says_what_it_costs():
    sites, tensors = _sites()
    config = FusionConfig(target_ratio=1.3)
    plan = plan_within_budget(sites, tensors.__getitem__, config, 4 * 48, _evaluate([]))
    assert len(plan.groups) == 1 and plan.groups[0].members == ("blocks.0.fc", "blocks.1.fc")
    assert plan.ratio >= 1.3 and plan.error == pytest.approx(0.001)
    assert "costs output cosine 0.9990" in plan.message
    assert any("target 1.3 reached" in why for *_, why in plan.decisions)


def test_without_a_budget_every_pair_is_taken_in_damage_order():
    sites, tensors = _sites()
    config = FusionConfig(target_ratio=10.0)
    plan = plan_within_budget(sites, tensors.__getitem__, config, 4 * 48, _evaluate([]))
    assert len(plan.groups) == 1 and len(plan.groups[0].members) == 4
    assert [round(e, 6) for _, e in plan.curve] == sorted(round(e, 6) for _, e in plan.curve)
    assert "short of the target" in plan.message


def test_group_size_cap_is_kept():
    sites, tensors = _sites()
    plan = plan_within_budget(sites, tensors.__getitem__, FusionConfig(target_ratio=10.0, max_group_size=2),
                              4 * 48, _evaluate([]))
    assert all(len(g.members) <= 2 for g in plan.groups)
    assert any("max_group_size" in why for *_, why in plan.decisions)


def test_corrections_are_counted_and_can_make_a_pair_not_worth_it():
    sites, tensors = _sites(shape=(8, 6))
    assert correction_params(sites[0], 2) == 2 * (8 + 6)
    config = FusionConfig(target_ratio=None, max_error=0.01, residual_rank=1)
    plan = plan_within_budget(sites, tensors.__getitem__, config, 4 * 48, _evaluate([]))
    assert all(g.extra == 2 * 14 for g in plan.groups)
    assert plan.params_after == 4 * 48 - 2 * (48 - 28)
    big = FusionConfig(target_ratio=None, max_error=0.01, residual_rank=4)  # 2 * 4 * 14 = 112 > 48 saved
    plan = plan_within_budget(sites, tensors.__getitem__, big, 4 * 48, _evaluate([]))
    assert not plan.groups and all("corrections cost" in why for *_, why in plan.decisions)


def test_with_options_recounts_a_weight_plan():
    from lfpass.core.planner import plan_fusion

    sites, tensors = _sites()
    plan = plan_fusion(sites, tensors.__getitem__, FusionConfig(target_ratio=2.0), 4 * 48)
    again = with_options(plan, {s.name: s for s in sites}, FusionConfig(residual_rank=1, align="weights"))
    assert again.align == "weights" and again.residual_rank == 1
    assert again.params_after == plan.params_after + sum(len(g.members) * 14 for g in plan.groups)


def test_budget_plan_round_trips_through_json():
    sites, tensors = _sites()
    plan = plan_within_budget(sites, tensors.__getitem__, FusionConfig(target_ratio=None, max_error=0.01,
                                                                       residual_rank=1), 4 * 48, _evaluate([]))
    again = FusionPlan.from_json(plan.to_json())
    assert again == plan
    assert again.curve == plan.curve and again.decisions == plan.decisions and again.groups[0].extra == 28


def test_config_checks_the_new_fields():
    with pytest.raises(ConfigError, match="max_error"):
        FusionConfig(max_error=-1)
    with pytest.raises(ConfigError, match="align"):
        FusionConfig(align="rotate")
    with pytest.raises(ConfigError, match="residual_rank"):
        FusionConfig(residual_rank=1.5)
    with pytest.raises(ConfigError, match="holdout"):
        FusionConfig(holdout=1.0)
    with pytest.raises(ConfigError, match="error_metric"):
        FusionConfig(error_metric="mse")
    assert FusionConfig(target_ratio=None, max_error=0.01).needs_calibration
    assert not FusionConfig(align="weights").needs_calibration


def test_output_error_metrics():
    rng = np.random.default_rng(1)
    ref = [rng.standard_normal((4, 3, 5)), rng.standard_normal((2, 3, 5))]
    assert output_error(ref, ref) == pytest.approx(0.0, abs=1e-12)
    assert output_error(ref, [-r for r in ref]) == pytest.approx(2.0)
    assert output_error(ref, [2 * r for r in ref]) == pytest.approx(0.0, abs=1e-12)  # cosine ignores scale
    noisy = [r + 0.1 * rng.standard_normal(r.shape) for r in ref]
    by_hand = np.mean([np.dot(a.ravel(), b.ravel()) / np.linalg.norm(a) / np.linalg.norm(b)
                       for r, n in zip(ref, noisy) for a, b in zip(r, n)])
    assert output_error(ref, noisy) == pytest.approx(1 - by_hand)
    flipped = [r.copy() for r in ref]
    flipped[0][0, 0] = -flipped[0][0, 0] * 10  # one position's argmax may move
    agree = np.mean(np.concatenate([r.argmax(-1).ravel() for r in ref])
                    == np.concatenate([f.argmax(-1).ravel() for f in flipped]))
    assert output_error(ref, flipped, "top1") == pytest.approx(1 - agree)
    labels = [r.argmax(-1) for r in ref]
    assert output_error(ref, ref, "accuracy", labels) == 0.0
    assert output_error(ref, [-r for r in ref], "accuracy", labels) == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="labels"):
        output_error(ref, ref, "accuracy")
    assert output_error(ref, [np.full_like(r, np.nan) for r in ref]) == 2.0  # broken never passes
    assert cosines([np.zeros((2, 3))], [np.zeros((2, 3))]).tolist() == [1.0, 1.0]
    assert describe("cosine", 0.01) == "output cosine 0.9900"
    assert math.isclose(output_error(ref, noisy, "cosine"), 1 - cosines(ref, noisy).mean())
