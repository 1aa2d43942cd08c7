"""The FX frontend: a PyTorch model (``nn.Module``, ``torch.fx`` or ``torch.export`` graph)
as the core's :class:`~lfpass.core.frontend.Frontend`.

Everything the keep-function pipeline (:mod:`lfpass.core.keep`) asks of a
model, answered in torch: its sites, unique parameters, calibration by forward
hooks (an interpreter for ``torch.export`` graphs), outputs on batches, a deep
copy to rewrite, alignment spaces from the traced data flow, tensors read and
written by name, the plan applied as shared ``nn.Parameter``\\s, and per-member
parts as extra modules or graph nodes. Every rewrite runs without gradients.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from lfpass.core.align import AlignReport, Skipped, Space
from lfpass.core.bases import Factor
from lfpass.core.calibration import Calibration
from lfpass.core.collapse import Block
from lfpass.core.errors import ConfigError
from lfpass.core.frontend import Frontend
from lfpass.core.keep import align_model
from lfpass.core.lowrank import Part
from lfpass.core.plan import FusionPlan
from lfpass.core.quality import MASK_INPUT, Readout
from lfpass.core.sites import Site
from lfpass.fx.align import holding, read_tensors, spaces_of, write_tensors
from lfpass.fx.batches import call, eval_mode
from lfpass.fx.calibrate import calibrate_fx
from lfpass.fx.collapse import block_influence, find_blocks, remove_blocks
from lfpass.fx.factor import factor_layers
from lfpass.fx.lowrank import attach_parts
from lfpass.fx.rewrite import apply_plan
from lfpass.fx.sites import FxSites, find_sites, unique_parameters
from lfpass.fx.trace import trace

OutputFn = Callable[[Any, Any], torch.Tensor]  # (model output, the batch it ran on) -> [batch, ...]


def default_output(output: Any, batch: Any) -> torch.Tensor:
    """Every floating-point tensor the model returns, flattened per sample and joined."""
    leaves = [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not leaves:
        raise ConfigError("the model returns no floating-point tensor to measure its error on")
    n = leaves[0].shape[0] if leaves[0].dim() else 1
    return torch.cat([t.reshape(n, -1).float() for t in leaves if t.dim() and t.shape[0] == n], dim=1)


def _named(output: Any) -> dict[str, np.ndarray]:
    """A model's output by name: a mapping's (a Hugging Face ``ModelOutput`` too) keys, a
    tuple's positions (``"0"``, ``"1"``, ...), or ``"output"`` for one tensor."""
    if isinstance(output, Mapping):
        items = output.items()
    elif isinstance(output, (tuple, list)):
        items = ((str(i), v) for i, v in enumerate(output))
    else:
        items = (("output", output),)
    return {k: v.detach().double().cpu().numpy() for k, v in items if isinstance(v, torch.Tensor)}


def readout_fn(readout: Readout) -> OutputFn | None:
    """``readout`` as an ``output_fn`` (None for the default: every floating-point output).
    A ``"mean"`` pooling weighs positions by the batch's ``attention_mask`` where it has one."""
    if readout == Readout():
        return None

    def read(output: Any, batch: Any) -> torch.Tensor:
        mask = batch.get(MASK_INPUT) if isinstance(batch, Mapping) else None
        mask = None if mask is None else np.asarray(torch.as_tensor(mask).cpu())
        return torch.from_numpy(readout(_named(output), mask))

    return read


def outputs(model: nn.Module, batches: Iterable[Any], output_fn: OutputFn | None = None) -> list[np.ndarray]:
    """``model``'s outputs on ``batches`` (eval mode, no gradients), one float64 array per batch."""
    output_fn = output_fn or default_output
    with eval_mode(model), torch.no_grad():
        return [output_fn(call(model, b), b).detach().double().cpu().numpy() for b in batches]


@dataclass
class FxFrontend(Frontend[nn.Module]):
    """``model`` (never modified) for the core. ``example_inputs``: one batch, for
    ``torch.export`` where ``symbolic_trace`` fails (alignment reads the traced data flow);
    ``output_fn(output, batch)``: what the error is measured on (default: every
    floating-point output, flattened per sample); ``gm``: the model's graph, if traced already."""

    model: nn.Module
    example_inputs: Any = None
    output_fn: OutputFn | None = None
    gm: fx.GraphModule | None = field(default=None, repr=False)
    returns_tuple: dict[str, bool] = field(default_factory=dict, repr=False)  # per block, as influence saw it
    hint = "pass calibration=[batch, ...]"

    def graph(self) -> fx.GraphModule:
        """The model's graph, traced once: alignment reads its data flow for every build."""
        if self.gm is None:
            self.gm = trace(self.model, self.example_inputs)
        return self.gm

    def find_sites(self, model: nn.Module) -> FxSites:
        return find_sites(model)

    def count(self, model: nn.Module) -> int:
        return unique_parameters(model)

    def calibrate(self, batches: Sequence[Any], cross: Sequence[tuple[str, str]],
                  progress: bool = False) -> Calibration:
        return calibrate_fx(self.model, batches, cross=cross, progress=progress)

    def outputs(self, model: nn.Module, batches: Sequence[Any]) -> list[np.ndarray]:
        return outputs(model, batches, self.output_fn)

    def blocks(self) -> list[Block]:
        return find_blocks(self.model, self.found.plannable)

    def influence(self, batches: Sequence[Any]) -> dict[str, float]:
        influence, self.returns_tuple = block_influence(self.model, self.blocks(), batches)
        return influence

    def collapse(self, model: nn.Module, names: Sequence[str]) -> None:
        remove_blocks(model, names, self.returns_tuple)

    def outputs_with(self, values: Mapping[str, np.ndarray], batches: Sequence[Any]) -> list[np.ndarray]:
        with holding(self.model, values):  # in place, restored: no copy of the model
            return self.outputs(self.model, batches)

    def copy(self) -> nn.Module:
        return copy.deepcopy(self.model)

    def spaces(self, model: nn.Module, skipped: list[Skipped]) -> tuple[list[Space], Mapping[str, Site]]:
        return spaces_of(self.graph(), skipped)  # a copy's names are the original's

    def read(self, model: nn.Module, names: Sequence[str]) -> dict[str, np.ndarray]:
        return read_tensors(model, names)

    def write(self, model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
        write_tensors(model, arrays)

    def apply(self, model: nn.Module, found: Any, plan: FusionPlan, stats: Calibration | None) -> None:
        with torch.no_grad():
            apply_plan(model, plan, inplace=True, stats=stats, found=found)

    def attach_parts(self, model: nn.Module, parts: Sequence[Part], rank: int) -> None:
        attach_parts(model, parts, rank)

    def factor(self, model: nn.Module, factors: Sequence[Factor]) -> None:
        factor_layers(model, factors)


def align_fx(module: nn.Module, plan: FusionPlan, mode: str = "weights", calibration: Calibration | None = None,
             example_inputs: Any = None, gm: fx.GraphModule | None = None, seed: int = 0) -> AlignReport:
    """Move each planned member into its anchor's coordinates, in ``module``'s own tensors (in place).

    The function is unchanged (up to rounding of rotations); ``calibration``, when given, is moved
    alike so it still describes the module. ``gm``: the graph whose data flow says what may move
    (default: ``module`` traced, with ``example_inputs`` for ``torch.export``)."""
    front = FxFrontend(module, example_inputs, gm=gm)
    return align_model(front, module, plan, mode, calibration, seed)
