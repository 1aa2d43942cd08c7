"""Data-aware merging (RegMean) and the output-error metric, against their closed forms."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
from torch import nn

from lfpass.core.calibration import Calibration, LayerStats
from lfpass.core.config import FusionConfig
from lfpass.core.errors import ConfigError, PlanError
from lfpass.core.merge import merged_slots
from lfpass.core.metrics import get_metric
from lfpass.core.plan import FusionGroup, FusionPlan
from lfpass.core.planner import plan_fusion
from lfpass.core.rules import RegMean
from lfpass.core.sites import Site
from lfpass.fx import apply_plan, find_sites
from lfpass.fx.calibrate import calibrate_fx


def _site(name: str, shape, bias: bool = True, layout: str = "out_in") -> Site:
    from lfpass.core.sites import make_signature

    sig = make_signature(shape=tuple(shape), bias=bias, layout=layout, dtype="float32")
    tensors = (f"{name}.weight",) + ((f"{name}.bias",) if bias else ())
    return Site(name, "linear", "l", sig, tensors, int(np.prod(shape)) + (shape[0] if bias else 0))


def _plan(groups, rule="regmean") -> FusionPlan:
    plan = FusionPlan.__new__(FusionPlan)  # only groups and seed are read by merged_slots
    object.__setattr__(plan, "groups", tuple(FusionGroup(members=tuple(g), rule=rule, score=1.0, cls=None, numel=0)
                                             for g in groups))
    object.__setattr__(plan, "seed", 0)
    return plan


def _merge(tensors: dict, sites, stats, groups, counts=None) -> dict[str, np.ndarray]:
    by_name = {s.name: s for s in sites}
    return {m.slot: m.array for m in merged_slots(_plan(groups), by_name, tensors.__getitem__, counts, stats)}


def _identity_stats(names, d: int, n: int = 10) -> Calibration:
    """Inputs whose mean second moment is I and mean 0 (so the augmented moment is diag(I, 1))."""
    return Calibration({f"{k}.weight": LayerStats(np.eye(d) * n, np.zeros(d), n) for k in names})


def _closed_form(mats, moments, ridge=None):
    """RegMean as documented: member moments weighted by 1 / output energy, ridge on the mean diagonal."""
    ridge = RegMean.ridge if ridge is None else ridge
    weighted = [g / np.trace(m @ g @ m.T) for m, g in zip(mats, moments)]
    total = sum(weighted)
    lhs = total + ridge * np.trace(total) / total.shape[0] * np.eye(total.shape[0])
    return sum(m @ g for m, g in zip(mats, weighted)) @ np.linalg.inv(lhs)


def test_identity_moments_give_the_ridged_mean():
    rng = np.random.default_rng(0)
    w = {f"{k}.weight": rng.normal(size=(3, 4)).astype(np.float64) for k in "ab"}
    w.update({f"{k}.bias": rng.normal(size=3) for k in "ab"})
    sites = [_site("a", (3, 4)), _site("b", (3, 4))]
    sites = [Site(s.name, s.kind, s.role, tuple((k, v if k != "dtype" else "float64") for k, v in s.signature),
                  s.tensors, s.numel) for s in sites]
    out = _merge(w, sites, _identity_stats("ab", 4), [["a", "b"]])
    # G_i = I (augmented too): each member weighs 1 / |[W_i b_i]|^2, then the ridge scales by 1 / (1 + ridge)
    full = {k: np.hstack([w[f"{k}.weight"], w[f"{k}.bias"][:, None]]) for k in "ab"}
    e = {k: float((full[k] ** 2).sum()) for k in "ab"}
    expected = (full["a"] / e["a"] + full["b"] / e["b"]) / ((1 / e["a"] + 1 / e["b"]) * (1 + RegMean.ridge))
    np.testing.assert_allclose(out["weight"], expected[:, :4], rtol=1e-12)
    np.testing.assert_allclose(out["bias"], expected[:, 4], rtol=1e-12)
    np.testing.assert_allclose(expected, _closed_form([full["a"], full["b"]], [np.eye(5), np.eye(5)]), rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32])
def test_identical_members_are_exact(dtype):
    rng = np.random.default_rng(1)
    weight, bias = rng.normal(size=(3, 4)).astype(dtype), rng.normal(size=3).astype(dtype)
    w = {"a.weight": weight, "b.weight": weight.copy(), "a.bias": bias, "b.bias": bias.copy()}
    stats = Calibration({k: LayerStats(g @ g.T, rng.normal(size=4), 7) for k, g in
                         (("a.weight", rng.normal(size=(4, 4))), ("b.weight", rng.normal(size=(4, 4))))})
    out = _merge(w, [_site("a", (3, 4)), _site("b", (3, 4))], stats, [["a", "b"]])
    assert out["weight"].dtype == dtype and out["bias"].dtype == dtype
    assert np.array_equal(out["weight"].view(np.uint16 if dtype != np.float32 else np.uint32),
                          weight.view(np.uint16 if dtype != np.float32 else np.uint32))
    assert np.array_equal(np.asarray(out["bias"], np.float64), np.asarray(bias, np.float64))


def test_missing_stats_is_one_line_plan_error():
    w = {"a.weight": np.ones((3, 4), np.float32), "b.weight": np.zeros((3, 4), np.float32)}
    sites = [_site("a", (3, 4), bias=False), _site("b", (3, 4), bias=False)]
    with pytest.raises(PlanError, match="merge rule 'regmean' needs calibration inputs") as err:
        _merge(w, sites, None, [["a", "b"]])
    assert "\n" not in str(err.value)


def test_a_layer_without_statistics_gets_the_mean():
    w = {"a.weight": np.ones((3, 4), np.float32), "b.weight": np.zeros((3, 4), np.float32)}
    sites = [_site("a", (3, 4), bias=False), _site("b", (3, 4), bias=False)]
    out = _merge(w, sites, Calibration({"a.weight": LayerStats(np.eye(4), np.zeros(4), 1)}), [["a", "b"]])
    np.testing.assert_array_equal(out["weight"], np.full((3, 4), 0.5, np.float32))


def test_in_out_layout_and_counts():
    """A weight stored [in, out] is solved as [out, in]; a member standing for two layers enters twice."""
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    ga, gb = (lambda m: m @ m.T)(rng.normal(size=(4, 6))), (lambda m: m @ m.T)(rng.normal(size=(4, 6)))
    stats = Calibration({"a.weight": LayerStats(ga * 5, np.zeros(4), 5), "b.weight": LayerStats(gb, np.zeros(4), 1)})
    sites = [_site(k, (4, 3), bias=False, layout="in_out") for k in "ab"]
    sites = [Site(s.name, s.kind, s.role, tuple((k, v if k != "dtype" else "float64") for k, v in s.signature),
                  s.tensors, s.numel) for s in sites]
    out = _merge({"a.weight": a, "b.weight": b}, sites, stats, [["a", "b"]], counts={"a": 2})
    expected = _closed_form([a.T, a.T, b.T], [ga, ga, gb])  # a enters twice; moments per sample
    np.testing.assert_allclose(out["weight"], expected.T, rtol=1e-10)


class MLP(nn.Module):
    def __init__(self, width: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(6, width)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        x = torch.tanh(self.inp(x))
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def test_regmean_beats_the_mean_on_members_inputs():
    torch.manual_seed(0)
    model = MLP().eval()
    batches = [torch.randn(64, 6) * torch.tensor([3.0, 1, 0.3, 2, 0.1, 1]) for _ in range(4)]
    stats = calibrate_fx(model, batches)
    found = find_sites(model)
    members = ["layers.0", "layers.1", "layers.2"]
    errors = {}
    for rule in ("mean", "regmean"):
        merged = {m.slot: m.array for m in merged_slots(_plan([members], rule), found.by_name(), found.load_exact,
                                                          stats=stats)}
        w, b = merged["weight"].astype(np.float64), merged["bias"].astype(np.float64)
        err = 0.0
        for m in members:
            s = stats[f"{m}.weight"]
            wi, bi = found.load(f"{m}.weight").astype(np.float64), found.load(f"{m}.bias").astype(np.float64)
            d = np.hstack([w - wi, (b - bi)[:, None]])
            own = np.hstack([wi, bi[:, None]])
            err += np.trace(d @ s.augmented() @ d.T) / np.trace(own @ s.augmented() @ own.T)
        errors[rule] = err / len(members)
    assert errors["regmean"] < 0.9 * errors["mean"], errors
    # and through the FX rewrite: one shared parameter, holding the regmean merge
    plan = plan_fusion(found.plannable, found.load, FusionConfig(merge="regmean", target_ratio=10.0,
                                                                  include=("layers.*",)), 1)
    fused = apply_plan(model, plan, stats=stats)
    assert fused.layers[0].weight is fused.layers[1].weight is fused.layers[2].weight
    with pytest.raises(PlanError, match="needs calibration inputs"):
        apply_plan(model, plan)


def test_a_unit_merges_per_layer():
    """q/k/v/o of an attention unit: each layer solved against its own statistics."""
    rng = np.random.default_rng(3)
    names = ("q", "k", "v", "o")
    tensors, stats_layers = {}, {}
    for blk in ("b0", "b1"):
        for n in names:
            tensors[f"{blk}.{n}.weight"] = rng.normal(size=(4, 4))
            tensors[f"{blk}.{n}.bias"] = rng.normal(size=4)
            g = rng.normal(size=(4, 8))
            stats_layers[f"{blk}.{n}.weight"] = LayerStats(g @ g.T, g.sum(1), 8)
    stats = Calibration(stats_layers)

    def unit(blk):
        layer = _site(f"{blk}.q", (4, 4))
        layer = Site(layer.name, layer.kind, layer.role,
                     tuple((k, v if k != "dtype" else "float64") for k, v in layer.signature), layer.tensors, 20)
        from lfpass.core.sites import Slot
        slots = tuple(Slot(f"{n}.{kind}", f"{blk}.{n}.{kind}", kind) for n in names for kind in ("weight", "bias"))
        return Site(f"{blk}.attn", "attention", "attn", tuple((n, ("linear", layer.signature)) for n in names),
                    slots, 80, parts=tuple(f"{blk}.{n}" for n in names))

    sites = [unit("b0"), unit("b1")]
    merged = list(merged_slots(_plan([["b0.attn", "b1.attn"]]), {s.name: s for s in sites}, tensors.__getitem__,
                               stats=stats))
    assert [m.slot for m in merged] == [x.name for x in sites[0].slots]
    out = {m.slot: m.array for m in merged}
    for n in names:
        a = [np.hstack([tensors[f"{blk}.{n}.weight"], tensors[f"{blk}.{n}.bias"][:, None]]) for blk in ("b0", "b1")]
        g = [stats[f"{blk}.{n}.weight"].augmented() / 8 for blk in ("b0", "b1")]
        expected = _closed_form(a, g)
        np.testing.assert_allclose(out[f"{n}.weight"], expected[:, :4], rtol=1e-9)
        np.testing.assert_allclose(out[f"{n}.bias"], expected[:, 4], rtol=1e-9)


def test_output_metric_closed_form_and_copies_rank_highest():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(5, 6))
    mats = [a, a.copy(), a + 0.3 * rng.normal(size=a.shape), rng.normal(size=a.shape)]
    grams = []
    for _ in mats:
        x = rng.normal(size=(6, 20)) * rng.uniform(0.1, 3, size=(6, 1))
        grams.append(x @ x.T / 20)
    sim = get_metric("output")(mats, grams)
    np.testing.assert_allclose(sim, sim.T, atol=1e-12)
    assert sim[0, 1] == pytest.approx(1.0, abs=1e-12)
    assert sim[0, 1] > sim[0, 2] > sim[0, 3]

    def err(i, j):
        d = (mats[i] + mats[j]) / 2 - mats[i]
        return np.trace(d @ grams[i] @ d.T) / np.trace(mats[i] @ grams[i] @ mats[i].T)

    for i, j in ((0, 2), (2, 3), (1, 3)):
        assert sim[i, j] == pytest.approx(1 - (err(i, j) + err(j, i)) / 2, rel=1e-10)


def test_output_metric_in_the_planner():
    torch.manual_seed(0)
    model = MLP(depth=3).eval()
    with torch.no_grad():
        model.layers[2].weight.copy_(model.layers[0].weight)
        model.layers[2].bias.copy_(model.layers[0].bias)
    found = find_sites(model)
    config = FusionConfig(metric="output", target_ratio=1.01, include=("layers.*",), ratio_scope="layers")
    with pytest.raises(ConfigError, match="metric 'output' needs calibration inputs"):
        plan_fusion(found.plannable, found.load, config, 1)
    stats = calibrate_fx(model, [torch.randn(32, 6)])
    plan = plan_fusion(found.plannable, found.load, config, 1, stats=stats)
    assert plan.groups[0].members == ("layers.0", "layers.2")
    assert plan.groups[0].score == pytest.approx(1.0, abs=1e-9)
