"""A fusion plan: pure data saying which sites share one tensor, and why.

A plan is what ``analyze`` returns and ``apply`` takes, so it can be saved,
reviewed, edited and applied later (or step by step) in a toolchain. It holds
no tensors: applying it to a graph whose weights changed since (say, after
retraining) merges the weights as they are then.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping

import numpy as np

from lfpass.errors import PlanError
from lfpass.merge import get_rule
from lfpass.sites import Site

PLAN_VERSION = 1


@dataclass(frozen=True)
class FusionGroup:
    """Sites that will share one tensor per slot. ``members[0]`` is the anchor
    whose tensor names the fused graph keeps."""

    members: tuple[str, ...]
    rule: str
    score: float
    cls: str
    numel: int

    @property
    def saved(self) -> int:
        """Unique parameters this group removes."""
        return (len(self.members) - 1) * self.numel


@dataclass(frozen=True)
class Candidate:
    """A pair of compatible sites and their similarity (higher = more alike)."""

    a: str
    b: str
    score: float


@dataclass(frozen=True)
class FusionPlan:
    groups: tuple[FusionGroup, ...]
    metric: str
    scope: str
    params_before: int
    params_after: int
    layer_params_before: int
    layer_params_after: int
    max_ratio: float
    target_ratio: float | None = None
    threshold: float | None = None
    max_group_size: int | None = None
    seed: int = 0
    message: str = ""
    candidates: tuple[Candidate, ...] = field(default=(), repr=False)
    signatures: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    classes: tuple[tuple[str, tuple[str, ...]], ...] = field(default=(), repr=False)

    # -- figures ---------------------------------------------------------
    @property
    def model_ratio(self) -> float:
        return self.params_before / max(self.params_after, 1)

    @property
    def layer_ratio(self) -> float:
        return self.layer_params_before / max(self.layer_params_after, 1)

    @property
    def ratio(self) -> float:
        """The predicted ratio over the plan's scope."""
        return self.model_ratio if self.scope == "model" else self.layer_ratio

    @property
    def reached(self) -> bool:
        return self.target_ratio is None or self.ratio >= self.target_ratio

    def take(self, n_groups: int) -> "FusionPlan":
        """The plan cut to its first ``n_groups`` groups (groups are in merge order),
        for applying a plan step by step."""
        kept = self.groups[:n_groups]
        saved = sum(g.saved for g in kept)
        before_saved = sum(g.saved for g in self.groups)
        return replace(
            self,
            groups=kept,
            params_after=self.params_after + before_saved - saved,
            layer_params_after=self.layer_params_after + before_saved - saved,
        )

    # -- serialisation ---------------------------------------------------
    def to_json(self, indent: int | None = 2) -> str:
        data = asdict(self)
        data["version"] = PLAN_VERSION
        data["ratio"] = self.ratio
        return json.dumps(data, indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "FusionPlan":
        try:
            data: dict[str, Any] = json.loads(text)
            if data.pop("version", None) != PLAN_VERSION:
                raise PlanError(f"plan: unsupported version (this lfpass reads version {PLAN_VERSION})")
            data.pop("ratio", None)
            data["groups"] = tuple(
                FusionGroup(**{**g, "members": tuple(g["members"])}) for g in data["groups"]
            )
            data["candidates"] = tuple(Candidate(**c) for c in data.get("candidates", ()))
            data["signatures"] = tuple(tuple(s) for s in data.get("signatures", ()))
            data["classes"] = tuple((k, tuple(v)) for k, v in data.get("classes", ()))
            return cls(**data)
        except PlanError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise PlanError(f"plan: not a valid lfpass plan ({exc})") from None

    def similarity(self, cls: str) -> tuple[list[str], np.ndarray]:
        """The class's members and their similarity matrix (NaN where a pair was not kept)."""
        names = list(dict(self.classes)[cls])
        index = {n: i for i, n in enumerate(names)}
        sim = np.full((len(names), len(names)), np.nan)
        np.fill_diagonal(sim, 1.0)
        for c in self.candidates:
            if c.a in index and c.b in index:
                sim[index[c.a], index[c.b]] = sim[index[c.b], index[c.a]] = c.score
        return names, sim

    # -- explanation -----------------------------------------------------
    def group_of(self) -> dict[str, int]:
        return {m: i for i, g in enumerate(self.groups) for m in g.members}

    def explain(self) -> str:
        """Why each candidate pair was or was not fused."""
        where = self.group_of()
        size = {i: len(g.members) for i, g in enumerate(self.groups)}
        weakest = min((g.score for g in self.groups), default=float("inf"))
        lines = [
            f"metric {self.metric}, scope {self.scope}: ratio {self.ratio:.3f} "
            f"(model {self.model_ratio:.3f}, layers {self.layer_ratio:.3f}, ceiling {self.max_ratio:.3f})"
        ]
        if self.message:
            lines.append(self.message)
        for c in sorted(self.candidates, key=lambda c: -c.score):
            ga, gb = where.get(c.a), where.get(c.b)
            if ga is not None and ga == gb:
                why = f"fused: group {ga}"
            elif self.threshold is not None and c.score < self.threshold:
                why = f"kept apart: below threshold {self.threshold:g}"
            elif self.max_group_size is not None and size.get(ga, 1) + size.get(gb, 1) > self.max_group_size:
                why = f"kept apart: joined groups would exceed max_group_size {self.max_group_size}"
            elif c.score <= weakest or self.reached:
                why = "kept apart: target reached before this pair"
            else:
                why = "kept apart: its groups' average similarity was lower than the pairs merged"
            lines.append(f"  {c.score:+.4f}  {c.a} ~ {c.b}: {why}")
        return "\n".join(lines)


def check_plan(plan: FusionPlan, sites: Mapping[str, Site]) -> None:
    """The plan names layers this model has, with the signatures it was made for."""
    planned = dict(plan.signatures)
    for group in plan.groups:
        get_rule(group.rule)
        if len(group.members) < 2 or len(set(group.members)) != len(group.members):
            raise PlanError(f"plan group {', '.join(group.members)}: needs two or more distinct layers")
        for name in group.members:
            site = sites.get(name)
            if site is None:
                raise PlanError(f"plan does not fit this model: it has no layer {name!r}")
            if name in planned and planned[name] != site.class_key(True):
                raise PlanError(f"plan does not fit this model: layer {name!r} changed shape or attributes")
        if len({sites[m].class_key(True) for m in group.members}) != 1:
            raise PlanError(f"plan groups incompatible layers: {', '.join(group.members)}")
    seen: dict[str, int] = {}
    for index, group in enumerate(plan.groups):
        for name in group.members:
            if seen.setdefault(name, index) != index:
                raise PlanError(f"plan puts layer {name!r} in two groups")
