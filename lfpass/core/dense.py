"""A plan as new values for the original model's tensors: candidates measured without a rebuild.

Every action the plan menu takes changes what a layer computes, not how it is
wired, as far as its outputs go: a tie gives each member the merged weight (and
bias), a tie's per-member residual gives it ``shared + U V`` and its own bias
back, a shared basis or per-layer low rank gives it ``C_i B``. So the model a
plan builds computes what the *original* model computes with those dense
values in its own tensors (up to the rounding of the factors' product). The
budget and the menu's end-to-end check measure candidates that way
(:meth:`lfpass.core.frontend.Frontend.outputs_with`): no copy, no rewrite, no
re-serialising; the plan they keep is then built once and verified as built.

What does not reduce to new values is said by ``None``: alignment (it moves
neighbours' tensors too, and the frontends find them), a Gemm's ``alpha`` or
``beta`` on a corrected layer, and a tensor the plan would give two values
(already shared by layers that now differ). The caller then builds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from lfpass.core.bases import BasisFit, plan_factors
from lfpass.core.dtypes import round_to
from lfpass.core.layers import from_matrix, signature_layout, to_matrix
from lfpass.core.lowrank import capture_originals, member_factors, residual_parts
from lfpass.core.merge import merged_slots

if TYPE_CHECKING:
    from lfpass.core.calibration import Calibration
    from lfpass.core.frontend import SiteTable
    from lfpass.core.plan import FusionPlan


class _Values(dict):
    """Tensor name -> new value; a second, different value for one name marks the plan unfit."""

    fits = True

    def put(self, name: str, array: np.ndarray) -> None:
        old = self.get(name)
        if old is not None and (old.shape != array.shape or not np.array_equal(old, array)):
            self.fits = False
        self[name] = array


def _scaled(signature: Any) -> bool:
    f = dict(signature)
    return f.get("alpha", 1.0) != 1.0 or f.get("beta", 1.0) != 1.0


def plan_values(plan: FusionPlan, found: SiteTable, stats: Calibration | None,
                fits: dict[tuple[str, ...], BasisFit] | None = None) -> dict[str, np.ndarray] | None:
    """The original model's tensors ``plan`` changes, by name, each in its own dtype and stored
    layout, such that the original model with them computes what the built plan computes; None
    when the plan does not reduce to new values (see the module's note). ``found``: the original
    model's sites; ``stats``: its calibration (what data-aware merges and factors use); ``fits``:
    the factored groups' SVDs kept across candidates (:func:`plan_factors`)."""
    if plan.align != "none" and plan.groups:
        return None
    values = _Values()
    by_name = found.by_name()
    merged: dict[str, np.ndarray] = {}
    for slot in merged_slots(plan, by_name, found.load_exact, stats=stats):
        for member in slot.members:
            values.put(member.tensor, slot.array)
            merged[member.tensor] = slot.array
    ranks = [g.rank if g.rank is not None else plan.residual_rank for g in plan.groups]
    corrected = _Values()  # a corrected member's own value replaces the merge's
    if any(ranks):
        originals = capture_originals(found, plan)
        for part in residual_parts(plan, originals, stats, found):
            rank = ranks[part.member.group]
            if not rank:
                continue
            m = part.member
            if _scaled(m.signature):
                return None
            layout, _ = signature_layout(m.kind, m.signature)
            shared = merged[m.tensor]
            u, v = member_factors(part, to_matrix(part.original, layout), to_matrix(shared, layout), rank)
            dense = to_matrix(shared, layout) + u.astype(np.float64) @ v.astype(np.float64)
            corrected.put(m.tensor, round_to(from_matrix(dense, layout, shared.shape), shared.dtype))
            if m.bias and part.original_bias is not None:
                corrected.put(m.bias, part.original_bias)  # the part's bias gives the member its own back
    if not corrected.fits:
        return None
    values.update(corrected)
    for factor in plan_factors(plan, found, stats, fits) if plan.factors else ():
        m = factor.member
        layout, _ = signature_layout(m.kind, m.signature)
        stored = found.load_exact(m.tensor)
        dense = factor.up.astype(np.float64) @ factor.down.astype(np.float64)
        values.put(m.tensor, round_to(from_matrix(dense, layout, stored.shape), stored.dtype))
    return dict(values) if values.fits else None
