"""Alignment before merging: move a member into its anchor's coordinates without changing its function.

Pretrained same-role layers are nearly orthogonal, so averaging them as they
are destroys both. But a hidden coordinate space between a producer and its
consumers may be re-expressed freely:

- a ``"permute"`` space (hidden units, channels) reached through elementwise
  ops only: permuting the producers' output rows (weights, biases, an
  eval-mode BatchNorm's four vectors) and the consumers' input columns by the
  same permutation ``P`` leaves the function unchanged, since
  ``W_c P^T act(P (W_p x + b)) = W_c act(W_p x + b)``;
- a ``"heads"`` space (``n_heads x head_dim``) in attention: heads may be
  permuted, and each head rotated by an orthogonal ``R``: Q and K rows alike
  (``(R q) . (R k) = q . k``), V rows with O's input columns
  (``O R^T R v = O v``).

A transform ``T`` (orthogonal) acts the same way on every tensor of a space:
``new[.., i, ..] = sum_j T[i, j] old[.., j, ..]`` along the tensor's moving
axis, the producers' output axis and the consumers' input axis alike.

Matching finds the member's ``T`` that brings it closest to the anchor:
``"weights"`` maximises the summed inner product of the moving slices (the
Hungarian algorithm on units; on heads, the Hungarian algorithm on each head
pair's Procrustes score, then orthogonal Procrustes per head);
``"activations"`` uses calibration statistics instead: the correlation of the
hidden activations themselves where the consumers' cross statistics were
gathered, else the producers' rows compared in their pooled input Gram metric.

Every result is reported beside a floor: the similarity the same matching
reaches on a member whose entries were shuffled, which is what matching
finds in noise. This module knows no IR: frontends find the spaces, hand in
the tensors by name, and write back the ones that changed.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from itertools import combinations
from typing import TYPE_CHECKING, Iterable, Mapping, MutableMapping, Sequence

import numpy as np

from lfpass.core.errors import ConfigError
from lfpass.core.layers import input_width

if TYPE_CHECKING:
    from lfpass.core.calibration import Calibration
    from lfpass.core.config import FusionConfig
    from lfpass.core.plan import FusionPlan
    from lfpass.core.sites import Site

log = logging.getLogger(__name__)


def linear_sum_assignment(cost: np.ndarray, maximize: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """scipy's assignment solver, imported when alignment first solves one (not on plain paths)."""
    from scipy.optimize import linear_sum_assignment as solve

    return solve(cost, maximize=maximize)

SPACE_KINDS = ("permute", "heads")
MODES = ("weights", "activations")
MOVE_ROLES = ("producer", "bias", "norm", "consumer")  # norm: a BatchNorm vector (moves, never compared)


@dataclass(frozen=True)
class Move:
    """One tensor that moves with a space, along ``axis``.

    ``label`` is the tensor's place in the space (``p0.weight``, ``p0.bias``,
    ``bn0.running_var``, ``c0.weight``): two spaces built alike have the same
    labels, and matching compares tensors of equal label. ``site`` is the layer
    holding it (for calibration: a consumer's statistics are keyed by its weight)."""

    label: str
    tensor: str
    axis: int
    role: str
    site: str = ""

    def __post_init__(self) -> None:
        if self.role not in MOVE_ROLES:
            raise ValueError(f"move {self.label!r}: role must be one of {MOVE_ROLES}, got {self.role!r}")


@dataclass(frozen=True)
class Space:
    """One hidden coordinate space that can be transformed without changing the function.

    ``key`` names it by the site producing it (``blocks.0.fc1``; a heads space
    adds ``:qk`` or ``:vo``), so the spaces of two members of a group
    correspond. ``producers``/``consumers`` are the layer sites on either side."""

    key: str
    kind: str
    width: int
    moves: tuple[Move, ...]
    producers: tuple[str, ...] = ()
    consumers: tuple[str, ...] = ()
    n_heads: int = 1
    tied: str = ""  # a heads space whose head order must stay the same as this one's (qk <-> vo)

    def __post_init__(self) -> None:
        if self.kind not in SPACE_KINDS:
            raise ValueError(f"space {self.key!r}: kind must be one of {SPACE_KINDS}, got {self.kind!r}")
        if self.width % self.n_heads:
            raise ValueError(f"space {self.key!r}: width {self.width} is not {self.n_heads} whole heads")
        if self.kind == "permute" and self.n_heads != 1:
            raise ValueError(f"space {self.key!r}: a permute space has no heads")

    @property
    def head_dim(self) -> int:
        return self.width // self.n_heads

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(m.label for m in self.moves)

    def move(self, label: str) -> Move:
        for m in self.moves:
            if m.label == label:
                return m
        raise KeyError(f"space {self.key!r} has no tensor {label!r}")

    def compared(self) -> tuple[Move, ...]:
        """The tensors similarity is measured on: layers' weights and biases (not BatchNorm vectors)."""
        return tuple(m for m in self.moves if m.role != "norm")


@dataclass(frozen=True)
class Transform:
    """New unit (or head) ``i`` of the member is old ``perm[i]``; for heads, then rotated:
    new head ``i`` = ``rotations[i] @ old head perm[i]``."""

    perm: np.ndarray
    rotations: np.ndarray | None = None  # [n_heads, head_dim, head_dim]

    def unit_perm(self, width: int) -> np.ndarray:
        """The permutation of single units (a head permutation spread over its head_dim units)."""
        d = width // len(self.perm)
        return (np.asarray(self.perm)[:, None] * d + np.arange(d)[None, :]).reshape(-1)

    def matrix(self, width: int) -> np.ndarray:
        """``T`` with ``new = T @ old``."""
        t = np.eye(width)[self.unit_perm(width)]
        if self.rotations is not None:
            n, d = self.rotations.shape[:2]
            block = np.zeros((width, width))
            for i in range(n):
                block[i * d:(i + 1) * d, i * d:(i + 1) * d] = self.rotations[i]
            t = block @ t
        return t

    @property
    def is_identity(self) -> bool:
        same = np.array_equal(self.perm, np.arange(len(self.perm)))
        if self.rotations is None:
            return same
        return same and np.allclose(self.rotations, np.eye(self.rotations.shape[-1])[None], atol=0, rtol=0)


def apply(array: np.ndarray, axis: int, transform: Transform, n_heads: int = 1) -> np.ndarray:
    """``array`` with ``transform`` applied along ``axis``, in its own dtype (a permutation is exact;
    a rotation is computed in float64 and rounded once)."""
    width = array.shape[axis]
    if transform.rotations is None:
        return np.take(array, transform.unit_perm(width), axis=axis)
    front = np.moveaxis(np.asarray(array, dtype=np.float64), axis, 0)
    rest = front.shape[1:]
    heads = front.reshape(n_heads, width // n_heads, -1)[transform.perm]
    out = np.einsum("hij,hjr->hir", transform.rotations, heads).reshape(width, *rest)
    return np.moveaxis(out, 0, axis).astype(array.dtype)


def _slice(array: np.ndarray, axis: int) -> np.ndarray:
    """The tensor as ``[width, rest]`` in float64: one row per unit of the space."""
    front = np.moveaxis(np.asarray(array, dtype=np.float64), axis, 0)
    return front.reshape(front.shape[0], -1)


# -- matching ---------------------------------------------------------------------------------------------

def _compared(anchor: Space, labels: Sequence[str] | None) -> tuple[Move, ...]:
    return tuple(m for m in anchor.compared() if labels is None or m.label in labels)


def _cross(anchor: Space, member: Space, tensors: Mapping[str, np.ndarray], member_tensors=None,
           labels: Sequence[str] | None = None) -> np.ndarray:
    """``sum_l A_l B_l^T`` over the compared tensors: ``[width, width]`` unit inner products."""
    member_tensors = tensors if member_tensors is None else member_tensors
    total = np.zeros((anchor.width, anchor.width))
    for m in _compared(anchor, labels):
        b = member.move(m.label)
        total += _slice(tensors[m.tensor], m.axis) @ _slice(member_tensors[b.tensor], b.axis).T
    return total


def _solve_permute(cost: np.ndarray) -> Transform:
    rows, cols = linear_sum_assignment(cost, maximize=True)
    return Transform(cols[np.argsort(rows)])


def _head_blocks(cross: np.ndarray, n_heads: int) -> np.ndarray:
    d = cross.shape[0] // n_heads
    return cross.reshape(n_heads, d, n_heads, d).transpose(0, 2, 1, 3)  # [h_anchor, h_member, d, d]


def _head_scores(cross: np.ndarray, n_heads: int) -> np.ndarray:
    """Each head pair's Procrustes score: the nuclear norm of its cross block."""
    return np.linalg.svd(_head_blocks(cross, n_heads), compute_uv=False).sum(-1)


def _rotations(cross: np.ndarray, n_heads: int, perm: np.ndarray) -> np.ndarray:
    """The best rotation per matched head pair: ``U V^T`` of the pair's cross block."""
    u, _, vt = np.linalg.svd(_head_blocks(cross, n_heads)[np.arange(n_heads), perm])
    return u @ vt


def _solve_heads(cross: np.ndarray, n_heads: int, scores: np.ndarray | None = None) -> Transform:
    """Hungarian over heads on the Procrustes scores (``scores`` when given: a tied space's added
    in), then orthogonal Procrustes per matched pair."""
    scores = _head_scores(cross, n_heads) if scores is None else scores
    rows, cols = linear_sum_assignment(scores, maximize=True)
    perm = cols[np.argsort(rows)]
    return Transform(perm, _rotations(cross, n_heads, perm))


def _solve(space: Space, cost: np.ndarray) -> Transform:
    return _solve_permute(cost) if space.kind == "permute" else _solve_heads(cost, space.n_heads)


def _activation_cost(anchor: Space, member: Space, tensors: Mapping[str, np.ndarray],
                     calibration: "Calibration", labels: Sequence[str] | None) -> tuple[np.ndarray | None, str]:
    """The unit-pair cost from calibration: activation correlations where the consumers' cross
    statistics exist, else the producers' rows in their pooled input Gram metric; None when neither."""
    cost = np.zeros((anchor.width, anchor.width))
    used = 0
    for m in _compared(anchor, labels):
        if m.role != "consumer":
            continue
        b = member.move(m.label)
        corr = _correlation(calibration, _weight_of(anchor, m), _weight_of(member, b))
        if corr is not None and corr.shape == cost.shape:
            cost += corr
            used += 1
    if used:
        return cost, "activations"
    for m in _compared(anchor, labels):
        if m.role != "producer":
            continue
        b = member.move(m.label)
        gram = _pooled_gram(calibration, m.tensor, b.tensor)
        if gram is None:
            continue
        rows_a, rows_b = _augmented_rows(anchor, m, tensors), _augmented_rows(member, b, tensors)
        if rows_a.shape[1] != gram.shape[0]:
            rows_a, rows_b, gram = rows_a[:, :-1], rows_b[:, :-1], gram[:-1, :-1]
        if rows_a.shape[1] != gram.shape[0]:
            continue
        cost += rows_a @ gram @ rows_b.T
        used += 1
    return (cost, "input-gram") if used else (None, "")


def _weight_of(space: Space, move: Move) -> str:
    """A consumer's calibration key: its weight tensor (the move itself, for a weight)."""
    return move.tensor


def _augmented_rows(space: Space, move: Move, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
    """A producer's rows ``[W b]`` (its bias appended when it has one; else a zero column)."""
    rows = _slice(tensors[move.tensor], move.axis)
    prefix = move.label.rsplit(".", 1)[0]
    bias = next((m for m in space.moves if m.role == "bias" and m.label == f"{prefix}.bias"), None)
    extra = _slice(tensors[bias.tensor], bias.axis) if bias is not None else np.zeros((rows.shape[0], 1))
    return np.concatenate([rows, extra], axis=1)


def _pooled_gram(calibration: "Calibration", a: str, b: str) -> np.ndarray | None:
    """The two layers' pooled augmented input second moment, or None without statistics."""
    sa, sb = calibration.layers.get(a), calibration.layers.get(b)
    if sa is None or sb is None or sa.dim != sb.dim:
        return None
    return (sa.augmented() + sb.augmented()) / max(sa.count + sb.count, 1)


def _channel_moments(stats) -> tuple[np.ndarray, np.ndarray]:
    """Per input channel: mean and variance (a convolution's averaged over its kernel positions)."""
    n = max(stats.count, 1)
    k = stats.kernel
    mean = (stats.total / n).reshape(-1, k).mean(1)
    second = (np.diag(stats.gram) / n).reshape(-1, k).mean(1)
    return mean, np.maximum(second - mean ** 2, 0.0)


def _correlation(calibration: "Calibration", a: str, b: str) -> np.ndarray | None:
    """The correlation of two consumers' input channels (the hidden activations), centred."""
    cross = calibration.cross_of(a, b)
    sa, sb = calibration.layers.get(a), calibration.layers.get(b)
    if cross is None or sa is None or sb is None:
        return None
    mean_a, var_a = _channel_moments(sa)
    mean_b, var_b = _channel_moments(sb)
    cov = cross / max(sa.count, 1) - np.outer(mean_a, mean_b)
    return cov / np.sqrt(np.outer(var_a, var_b) + 1e-12)


def match(anchor: Space, member: Space, tensors: Mapping[str, np.ndarray], mode: str = "weights",
          calibration: "Calibration | None" = None, labels: Sequence[str] | None = None) -> tuple[Transform, str]:
    """The member's transform that brings it closest to the anchor, and what decided it
    (``weights``, ``activations`` or ``input-gram``)."""
    if mode not in MODES:
        raise ConfigError(f"alignment mode must be one of {', '.join(MODES)}, got {mode!r}")
    cost, used = _cost(anchor, member, tensors, mode, calibration, labels)
    return _solve(anchor, cost), used


def _cost(anchor: Space, member: Space, tensors: Mapping[str, np.ndarray], mode: str,
          calibration: "Calibration | None", labels: Sequence[str] | None) -> tuple[np.ndarray, str]:
    """The ``[width, width]`` affinity of anchor units (rows) and member units (columns)."""
    if mode == "activations" and calibration is not None:
        cost, used = _activation_cost(anchor, member, tensors, calibration, labels)
        if cost is not None:
            return cost, used
    return _cross(anchor, member, tensors, labels=labels), "weights"


def similarity(anchor: Space, member: Space, tensors: Mapping[str, np.ndarray], member_tensors=None,
               labels: Sequence[str] | None = None) -> float:
    """Cosine of the two spaces' compared tensors, concatenated (1.0: identical)."""
    member_tensors = tensors if member_tensors is None else member_tensors
    dot = na = nb = 0.0
    for m in _compared(anchor, labels):
        b = member.move(m.label)
        x, y = _slice(tensors[m.tensor], m.axis), _slice(member_tensors[b.tensor], b.axis)
        dot += float(np.sum(x * y))
        na += float(np.sum(x * x))
        nb += float(np.sum(y * y))
    return dot / np.sqrt(na * nb) if na > 0 and nb > 0 else 0.0


def floor(anchor: Space, member: Space, tensors: Mapping[str, np.ndarray], rng: np.random.Generator,
          labels: Sequence[str] | None = None) -> float:
    """The similarity weight matching reaches on the member's entries shuffled: what it finds in noise."""
    shuffled = {}
    for m in member.compared():
        flat = np.asarray(tensors[m.tensor]).reshape(-1)
        shuffled[m.tensor] = flat[rng.permutation(flat.size)].reshape(np.shape(tensors[m.tensor]))
    transform = _solve(anchor, _cross(anchor, member, tensors, shuffled, labels))
    moved = {m.tensor: apply(shuffled[m.tensor], m.axis, transform, member.n_heads) for m in member.compared()}
    return similarity(anchor, member, tensors, moved, labels)


def transform_space(space: Space, transform: Transform, tensors: MutableMapping[str, np.ndarray],
                    calibration: "Calibration | None" = None) -> None:
    """Apply ``transform`` to every tensor of ``space`` (and to the consumers' calibration statistics)."""
    for m in space.moves:
        tensors[m.tensor] = apply(tensors[m.tensor], m.axis, transform, space.n_heads)
    if calibration is None:
        return
    for m in space.moves:
        if m.role != "consumer":
            continue
        if transform.rotations is None:
            calibration.permute_input(m.tensor, transform.unit_perm(space.width))
        else:
            calibration.transform_input(m.tensor, transform.matrix(space.width))


# -- spaces from a plan, and the whole alignment --------------------------------------------------------

@dataclass(frozen=True)
class Link:
    """Align ``member`` (a space key) to ``anchor``: the plan groups layers on these spaces."""

    anchor: str
    member: str
    why: str


@dataclass(frozen=True)
class Aligned:
    """One space moved into its anchor's coordinates. Similarities are cosines over the
    compared tensors; ``floor`` is what matching reaches on a shuffled member."""

    space: str
    anchor: str
    kind: str
    width: int
    matched_by: str
    before: float
    after: float
    floor: float
    identity: bool
    compared: tuple[str, ...] = ()  # the tensors (by label) the similarities are over

    @property
    def gain_over_floor(self) -> float:
        return self.after - self.floor


@dataclass(frozen=True)
class Skipped:
    """A space (or a layer) left as it is, and why."""

    name: str
    reason: str


@dataclass
class AlignReport:
    mode: str
    aligned: list[Aligned] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    spaces: list[Space] = field(default_factory=list)
    changed: set[str] = field(default_factory=set)  # tensor names written

    def summary(self) -> str:
        lines = [f"alignment ({self.mode}): {len(self.aligned)} space(s) moved, {len(self.skipped)} skipped, "
                 f"{len(self.spaces)} found"]
        for a in self.aligned:
            lines.append(f"  {a.space} -> {a.anchor} [{a.kind} {a.width}, by {a.matched_by}]: "
                         f"{a.before:+.4f} -> {a.after:+.4f} (floor {a.floor:+.4f})")
        lines += [f"  skipped {s.name}: {s.reason}" for s in self.skipped]
        return "\n".join(lines)


def collect(found: Iterable[tuple[str, "Space | str"]], spaces: list[Space] | None = None,
            reasons: Mapping[str, str] | None = None, skipped: list[Skipped] | None = None) -> list[Space]:
    """The spaces a frontend found, one ``(layer, space or why not)`` at a time: each set of
    producers once; the reasons of layers no space covers go to ``skipped`` (when given)."""
    spaces = list(spaces or ())
    why = dict(reasons or {})
    seen = {s.producers for s in spaces}
    for name, space in found:
        if isinstance(space, str):
            why.setdefault(name, space)
        elif space.producers not in seen:
            seen.add(space.producers)
            spaces.append(space)
    done = {p for s in spaces for p in s.producers}
    if skipped is not None:
        skipped += [Skipped(n, reason) for n, reason in why.items() if n not in done]
    return spaces


def _layer_pairs(anchor: "Site", member: "Site") -> list[tuple[str, str]] | str:
    """The layer sites to relate: the site itself, or a unit's parts in order."""
    if not anchor.parts and not member.parts:
        return [(anchor.name, member.name)]
    if len(anchor.parts) != len(member.parts):
        return f"units {anchor.name!r} and {member.name!r} have different layers"
    return list(zip(anchor.parts, member.parts))


def links_from_plan(plan: "FusionPlan", sites: Mapping[str, "Site"], spaces: Sequence[Space]) -> list[Link]:
    """Which spaces each group asks to align: a member layer's output space with its anchor
    layer's output space, and its input space with the anchor's input space."""
    side: dict[tuple[str, str], str] = {}
    for s in spaces:
        for p in s.producers:
            side.setdefault((p, "producer"), s.key)
        for c in s.consumers:
            side.setdefault((c, "consumer"), s.key)
    links: dict[tuple[str, str], Link] = {}
    for group in plan.groups:
        anchor = sites.get(group.members[0])
        for name in group.members[1:]:
            member = sites.get(name)
            if anchor is None or member is None:
                continue
            pairs = _layer_pairs(anchor, member)
            if isinstance(pairs, str):
                continue
            for a, m in pairs:
                for role in ("producer", "consumer"):
                    sa, sm = side.get((a, role)), side.get((m, role))
                    if sa is not None and sm is not None and sa != sm and (sa, sm) not in links:
                        links[(sa, sm)] = Link(sa, sm, f"{m} ~ {a} ({role})")
    return list(links.values())


def _common(a: Space, b: Space, tensors: Mapping[str, np.ndarray]) -> tuple[str, ...] | str:
    """The labels two spaces can be compared on (same place, same shape); a reason when none."""
    if (a.kind, a.width, a.n_heads) != (b.kind, b.width, b.n_heads):
        return f"{a.kind} {a.width}/{a.n_heads} heads vs {b.kind} {b.width}/{b.n_heads} heads"
    other = {m.label: m for m in b.moves}
    common = tuple(m.label for m in a.compared() if m.label in other and m.axis == other[m.label].axis
                   and np.shape(tensors[m.tensor]) == np.shape(tensors[other[m.label].tensor]))
    if not common:
        return "no tensor of one has the shape of its like in the other"
    return common


def _order(links: Sequence[Link]) -> list[tuple[Link, str, str]]:
    """``(link, fixed, moving)`` in BFS order from each component's root (an anchor side that is
    never a member side, where there is one), so each space moves at most once and after its anchor."""
    nbrs: dict[str, list[Link]] = {}
    for link in links:
        nbrs.setdefault(link.anchor, []).append(link)
        nbrs.setdefault(link.member, []).append(link)
    members = {link.member for link in links}
    roots = [link.anchor for link in links if link.anchor not in members] + [link.anchor for link in links]
    seen: set[str] = set()
    order: list[tuple[Link, str, str]] = []
    for root in roots:
        if root in seen:
            continue
        seen.add(root)
        queue = deque([root])
        while queue:
            fixed = queue.popleft()
            for link in nbrs[fixed]:
                moving = link.member if link.anchor == fixed else link.anchor
                if moving in seen:
                    continue
                seen.add(moving)
                order.append((link, fixed, moving))
                queue.append(moving)
    return order


def align_spaces(spaces: Sequence[Space], links: Iterable[Link], tensors: MutableMapping[str, np.ndarray],
                 mode: str = "weights", calibration: "Calibration | None" = None, seed: int = 0,
                 skipped: Sequence[Skipped] = ()) -> AlignReport:
    """Align each linked space to its component's root, in BFS order; ``tensors`` (name -> array)
    is updated in place with the moved tensors, and the report names them in ``changed``."""
    if mode not in MODES:
        raise ConfigError(f"alignment mode must be one of {', '.join(MODES)}, got {mode!r}")
    report = AlignReport(mode, spaces=list(spaces), skipped=list(skipped))
    by_key = {s.key: s for s in spaces}
    links = list(links)
    links, dropped = _drop_overlaps(links, by_key)
    report.skipped += dropped
    rng = np.random.default_rng(seed)
    pairs = {(link.anchor, link.member) for link in links} | {(link.member, link.anchor) for link in links}
    head_order: set[str] = set()  # heads spaces whose head order is already set (they may only rotate)
    for link, fixed_key, moving_key in _order(links):
        fixed, moving = by_key[fixed_key], by_key[moving_key]
        labels = _common(fixed, moving, tensors)
        if isinstance(labels, str):
            report.skipped.append(Skipped(moving_key, f"not matched with {fixed_key}: {labels}"))
            continue
        before = similarity(fixed, moving, tensors, labels=labels)
        cost, used = _cost(fixed, moving, tensors, mode, calibration, labels)
        if moving.kind == "heads":
            transform = _tied_heads(fixed, moving, cost, by_key, tensors, mode, calibration, pairs, head_order)
        else:
            transform = _solve(fixed, cost)
        base = floor(fixed, moving, tensors, rng, labels)
        transform_space(moving, transform, tensors, calibration)
        report.changed.update(m.tensor for m in moving.moves)
        partner = by_key.get(moving.tied)
        if moving.kind == "heads" and partner is not None and moving.key not in head_order:
            n, d = partner.n_heads, partner.head_dim  # the partner's heads follow, unrotated
            transform_space(partner, Transform(transform.perm, np.broadcast_to(np.eye(d), (n, d, d)).copy()),
                            tensors, calibration)
            report.changed.update(m.tensor for m in partner.moves)
        head_order.update({moving.key, moving.tied})
        report.aligned.append(Aligned(moving_key, fixed_key, moving.kind, moving.width, used, before,
                                      similarity(fixed, moving, tensors, labels=labels), base,
                                      transform.is_identity, labels))
    log.info("%s", report.summary())
    return report


def _tied_heads(fixed: Space, moving: Space, cost: np.ndarray, by_key: Mapping[str, Space],
                tensors: Mapping[str, np.ndarray], mode: str, calibration: "Calibration | None",
                pairs: set[tuple[str, str]], head_order: set[str]) -> Transform:
    """A heads transform that keeps Q/K heads paired with their V/O heads: one head order for a
    space and its tied partner (chosen on both spaces' scores when both are linked), rotations apart.
    A space whose order is already set only rotates."""
    n = moving.n_heads
    if moving.key in head_order:
        perm = np.arange(n)
        return Transform(perm, _rotations(cost, n, perm))
    scores = _head_scores(cost, n)
    fixed_partner, moving_partner = by_key.get(fixed.tied), by_key.get(moving.tied)
    if fixed_partner is not None and moving_partner is not None and \
            (fixed_partner.key, moving_partner.key) in pairs and not isinstance(
                labels := _common(fixed_partner, moving_partner, tensors), str):
        other, _ = _cost(fixed_partner, moving_partner, tensors, mode, calibration, labels)
        scores = scores + _head_scores(other, n)
    return _solve_heads(cost, n, scores)


def _drop_overlaps(links: list[Link], by_key: Mapping[str, Space]) -> tuple[list[Link], list[Skipped]]:
    """Links whose spaces both exist; a space moving a (tensor, axis) another space also moves is
    dropped (its transforms would not commute)."""
    owner: dict[tuple[str, int], str] = {}
    bad: dict[str, str] = {}
    for s in by_key.values():
        for m in s.moves:
            other = owner.setdefault((m.tensor, m.axis), s.key)
            if other != s.key:
                bad[s.key] = f"moves {m.tensor} axis {m.axis}, which {other} moves too"
    kept, skipped = [], [Skipped(k, why) for k, why in bad.items()]
    for link in links:
        if link.anchor in by_key and link.member in by_key and link.anchor not in bad and link.member not in bad:
            kept.append(link)
    return kept, skipped


# -- what calibration gathers for matching by activations ------------------------------------------

CROSS_BYTES = 1 << 30  # paired statistics for matching by activations: at most this much memory


def cross_pairs(sites: Sequence["Site"], config: "FusionConfig") -> list[tuple[str, str]]:
    """Pairs of layers (by weight name) that may share a tensor under ``config``, whose paired
    input statistics matching by activations reads, while they fit in :data:`CROSS_BYTES`."""
    if config.alignment != "activations":
        return []
    classes: dict[object, list["Site"]] = {}
    for s in sites:
        if not s.parts:
            classes.setdefault(s.class_key(config.cross_role), []).append(s)
    pairs, used = [], 0
    for members in classes.values():
        for a, b in combinations(members, 2):
            used += 8 * input_width(a) * input_width(b)
            if used > CROSS_BYTES:
                log.info("paired statistics stop at %d pairs (memory)", len(pairs))
                return pairs
            pairs.append((a.weight, b.weight))
    return pairs

