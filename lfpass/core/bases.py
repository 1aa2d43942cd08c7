"""Shared bases: same-role layers factored through one basis, each member with its own coefficients.

A layer ``y = W x`` (``W``: ``[out, in]``; a convolution's ``in`` is its patch,
``channels * prod(kernel)``) in a group of ``k`` members becomes ``C_i (B x)``:
the basis ``B`` (``[r, in]``) is one tensor for the whole group, each member keeps
its coefficients ``C_i`` (``[out, r]``) and its bias. This is Basis Sharing
(Wang et al., ICLR 2025, arXiv 2410.03765): the members' weights stacked so that
they share the *input* side, factored by one SVD after whitening by their
inputs. With ``M_i`` member ``i``'s input second moment, ``M = mean_i M_i`` (plus
a small ridge) and ``S S^T = M``::

    [W_1 S; ...; W_k S] = P D Q^T,   B = sqrt(D_r) Q_r^T S^-1,   C_i = P_i,r sqrt(D_r)

which minimises ``sum_i ||(W_i - C_i B) X||^2`` over inputs of moment ``M``: the
best shared rank-``r`` factorisation for inputs like the group's. The input side
is the paper's choice and the one that can work at all: the layers of one role
read one residual stream, whose principal directions they share, while what
each writes back differs (the paper measures Q, K, V, up and gate sharing well,
O and down less; the plan menu measures it per class and picks per-layer low rank
where sharing loses). Two limits are exact: a group of one is per-layer
activation-aware SVD (:func:`lfpass.core.lowrank.activation_svd`, bit for bit),
and full rank reproduces every member.

Damage in closed form: member ``i``'s squared output error on its *own* inputs at
every rank at once, relative to its output energy ``tr(W_i M_i W_i^T)``. A group
of one is whitened by its own inputs, so its error is the tail of its spectrum
(in the ridged metric: exact to the ridge, 1e-6 of the mean input energy). The
residual at rank ``r`` is ``sum_{j>r} p_ij d_j q_j^T S^-1``, so with
``A_i = P_i D`` and ``Z_i = Q^T S^-1 M_i S^-T Q`` the error is the sum of
``(A_i^T A_i) * Z_i`` (elementwise) over the block ``[r:, r:]``, a reversed 2-D
cumulative sum. Everything here is float64 numpy and knows no IR.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from lfpass.core.calibration import Calibration, LayerStats, output_energy
from lfpass.core.dtypes import round_to
from lfpass.core.errors import PlanError
from lfpass.core.layers import layers_of, layout_of, to_matrix
from lfpass.core.lowrank import EPS, Member, thin_svd, whiten_moment

if TYPE_CHECKING:
    from lfpass.core.plan import FusionPlan

log = logging.getLogger(__name__)


def moments(stats: Sequence[LayerStats | None], dim: int) -> list[np.ndarray]:
    """Each member's input second moment per sample (``G / n``); identity where a member has
    no statistics (it is then factored as if its inputs were white: plain SVD)."""
    out = []
    for s in stats:
        if s is None or s.count <= 0:
            out.append(np.eye(dim))
            continue
        if s.dim != dim:
            raise PlanError(f"calibration statistics over {s.dim} inputs do not fit a weight taking {dim}")
        out.append(np.asarray(s.mean_gram(), dtype=np.float64))
    return out


@dataclass(frozen=True)
class BasisFit:
    """One group's whitened SVD, from which every rank's factors and damage are read."""

    p: np.ndarray  # [k * out, m]: the stacked members' left singular vectors
    d: np.ndarray  # [m]: singular values, descending
    qt: np.ndarray  # [m, in]: right singular vectors
    s_inv: np.ndarray  # [in, in]: the whitening's inverse
    out: int  # each member's output width
    relative: np.ndarray  # [k, m + 1]: each member's relative squared output error at rank 0..m

    @property
    def size(self) -> int:
        return self.p.shape[0] // self.out

    @property
    def max_rank(self) -> int:
        return len(self.d)

    def factors(self, rank: int, dtype: np.dtype) -> tuple[np.ndarray, list[np.ndarray]]:
        """``(B, [C_1, ..., C_k])`` at ``rank`` (cut to :attr:`max_rank`), rounded to ``dtype``."""
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
            raise PlanError(f"a rank must be a whole number >= 1, got {rank!r}")
        r = int(min(rank, self.max_rank))
        root = np.sqrt(self.d[:r])
        basis = (root[:, None] * self.qt[:r]) @ self.s_inv
        coeffs = self.p[:, :r] * root
        return round_to(basis, dtype), [round_to(coeffs[i * self.out:(i + 1) * self.out], dtype)
                                        for i in range(self.size)]

    def damage(self, rank: int) -> np.ndarray:
        """Each member's relative squared output error at ``rank`` on its own inputs."""
        return self.relative[:, min(max(int(rank), 0), self.max_rank)]


Whitening = tuple[np.ndarray, np.ndarray]


def fit_basis(weights: Sequence[np.ndarray], stats: Sequence[LayerStats | None] | None = None,
              eps: float = EPS, white: Whitening | None = None) -> BasisFit:
    """The shared basis of ``weights`` (``[out, in]`` matrices, one per member, same shape),
    whitened by the members' pooled input moments (``stats``: one per member, or None for
    plain SVD); ``white``: that whitening's ``(S, S^-1)`` when the caller has it already."""
    mats = [np.asarray(w, dtype=np.float64) for w in weights]
    if not mats or any(w.ndim != 2 or w.shape != mats[0].shape for w in mats):
        raise PlanError(f"a shared basis needs members of one [out, in] shape, got "
                        f"{[tuple(np.shape(w)) for w in weights]}")
    out, dim = mats[0].shape
    own = moments(stats if stats is not None else [None] * len(mats), dim)
    s, s_inv = white if white is not None else whiten_moment(np.mean(own, axis=0), eps)
    p, d, qt = thin_svd(np.vstack([w @ s for w in mats]))
    if len(mats) == 1:  # whitened by its own inputs: the error is the tail of the spectrum
        tail = np.append(np.cumsum((d ** 2)[::-1])[::-1], 0.0)
        relative = (tail / tail[0] if tail[0] > 0 else tail)[None, :]
        return BasisFit(p, d, qt, s_inv, out, relative)
    return BasisFit(p, d, qt, s_inv, out, _relative(p, d, qt, s_inv, mats, own))


def _relative(p: np.ndarray, d: np.ndarray, qt: np.ndarray, s_inv: np.ndarray, mats: Sequence[np.ndarray],
              own: Sequence[np.ndarray]) -> np.ndarray:
    out, m = mats[0].shape[0], len(d)
    q = qt @ s_inv  # [m, in]: each component's direction in the input space
    rows = []
    for i, (w, mi) in enumerate(zip(mats, own)):
        a = p[i * out:(i + 1) * out] * d  # [out, m]
        h = (a.T @ a) * (q @ mi @ q.T)
        tail = h[::-1, ::-1].cumsum(0).cumsum(1)[::-1, ::-1]  # tail[r, r] = sum over [r:, r:]
        errors = np.append(np.clip(np.diag(tail), 0.0, None), 0.0)
        energy = output_energy(w, mi)
        rows.append(errors / energy if energy > 0 else np.zeros(m + 1))
    return np.vstack(rows)


def relative_error(w: np.ndarray, approx: np.ndarray, stats: LayerStats | None = None,
                   moment: np.ndarray | None = None) -> float:
    """``||(w - approx) X||^2 / ||w X||^2`` on the layer's calibration inputs (white inputs without;
    ``moment``: the inputs' second moment given directly, e.g. augmented with a bias's constant 1)."""
    a = np.asarray(w, dtype=np.float64)
    diff = a - np.asarray(approx, dtype=np.float64)
    m = moment if moment is not None else moments([stats], a.shape[1])[0]
    energy = output_energy(a, m)
    err = output_energy(diff, m)
    return max(err, 0.0) / energy if energy > 0 else max(err, 0.0)


def residual_curve(w: np.ndarray, shared: np.ndarray, stats: LayerStats | None, eps: float = EPS,
                   white: Whitening | None = None) -> np.ndarray:
    """A member's relative squared output error at every rank 0..m of its own residual
    ``w - shared`` (:func:`lfpass.core.lowrank.residual`, activation-aware), in closed form:
    the residual's own curve, rescaled from its energy to the member's (``white``: the
    member's own whitening, when the caller has it)."""
    a = np.asarray(w, dtype=np.float64)
    delta = a - np.asarray(shared, dtype=np.float64)
    fit = fit_basis([delta], [stats], eps, white)
    m = moments([stats], a.shape[1])[0]
    energy = output_energy(a, m)
    lost = output_energy(delta, m)
    return fit.relative[0] * (lost / energy if energy > 0 else lost)


# -- parameter counts ------------------------------------------------------------------------------

def basis_params(size: int, out: int, in_: int, rank: int) -> int:
    """Parameters of a rank-``rank`` basis shared by ``size`` members of ``[out, in]``: one basis,
    one coefficient matrix each."""
    return rank * (in_ + size * out)


def break_even(size: int, out: int, in_: int) -> int:
    """The largest rank at which a shared basis is smaller than its members kept dense (0: none)."""
    dense = size * out * in_
    r = dense // (in_ + size * out)
    while r > 0 and basis_params(size, out, in_, r) >= dense:
        r -= 1
    return r


# -- what a frontend writes -------------------------------------------------------------------------

@dataclass(frozen=True)
class Factor:
    """One layer written as ``up(down(x))`` with its own bias unchanged: ``down`` (``[r, in]``)
    is one tensor for every factor of the same ``basis`` key, ``up`` (``[out, r]``) the layer's
    own; both in the layer's dtype, as ``[out, in]``-matrix factors (a frontend reshapes a
    convolution's ``down`` to ``[r, channels, *kernel]`` with the layer's geometry and its
    ``up`` to a 1x1 kernel)."""

    member: Member
    basis: str
    down: np.ndarray
    up: np.ndarray


def plan_factors(plan: FusionPlan, found: Any, stats: Calibration | None,
                 fits: dict[tuple[str, ...], BasisFit] | None = None) -> list[Factor]:
    """Every layer of ``plan.factors`` with its basis and coefficients, from ``found``'s current
    weights (a frontend's :class:`~lfpass.core.frontend.SiteTable` of the model being built:
    ``by_name`` and ``load_exact``) and their calibration statistics
    (None: plain SVD). ``fits``: each group's SVD by its members, kept across calls on the same
    weights and statistics (a budget's candidates factor the same layers at other ranks).
    Errors name the layer."""
    by_name = found.by_name()
    out: list[Factor] = []
    for index, entry in enumerate(plan.factors):
        sites = [by_name[m] for m in entry.members]
        layers = [layers_of(s)[0] for s in sites]
        weights = [found.load_exact(layer.weight.tensor) for layer in layers]
        dtypes = {w.dtype for w in weights}
        if len(dtypes) != 1:
            raise PlanError(f"a basis shared by {', '.join(entry.members)} cannot hold weights of several dtypes "
                            f"({', '.join(sorted(str(d) for d in dtypes))})")
        mats = []
        for site, layer, w in zip(sites, layers, weights):
            layout, why = layout_of(layer)
            if layout is None:
                raise PlanError(f"layer {site.name!r} cannot be factored: {why}")
            mats.append(to_matrix(w, layout))
            if mats[-1].shape != (entry.out, entry.in_):
                raise PlanError(f"plan does not fit this model: layer {site.name!r} is {mats[-1].shape[0]}x"
                                f"{mats[-1].shape[1]} as a matrix, the plan says {entry.out}x{entry.in_}")
        fit = fits.get(entry.members) if fits is not None else None
        if fit is None:
            fit = fit_basis(mats, [stats.layers.get(layer.weight.tensor) if stats is not None else None
                                   for layer in layers])
            if fits is not None:
                fits[entry.members] = fit
        dtype = weights[0].dtype if weights[0].dtype.kind == "f" or weights[0].dtype.name == "bfloat16" \
            else np.dtype(np.float64)
        basis, coeffs = fit.factors(entry.rank, dtype)
        key = f"basis{index}"
        for site, layer, coeff in zip(sites, layers, coeffs):
            bias = layer.bias.tensor if layer.bias is not None else ""
            member = Member(index, site.name, layer.weight.tensor, site.location, bias, site.kind, site.signature)
            out.append(Factor(member, key, basis, coeff))
    return out
