"""Greedy agglomerative planning: which sites share a tensor.

Inside each compatibility class the planner starts from singletons and, one
step at a time, merges the two groups with the highest average-linkage
similarity (over all classes at once), until the target ratio is reached, the
best remaining pair falls below the threshold, or nothing more can merge.
Groups never exceed ``max_group_size``. With ``max_overshoot`` set, a merge
that would take the ratio past ``target_ratio + max_overshoot`` is skipped and
smaller merges that fit are taken instead. The result is deterministic: ties
break by class name, then by site order.

The plan says what it did in its ``message``: layers left out (a weight
holding NaN/Inf), planning by signature alone (layer names that give no
roles), a target overshot (with the nearest plan at or below it), or a target
out of reach (with the options that would raise the ceiling, and to what).
"""

from __future__ import annotations

import fnmatch
import logging
import math
import re
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm

from lfpass.core.calibration import Calibration
from lfpass.core.config import KINDS, FusionConfig
from lfpass.core.errors import ConfigError
from lfpass.core.layers import augmented, input_moment, layers_of, layout_of, to_matrix
from lfpass.core.metrics import Metric, get_metric
from lfpass.core.plan import Candidate, FusionGroup, FusionPlan
from lfpass.core.sites import ClassKey, Site

log = logging.getLogger(__name__)

LoadTensor = Callable[[str], np.ndarray]
_MAX_PAIRS_PER_CLASS = 2048
_TOP_PER_SITE = 8
# An overshoot is worth a note once it shows at the three decimals ratios are printed with.
_OVERSHOOT_SHOWN = 5e-4
_SHOWN_LEFT_OUT = 10
_GAIN = 1e-9  # a ceiling higher by more than rounding
NON_FINITE = "weight or bias holds NaN/Inf"
NO_ROLES = "layer names give no roles; planned by signature only"


@dataclass
class _Class:
    """Working state of one compatibility class during planning."""

    key: ClassKey
    sites: list[Site]
    sim: np.ndarray  # site x site similarity
    link: np.ndarray  # group x group average linkage, -inf where not mergeable
    groups: list[list[int]]
    scores: list[float]  # merge score of each group (nan for singletons)

    @property
    def numel(self) -> int:
        return self.sites[0].numel


@dataclass
class _Run:
    """What one greedy pass did."""

    saved: int
    order: list[tuple[_Class, int]]  # (class, group index) of each group, in the order groups formed
    last_numel: int = 0  # parameters the last merge saved
    blocked_numel: int | None = None  # smallest merge left that ``fits`` refused, if any


@dataclass(frozen=True)
class _Scale:
    """Turns parameters saved into the ratio over the plan's scope."""

    scope: str
    params_total: int
    layer_before: int

    def ratio(self, saved: int, layer_before: int | None = None) -> float:
        if self.scope == "model":
            before = self.params_total
        else:
            before = self.layer_before if layer_before is None else layer_before
        return before / max(before - saved, 1)


def is_finite(weight: np.ndarray) -> bool:
    """Whether every value of ``weight`` is finite, whatever its float dtype
    (float16/32/64, or bfloat16 and other ml_dtypes types, which numpy sees as opaque)."""
    arr = np.asarray(weight)
    if arr.dtype.kind in "biu":
        return True
    if arr.dtype.kind not in "fc":
        arr = arr.astype(np.float32)  # the ml_dtypes floats are all narrower: exact
    return bool(np.isfinite(arr).all())


class _Scorer:
    """Loads weights, leaves out those holding NaN/Inf (with a reason), and scores
    classes; similarity matrices are cached by their members. A metric that
    ``needs_stats`` gets each layer's ``[W b]`` and input moment from ``stats``."""

    def __init__(self, load: LoadTensor, metric: Metric, stats: Calibration | None = None) -> None:
        self._load = load
        self._metric = metric
        self._stats = stats
        self._seen: set[str] = set()
        self._sims: dict[tuple[str, ...], np.ndarray] = {}
        self.bad: dict[str, str] = {}  # layer name -> why it was left out

    def _compared(self, site: Site) -> list[np.ndarray]:
        return [self._load(x.tensor) for x in site.compared]

    def _keep(self, site: Site, compared: Sequence[np.ndarray]) -> bool:
        if site.name not in self._seen:
            self._seen.add(site.name)
            others = (self._load(x.tensor) for x in site.slots if not x.compared)
            if not all(is_finite(w) for w in compared) or not all(is_finite(b) for b in others):
                self.bad[site.name] = NON_FINITE
                log.warning("layer %s: %s; left out", site.name, NON_FINITE)
        return site.name not in self.bad

    def finite(self, members: Sequence[Site]) -> list[Site]:
        """``members`` less those whose tensors hold NaN/Inf (loading only unseen ones)."""
        for s in members:
            if s.name not in self._seen:
                self._keep(s, self._compared(s))
        return [s for s in members if s.name not in self.bad]

    def score(self, key: ClassKey, members: Sequence[Site]) -> _Class | None:
        """The class of ``members`` with finite tensors, scored; None if fewer than two remain.

        A site with several compared slots (a unit's q, k, v, o) scores the
        mean of the metric over its slots, so each projection counts alike."""
        names = tuple(s.name for s in members if s.name not in self.bad)
        if names in self._sims:
            kept = [s for s in members if s.name not in self.bad]
            return _Class(key, kept, self._sims[names], np.empty(0), [], [])
        kept, weights = [], []
        for s in members:
            if s.name in self.bad:
                continue
            compared = self._compared(s)
            if self._keep(s, compared):
                kept.append(s)
                weights.append(compared)
        if len(kept) < 2:
            return None
        if getattr(self._metric, "needs_stats", False):
            inputs = [self._layer_inputs(s) for s in kept]
            sim = np.mean([self._metric([x[k][0] for x in inputs], [x[k][1] for x in inputs])
                           for k in range(len(inputs[0]))], axis=0)
        else:
            sim = np.mean([self._metric([w[k] for w in weights]) for k in range(len(weights[0]))], axis=0)
        sim = self._sims.setdefault(tuple(s.name for s in kept), sim)
        return _Class(key, kept, sim, np.empty(0), [], [])


    def _layer_inputs(self, site: Site) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """Per layer of ``site``: ``[W b]`` as ``[out, in (+1)]`` and its input moment
        (None, logged, where there is none: the metric then weighs inputs alike)."""
        out = []
        for layer in layers_of(site):
            w = self._load(layer.weight.tensor)
            b = self._load(layer.bias.tensor) if layer.bias is not None else None
            layout, why = layout_of(layer)
            matrix = to_matrix(w, layout or "out_in")
            moment = None
            if layout is not None and self._stats is not None:
                moment, why = input_moment(self._stats, layer, matrix.shape[1])
            if moment is None:
                log.info("layer %s: %s; compared without its inputs", layer.label(site.name), why)
            out.append((augmented(matrix, b), moment if moment is not None else None))
        return out


def select_sites(sites: Iterable[Site], config: FusionConfig) -> list[Site]:
    """The sites the config allows to fuse: the layers, or with ``granularity = "block"``
    the units in place of the layers they cover; then kinds, heads, include/exclude
    patterns and size."""

    def matches(site: Site, patterns: Sequence[str]) -> bool:
        return any(fnmatch.fnmatchcase(site.role, p) or fnmatch.fnmatchcase(site.name, p) for p in patterns)

    sites = list(sites)
    if config.granularity == "block":
        covered = {p for s in sites for p in s.parts}
        sites = [s for s in sites if s.name not in covered]
    else:
        sites = [s for s in sites if not s.parts]
    out = []
    for s in sites:
        if s.kind not in config.kinds or s.numel < config.min_params:
            continue
        if not config.heads and is_head(s):
            continue
        if config.include and not matches(s, config.include):
            continue
        if config.exclude and matches(s, config.exclude):
            continue
        out.append(s)
    return out


_HEADS = re.compile(r"(^|[./])(lm_head|classifier|pooler|heads?|score)([./]|$)")


def is_head(site: Site) -> bool:
    """An output head (``lm_head``, ``classifier``, ``pooler``, ``head``): fused only when asked."""
    return bool(_HEADS.search(site.name))


def compatibility_classes(sites: Iterable[Site], cross_role: bool) -> dict[ClassKey, list[Site]]:
    """Sites by class key, in the order of the keys' text (deterministic): only sites
    of one class may share a tensor."""
    classes: dict[ClassKey, list[Site]] = {}
    for s in sites:
        classes.setdefault(s.class_key(cross_role), []).append(s)
    return dict(sorted(classes.items(), key=lambda kv: str(kv[0])))


def role_note(sites: Sequence[Site], config: FusionConfig) -> str:
    """What the layer names say of planning by role, when that is worth saying.

    A role is a layer's name with its indices starred, so repeated blocks share
    one. An ONNX node without a usable name gets the empty role: where every
    layer has it, classes by role are classes by signature alone. Where every
    layer's role is its own (no repeated structure) nothing can share by role;
    an out-of-reach target already names cross_role, so this is said only for
    a threshold-only plan. Either way the plan itself is unchanged.
    """
    if config.cross_role or len(sites) < 2:
        return ""
    roles = [s.role for s in sites]
    if not any(roles):
        return NO_ROLES
    alike = any(len(m) > 1 for m in compatibility_classes(sites, True).values())
    if config.target_ratio is None and alike and len(set(roles)) == len(roles):
        return "no two layers share a role, so none can share by role; cross_role=true lets same-shaped layers share"
    return ""


def _candidates(cls: _Class) -> list[Candidate]:
    n = len(cls.sites)
    iu, ju = np.triu_indices(n, k=1)
    if len(iu) > _MAX_PAIRS_PER_CLASS:  # keep each site's nearest neighbours
        order = np.argsort(-np.where(np.eye(n, dtype=bool), -np.inf, cls.sim), axis=1)[:, :_TOP_PER_SITE]
        pairs = {(min(i, j), max(i, j)) for i in range(n) for j in order[i]}
        iu, ju = map(np.array, zip(*sorted(pairs)))
    return [Candidate(cls.sites[i].name, cls.sites[j].name, float(cls.sim[i, j])) for i, j in zip(iu, ju)]


def _score_classes(sites: Sequence[Site], cross_role: bool, scorer: _Scorer, progress: bool) -> list[_Class]:
    """The scored classes of two or more sites with finite weights, in key order."""
    classes = []
    bar = tqdm(compatibility_classes(sites, cross_role).items(), desc="similarity", unit="class",
               disable=not progress, leave=False)
    for key, members in bar:
        if len(members) >= 2 and (cls := scorer.score(key, members)) is not None:
            classes.append(cls)
    return classes


def plan_fusion(
    sites: Sequence[Site],
    load: LoadTensor,
    config: FusionConfig,
    params_total: int,
    progress: bool = False,
    stats: Calibration | None = None,
) -> FusionPlan:
    """Plan which of ``sites`` share tensors; ``load(name)`` gives a tensor's values.

    ``params_total`` is the model's unique parameter count (the ``model`` scope).
    ``stats``: calibration of the model, which a metric that ``needs_stats`` (``output``) requires.
    """
    metric = get_metric(config.metric)
    if getattr(metric, "needs_stats", False) and stats is None:
        raise ConfigError(f"metric {config.metric!r} needs calibration inputs (calibrate the model and pass "
                          "its statistics, or choose a weight metric such as 'cosine')")
    chosen = select_sites(sites, config)
    scorer = _Scorer(load, metric, stats)
    classes = _score_classes(chosen, config.cross_role, scorer, progress)
    left_out = tuple(scorer.bad.items())
    scale = _Scale(config.ratio_scope, params_total, sum(s.numel for s in chosen))
    # The ceiling is what this planner reaches when nothing stops it but the
    # signatures and max_group_size (greedy packing may strand groups below the cap).
    ceiling = _greedy(classes, lambda saved: False, None, config.max_group_size).saved
    run = _greedy(classes, _reached(config, scale), config.threshold, config.max_group_size, _fits(config, scale))
    plan = FusionPlan(
        groups=tuple(_group(cls, g, config.merge_rule) for cls, g in run.order),
        metric=config.metric,
        scope=config.ratio_scope,
        params_before=params_total,
        params_after=params_total - run.saved,
        layer_params_before=scale.layer_before,
        layer_params_after=scale.layer_before - run.saved,
        max_ratio=scale.ratio(ceiling),
        target_ratio=config.target_ratio,
        threshold=config.threshold,
        max_group_size=config.max_group_size,
        seed=config.seed,
        candidates=tuple(c for cls in classes for c in _candidates(cls)),
        signatures=tuple((s.name, s.class_key(True)) for cls in classes for s in cls.sites),
        classes=tuple((cls.key, tuple(s.name for s in cls.sites)) for cls in classes),
        max_overshoot=config.max_overshoot,
        left_out=left_out,
    )
    context = _Context(config, scale, classes, scorer, sites, chosen)
    notes = (role_note(chosen, config), _left_out_note(left_out), _target_note(plan, run, context))
    plan = replace(plan, message="\n".join(n for n in notes if n))
    log.info("planned %d groups, ratio %.3f (%s)", len(plan.groups), plan.ratio, plan.scope)
    return plan


def _reached(config: FusionConfig, scale: _Scale) -> Callable[[int], bool]:
    target = config.target_ratio
    return lambda saved: target is not None and scale.ratio(saved) >= target


def _fits(config: FusionConfig, scale: _Scale) -> Callable[[int], bool] | None:
    """Whether a plan saving so much stays within ``target_ratio + max_overshoot`` (None: no bound)."""
    over = config.max_overshoot
    if config.target_ratio is None or over is None:
        return None
    bound = config.target_ratio + over
    return lambda saved: scale.ratio(saved) <= bound


def _greedy(
    classes: list[_Class],
    done: Callable[[int], bool],
    threshold: float | None,
    max_group_size: int | None,
    fits: Callable[[int], bool] | None = None,
) -> _Run:
    """Merge the most similar groups, across classes, until ``done(saved)``.

    With ``fits``, a merge leaving ``saved`` where ``fits(saved)`` is false is
    skipped, and planning goes on with the merges that fit. Resets and then
    mutates each class's working state.
    """
    for cls in classes:
        cls.link = cls.sim.astype(np.float64, copy=True)
        np.fill_diagonal(cls.link, -np.inf)
        cls.groups = [[i] for i in range(len(cls.sites))]
        cls.scores = [math.nan] * len(cls.sites)
    run = _Run(0, [])
    while not done(run.saved):
        best, run.blocked_numel = _best_pair(classes, run.saved, threshold, max_group_size, fits)
        if best is None:
            break
        score, cls, i, j = best
        _merge(cls, i, j, score)
        run.saved += cls.numel
        run.last_numel = cls.numel
        order = [(c, g - 1 if c is cls and g > j else g) for c, g in run.order if not (c is cls and g == j)]
        run.order = order if (cls, i) in order else [*order, (cls, i)]
    return run


def _best_pair(
    classes: list[_Class],
    saved: int,
    threshold: float | None,
    max_group_size: int | None,
    fits: Callable[[int], bool] | None,
) -> tuple[tuple[float, _Class, int, int] | None, int | None]:
    """The most similar pair of groups that may merge (at least ``threshold``
    alike, within ``max_group_size``) over the classes whose merge fits, and the
    smallest merge refused only for not fitting (None if none was)."""
    best: tuple[float, _Class, int, int] | None = None
    blocked: int | None = None
    for cls in classes:
        link = cls.link
        if max_group_size is not None:
            sizes = np.array([len(g) for g in cls.groups])
            link = np.where(sizes[:, None] + sizes[None, :] > max_group_size, -np.inf, link)
        flat = int(np.argmax(link))
        score = float(link.flat[flat])
        if not score > -np.inf or (threshold is not None and score < threshold):
            continue
        if fits is not None and not fits(saved + cls.numel):
            blocked = cls.numel if blocked is None else min(blocked, cls.numel)
            continue
        if best is None or score > best[0]:
            i, j = divmod(flat, link.shape[1])
            best = (score, cls, min(i, j), max(i, j))
    return best, blocked


def _merge(cls: _Class, i: int, j: int, score: float) -> None:
    """Merge group ``j`` into group ``i`` and update average linkage (Lance-Williams)."""
    ni, nj = len(cls.groups[i]), len(cls.groups[j])
    row = (ni * cls.link[i] + nj * cls.link[j]) / (ni + nj)
    cls.link[i, :] = row
    cls.link[:, i] = row
    cls.link[i, i] = -np.inf
    cls.link = np.delete(np.delete(cls.link, j, axis=0), j, axis=1)
    cls.groups[i] = sorted(cls.groups[i] + cls.groups[j])
    del cls.groups[j]
    del cls.scores[j]
    cls.scores[i] = score


def _group(cls: _Class, g: int, rule: str) -> FusionGroup:
    idx = cls.groups[g]
    sub = cls.sim[np.ix_(idx, idx)]
    mean_pair = float((sub.sum() - np.trace(sub)) / (len(idx) * (len(idx) - 1)))
    return FusionGroup(
        members=tuple(cls.sites[k].name for k in idx),
        rule=rule,
        score=mean_pair,
        cls=cls.key,
        numel=cls.numel,
    )


# -- what the plan says ----------------------------------------------------


@dataclass
class _Context:
    """What the notes on a plan need to know of how it was made."""

    config: FusionConfig
    scale: _Scale
    classes: list[_Class]
    scorer: _Scorer
    sites: Sequence[Site]  # all the model's sites
    chosen: Sequence[Site]  # those the config's filters let through


def _left_out_note(left_out: Sequence[tuple[str, str]]) -> str:
    notes = [f"layer {name}: {why}; left out" for name, why in left_out[:_SHOWN_LEFT_OUT]]
    if len(left_out) > _SHOWN_LEFT_OUT:
        notes.append(f"and {len(left_out) - _SHOWN_LEFT_OUT} more layers left out")
    return "; ".join(notes)


def _target_note(plan: FusionPlan, run: _Run, ctx: _Context) -> str:
    """How the plan stands against its target: out of reach (and why), or overshot."""
    target, over = plan.target_ratio, plan.max_overshoot
    if target is None:
        return ""
    if not plan.reached and plan.max_ratio < target:
        return (f"target ratio {target:g} is out of reach: fused what it could, reaching {plan.ratio:.3f} "
                f"over the {plan.scope} (ceiling {plan.max_ratio:.3f}); {_options_note(plan, ctx)}")
    if not plan.reached and over is not None and run.blocked_numel is not None:
        past = ctx.scale.ratio(run.saved + run.blocked_numel)
        return (f"target ratio {target:g} is out of reach within max_overshoot {over:g}: the plan reaches "
                f"{plan.ratio:.3f} over the {plan.scope} ({_groups(len(plan.groups))}); the smallest merge left "
                f"would take it to {past:.3f}, past {target + over:.3f} (ceiling {plan.max_ratio:.3f})")
    if not plan.reached and plan.threshold is not None:
        return (f"target ratio {target:g} is out of reach under threshold {plan.threshold:g}: fused what it "
                f"could, reaching {plan.ratio:.3f} over the {plan.scope} (ceiling {plan.max_ratio:.3f}); "
                f"a lower threshold would go further")
    if not plan.reached:  # not from this planner's greedy: say only what is so
        return f"target ratio {target:g} is not reached: the plan reaches {plan.ratio:.3f} over the {plan.scope}"
    if over is None and plan.overshoot > _OVERSHOOT_SHOWN:
        return _overshoot_note(plan, run, ctx)
    return ""


def _groups(n: int) -> str:
    return f"{n} group" if n == 1 else f"{n} groups"


def _overshoot_note(plan: FusionPlan, run: _Run, ctx: _Context) -> str:
    """The overshoot, and the nearest plan at or below the target: the same greedy
    order, skipping any merge that would pass the target. Empty when no plan at or
    below the target fuses anything (every merge passes it): ``plan.overshoot``
    and the summary still tell the overshoot, but there is nothing nearer to offer."""
    target = plan.target_ratio
    assert target is not None
    config = ctx.config
    near = _greedy(ctx.classes, _reached(config, ctx.scale), config.threshold, config.max_group_size,
                   lambda saved: ctx.scale.ratio(saved) <= target)
    if not near.order:
        return ""
    return (f"ratio {plan.ratio:.3f} overshoots the target {target:g} by {plan.overshoot:.3f} "
            f"(its last merge saved {run.last_numel:,} parameters); the nearest plan at or below the target "
            f"reaches {ctx.scale.ratio(near.saved):.3f} ({_groups(len(near.order))}); "
            f"set max_overshoot to bound the overshoot")


def _options_note(plan: FusionPlan, ctx: _Context) -> str:
    """The options that would raise the ceiling, and to what; or that none would."""
    config = ctx.config
    options: list[tuple[str, bool, int | None, Sequence[Site]]] = []
    if not config.cross_role:
        options.append(("cross_role=true", True, config.max_group_size, ctx.chosen))
    if config.max_group_size is not None:
        options.append(("max_group_size unset", config.cross_role, None, ctx.chosen))
    lifted = [k for k in ("include", "exclude", "min_params") if getattr(config, k)]
    lifted += ["kinds"] if set(config.kinds) != set(KINDS) else []
    if lifted:
        options.append((f"{'/'.join(lifted)} lifted", config.cross_role, config.max_group_size, ctx.sites))
    if len(options) > 1:
        options.append(("all of these", True, None, ctx.sites))
    reach = {name: _reach(ctx, cross_role, cap, sites) for name, cross_role, cap, sites in options}
    helps = [(name, r) for name, r in reach.items() if r > plan.max_ratio + _GAIN and name != "all of these"]
    together = reach.get("all of these", 0.0)
    if together > max((r for _, r in helps), default=plan.max_ratio) + _GAIN:
        helps.append(("all of these", together))
    if not helps:
        return (f"no option raises the ceiling: sharing cannot reach {plan.target_ratio:g} in this model "
                f"(the most it reaches is {plan.max_ratio:.3f} over the {plan.scope})")
    return "; ".join(f"{name} would reach {reach:.3f}" for name, reach in helps)


def _reach(ctx: _Context, cross_role: bool, max_group_size: int | None, sites: Sequence[Site]) -> float:
    """The ceiling, over the plan's scope, of planning ``sites`` with these options."""
    saved = _ceiling(sites, cross_role, max_group_size, ctx.scorer)
    return ctx.scale.ratio(saved, sum(s.numel for s in sites))


def _ceiling(sites: Sequence[Site], cross_role: bool, max_group_size: int | None, scorer: _Scorer) -> int:
    """Parameters the planner saves when nothing stops it but the classes and the cap.

    Classes do not interact then, so each is planned alone; without a cap a class
    ends as one group, which needs no similarity.
    """
    saved = 0
    for key, members in compatibility_classes(sites, cross_role).items():
        if len(members) < 2:
            continue
        if max_group_size is None:
            saved += max(len(scorer.finite(members)) - 1, 0) * members[0].numel
        elif (cls := scorer.score(key, members)) is not None:
            saved += _greedy([cls], lambda saved: False, None, max_group_size).saved
    return saved
