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

from lfpass.core.errors import PlanError
from lfpass.core.rules import get_rule
from lfpass.core.sites import ClassKey, Site

PLAN_VERSION = 2  # 2: class keys are objects (kind, role, signature), not strings


@dataclass(frozen=True)
class FusionGroup:
    """Sites that will share one tensor per slot. ``members[0]`` is the anchor
    whose tensor names the fused graph keeps."""

    members: tuple[str, ...]
    rule: str
    score: float
    cls: ClassKey
    numel: int
    extra: int = 0  # parameters the group adds back: its members' own low-rank corrections
    damage: float | None = None  # the output error of this group alone, where it was measured
    rank: int | None = None  # its members' correction rank (None: the plan's ``residual_rank``)

    @property
    def saved(self) -> int:
        """Unique parameters this group removes, net of its members' own corrections."""
        return (len(self.members) - 1) * self.numel - self.extra


@dataclass(frozen=True)
class Factored:
    """Layers of one class written through one shared basis, each with its own coefficients:
    ``C_i (B x)`` (:mod:`lfpass.core.bases`); one member is per-layer low rank. ``out`` and
    ``in_`` are each member's weight as the matrix ``[out, in]`` (a convolution's ``in`` is its
    patch); ``damage``: the members' summed relative squared output error, in closed form."""

    members: tuple[str, ...]
    rank: int
    cls: ClassKey
    out: int
    in_: int
    damage: float | None = None
    whitened: bool = False  # factored on calibration statistics (rebuilding it needs them again)

    @property
    def action(self) -> str:
        return "lowrank" if len(self.members) == 1 else "basis"

    @property
    def params(self) -> int:
        """Unique parameters of the factors: one basis, one coefficient matrix per member."""
        return self.rank * (self.in_ + len(self.members) * self.out)

    @property
    def saved(self) -> int:
        return len(self.members) * self.out * self.in_ - self.params


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
    signatures: tuple[tuple[str, ClassKey], ...] = field(default=(), repr=False)
    classes: tuple[tuple[ClassKey, tuple[str, ...]], ...] = field(default=(), repr=False)
    max_overshoot: float | None = None  # planning kept the ratio <= target_ratio + max_overshoot
    left_out: tuple[tuple[str, str], ...] = ()  # (layer, why) for layers planning left out
    align: str = "none"  # members moved into their anchor's coordinates first ("weights", "activations")
    residual_rank: int = 0  # each member keeps a correction of this rank (counted in ``extra``)
    error_metric: str | None = None  # how ``error`` was measured, when it was
    max_error: float | None = None  # the budget planning kept to
    error: float | None = None  # the fused model's output error on held-out calibration inputs
    curve: tuple[tuple[float, float], ...] = ()  # (ratio, error) after each accepted group, in order
    decisions: tuple[tuple[str, str, str], ...] = field(default=(), repr=False)  # (a, b, why): budgeted plans
    factors: tuple[Factored, ...] = ()  # layers written through shared bases or low-rank factors
    choices: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # (class, what the menu chose and why)
    dropped: tuple[str, ...] = ()  # residual blocks removed from the graph (depth collapse)

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
    def keeps_function(self) -> bool:
        """Whether applying the plan takes more than merging: alignment, per-member corrections,
        or a data-aware rule (which needs calibration statistics)."""
        return self.align != "none" or self.residual_rank > 0 or self.needs_statistics or bool(self.factors) or any(
            g.rank for g in self.groups) or bool(self.dropped)

    @property
    def needs_statistics(self) -> bool:
        """Whether applying the plan needs calibration statistics (a data-aware rule, or
        alignment by activations)."""
        return (self.align == "activations" or any(get_rule(g.rule).uses_stats for g in self.groups)
                or any(f.whitened for f in self.factors))

    @property
    def empty(self) -> bool:
        """Whether applying the plan changes nothing: no tie, no factored layer, no block removed."""
        return not self.groups and not self.factors and not self.dropped

    @property
    def reached(self) -> bool:
        return self.target_ratio is None or self.ratio >= self.target_ratio

    @property
    def overshoot(self) -> float:
        """How far the ratio passed the target (0 when it did not, or there is none)."""
        return max(self.ratio - self.target_ratio, 0.0) if self.target_ratio is not None else 0.0

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
            if not isinstance(data, dict):
                raise PlanError("plan: not a valid lfpass plan (not a JSON object)")
            version = data.pop("version", None)
            if version == 1:
                raise PlanError("plan: version 1 was written by an older lfpass; make it again with "
                                "`lfpass analyze --plan-out`")
            if version != PLAN_VERSION:
                raise PlanError(f"plan: unsupported version (this lfpass reads version {PLAN_VERSION})")
            data.pop("ratio", None)
            data["groups"] = tuple(_group_from_json(g) for g in _list(data, "groups"))
            data["candidates"] = tuple(Candidate(**c) for c in _list(data, "candidates", ()))
            data["signatures"] = tuple((_name(n), ClassKey.from_json(k)) for n, k in _list(data, "signatures", ()))
            data["classes"] = tuple((ClassKey.from_json(k), tuple(_name(n) for n in v))
                                    for k, v in _list(data, "classes", ()))
            data["left_out"] = tuple((_name(name), str(why)) for name, why in _list(data, "left_out", ()))
            data["curve"] = tuple((float(r), float(e)) for r, e in _list(data, "curve", ()))
            data["decisions"] = tuple((_name(a), _name(b), str(why)) for a, b, why in _list(data, "decisions", ()))
            data["factors"] = tuple(_factored_from_json(f) for f in _list(data, "factors", ()))
            data["choices"] = tuple((str(c), str(why)) for c, why in _list(data, "choices", ()))
            data["dropped"] = tuple(_name(n) for n in _list(data, "dropped", ()))
            return cls(**data)
        except PlanError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise PlanError(f"plan: not a valid lfpass plan ({exc})") from None

    def similarity(self, cls: ClassKey) -> tuple[list[str], np.ndarray]:
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
        lines = [
            f"metric {self.metric}, scope {self.scope}: ratio {self.ratio:.3f} "
            f"(model {self.model_ratio:.3f}, layers {self.layer_ratio:.3f}, ceiling {self.max_ratio:.3f})"
        ]
        if self.message:
            lines.append(self.message)
        for cls, why in self.choices:  # a menu plan: per class, the action chosen and what the others cost
            lines.append(f"  {cls}: {why}")
        for f in self.factors:
            lines.append(f"  {f.action} rank {f.rank}: {', '.join(f.members)} (saves {f.saved:,} parameters"
                         + (f", damage {f.damage:.4g})" if f.damage is not None else ")"))
        if self.dropped:
            lines.append(f"  removed blocks: {', '.join(self.dropped)}")
        if self.choices or self.dropped:
            return "\n".join(lines)
        if self.decisions:  # a budgeted plan: each pair was measured, and kept or rolled back
            score = {(c.a, c.b): c.score for c in self.candidates}
            for a, b, reason in self.decisions:
                lines.append(f"  {score.get((a, b), float('nan')):+.4f}  {a} ~ {b}: {reason}")
            return "\n".join(lines)
        why = _Reasons(self)
        for c in sorted(self.candidates, key=lambda c: -c.score):
            lines.append(f"  {c.score:+.4f}  {c.a} ~ {c.b}: {why(c)}")
        return "\n".join(lines)


class _Reasons:
    """Why a candidate pair ended where it did, read from the plan alone.

    Groups merge by average linkage, so a pair is kept apart by what holds
    between its two groups (sizes, average similarity), not by its own score.
    Each reason is one that holds for the plan's final groups; where the
    plan's kept pairs cannot tell a group average, the reason is the one left
    once the others are ruled out.
    """

    def __init__(self, plan: FusionPlan) -> None:
        self.plan = plan
        self.where = plan.group_of()
        self.score = {(c.a, c.b): c.score for c in plan.candidates}
        self.score.update({(c.b, c.a): c.score for c in plan.candidates})

    def members(self, name: str) -> tuple[str, ...]:
        g = self.where.get(name)
        return (name,) if g is None else self.plan.groups[g].members

    def linkage(self, a: tuple[str, ...], b: tuple[str, ...]) -> float | None:
        """The average similarity between two groups; None if a pair was not kept."""
        scores = [self.score.get((x, y)) for x in a for y in b]
        return None if any(s is None for s in scores) else float(np.mean(scores))

    def __call__(self, c: Candidate) -> str:
        plan, t = self.plan, self.plan.threshold
        ga, gb = self.where.get(c.a), self.where.get(c.b)
        if ga is not None and ga == gb:
            return f"fused: group {ga}"
        a, b = self.members(c.a), self.members(c.b)
        if plan.max_group_size is not None and len(a) + len(b) > plan.max_group_size:
            return f"kept apart: joined groups would exceed max_group_size {plan.max_group_size}"
        link = self.linkage(a, b)
        if t is not None and link is not None and link < t:
            if len(a) == len(b) == 1:
                return f"kept apart: below threshold {t:g}"
            return f"kept apart: its groups' average similarity {link:+.4f} is below threshold {t:g}"
        if plan.target_ratio is not None and plan.reached:
            return "kept apart: target reached before this pair"
        if plan.target_ratio is not None and plan.max_overshoot is not None:
            limit = plan.target_ratio + plan.max_overshoot
            bound = f"merging would take the ratio past target + max_overshoot ({limit:.3f})"
            if t is not None and link is None:
                return f"kept apart: its groups' average similarity is below threshold {t:g}, or {bound}"
            return f"kept apart: {bound}"
        if t is not None and link is None:
            return f"kept apart: its groups' average similarity is below threshold {t:g}"
        return "kept apart: the plan ends before these groups merge"


def _list(data: Mapping[str, Any], key: str, default: Any = None) -> list:
    value = data.get(key, default) if default is not None else data[key]
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{key} must be a list, got {type(value).__name__}")
    return list(value)


def _name(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"a layer name must be a string, got {value!r}")
    return value


def _group_from_json(g: Any) -> FusionGroup:
    if not isinstance(g, dict):
        raise TypeError(f"a group must be an object, got {g!r}")
    members = g["members"]
    if not isinstance(members, list):
        raise TypeError(f"a group's members must be a list of layer names, got {members!r}")
    score = g["score"]
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        raise TypeError(f"a group's score must be a number, got {score!r}")
    rank = g.get("rank")
    return FusionGroup(tuple(_name(m) for m in members), str(g["rule"]), float(score),
                       ClassKey.from_json(g["cls"]), _count(g["numel"], "a group's numel"),
                       _count(g.get("extra", 0), "a group's extra"), _number(g.get("damage"), "a group's damage"),
                       None if rank is None else _count(rank, "a group's rank"))


def _number(value: Any, what: str) -> float | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise TypeError(f"{what} must be a number, got {value!r}")
    return None if value is None else float(value)


def _count(value: Any, what: str, least: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise TypeError(f"{what} must be a whole number >= {least}, got {value!r}")
    return value


def _factored_from_json(f: Any) -> Factored:
    if not isinstance(f, dict):
        raise TypeError(f"a factored entry must be an object, got {f!r}")
    members = f["members"]
    if not isinstance(members, list) or not members:
        raise TypeError(f"a factored entry's members must be a list of layer names, got {members!r}")
    damage = _number(f.get("damage"), "a factored entry's damage")
    whitened = f.get("whitened", False)
    if not isinstance(whitened, bool):
        raise TypeError(f"a factored entry's whitened must be true or false, got {whitened!r}")
    return Factored(tuple(_name(m) for m in members), _count(f["rank"], "a rank", 1), ClassKey.from_json(f["cls"]),
                    _count(f["out"], "out", 1), _count(f["in_"], "in_", 1), damage, whitened)


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
    owner: dict[str, str] = {}  # tensor -> the member that holds it (a unit holds its layers' tensors)
    for index, group in enumerate(plan.groups):
        for name in group.members:
            if seen.setdefault(name, index) != index:
                raise PlanError(f"plan puts layer {name!r} in two groups")
            for tensor in sites[name].tensors:
                if owner.setdefault(tensor, name) != name:
                    raise PlanError(f"plan fuses {owner[tensor]!r} and {name!r}, which hold the same tensor "
                                    "(a unit and one of its layers)")
    tensors = set(owner)
    for entry in plan.factors:
        if len(set(entry.members)) != len(entry.members):
            raise PlanError(f"plan factors {', '.join(entry.members)}: a layer twice in one basis")
        for name in entry.members:
            site = sites.get(name)
            if site is None:
                raise PlanError(f"plan does not fit this model: it has no layer {name!r}")
            if site.parts:
                raise PlanError(f"plan factors {name!r}, a unit: a basis is shared by layers, not units")
            if (site.kind, site.signature) != (entry.cls.kind, entry.cls.signature):
                raise PlanError(f"plan does not fit this model: layer {name!r} changed shape or attributes")
            if name in seen or tensors & set(site.tensors):
                raise PlanError(f"plan puts layer {name!r} in two places (a tied group or another basis)")
            seen[name] = -1
            tensors.update(site.tensors)
        if entry.rank > min(entry.in_, len(entry.members) * entry.out):
            raise PlanError(f"plan factors {', '.join(entry.members)} at rank {entry.rank}, past the largest its "
                            f"layers allow ({min(entry.in_, len(entry.members) * entry.out)})")
