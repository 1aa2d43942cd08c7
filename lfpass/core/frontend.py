"""The contract between the core and an IR: what a frontend implements.

The core plans, merges, aligns and factors on numpy arrays and names; it
never sees a graph. A frontend is the only code that does: it adapts one
model in one IR to the questions below, and :mod:`lfpass.core.keep` runs the
whole keep-function pipeline (calibrate, plan by measured damage, align,
merge by data, attach per-member parts, measure) over any frontend.

Two frontends exist: :class:`lfpass.fx.frontend.FxFrontend` (``nn.Module``,
``torch.fx`` and ``torch.export`` graphs) and
:class:`lfpass.onnx.frontend.OnnxFrontend` (ONNX through onnx-ir).

A third frontend starts here. Implement, for one model of the new IR:

1. a :class:`SiteTable` (:meth:`Frontend.find_sites`): each weight-bearing
   layer as a :class:`~lfpass.core.sites.Site` (kind, role, signature, slots
   naming its tensors) and how to read a tensor by name, in its own dtype;
   the units (:func:`lfpass.core.units.find_units`) come for free from names;
2. :meth:`Frontend.count`: unique parameters, a tensor shared by several
   layers counted once (the ratio's denominator);
3. :meth:`Frontend.apply`: write a plan, every slot of a group re-pointed to
   the tensor :func:`lfpass.core.merge.merged_slots` yields (the merge itself
   is the core's);
4. for calibration and budgets, :meth:`Frontend.calibrate` (per-layer input
   statistics, :func:`lfpass.core.calibration.accumulate`) and
   :meth:`Frontend.outputs` (the model's outputs per batch, float64);
5. for alignment, :meth:`Frontend.spaces` (function-preserving spaces found
   from the graph's data flow, :class:`lfpass.core.align.Space`) with
   :meth:`Frontend.read` and :meth:`Frontend.write` for the tensors they move;
6. for per-member parts, :meth:`Frontend.attach_parts`: each
   :class:`lfpass.core.lowrank.Part` written as ``layer(x) + up(down(x))``;
7. for shared bases and per-layer low rank (the plan menu,
   :mod:`lfpass.core.menu`), :meth:`Frontend.factor`: each
   :class:`lfpass.core.bases.Factor`'s layer written as ``up(down(x))`` with
   its own bias, one ``down`` tensor per basis however many layers read it;
8. optionally, :meth:`Frontend.outputs_with`: the original model run with
   some tensors holding other values and left as it was, so a budget measures
   each candidate without building it (the default builds a copy);
9. optionally, for depth collapse (:mod:`lfpass.core.collapse`),
   :meth:`Frontend.blocks`, :meth:`Frontend.influence` and
   :meth:`Frontend.collapse`: the residual blocks of the model's stack, how
   far each turns the stream, and their removal.

Nothing else of the pipeline belongs in a frontend: splitting calibration
batches, choosing what needs data, the budget, the order of the steps and the
error measurement are the core's, written once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from functools import cached_property
from typing import TYPE_CHECKING, Any, Generic, Mapping, Sequence, TypeVar

import numpy as np

from lfpass.core.errors import PlanError

if TYPE_CHECKING:
    from lfpass.core.align import Skipped, Space
    from lfpass.core.bases import Factor
    from lfpass.core.calibration import Calibration
    from lfpass.core.collapse import Block
    from lfpass.core.lowrank import Part
    from lfpass.core.plan import FusionPlan
    from lfpass.core.sites import Site

Model = TypeVar("Model")


class SiteTable(ABC):
    """The sites one model holds and how to read their tensors: what a frontend finds.

    Subclasses set ``sites`` (the layers) and ``units`` (attention / MLP units
    over them) and implement :meth:`load_exact`."""

    sites: list[Site]
    units: list[Site]

    @abstractmethod
    def load_exact(self, name: str) -> np.ndarray:
        """A tensor's values in its own dtype (bfloat16 as ``ml_dtypes.bfloat16``), for merging."""

    def load(self, name: str) -> np.ndarray:
        """A tensor's values for scoring: float32, or float64 when stored so (float16 and
        bfloat16 widen exactly)."""
        array = self.load_exact(name)
        return array if array.dtype == np.float64 else np.asarray(array, dtype=np.float32)

    @property
    def plannable(self) -> list[Site]:
        """The layers, then the units over them: what the planner chooses from."""
        return [*self.sites, *self.units]

    def by_name(self) -> dict[str, Site]:
        return {s.name: s for s in self.plannable}


class Frontend(ABC, Generic[Model]):
    """One model (``self.model``, never modified) in one IR, as the core sees it.

    Methods that take a ``model`` act on a copy the core made with :meth:`copy`
    (or, for :meth:`outputs`, on any model of the IR, the original included)."""

    model: Model
    hint: str = "pass calibration inputs"  # how a user of this frontend gives data, for errors

    # -- what the model holds ------------------------------------------------------------------
    @abstractmethod
    def find_sites(self, model: Model) -> SiteTable:
        """The sites of ``model``."""

    @cached_property
    def found(self) -> SiteTable:
        """The sites of the original model (found once)."""
        return self.find_sites(self.model)

    @abstractmethod
    def count(self, model: Model) -> int:
        """Unique parameters of ``model``: a tensor shared by several layers counts once."""

    # -- running it on data --------------------------------------------------------------------
    @abstractmethod
    def calibrate(self, batches: Sequence[Any], cross: Sequence[tuple[str, str]],
                  progress: bool = False) -> Calibration:
        """The original model's per-layer input statistics on ``batches`` (paired ones for ``cross``)."""

    @abstractmethod
    def outputs(self, model: Any, batches: Sequence[Any]) -> list[np.ndarray]:
        """``model``'s outputs on ``batches``, one float64 ``[samples, features]`` array per batch."""

    # -- depth collapse (optional) ---------------------------------------------------------------
    def blocks(self) -> list[Block]:
        """The original model's residual blocks of one stack, in order (:mod:`lfpass.core.collapse`)."""
        raise PlanError(f"{type(self).__name__} finds no residual blocks: depth collapse is not available here")

    def influence(self, batches: Sequence[Any]) -> dict[str, float]:
        """Each block's influence on ``batches``: ``1 - cos(input, output)`` per position, averaged."""
        raise PlanError(f"{type(self).__name__} finds no residual blocks: depth collapse is not available here")

    def collapse(self, model: Model, names: Sequence[str]) -> None:
        """Remove the named blocks from ``model``, in place: each one's input flows on as its output."""
        raise PlanError(f"{type(self).__name__} cannot remove blocks: depth collapse is not available here")

    def outputs_with(self, values: Mapping[str, np.ndarray], batches: Sequence[Any]) -> list[np.ndarray]:
        """The original model's :meth:`outputs` with the named tensors holding ``values`` (each in
        its own dtype and stored layout; :func:`lfpass.core.dense.plan_values`), the model left
        as it was. This default writes them into a :meth:`copy`; a frontend overrides it to
        measure without one (the budget calls it for every candidate)."""
        model = self.copy()
        self.write(model, {name: _widened(a) for name, a in values.items()})
        return self.outputs(model, batches)

    # -- building a fused copy -----------------------------------------------------------------
    @abstractmethod
    def copy(self) -> Model:
        """A private copy of the original model, for the core to rewrite."""

    @abstractmethod
    def spaces(self, model: Model, skipped: list[Skipped]) -> tuple[list[Space], Mapping[str, Site]]:
        """``model``'s alignment spaces (what was not one goes to ``skipped``) and the sites
        they were found with, by name."""

    @abstractmethod
    def read(self, model: Model, names: Sequence[str]) -> dict[str, np.ndarray]:
        """The named tensors of ``model``, as float64 arrays."""

    @abstractmethod
    def write(self, model: Model, arrays: Mapping[str, np.ndarray]) -> None:
        """Store float64 ``arrays`` into ``model``'s tensors of those names, each in its own dtype."""

    @abstractmethod
    def apply(self, model: Model, found: SiteTable, plan: FusionPlan, stats: Calibration | None) -> None:
        """Make each group of ``plan`` share one merged tensor per slot in ``model``, in place
        (``found``: its sites; ``stats``: what a data-aware rule merges by)."""

    @abstractmethod
    def attach_parts(self, model: Model, parts: Sequence[Part], rank: int) -> None:
        """Give each part's layer in the fused ``model`` its own rank-``rank`` correction, in place."""

    def factor(self, model: Model, factors: Sequence[Factor]) -> None:
        """Write each factor's layer in ``model`` as ``up(down(x))`` (its own bias kept), in place;
        factors with one ``basis`` key read one ``down`` tensor, stored once."""
        raise PlanError(f"{type(self).__name__} writes no factored layers: plan with actions='tie'")


def _widened(array: np.ndarray) -> np.ndarray:
    """float64 (bfloat16 through float32, exactly), for :meth:`Frontend.write`."""
    a = np.asarray(array)
    return (a.astype(np.float32) if a.dtype.itemsize < 4 else a).astype(np.float64)
