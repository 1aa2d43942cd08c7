"""Greedy agglomerative planning: which sites share a tensor.

Inside each compatibility class the planner starts from singletons and, one
step at a time, merges the two groups with the highest average-linkage
similarity (over all classes at once), until the target ratio is reached, the
best remaining pair falls below the threshold, or nothing more can merge.
Groups never exceed ``max_group_size``. The result is deterministic: ties
break by class name, then by site order.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm

from lfpass.config import FusionConfig
from lfpass.metrics import get_metric
from lfpass.plan import Candidate, FusionGroup, FusionPlan
from lfpass.sites import Site

log = logging.getLogger(__name__)

LoadTensor = Callable[[str], np.ndarray]
_MAX_PAIRS_PER_CLASS = 2048
_TOP_PER_SITE = 8


@dataclass
class _Class:
    """Working state of one compatibility class during planning."""

    key: str
    sites: list[Site]
    sim: np.ndarray  # site x site similarity
    link: np.ndarray  # group x group average linkage, -inf where not mergeable
    groups: list[list[int]]
    scores: list[float]  # merge score of each group (nan for singletons)

    @property
    def numel(self) -> int:
        return self.sites[0].numel


def select_sites(sites: Iterable[Site], config: FusionConfig) -> list[Site]:
    """The sites the config allows to fuse (kinds, include/exclude patterns, size)."""

    def matches(site: Site, patterns: Sequence[str]) -> bool:
        return any(fnmatch.fnmatchcase(site.role, p) or fnmatch.fnmatchcase(site.name, p) for p in patterns)

    out = []
    for s in sites:
        if s.kind not in config.kinds or s.numel < config.min_params:
            continue
        if config.include and not matches(s, config.include):
            continue
        if config.exclude and matches(s, config.exclude):
            continue
        out.append(s)
    return out


def compatibility_classes(sites: Iterable[Site], cross_role: bool) -> dict[str, list[Site]]:
    classes: dict[str, list[Site]] = {}
    for s in sites:
        classes.setdefault(s.class_key(cross_role), []).append(s)
    return classes


def _candidates(cls: _Class) -> list[Candidate]:
    n = len(cls.sites)
    iu, ju = np.triu_indices(n, k=1)
    if len(iu) > _MAX_PAIRS_PER_CLASS:  # keep each site's nearest neighbours
        order = np.argsort(-np.where(np.eye(n, dtype=bool), -np.inf, cls.sim), axis=1)[:, :_TOP_PER_SITE]
        pairs = {(min(i, j), max(i, j)) for i in range(n) for j in order[i]}
        iu, ju = map(np.array, zip(*sorted(pairs)))
    return [Candidate(cls.sites[i].name, cls.sites[j].name, float(cls.sim[i, j])) for i, j in zip(iu, ju)]


def plan_fusion(
    sites: Sequence[Site],
    load: LoadTensor,
    config: FusionConfig,
    params_total: int,
    progress: bool = False,
) -> FusionPlan:
    """Plan which of ``sites`` share tensors; ``load(name)`` gives a tensor's values.

    ``params_total`` is the model's unique parameter count (the ``model`` scope).
    """
    metric = get_metric(config.metric)
    chosen = select_sites(sites, config)
    layer_before = sum(s.numel for s in chosen)
    classes: list[_Class] = []
    by_key = compatibility_classes(chosen, config.cross_role)
    bar = tqdm(sorted(by_key.items()), desc="similarity", unit="class", disable=not progress, leave=False)
    for key, members in bar:
        if len(members) < 2:
            continue
        sim = metric([load(s.weight) for s in members])
        classes.append(_Class(key, members, sim, np.empty(0), [], []))

    def ratio(saved: int) -> float:
        if config.ratio_scope == "model":
            return params_total / max(params_total - saved, 1)
        return layer_before / max(layer_before - saved, 1)

    # The ceiling is what this planner reaches when nothing stops it but the
    # signatures and max_group_size (greedy packing may strand groups below the cap).
    ceiling_saved, _ = _greedy(classes, lambda saved: False, None, config.max_group_size)
    target = config.target_ratio
    saved, order = _greedy(
        classes,
        lambda saved: target is not None and ratio(saved) >= target,
        config.threshold,
        config.max_group_size,
    )
    groups = tuple(_group(cls, g, config.merge) for cls, g in order)
    max_ratio = ratio(ceiling_saved)
    plan = FusionPlan(
        groups=groups,
        metric=config.metric,
        scope=config.ratio_scope,
        params_before=params_total,
        params_after=params_total - saved,
        layer_params_before=layer_before,
        layer_params_after=layer_before - saved,
        max_ratio=max_ratio,
        target_ratio=config.target_ratio,
        threshold=config.threshold,
        max_group_size=config.max_group_size,
        seed=config.seed,
        candidates=tuple(c for cls in classes for c in _candidates(cls)),
        signatures=tuple((s.name, s.class_key(True)) for cls in classes for s in cls.sites),
        classes=tuple((cls.key, tuple(s.name for s in cls.sites)) for cls in classes),
    )
    if not plan.reached:
        hint = "" if config.cross_role else "; cross_role=true lets same-shaped layers of different roles share"
        plan = replace(
            plan,
            message=f"target ratio {config.target_ratio:g} is out of reach: fused what it could, reaching "
            f"{plan.ratio:.3f} over the {plan.scope} (ceiling {max_ratio:.3f}){hint}",
        )
    log.info("planned %d groups, ratio %.3f (%s)", len(groups), plan.ratio, plan.scope)
    return plan


def _greedy(
    classes: list[_Class],
    done: Callable[[int], bool],
    threshold: float | None,
    max_group_size: int | None,
) -> tuple[int, list[tuple[_Class, int]]]:
    """Merge the most similar groups, across classes, until ``done(saved)``.

    Resets and then mutates each class's working state; returns the parameters
    saved and the (class, group index) of each group, in the order groups formed.
    """
    for cls in classes:
        cls.link = cls.sim.astype(np.float64, copy=True)
        np.fill_diagonal(cls.link, -np.inf)
        cls.groups = [[i] for i in range(len(cls.sites))]
        cls.scores = [math.nan] * len(cls.sites)
    saved = 0
    order: list[tuple[_Class, int]] = []
    while not done(saved):
        best: tuple[float, _Class, int, int] | None = None
        for cls in classes:
            link = cls.link
            if max_group_size is not None:
                sizes = np.array([len(g) for g in cls.groups])
                link = np.where(sizes[:, None] + sizes[None, :] > max_group_size, -np.inf, link)
            flat = int(np.argmax(link))
            score = float(link.flat[flat])
            if score > -np.inf and (best is None or score > best[0]):
                i, j = divmod(flat, link.shape[1])
                best = (score, cls, min(i, j), max(i, j))
        if best is None or (threshold is not None and best[0] < threshold):
            break
        score, cls, i, j = best
        _merge(cls, i, j, score)
        saved += cls.numel
        order = [(c, g - 1 if c is cls and g > j else g) for c, g in order if not (c is cls and g == j)]
        if (cls, i) not in order:
            order.append((cls, i))
    return saved, order


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
