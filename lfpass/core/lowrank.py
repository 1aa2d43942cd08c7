"""Low-rank factors: the activation-aware SVD, and per-member residuals of a shared tensor.

A layer ``y = W x`` (``W``: ``[out, in]``; a convolution flattened to
``[out, in * kernel]`` over patches in ``(channel, *kernel)`` order) is
replaced by ``U (V x)`` with ``U``: ``[out, r]``, ``V``: ``[r, in]``. The
best such pair for the inputs the layer actually sees minimises
``||(W - U V) X||_F``. With ``M = G / n`` the inputs' second moment and
``S S^T = M`` (Cholesky), that error is ``sqrt(n) ||(W - U V) S||_F``, so the
truncated SVD ``W S ~ P_r D_r Q_r^T`` gives the optimum
``U V = P_r D_r Q_r^T S^-1`` (SVD-LLM's whitening; plain SVD is ``S = I``).
The singular values are split evenly, ``U = P_r sqrt(D_r)`` and
``V = sqrt(D_r) Q_r^T S^-1``, so both factors have alike scales for retraining
and half precision.

Sharing a tensor among the members of a group loses each member's own part;
:func:`residual` gives each member back the best rank-``r`` part of what it
lost, ``W_member - W_shared``, at ``r * (out + in)`` parameters per member.

Everything is computed in float64 and rounded once into the weight's dtype
(:func:`lfpass.core.dtypes.round_to`). This module knows no IR.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from lfpass.core.calibration import LayerStats, output_energy
from lfpass.core.dtypes import round_to
from lfpass.core.errors import PlanError
from lfpass.core.layers import signature_layout
from lfpass.core.plan import FusionPlan
from lfpass.core.sites import Site

log = logging.getLogger(__name__)

EPS = 1e-6  # ridge, relative to the mean input energy: keeps S invertible for inputs of low rank


def whiten(stats: LayerStats, eps: float = EPS) -> tuple[np.ndarray, np.ndarray]:
    """``(S, S^-1)`` with ``S S^T = G / n + eps * mean(diag) * I`` (:func:`whiten_moment`)."""
    return whiten_moment(stats.mean_gram(), eps)


def whiten_moment(m: np.ndarray, eps: float = EPS) -> tuple[np.ndarray, np.ndarray]:
    """``(S, S^-1)`` with ``S S^T = m + eps * mean(diag) * I``: Cholesky, or a symmetric square
    root from ``eigh`` when rounding leaves the matrix not positive definite."""
    m = np.asarray(m, dtype=np.float64)
    m = (m + m.T) / 2
    d = m.shape[0]
    ridge = eps * max(float(np.trace(m)) / max(d, 1), np.finfo(np.float64).tiny)
    m = m + ridge * np.eye(d)
    try:
        s = np.linalg.cholesky(m)
        return s, np.linalg.inv(s)
    except np.linalg.LinAlgError:
        vals, vecs = np.linalg.eigh(m)
        vals = np.maximum(vals, ridge)
        root = np.sqrt(vals)
        return vecs * root, (vecs / root).T


def thin_svd(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(U, d, V^T)`` of ``x`` (float64), ``d`` descending, from the eigenvectors of its smaller
    Gram matrix: 3-5x faster than LAPACK's SVD at the shapes stacked bases have (9216 x 384),
    and exact where it matters here (components below ``1e-8`` of the largest singular value
    carry ``1e-16`` of the energy; ``U d V^T`` still gives ``x`` back at full rank)."""
    x = np.asarray(x, dtype=np.float64)
    wide = x.shape[0] < x.shape[1]
    a = x.T if wide else x
    vals, v = np.linalg.eigh(a.T @ a)
    vals, v = np.clip(vals[::-1], 0.0, None), v[:, ::-1]
    d = np.sqrt(vals)
    u = a @ v
    live = d > (d[0] if len(d) else 0.0) * 1e-12
    u[:, live] /= d[live]
    u[:, ~live] = 0.0
    return (v, d, u.T) if wide else (u, d, v.T)


def _as64(w: Any) -> np.ndarray:
    a = np.asarray(w)
    if a.ndim != 2:
        raise PlanError(f"a factored weight must be a matrix [out, in], got shape {a.shape}")
    return a.astype(np.float64)


def _dtype(*arrays: Any) -> np.dtype:
    dt = np.asarray(arrays[0]).dtype
    return dt if dt.kind == "f" or dt.name == "bfloat16" else np.dtype(np.float64)


def _check_rank(w: np.ndarray, rank: int) -> int:
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise PlanError(f"a rank must be a whole number >= 1, got {rank!r}")
    return int(min(rank, *w.shape))


def _factor(w: np.ndarray, s: np.ndarray | None, s_inv: np.ndarray | None, rank: int,
            dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    rank = _check_rank(w, rank)
    target = w @ s if s is not None else w
    p, d, qt = thin_svd(target)
    root = np.sqrt(d[:rank])
    u = p[:, :rank] * root
    v = root[:, None] * qt[:rank]
    if s_inv is not None:
        v = v @ s_inv
    return round_to(u, dtype), round_to(v, dtype)


def activation_svd(w: Any, stats: LayerStats, rank: int, eps: float = EPS) -> tuple[np.ndarray, np.ndarray]:
    """``(U, V)``, ``U @ V ~ w``, minimising the output error on the calibration inputs."""
    return _fit(_as64(w), stats, rank, eps, _dtype(w))


def plain_svd(w: Any, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """``(U, V)``, ``U @ V ~ w``, minimising the weight error (inputs taken as white)."""
    return _factor(_as64(w), None, None, rank, _dtype(w))


def residual(w_member: Any, w_shared: Any, stats: LayerStats | None, rank: int,
             eps: float = EPS) -> tuple[np.ndarray, np.ndarray]:
    """The member's own rank-``rank`` part: factors of ``w_member - w_shared`` (activation-aware
    when ``stats`` is given), in ``w_member``'s dtype."""
    a, b = _as64(w_member), _as64(w_shared)
    if a.shape != b.shape:
        raise PlanError(f"a member of shape {a.shape} does not share a tensor of shape {b.shape}")
    return _fit(a - b, stats, rank, eps, _dtype(w_member))


def _fit(w: np.ndarray, stats: LayerStats | None, rank: int, eps: float,
         dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    if stats is None:
        return _factor(w, None, None, rank, dtype)
    if stats.dim != w.shape[1]:
        raise PlanError(f"calibration statistics over {stats.dim} inputs do not fit a weight of shape {w.shape}")
    s, s_inv = whiten(stats, eps)
    return _factor(w, s, s_inv, rank, dtype)


def output_error(w: Any, approx: Any, stats: LayerStats) -> float:
    """``||(w - approx) X||_F / ||w X||_F`` over the calibration inputs, from their Gram alone."""
    g = np.asarray(stats.gram, dtype=np.float64)
    a, d = _as64(w), _as64(w) - _as64(approx)
    num, den = output_energy(d, g), output_energy(a, g)
    return math.sqrt(max(num, 0.0) / den) if den > 0 else math.sqrt(max(num, 0.0))


# -- parameter counting ------------------------------------------------------------------------

def factor_params(out: int, in_: int, rank: int) -> int:
    """Parameters of a rank-``rank`` factorisation of an ``[out, in]`` weight."""
    return rank * (out + in_)


def rank_for(params: int, out: int, in_: int) -> int:
    """The largest rank whose factors fit in ``params`` parameters (0 when none does)."""
    return max(params, 0) // (out + in_)


def full_rank(out: int, in_: int) -> int:
    return min(out, in_)


def layer_dims(kind: str, signature: Mapping[str, Any] | tuple) -> tuple[int, int]:
    """``(out, in)`` of a layer's weight as a matrix, from its signature (either frontend):
    FX ``layout`` out_in / in_out; ONNX MatMul ``[in, out]`` (through its Transposes),
    Gemm by ``transB``; a convolution's ``in`` is ``in_channels / groups * kernel``."""
    sig = dict(signature)
    shape = tuple(sig["shape"])
    for op in sig.get("via", ()):
        if op.startswith("Transpose"):
            shape = shape[::-1] if len(shape) == 2 else shape
    if kind == "conv":
        return int(shape[0]), int(np.prod(shape[1:]))
    if kind != "linear" or len(shape) != 2:
        raise PlanError(f"no low-rank factors for a {kind} layer of shape {shape}")
    if "layout" in sig:
        return (shape[0], shape[1]) if sig["layout"] in ("out_in", "left_out_in") else (shape[1], shape[0])
    if "transB" in sig:
        return (shape[0], shape[1]) if sig["transB"] else (shape[1], shape[0])
    return shape[1], shape[0]  # ONNX MatMul: x @ W, W [in, out]


def uniform_ranks(dims: Mapping[str, tuple[int, int]], budget: int) -> tuple[dict[str, int], float]:
    """One fraction ``f`` of each layer's full rank (``max(1, floor(f * min(out, in)))``) whose
    parameters, a layer kept dense where its factors would not be smaller, fit in ``budget``
    and are the most that do; ``{}`` ranks mean dense. Returns ``(ranks, f)``; raises when
    even rank 1 everywhere does not fit."""
    def cost(f: float) -> tuple[int, dict[str, int]]:
        ranks, total = {}, 0
        for name, (o, i) in dims.items():
            r = max(1, math.floor(f * full_rank(o, i) + 1e-9))
            if factor_params(o, i, r) < o * i:
                ranks[name] = r
                total += factor_params(o, i, r)
            else:
                total += o * i
        return total, ranks

    points = sorted({k / full_rank(o, i) for o, i in dims.values() for k in range(1, full_rank(o, i) + 1)})
    lo_cost, lo_ranks = cost(points[0]) if points else (0, {})
    if lo_cost > budget:
        raise PlanError(f"the chosen layers need at least {lo_cost:,} parameters at rank 1; "
                        f"the budget is {budget:,}")
    lo, hi = 0, len(points) - 1  # cost is monotone in f: bisect for the last point that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost(points[mid])[0] <= budget:
            lo = mid
        else:
            hi = mid - 1
    return cost(points[lo])[1], points[lo]


# -- which layers get a residual ---------------------------------------------------------------

@dataclass(frozen=True)
class Member:
    """One layer that gets a residual: its group, its layer name, its weight (and bias) tensor's
    name before fusion (the keys of ``originals`` and of a :class:`Calibration`)."""

    group: int
    layer: str
    tensor: str
    location: str = ""
    bias: str = ""
    kind: str = ""  # the layer's kind and signature, where known: what decides whether it takes a part
    signature: Any = ()


def plan_members(plan: FusionPlan, sites: Any = None,
                 known: Callable[[str], bool] = lambda layer: True) -> list[Member]:
    """Every layer of every member of ``plan`` (a unit stands for its layers). ``sites``: the
    model's sites before fusion (by name, or a frontend's found sites), which name each layer's
    tensors and nodes exactly; without them a layer ``L``'s weight is ``L.weight`` and a unit's
    layers come from its class signature (``known`` says which possible layer path exists)."""
    by_name = sites.by_name() if hasattr(sites, "by_name") else dict(sites or {})
    out = []
    for index, group in enumerate(plan.groups):
        for name in group.members:
            site = by_name.get(name)
            if site is not None:
                parts = [by_name[p] for p in site.parts] if site.parts else [site]
                out += [Member(index, p.name, p.weight, p.location, _bias_name(p), p.kind, p.signature)
                        for p in parts]
            elif group.cls.kind in ("attention", "mlp"):
                base = name.split(":")[0]
                for rel, (kind, sig) in group.cls.signature:
                    layer = _unit_layer(base, rel, known)
                    out.append(Member(index, layer, f"{layer}.weight", bias=f"{layer}.bias", kind=kind, signature=sig))
            else:
                out.append(Member(index, name, f"{name}.weight", bias=f"{name}.bias", kind=group.cls.kind,
                                  signature=group.cls.signature))
    return out


def _unit_layer(unit: str, rel: str, known: Callable[[str], bool]) -> str:
    """A unit's layer from the unit's name and the layer's path in it: under the unit (``h.0.mlp``
    + ``c_fc``), or beside it when the unit's last component was made up (``blocks.0.mlp`` for
    ``blocks.0.fc1`` and ``blocks.0.fc2``; see :mod:`lfpass.core.units`)."""
    inside = f"{unit}.{rel}" if rel else unit
    beside = f"{unit.rpartition('.')[0]}.{rel}" if rel and "." in unit else inside
    return beside if not known(inside) and known(beside) else inside


def _bias_name(site: Site) -> str:
    return next((x.tensor for x in site.slots if x.kind == "bias"), "")


def lookup(mapping: Mapping[str, Any] | None, member: Member, what: str, required: bool = True) -> Any:
    """``mapping``'s entry for a member layer: by weight tensor name, then by layer name."""
    if mapping is None:
        return None
    for key in (member.tensor, member.layer, f"{member.layer}.weight"):
        if key in mapping:
            return mapping[key]
    if required:
        raise PlanError(f"no {what} for layer {member.layer!r} (looked up as {member.tensor!r})")
    return None


def residual_params(site, rank: int, bias: bool = False) -> int:
    """Parameters a residual of rank ``rank`` adds to one member (a :class:`~lfpass.core.sites.Site`):
    ``r * (out + in)`` per layer (a unit: over its layers; a rank past a layer's full rank is cut
    to it), plus ``out`` per layer with a bias when ``bias`` (its own bias given back, as the
    frontends' ``attach_residuals`` do by default)."""
    if site.kind in ("attention", "mlp"):
        return sum(_layer_params(kind, sig, rank, bias) for _, (kind, sig) in site.signature)
    return _layer_params(site.kind, site.signature, rank, bias)


def declined(kind: str, signature: Any) -> str:
    """Why a layer takes no per-member part ("" when it does): it needs an ``[out, in]``
    matrix (no grouped, depthwise or transposed convolution, no weight multiplying from the
    left, no Gemm with ``transA``; a Gemm's ``alpha`` goes into the part). Counting and
    attaching both ask here."""
    if not kind:
        return ""
    return signature_layout(kind, {k: v for k, v in dict(signature).items() if k not in ("alpha", "beta")})[1]


def _layer_params(kind: str, signature, rank: int, bias: bool) -> int:
    if rank <= 0 or declined(kind, signature):
        return 0
    out, in_ = layer_dims(kind, signature)
    extra = out if bias and dict(signature).get("bias") is True else 0
    return factor_params(out, in_, min(rank, full_rank(out, in_))) + extra


# -- per-member parts, for every frontend ----------------------------------------------------------

@dataclass(frozen=True)
class Part:
    """What one member layer needs to get its own correction: the layer, its weight (and bias)
    before fusion as stored, and its calibration statistics (None: plain SVD)."""

    member: Member
    original: np.ndarray
    original_bias: np.ndarray | None
    stats: LayerStats | None


def capture_originals(found: Any, plan: FusionPlan) -> dict[str, np.ndarray]:
    """The tensors of ``plan``'s member layers before fusion (copies, own dtype), keyed by tensor
    name and by layer name (the bias also by ``<layer>.bias``). ``found``: a frontend's
    :class:`~lfpass.core.frontend.SiteTable` of the model about to be fused."""
    out: dict[str, np.ndarray] = {}
    for m in plan_members(plan, found):
        out[m.tensor] = out[m.layer] = np.array(found.load_exact(m.tensor))
        if m.bias:
            out[m.bias] = out[f"{m.layer}.bias"] = np.array(found.load_exact(m.bias))
    return out


def residual_parts(plan: FusionPlan, originals: Mapping[str, Any], calibration: Mapping[str, LayerStats] | None,
                   sites: Any = None, bias: bool = True) -> list[Part]:
    """Every member layer of ``plan`` with what its correction is made from. ``originals``: as
    :func:`capture_originals` takes them (or any mapping by tensor or layer name); ``sites``:
    the model's sites before fusion (see :func:`plan_members`); ``bias``: give a member whose
    bias the merge changed ``original - shared`` back."""
    known = (lambda layer: layer in originals or f"{layer}.weight" in originals)  # noqa: E731
    parts = []
    for m in plan_members(plan, sites, known):
        why = declined(m.kind, m.signature)
        if why:
            log.info("layer %s takes no per-member part: %s", m.layer, why)
            continue
        original = lookup(originals, m, "original weight")
        stats = lookup(calibration, m, "calibration statistics", required=False) if calibration is not None else None
        if calibration is not None and stats is None:
            log.info("layer %s has no calibration statistics (it never ran on them): plain SVD", m.layer)
        original_bias = next((originals[k] for k in (m.bias, f"{m.layer}.bias") if k and k in originals), None)
        parts.append(Part(m, np.asarray(original), np.asarray(original_bias) if bias and original_bias is not None
                          else None, stats))
    return parts


def member_factors(part: Part, member: np.ndarray, shared: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`residual` of one part, ``member`` and ``shared`` as ``[out, in]`` matrices; an error names the layer."""
    try:
        return residual(member, shared, part.stats, rank)
    except PlanError as exc:
        raise PlanError(f"layer {part.member.layer!r}: {exc}") from None


def bias_delta(part: Part, shared: np.ndarray, scale: float = 1.0) -> np.ndarray | None:
    """``scale * (original bias - shared bias)`` in the bias's dtype (zeros too, so the count a
    plan makes holds whatever the values), or None when the part has no original bias."""
    if part.original_bias is None:
        return None
    original, shared = np.asarray(part.original_bias), np.asarray(shared)
    if original.shape != shared.shape:
        raise PlanError(f"layer {part.member.layer!r}: an original bias of shape {original.shape} does not fit "
                        f"{shared.shape}")
    return round_to(scale * (original.astype(np.float64) - shared.astype(np.float64)), shared.dtype)
