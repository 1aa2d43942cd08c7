"""The keep-function pipeline over the frontend contract, with a third frontend written here
in numpy alone: what ``core/frontend.py`` says a new IR implements is enough for calibration,
the budget, data-aware merges and per-member parts, and nothing here imports torch or ONNX."""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import numpy as np
import pytest

from lfpass.core.bases import Factor
from lfpass.core.calibration import Calibration, accumulate
from lfpass.core.config import FusionConfig
from lfpass.core.errors import ConfigError
from lfpass.core.frontend import Frontend, SiteTable
from lfpass.core.keep import Fuser, fuse_keeping, split
from lfpass.core.lowrank import Part, bias_delta, member_factors
from lfpass.core.menu import plan_menu
from lfpass.core.merge import merged_slots
from lfpass.core.plan import FusionPlan
from lfpass.core.sites import Site, make_signature

D = 8


@dataclass
class Mlp:
    """``x + relu(W_i x + b_i)`` per block; ``reads`` says which stored tensor each name reads
    (a tie re-points it); ``parts`` holds each layer's own ``(U, V, bias)`` correction."""

    tensors: dict[str, np.ndarray]
    reads: dict[str, str]
    parts: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = field(default_factory=dict)
    blocks: int = 4
    factored: dict[str, tuple[str, np.ndarray]] = field(default_factory=dict)  # layer -> (basis key, up)
    bases: dict[str, np.ndarray] = field(default_factory=dict)

    def forward(self, x: np.ndarray, record: dict[str, list[np.ndarray]] | None = None) -> np.ndarray:
        for i in range(self.blocks):
            w, b = (self.tensors[self.reads[f"b{i}.{k}"]] for k in ("weight", "bias"))
            if record is not None:
                record.setdefault(f"b{i}.weight", []).append(x)
            if f"b{i}" in self.factored:
                key, up = self.factored[f"b{i}"]
                y = (x @ self.bases[key].T) @ up.T + b
            else:
                y = x @ w.T + b
            if f"b{i}" in self.parts:
                u, v, db = self.parts[f"b{i}"]
                y = y + (x @ v.T) @ u.T + (db if db is not None else 0)
            x = x + np.maximum(y, 0)
        return x


class MlpSites(SiteTable):
    def __init__(self, model: Mlp):
        self.model = model
        sig = make_signature(shape=(D, D), bias=True, layout="out_in", dtype="float32")
        self.sites = [Site(f"b{i}", "linear", "b*", sig, (f"b{i}.weight", f"b{i}.bias"), D * D + D)
                      for i in range(model.blocks)]
        self.units = []

    def load_exact(self, name: str) -> np.ndarray:
        return self.model.tensors[self.model.reads[name]]


@dataclass
class MlpFrontend(Frontend[Mlp]):
    model: Mlp
    hint = "pass batches"

    def find_sites(self, model: Mlp) -> MlpSites:
        return MlpSites(model)

    def count(self, model: Mlp) -> int:
        stored = {model.reads[n] for n in model.reads}
        parts = sum(u.size + v.size + (0 if db is None else db.size) for u, v, db in model.parts.values())
        stored -= {f"{layer}.weight" for layer in model.factored}
        factored = sum(up.size for _, up in model.factored.values()) + sum(b.size for b in model.bases.values())
        return sum(model.tensors[n].size for n in stored) + parts + factored

    def calibrate(self, batches: Sequence[np.ndarray], cross: Sequence[tuple[str, str]],
                  progress: bool = False) -> Calibration:
        record: dict[str, list[np.ndarray]] = {}
        for x in batches:
            self.model.forward(x, record)
        layers = {}
        for name, xs in record.items():
            stats = None
            for x in xs:
                stats = accumulate(stats, x)
            layers[name] = stats
        return Calibration(layers, {}, len(batches))

    def outputs(self, model: Mlp, batches: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [model.forward(x).astype(np.float64) for x in batches]

    def copy(self) -> Mlp:
        return copy.deepcopy(self.model)

    def spaces(self, model: Mlp, skipped: list) -> tuple[list, Mapping[str, Site]]:
        return [], self.find_sites(model).by_name()  # residual-stream widths never move

    def read(self, model: Mlp, names: Sequence[str]) -> dict[str, np.ndarray]:
        return {n: model.tensors[model.reads[n]].astype(np.float64) for n in names}

    def write(self, model: Mlp, arrays: Mapping[str, np.ndarray]) -> None:
        for n, a in arrays.items():
            model.tensors[model.reads[n]] = a.astype(np.float32)

    def apply(self, model: Mlp, found: Any, plan: FusionPlan, stats: Calibration | None) -> None:
        for merged in merged_slots(plan, found.by_name(), found.load_exact, stats=stats):
            anchor = merged.members[0].tensor
            model.tensors[anchor] = merged.array
            for slot in merged.members:
                model.reads[slot.tensor] = anchor

    def attach_parts(self, model: Mlp, parts: Sequence[Part], rank: int) -> None:
        for part in parts:
            layer = part.member.layer
            shared = model.tensors[model.reads[f"{layer}.weight"]]
            u, v = member_factors(part, part.original, shared, rank)
            model.parts[layer] = (u, v, bias_delta(part, model.tensors[model.reads[f"{layer}.bias"]]))


    def factor(self, model: Mlp, factors: Sequence[Factor]) -> None:
        for f in factors:
            model.bases.setdefault(f.basis, f.down)
            model.factored[f.member.layer] = (f.basis, f.up)


def mlp(seed: int = 0) -> Mlp:
    """Blocks 0 and 1 nearly alike, 2 and 3 unrelated."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((D, D)).astype(np.float32) / np.sqrt(D)
    weights = [base, base + 0.01 * rng.standard_normal((D, D)).astype(np.float32),
               *(rng.standard_normal((D, D)).astype(np.float32) / np.sqrt(D) for _ in range(2))]
    tensors = {}
    for i, w in enumerate(weights):
        tensors[f"b{i}.weight"] = w
        tensors[f"b{i}.bias"] = (0.1 * rng.standard_normal(D)).astype(np.float32)
    return Mlp(tensors, {n: n for n in tensors})


def batches(n: int = 8, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((16, D)).astype(np.float32) for _ in range(n)]


def test_the_core_modules_hold_no_ir():
    core = [m for m in sys.modules if m.startswith("lfpass.core.")]
    assert "lfpass.core.keep" in core
    for m in core:
        assert not {"torch", "onnx", "onnx_ir", "onnxruntime"} & set(vars(sys.modules[m])), m


def test_a_budget_fuses_the_alike_pair_and_measures_what_it_built():
    front = MlpFrontend(mlp())
    kept = fuse_keeping(front, FusionConfig(target_ratio=None, max_error=0.01, actions=["tie"]), batches())
    assert [g.members for g in kept.plan.groups] == [("b0", "b1")]
    assert front.count(kept.model) == kept.plan.params_after == front.count(front.model) - (D * D + D)
    assert 0 < kept.plan.error <= 0.01
    assert kept.error_of(kept.model) == pytest.approx(kept.plan.error, rel=1e-12)
    assert front.model.reads == {n: n for n in front.model.tensors}  # the original is never touched


def test_parts_pay_for_themselves_and_full_rank_gives_the_function_back():
    front = MlpFrontend(mlp())
    kept = fuse_keeping(front, FusionConfig(target_ratio=1.6, residual_rank=1, merge="mean"), batches())
    assert len(kept.plan.groups) >= 1 and kept.model.parts
    assert front.count(kept.model) == kept.plan.params_after < front.count(front.model)
    x = batches(1, seed=7)[0]
    shared_only = Fuser(front).build(replace(kept.plan, residual_rank=0))
    error = lambda m: np.abs(m.forward(x) - front.model.forward(x)).max()  # noqa: E731
    assert error(kept.model) < error(shared_only)
    full = Fuser(front).build(replace(kept.plan, residual_rank=D))  # the parts' algebra: exact at full rank
    np.testing.assert_allclose(full.forward(x), front.model.forward(x), rtol=1e-4, atol=1e-4)
    assert error(shared_only) > 1e-2  # ... where sharing alone is not
    costly = fuse_keeping(front, FusionConfig(target_ratio=1.6, residual_rank=D), batches())
    assert not costly.plan.groups and "cost as much as sharing saves" in costly.plan.message


def test_regmean_and_a_given_plan_are_built_the_same_way_again():
    front = MlpFrontend(mlp())
    kept = fuse_keeping(front, FusionConfig(target_ratio=1.3, merge="regmean"), batches())
    again = Fuser(front, front.calibrate(split(batches(), 0.25)[0], [])).build(kept.plan)
    x = batches(1, seed=3)[0]
    np.testing.assert_array_equal(again.forward(x), kept.model.forward(x))
    with pytest.raises(ConfigError, match="need calibration inputs: pass batches"):
        fuse_keeping(front, FusionConfig(target_ratio=1.3, merge="regmean"), [])


def test_a_frontend_must_implement_the_whole_contract():
    class Partial(Frontend):
        def find_sites(self, model):
            return MlpSites(model)

    with pytest.raises(TypeError, match="abstract"):
        Partial()


def test_an_auto_merge_under_a_budget_takes_the_rule_that_damages_less():
    front = MlpFrontend(mlp())
    config = FusionConfig(target_ratio=None, max_error=0.01, actions=("tie",))
    auto = fuse_keeping(front, config, batches())
    forced = fuse_keeping(front, config.replace(merge="regmean"), batches())
    # RegMean of the nearly equal pair, from 64 samples, costs more than their mean: measured, the mean wins
    assert [(g.members, g.rule) for g in auto.plan.groups] == [(("b0", "b1"), "mean")]
    assert auto.plan.ratio > forced.plan.ratio
    assert any("merged by mean" in why for _, _, why in auto.plan.decisions)
    assert "margin of 1.645 standard errors" in auto.plan.message
    assert "alignment measured (ratio within the budget: weights" in auto.plan.message  # then none
    assert "alignment measured" not in fuse_keeping(front, config.replace(align="none"), batches()).plan.message


# -- the plan menu over the same contract ------------------------------------------------------------

def _damage(plan: FusionPlan) -> float:
    return sum(f.damage for f in plan.factors) + sum(g.damage for g in plan.groups)


def test_the_menu_reaches_a_ratio_with_the_exact_count_and_rebuilds_from_its_json():
    front = MlpFrontend(mlp())
    assert [g.members for g in fuse_keeping(front, FusionConfig(target_ratio=1.3), batches()).plan.groups] == [
        ("b0", "b1")]  # a small step: the nearly equal pair is tied, the cheapest damage there is
    kept = fuse_keeping(front, FusionConfig(target_ratio=2.0), batches())
    plan = kept.plan
    assert plan.factors and plan.ratio >= 2.0
    assert front.count(kept.model) == plan.params_after < front.count(front.model)
    assert front.model.reads == {n: n for n in front.model.tensors} and not front.model.factored
    again = Fuser(front, front.calibrate(split(batches(), 0.25)[0], [])).build(FusionPlan.from_json(plan.to_json()))
    x = batches(1, seed=9)[0]
    np.testing.assert_array_equal(again.forward(x), kept.model.forward(x))
    assert "at the same price" in plan.explain() and "b*" in plan.explain()
    assert "measured at the same size on held-out inputs (error: the menu" in plan.message
    assert "uniform low rank" in plan.message  # the activation-aware SVD baseline's allocation, measured too


def test_the_menu_prices_no_worse_than_per_layer_low_rank_and_shares_where_layers_agree():
    front = MlpFrontend(mlp())
    full = fuse_keeping(front, FusionConfig(target_ratio=1.6), batches()).plan
    lowrank = fuse_keeping(front, FusionConfig(target_ratio=1.6, actions="lowrank"), batches()).plan
    assert full.params_after <= lowrank.params_after * 1.02 and lowrank.ratio >= 1.6
    assert _damage(full) <= _damage(lowrank) + 1e-12
    together = [set(f.members) for f in full.factors if len(f.members) > 1] + [set(g.members) for g in full.groups]
    assert any({"b0", "b1"} <= members for members in together)  # the nearly equal pair shares


def test_the_menu_under_a_budget_measures_only_a_few_plans_and_verifies_on_unseen_inputs():
    front = MlpFrontend(mlp())
    kept = fuse_keeping(front, FusionConfig(target_ratio=None, max_error=0.02), batches(12))
    plan = kept.plan
    assert plan.ratio > 1.0 and front.count(kept.model) == plan.params_after
    ordered, measured = (int(n) for n in
                         __import__("re").search(r"(\d+) plans ordered by size, measured end to end at (\d+)",
                                                 plan.message).groups())
    assert measured <= int(np.ceil(np.log2(ordered + 1))) + 1
    assert "verified on" in plan.message and plan.error == pytest.approx(kept.error_of(kept.model), rel=1e-12)
    assert any(abs(ratio - plan.ratio) < 1e-9 and error <= 0.02 for ratio, error in plan.curve)  # chosen within
    assert "uniform low rank: " in plan.message and "kept " in plan.message  # and measured against it


def test_the_menu_weighs_each_layers_damage_by_how_far_it_moves_the_outputs():
    """Block 3 writes a hundredth of what the others write into the stream: its own relative
    error is priced alike, but it moves the outputs 1e4 times less, so it is cut hardest."""
    model = mlp()
    for name in ("b3.weight", "b3.bias"):
        model.tensors[name] = model.tensors[name] * np.float32(0.01)
    front = MlpFrontend(model)
    plan = fuse_keeping(front, FusionConfig(target_ratio=1.25, actions="lowrank"), batches()).plan
    assert "weighted by its measured sensitivity (4 layers probed" in plan.message
    ranks = {f.members[0]: f.rank for f in plan.factors}
    assert ranks["b3"] == 1 and all(r > 1 for m, r in ranks.items() if m != "b3"), ranks
    unweighted = plan_menu(front.found.plannable, front.found.load, FusionConfig(target_ratio=1.25), front.count(model),
                           front.calibrate(batches()[:-2], []), ("lowrank",))
    assert "sensitivity" not in unweighted.message
    assert {f.members[0]: f.rank for f in unweighted.factors}.get("b3", D) > 1  # priced alike without the probes
