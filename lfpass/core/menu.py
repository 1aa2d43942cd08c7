"""One plan over every action: keep, tie, tie + residual, shared basis, per-layer low rank.

Each class of same-role, same-shape layers can be compressed several ways,
and which way keeps most of the function differs from class to class (and
from model to model). This planner prices them all with one currency:

- **damage**, in closed form from the calibration statistics: each member's
  squared output error on its own inputs relative to its output energy
  (:mod:`lfpass.core.bases`), summed over the layers an action touches. With
  held-out inputs each layer's damage is first weighted by its measured
  sensitivity (:func:`sensitivities`: one end-to-end probe per layer, run on
  the original model holding the probe's values), so the sum estimates how far
  the model's outputs move, not how far each layer's own outputs do;
- **parameters**, the unique parameters the action leaves, counted exactly
  as the frontends write them.

For one price ``lam`` (damage per parameter), every unit of layers takes the
option minimising ``damage + lam * params``: a rank along its curve, or its
members on their own. A class is cut into units several ways (singletons; pairs
for ties; consecutive chunks of 2, 3, 4 or all members for a shared basis) and
keeps the cut that costs least. Raising ``lam`` can only lower the parameters
left, so a ratio is reached by bisection on ``lam`` (Lagrangian allocation:
the ranks and actions land on the lower convex hull of damage against size).
A budget on the measured output error is kept the same way: the plans along
``lam`` are ordered by size, and the model is run end to end only at the few
points a bisection over that list visits, never per pair.

Ties here merge by the configured rule, without alignment (its damage has no
closed form); a basis of one member is per-layer low rank, so the menu can
never price below the per-layer baseline.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field, replace
from typing import Callable, Collection, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from lfpass.core.bases import (BasisFit, Whitening, basis_params, break_even, fit_basis, moments, relative_error,
                               residual_curve)
from lfpass.core.budget import NEVER
from lfpass.core.calibration import Calibration, LayerStats
from lfpass.core.config import FusionConfig
from lfpass.core.layers import layers_of, layout_of, to_matrix
from lfpass.core.errors import PlanError
from lfpass.core.lowrank import declined, residual_params, uniform_ranks, whiten_moment
from lfpass.core.merge import merged_slots
from lfpass.core.plan import Factored, FusionGroup, FusionPlan
from lfpass.core.planner import LoadTensor, compatibility_classes, plan_fusion, select_sites
from lfpass.core.quality import describe
from lfpass.core.sites import ClassKey, Site

log = logging.getLogger(__name__)

Evaluate = Callable[[FusionPlan], float]
BASIS_SIZES = (2, 3)  # chunk sizes tried beside "all members of the class"
_PAIRS_ALL = 16  # classes up to this size try every pair for ties; larger ones neighbours only
_GRID = 48  # prices tried when a budget is measured


@dataclass
class Curve:
    """One action on one unit: the unit's unique parameters and damage at each option (rank).
    ``per``: each member's damage (``[members, options]``); ``damage`` is their sum, weighted
    by each member's sensitivity once it is measured (:meth:`Menu.weighed`)."""

    action: str  # keep, lowrank, basis, tie, residual
    params: np.ndarray
    per: np.ndarray
    ranks: np.ndarray
    members: tuple[str, ...]
    damage: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.damage = self.per.sum(axis=0)

    def weighed(self, weights: Mapping[str, float]) -> "Curve":
        """This curve with each member's damage weighted by ``weights`` (1 where not given)."""
        out = replace(self)
        out.damage = np.array([weights.get(m, 1.0) for m in self.members]) @ self.per
        return out

    def best(self, lam: float) -> tuple[float, int]:
        cost = self.damage + lam * self.params
        i = int(np.argmin(cost))
        return float(cost[i]), i


@dataclass
class Unit:
    """Layers that take one action together; ``alone``: its members as units of their own."""

    members: tuple[str, ...]
    curves: list[Curve]
    alone: list["Unit"] = field(default_factory=list)

    def choose(self, lam: float) -> tuple[float, list[tuple["Unit", Curve, int]]]:
        """The least cost at ``lam`` and the choices making it."""
        best: tuple[float, list] = (math.inf, [])
        for curve in self.curves:
            cost, i = curve.best(lam)
            if cost < best[0]:
                best = (cost, [(self, curve, i)])
        if self.alone:
            parts = [u.choose(lam) for u in self.alone]
            cost = sum(p[0] for p in parts)
            if cost < best[0]:
                best = (cost, [c for p in parts for c in p[1]])
        return best


@dataclass
class Cut:
    """One way to cut a class into units."""

    name: str
    units: list[Unit]

    def choose(self, lam: float) -> tuple[float, list[tuple[Unit, Curve, int]]]:
        picks = [u.choose(lam) for u in self.units]
        return sum(p[0] for p in picks), [c for p in picks for c in p[1]]


@dataclass
class _Class:
    key: ClassKey
    label: str
    cuts: list[Cut]
    shape: tuple[int, int]  # each member's weight as [out, in]

    def choose(self, lam: float) -> tuple[Cut, float, list[tuple[Unit, Curve, int]]]:
        best = None
        for cut in self.cuts:
            cost, picks = cut.choose(lam)
            if best is None or cost < best[1] - 1e-15:
                best = (cut, cost, picks)
        assert best is not None
        return best


def _totals(picks: Sequence[tuple[Unit, Curve, int]]) -> tuple[int, float]:
    return (int(sum(c.params[i] for _, c, i in picks)), float(sum(c.damage[i] for _, c, i in picks)))


class Menu:
    """Every class's cuts and curves, priced from the calibration statistics once."""

    def __init__(self, sites: Sequence[Site], classes: Sequence[tuple[ClassKey, Sequence[str]]], load: LoadTensor,
                 stats: Calibration | None, config: FusionConfig, actions: Sequence[str],
                 progress: bool = False) -> None:
        self.sites = {s.name: s for s in sites}
        self.load, self.config, self.actions = load, config, tuple(actions)
        self.stats = stats
        self._white: dict[str, Whitening] = {}
        self.skipped: list[tuple[str, str]] = []
        held: dict[str, int] = {}
        for s in self.sites.values():
            for t in () if s.parts else s.tensors:  # a unit holds its layers' tensors: not a tie
                held[t] = held.get(t, 0) + 1
        self.classes: list[_Class] = []
        alone, thin = [], []
        for key, names in tqdm(classes, desc="menu", unit="class", disable=not progress, leave=False):
            names = [n for n in names if self._eligible(n, held)]
            if not names:
                continue
            if len(names) == 1 and "lowrank" not in self.actions:
                alone.append(names[0])
            thin += [n for n in names if (s := self.layer_stats(n)) is not None and 0 < s.count < s.dim]
            self.classes.append(self._price(key, names))
        self.notes: list[str] = []
        if alone:
            self.notes.append(f"{len(alone)} layer(s) have no same-class partner to share with (e.g. {alone[0]}): "
                              "kept dense; add lowrank to the actions to factor them alone")
        if thin:
            self.notes.append(f"{len(thin)} layer(s) saw fewer calibration samples than their input width (e.g. "
                              f"{thin[0]}): their whitening is regularised; give more inputs for a sharper estimate")
        for note in self.notes:
            log.warning("%s", note)

    # -- what may take part ---------------------------------------------------------------------
    def _eligible(self, name: str, held: Mapping[str, int]) -> bool:
        site = self.sites[name]
        why = ""
        if site.parts:
            why = "a unit (the menu plans layers)"
        elif declined(site.kind, site.signature):
            why = declined(site.kind, site.signature)
        elif any(held[t] > 1 for t in site.tensors):
            why = "its weight is held by another layer too (already tied)"
        else:
            why = layout_of(layers_of(site)[0])[1]  # "" where the weight is an [out, in] matrix
        if why:
            self.skipped.append((name, why))
        return not why

    def matrix(self, name: str) -> np.ndarray:
        layer = layers_of(self.sites[name])[0]
        return to_matrix(self.load(layer.weight.tensor), layout_of(layer)[0])

    def whitening(self, name: str, dim: int) -> Whitening:
        """A layer's own ``(S, S^-1)``, made once: its single fit and every residual reuse it."""
        if name not in self._white:
            self._white[name] = whiten_moment(moments([self.layer_stats(name)], dim)[0])
        return self._white[name]

    def layer_stats(self, name: str) -> LayerStats | None:
        if self.stats is None:
            return None
        return self.stats.layers.get(self.sites[name].weight)

    # -- pricing ---------------------------------------------------------------------------------
    def _price(self, key: ClassKey, names: list[str]) -> _Class:
        site = self.sites[names[0]]
        mats = {n: self.matrix(n) for n in names}
        out, in_ = mats[names[0]].shape
        dense = site.numel
        singles = {n: self._single(n, mats[n], dense) for n in names}
        label = key.role or str(key)
        cuts = [Cut("per layer", [singles[n] for n in names])]
        if "basis" in self.actions and len(names) > 1:
            for size in sorted({*(k for k in BASIS_SIZES if k < len(names)), len(names)}):
                units = []
                for start in range(0, len(names), size):
                    chunk = names[start:start + size]
                    if len(chunk) == 1:
                        units.append(singles[chunk[0]])
                        continue
                    fit = fit_basis([mats[n] for n in chunk], [self.layer_stats(n) for n in chunk])
                    units.append(Unit(tuple(chunk), [self._basis_curve(fit, tuple(chunk), dense, out, in_)],
                                      [singles[n] for n in chunk]))
                cuts.append(Cut(f"basis of {size}" if size < len(names) else "one basis", units))
        if ({"tie", "residual"} & set(self.actions)) and len(names) > 1:
            cuts.append(self._ties(names, mats, singles))
        return _Class(key, label, cuts, (out, in_))

    def _single(self, name: str, w: np.ndarray, dense: int) -> Unit:
        out, in_ = w.shape
        keep = Curve("keep", np.array([dense]), np.zeros((1, 1)), np.array([0]), (name,))
        curves = [keep]
        top = break_even(1, out, in_)
        if "lowrank" in self.actions and top >= 1:
            fit = fit_basis([w], [self.layer_stats(name)], white=self.whitening(name, in_))
            curves.append(self._basis_curve(fit, (name,), dense, out, in_, "lowrank"))
        return Unit((name,), curves)

    def _basis_curve(self, fit: BasisFit, members: tuple[str, ...], dense: int, out: int, in_: int,
                     action: str = "basis") -> Curve:
        k = fit.size
        top = min(break_even(k, out, in_), fit.max_rank)
        ranks = np.arange(1, top + 1)
        params = k * (dense - out * in_) + np.array([basis_params(k, out, in_, int(r)) for r in ranks])
        return Curve(action, params.astype(np.int64), fit.relative[:, 1:top + 1], ranks, members)

    def _ties(self, names: list[str], mats: Mapping[str, np.ndarray], singles: Mapping[str, Unit]) -> Cut:
        """Disjoint pairs, least tie damage first, each a unit (tie, tie + residual, or apart)."""
        pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]
                 if len(names) <= _PAIRS_ALL or names.index(b) == i + 1]
        priced = []
        for a, b in pairs:
            curves = self._tie_curves([a, b], mats, self._merge([a, b]))
            priced.append((min(float(c.damage.min()) for c in curves), (a, b), curves))
        taken: set[str] = set()
        units = []
        for _, pair, curves in sorted(priced, key=lambda p: p[0]):
            if taken & set(pair):
                continue
            taken.update(pair)
            units.append(Unit(pair, curves, [singles[n] for n in pair]))
        units += [singles[n] for n in names if n not in taken]
        return Cut("ties", units)

    def _merge(self, members: Sequence[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """The weight (as ``[out, in]``) and bias ``members`` would share, merged as the build merges
        them (:func:`merged_slots`)."""
        sites = [self.sites[m] for m in members]
        group = FusionGroup(tuple(members), self.config.merge_rule, math.nan, sites[0].class_key(), sites[0].numel)
        plan = FusionPlan((group,), "cosine", "model", 0, 0, 0, 0, 1.0)
        layer = layers_of(sites[0])[0]
        merged = {x.slot: x.array for x in merged_slots(plan, self.sites, self.load, stats=self.stats)}
        bias = merged.get(layer.bias.name) if layer.bias is not None else None
        return to_matrix(merged[layer.weight.name], layout_of(layer)[0]), bias

    def _tie_error(self, name: str, w: np.ndarray, shared: np.ndarray, bias: np.ndarray | None) -> float:
        """A member's relative squared output error when it reads the merged weight and bias: the
        bias's change counts too (a tie shares it; a residual gives the member its own back)."""
        layer = layers_of(self.sites[name])[0]
        stats = self.layer_stats(name)
        if bias is None or layer.bias is None or stats is None or stats.count <= 0:
            return relative_error(w, shared, stats)
        own = np.asarray(self.load(layer.bias.tensor), dtype=np.float64).reshape(-1, 1)
        moment = stats.augmented() / stats.count
        return relative_error(np.hstack([w, own]), np.hstack([shared, np.asarray(bias, np.float64).reshape(-1, 1)]),
                              moment=moment)

    def _tie_curves(self, members: Sequence[str], mats: Mapping[str, np.ndarray],
                    merged: tuple[np.ndarray, np.ndarray | None]) -> list[Curve]:
        site = self.sites[members[0]]
        shared, bias = merged
        out, in_ = shared.shape
        curves = []
        if "tie" in self.actions:
            per = np.array([[self._tie_error(m, mats[m], shared, bias)] for m in members])
            curves.append(Curve("tie", np.array([site.numel]), per, np.array([0]), tuple(members)))
        if "residual" in self.actions:
            tails = [residual_curve(mats[m], shared, self.layer_stats(m), white=self.whitening(m, in_))
                     for m in members]
            top = min(len(t) - 1 for t in tails)
            ranks = np.array([r for r in range(1, top + 1)
                              if site.numel + sum(residual_params(self.sites[m], r, bias=True) for m in members)
                              < len(members) * site.numel])
            if len(ranks):
                params = np.array([site.numel + sum(residual_params(self.sites[m], int(r), bias=True)
                                                    for m in members) for r in ranks])
                per = np.array([t[ranks] for t in tails])
                curves.append(Curve("residual", params.astype(np.int64), per, ranks, tuple(members)))
        return curves

    # -- choosing at a price -----------------------------------------------------------------------
    def at(self, lam: float) -> list[tuple[_Class, Cut, list[tuple[Unit, Curve, int]]]]:
        return [(c, *(lambda r: (r[0], r[2]))(c.choose(lam))) for c in self.classes]

    def saved(self, lam: float) -> int:
        return sum(_saved(picks) for _, _, picks in self.at(lam))

    def weighed(self, weights: Mapping[str, float]) -> "Menu":
        """This menu with every curve's damage its members' damages weighted by ``weights``
        (layer -> how much of the model's output a unit of its own damage moves; the median
        weight where a layer has none). The statistics and sites are shared, not copied."""
        typical = float(np.median(list(weights.values()))) if weights else 1.0
        full = {name: weights.get(name, typical) for name in self.sites}
        made: dict[int, Unit] = {}

        def unit(u: Unit) -> Unit:
            if id(u) not in made:
                made[id(u)] = Unit(u.members, [c.weighed(full) for c in u.curves], [unit(a) for a in u.alone])
            return made[id(u)]

        view = copy.copy(self)
        view.classes = [replace(c, cuts=[Cut(cut.name, [unit(u) for u in cut.units]) for cut in c.cuts])
                        for c in self.classes]
        return view

    def lowrank_layers(self) -> dict[str, tuple[_Class, Curve]]:
        """Every layer that can be factored alone, with its class and its low-rank curve."""
        layers = {}
        for cls in self.classes:
            for unit in cls.cuts[0].units:
                curve = next((c for c in unit.curves if c.action == "lowrank"), None)
                if curve is not None:
                    layers[unit.members[0]] = (cls, curve)
        return layers

    def per_layer(self) -> "Menu":
        """This menu with every class cut into single layers only (keep or per-layer low rank)."""
        view = copy.copy(self)
        view.classes = [replace(c, cuts=[c.cuts[0]]) for c in self.classes]
        return view

    def ceiling(self) -> int:
        """The most parameters the menu can save (every unit at its smallest option)."""
        return self.saved(1e30)


def _saved(picks: Sequence[tuple[Unit, Curve, int]]) -> int:
    return sum(_dense(u, c) - int(c.params[i]) for u, c, i in picks)


def _dense(unit: Unit, curve: Curve) -> int:
    """The unit's parameters kept dense: its keep point (a single), or its members' keep points."""
    if curve.action == "keep":
        return int(curve.params[0])
    members = unit.alone or [unit]
    return sum(int(next(c for c in u.curves if c.action == "keep").params[0]) for u in members)


def _lam_for(menu: Menu, needed: int) -> float:
    """The smallest price (to 0.1%) at which the menu saves at least ``needed``."""
    lo, hi = -30.0, 30.0
    if menu.saved(10 ** hi) < needed:
        return 10 ** hi
    for _ in range(80):
        mid = (lo + hi) / 2
        if menu.saved(10 ** mid) >= needed:
            hi = mid
        else:
            lo = mid
        if hi - lo < 1e-3:
            break
    return 10 ** hi


def plan_menu(sites: Sequence[Site], load: LoadTensor, config: FusionConfig, params_total: int,
              stats: Calibration | None, actions: Sequence[str], evaluate: Evaluate | None = None,
              progress: bool = False, probe: Evaluate | None = None, start: FusionPlan | None = None,
              skip: Collection[str] = ()) -> FusionPlan:
    """The menu's plan for ``config``'s ``target_ratio`` and/or ``max_error``. ``evaluate(plan)``:
    the measured error of the model a plan makes; a budget needs it, and with it the menu's plan
    is also measured against per-layer low rank alone at the same size, and the better one kept
    (the closed form prices each layer's own error, not how errors add up through the model).
    ``probe(plan)``: how far a plan moves the model's outputs (:func:`relative_change`); with it
    each layer's damage is weighted by its measured sensitivity (:func:`sensitivities`).
    ``start``: a plan every plan here builds on (whole blocks removed: its ``dropped`` and
    counts), the layers named in ``skip`` (those inside them) left out; the target counts
    what ``start`` saved already."""
    base = plan_fusion(sites, load, config.replace(target_ratio=None, threshold=NEVER, max_overshoot=None,
                                                   granularity="tensor"), params_total, progress=progress)
    base = replace(base, target_ratio=config.target_ratio, threshold=None, max_overshoot=None, align="none",
                   residual_rank=0, error_metric=config.error_metric, max_error=config.max_error, message="")
    if start is not None:
        base = replace(base, dropped=start.dropped, params_after=start.params_after,
                       layer_params_after=start.layer_params_after)
    planned = config.replace(granularity="tensor")
    left = [s for s in sites if s.name not in skip]
    classes = [(key, [s.name for s in members])  # single layers too: per-layer low rank needs no partner
               for key, members in compatibility_classes(select_sites(left, planned), config.cross_role).items()]
    menu = Menu(left, classes, load, stats, config, actions, progress)
    model_scope = config.ratio_scope == "model"
    scope_before = base.params_before if model_scope else base.layer_params_before
    scope_start = base.params_after if model_scope else base.layer_params_after
    base = replace(base, max_ratio=scope_before / max(scope_start - menu.ceiling(), 1))
    needed = None
    if config.target_ratio is not None:
        needed = max(scope_start - math.floor(scope_before / config.target_ratio), 0)
    how = "closed-form damage from calibration statistics" if stats is not None else "closed-form weight damage " \
          "(no calibration inputs: inputs taken as white)"
    head = [f"plan menu ({', '.join(actions)}), {how}", *menu.notes]
    raw = menu
    if probe is not None and "lowrank" in actions:
        weights = sensitivities(base, menu, needed, probe, progress)
        if weights:
            menu = menu.weighed(weights)
            spread = np.array(list(weights.values()))
            head.append(f"each layer's damage weighted by its measured sensitivity ({len(weights)} layers probed "
                        f"end to end; weights {spread.min():.3g} to {spread.max():.3g}, median {np.median(spread):.3g})")
    rivals: list[tuple[str, Callable[[int], FusionPlan | None]]] = [
        ("the menu", lambda n: _plan(base, menu, _lam_for(menu, n), config, n))]
    if evaluate is not None and menu is not raw:  # the weights assume errors add; where they compound, check
        rivals.append(("the menu by the closed form alone", lambda n: _plan(base, raw, _lam_for(raw, n), config, n)))
    if evaluate is not None and "lowrank" in actions:
        single = menu.per_layer()
        if any(len(c.cuts) > 1 for c in menu.classes):
            rivals.append(("per-layer low rank", lambda n: _plan(base, single, _lam_for(single, n), config, n)))
        rivals.append(("uniform low rank", lambda n: _uniform(base, menu, config, n)))
    if config.max_error is None or evaluate is None:
        made = [(name, make(needed or 0)) for name, make in rivals]
        made = [(name, plan) for name, plan in made if plan is not None]
        errors = [evaluate(plan) for _, plan in made] if len(made) > 1 else [0.0]
        best = min(range(len(made)), key=lambda i: (errors[i], i))
        plan = made[best][1]
        if len(made) > 1:
            tried = ", ".join(f"{name} {error:.4g}" for (name, _), error in zip(made, errors))
            head.append(f"measured at the same size on held-out inputs (error: {tried}): kept {made[best][0]}")
        if needed is not None and plan.ratio + 1e-12 < config.target_ratio:
            head.append(f"the target {config.target_ratio:g} is out of reach: the menu reaches {plan.ratio:.3f}")
        return replace(plan, message="; ".join(head))
    return _budgeted(base, menu, rivals, config, evaluate, needed, head, progress)


_BROKEN = 1e6  # the weight of a layer whose probe broke the model (outputs not finite)
PROBE_DAMAGE = 0.05  # with no target: each layer probed at the rank whose own damage is nearest this


def sensitivities(base: FusionPlan, menu: Menu, needed: int | None, probe: Evaluate,
                  progress: bool = False) -> dict[str, float]:
    """Each factorable layer's end-to-end sensitivity: how far the model's outputs move
    (``probe``) with that layer alone factored, per unit of its closed-form damage there.

    The closed form prices a layer's error on its own output; how much of it reaches the
    model's output differs by layer (depth, normalisation, what reads it) by orders of
    magnitude, and summing raw damages across layers ignores that. Errors this small add
    up nearly linearly, so one probe per layer calibrates its damage into the model's
    currency. Each layer is probed at its operating point: its rank at one uniform fraction
    of full rank that saves ``needed`` (the target's), or, without a target, the rank whose
    damage is nearest :data:`PROBE_DAMAGE`. One run of the chosen-on inputs per layer,
    through the candidate's values (no rebuild)."""
    layers = menu.lowrank_layers()
    at: dict[str, int] = {}
    if needed:
        dims = {name: cls.shape for name, (cls, _) in layers.items()}
        try:
            ranks, _ = uniform_ranks(dims, sum(o * i for o, i in dims.values()) - needed)
            at = {n: int(np.searchsorted(layers[n][1].ranks, r)) for n, r in ranks.items()}
        except PlanError:
            at = {}
    weights = {}
    for name, (cls, curve) in tqdm(layers.items(), desc="sensitivity", unit="layer", disable=not progress,
                                   leave=False):
        i = at.get(name, len(curve.ranks))
        if i >= len(curve.ranks):  # kept dense at the uniform fraction, or no target: the damage point
            i = int(np.argmin(np.abs(curve.per[0] - PROBE_DAMAGE)))
        own = float(curve.per[0, i])
        if not own > 1e-12:
            continue
        out, in_ = cls.shape
        plan = replace(base, groups=(), factors=(Factored((name,), int(curve.ranks[i]), cls.key, out, in_, own,
                                                          menu.stats is not None),))
        moved = probe(plan)
        weights[name] = max(moved, 0.0) / own if math.isfinite(moved) else _BROKEN
    return weights


def _uniform(base: FusionPlan, menu: Menu, config: FusionConfig, needed: int) -> FusionPlan | None:
    """Per-layer low rank at one fraction of every layer's full rank (the activation-aware SVD
    baseline's allocation), saving at least ``needed``; None when even rank 1 everywhere cannot."""
    layers = menu.lowrank_layers()
    dims = {name: cls.shape for name, (cls, _) in layers.items()}
    dense = sum(o * i for o, i in dims.values())
    try:
        ranks, _ = uniform_ranks(dims, dense - needed)
    except PlanError:
        return None
    factors, saved = [], 0
    for name, rank in ranks.items():
        cls, curve = layers[name]
        at = np.searchsorted(curve.ranks, rank)
        if at >= len(curve.ranks) or curve.ranks[at] != rank:
            continue  # not smaller than the layer dense: kept
        out, in_ = cls.shape
        factors.append(Factored((name,), int(rank), cls.key, out, in_, float(curve.damage[at]), menu.stats is not None))
        saved += out * in_ - int(rank) * (out + in_)
    return replace(base, groups=(), factors=tuple(factors), choices=(("all classes", "uniform low rank: one "
                   "fraction of each layer's full rank"),), params_after=base.params_after - saved,
                   layer_params_after=base.layer_params_after - saved)


def _bisect(plans: list[FusionPlan], evaluate: Evaluate, budget: float, curve: list,
            progress: bool) -> tuple[int, dict[int, float]]:
    """The index of the largest plan whose measured error keeps ``budget`` (-1: none), assuming
    the error grows with size, and what was measured."""
    lo, hi, measured = -1, len(plans), {}
    bar = tqdm(total=max(1, math.ceil(math.log2(len(plans) + 1))), desc="budget", unit="check", disable=not progress,
               leave=False)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        measured[mid] = evaluate(plans[mid])
        curve.append((plans[mid].ratio, measured[mid]))
        bar.update()
        if measured[mid] <= budget:
            lo = mid
        else:
            hi = mid
    bar.close()
    return lo, measured


def _budgeted(base: FusionPlan, menu: Menu, rivals: Sequence[tuple[str, Callable[[int], FusionPlan | None]]],
              config: FusionConfig, evaluate: Evaluate, needed: int | None, head: list[str],
              progress: bool) -> FusionPlan:
    """Per rival (the menu; per-layer low rank alone, chosen by the same price and at one uniform
    fraction), its plans at a grid of sizes ordered largest first, and the largest whose measured
    error keeps the budget found by bisection; the largest over the rivals kept."""
    top = menu.ceiling() if needed is None else min(needed, menu.ceiling())
    if top <= 0:
        plan = replace(_plan(base, menu, 0.0, config), error=0.0)
        return replace(plan, message=f"{head[0]}: no layer here can be made smaller (none factors below its "
                                     f"size, none has a partner to share with)")
    found, counts, curve = [], [], []
    for name, make in rivals:
        plans, seen = [], set()
        for f in np.linspace(0, 1, _GRID + 1)[1:]:
            plan = make(int(top * f))
            if plan is not None and plan.params_after not in seen and plan.params_after < base.params_after:
                seen.add(plan.params_after)
                plans.append(plan)
        plans.sort(key=lambda p: -p.params_after)
        lo, measured = _bisect(plans, evaluate, config.max_error, curve, progress)
        counts.append(f"{name}: {len(plans)} plans ordered by size, measured end to end at {len(measured)}")
        if lo >= 0:
            found.append((name, plans[lo], measured[lo]))
    budget = describe(config.error_metric, config.max_error)
    line = [f"{head[0]}: " + "; ".join(counts), *head[1:]]
    if not found:
        plan = replace(_plan(base, menu, 0.0, config), error=0.0, curve=tuple(sorted(curve)))
        return replace(plan, message="; ".join([*line, f"even the smallest step breaks the budget (error <= "
                                                       f"{config.max_error:g}, {budget}): nothing compressed"]))
    name, plan, error = max(found, key=lambda f: (round(f[1].ratio, 9), -f[2]))
    if len(rivals) > 1:
        line.append(f"kept {name}")
    line.append(f"the largest ratio found within the budget (error <= {config.max_error:g}, {budget}) is "
                f"{plan.ratio:.3f} ({plan.scope}), at {describe(config.error_metric, error)}")
    if needed is not None and plan.ratio + 1e-12 < (config.target_ratio or 0):
        line.append(f"the target {config.target_ratio:g} is out of reach within the budget")
    return replace(plan, error=error, curve=tuple(sorted(curve)), message="; ".join(line))


def _fill(chosen: list[tuple[_Class, Cut, list[tuple[Unit, Curve, int]]]], slack: int) -> None:
    """Spend ``slack`` (parameters saved past the target) back on rank, in place: one rank step
    at a time where it removes the most damage per parameter, while the target still holds (a
    price lands on a step of the size curve; this takes the overshoot back)."""
    while slack > 0:
        best = None
        for c, (_, _, picks) in enumerate(chosen):
            for k, (_, curve, i) in enumerate(picks):
                if i + 1 >= len(curve.params):
                    continue
                cost = int(curve.params[i + 1] - curve.params[i])
                gain = float(curve.damage[i] - curve.damage[i + 1])
                if 0 < cost <= slack and gain > 0 and (best is None or gain / cost > best[0]):
                    best = (gain / cost, c, k, cost)
        if best is None:
            return
        _, c, k, cost = best
        unit, curve, i = chosen[c][2][k]
        chosen[c][2][k] = (unit, curve, i + 1)
        slack -= cost


def _plan(base: FusionPlan, menu: Menu, lam: float, config: FusionConfig, needed: int | None = None) -> FusionPlan:
    """The plan the menu makes at price ``lam``; with ``needed`` (parameters to save), the overshoot
    spent back on rank."""
    groups, factors, choices, saved = [], [], [], 0
    chosen = [(cls, cut, list(picks)) for cls, cut, picks in menu.at(lam)]
    if needed is not None:
        _fill(chosen, sum(_saved(picks) for _, _, picks in chosen) - needed)
    for cls, cut, picks in chosen:
        for unit, curve, i in picks:
            saved += _dense(unit, curve) - int(curve.params[i])
            damage = float(curve.damage[i])
            if curve.action in ("lowrank", "basis"):
                factors.append(Factored(unit.members, int(curve.ranks[i]), cls.key, *cls.shape, damage,
                                        menu.stats is not None))
            elif curve.action in ("tie", "residual"):
                numel = menu.sites[unit.members[0]].numel
                groups.append(FusionGroup(unit.members, config.merge_rule, math.nan,
                                          cls.key, numel, int(curve.params[i]) - numel, damage, int(curve.ranks[i])))
        choices.append((cls.label, _why(cls, cut, picks, lam)))
    plan = replace(base, groups=tuple(groups), factors=tuple(factors), choices=tuple(choices),
                   params_after=base.params_after - saved, layer_params_after=base.layer_params_after - saved)
    return plan


def _picked(picks: Sequence[tuple[Unit, Curve, int]]) -> set[tuple[tuple[str, ...], str, int]]:
    return {(u.members, c.action, int(c.ranks[i])) for u, c, i in picks}


def _why(cls: _Class, chosen: Cut, picks, lam: float) -> str:
    params, damage = _totals(picks)
    counts: dict[str, int] = {}
    for _, curve, _ in picks:
        counts[curve.action] = counts.get(curve.action, 0) + 1
    what = ", ".join(f"{n} {a}" for a, n in counts.items())
    others, same = [], []
    picked = _picked(picks)
    for cut in cls.cuts:
        if cut is chosen:
            continue
        _, p = cut.choose(lam)
        if _picked(p) == picked:  # every unit of that cut fell back to what was chosen
            same.append(cut.name)
            continue
        op, od = _totals(p)
        others.append(f"{cut.name}: {op:,} params, damage {od:.3g}")
    if same:
        others.append(f"{', '.join(same)}: the same layers alone")
    line = f"{chosen.name} ({what}): {params:,} params, damage {damage:.3g}"
    return line + (f"; at the same price {'; '.join(others)}" if others else "")
