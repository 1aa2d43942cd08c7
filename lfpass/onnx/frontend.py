"""The ONNX frontend: an onnx-ir model as the core's :class:`~lfpass.core.frontend.Frontend`.

Everything the keep-function pipeline (:mod:`lfpass.core.keep`) asks of a
model, answered for ONNX: its sites, unique parameters, calibration in
onnxruntime (the layers' inputs exposed as outputs), outputs on feeds
(onnxruntime, graph optimisations off, so the runtime hides no difference),
a copy to rewrite, alignment spaces from the graph's data flow, initializers
read and written by name, the plan applied as shared initializers,
per-member parts as extra MatMul/Conv nodes, and factored layers reading one
shared basis (:mod:`lfpass.onnx.factor`). Each build copies the graph, so
this path is for models that fit in memory twice (and in one 2 GB protobuf
for onnxruntime).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from lfpass.core.align import AlignReport, Skipped, Space
from lfpass.core.bases import Factor
from lfpass.core.calibration import Calibration
from lfpass.core.collapse import Block
from lfpass.core.config import FusionConfig
from lfpass.core.errors import InputError, first_line
from lfpass.core.frontend import Frontend
from lfpass.core.keep import Kept, align_model, fuse_keeping
from lfpass.core.lowrank import Part
from lfpass.core.plan import FusionPlan
from lfpass.core.quality import MASK_INPUT, Readout
from lfpass.core.sites import Site
from lfpass.onnx.align import read_tensors, spaces_of, write_tensors
from lfpass.onnx.calibrate import calibrate_onnx
from lfpass.onnx.collapse import find_spans, remove_spans, span_influence
from lfpass.onnx.factor import factor_layers
from lfpass.onnx.inputs import LABELS, Feeds, runtime_inputs
from lfpass.onnx.load import count_params
from lfpass.onnx.lowrank import attach_parts
from lfpass.onnx.rewrite import apply_plan
from lfpass.onnx.runtime import session
from lfpass.onnx.sites import OnnxSites, find_sites

_BATCHES = 8  # a calibration .npz is cut into this many batches along its first axis


def copy_model(model: ir.Model) -> ir.Model:
    return ir.from_proto(ir.to_proto(model))


def outputs(model: ir.Model | Path, feeds: Sequence[Feeds], readout: Readout = Readout()) -> list[np.ndarray]:
    """What ``readout`` takes of the outputs per batch (default: every floating-point output,
    flattened per sample and joined), float64."""
    return run(session(model), feeds, readout)


def run(sess: Any, feeds: Sequence[Feeds], readout: Readout = Readout(),
        overrides: Feeds | None = None) -> list[np.ndarray]:
    """:func:`outputs` of an open session; ``overrides``: initializers fed with other values
    (the session's overridable ones)."""
    names = [o.name for o in sess.get_outputs()]
    out = []
    for feed in feeds:
        try:
            results = [np.asarray(r) for r in sess.run(None, {**feed, **(overrides or {})})]
        except Exception as exc:  # onnxruntime's own error types: the inputs do not fit the model
            shapes = ", ".join(f"{k} {tuple(a.shape)} {a.dtype}" for k, a in feed.items())
            raise InputError(f"onnxruntime cannot run the model on the calibration inputs ({shapes}): "
                             f"{first_line(exc)}") from None
        out.append(readout(dict(zip(names, results)), feed.get(MASK_INPUT)))
    return out


def overridable(model: ir.Model, names: Sequence[str]) -> tuple[Any, frozenset[str]]:
    """A session on ``model`` whose initializers of ``names`` (those in the main graph, of a
    dtype numpy feeds) are also graph inputs, so a run can feed them other values (onnxruntime's
    overridable initializers); and those names."""
    import onnx

    proto = ir.to_proto(model)
    graph = proto.graph
    inputs = {i.name for i in graph.input}
    wanted, fed = set(names), set()
    for init in graph.initializer:
        if init.name in wanted and init.name not in inputs and init.data_type != onnx.TensorProto.BFLOAT16:
            graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
            fed.add(init.name)
    return session(proto.SerializeToString()), frozenset(fed)


def split_feed(feed: Feeds, model: ir.Model, batches: int = _BATCHES) -> list[Feeds]:
    """One ``.npz`` feed (first axis: samples) cut into up to ``batches`` batches."""
    sizes = {a.shape[0] for a in feed.values() if a.ndim}
    if len(sizes) != 1:
        raise InputError("calibration inputs must share their first axis (samples); "
                         f"got first dimensions {sorted(sizes)}")
    n = sizes.pop()
    if n < 2:
        raise InputError(f"calibration needs at least 2 samples along the first axis, got {n}")
    for v in runtime_inputs(model):
        dim = v.shape[0] if v.shape is not None and len(v.shape) else None
        if isinstance(dim, int) and dim != n:
            raise InputError(f"input {v.name!r} has a fixed batch size of {dim}: calibration cuts its "
                             f"{n} samples into batches, so export the model with a dynamic batch axis")
    for name, a in feed.items():
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            raise InputError(f"calibration input {name!r} holds NaN or Inf ({int((~np.isfinite(a)).sum()):,} "
                             "values): give finite inputs")
    cuts = np.array_split(np.arange(n), min(batches, n))
    return [{k: a[idx] for k, a in feed.items()} for idx in cuts]


@dataclass
class OnnxFrontend(Frontend[ir.Model]):
    """``model`` (an in-memory onnx-ir model, whose values are never modified) for the core;
    ``readout``: what its error is measured on.

    Tensors the model holds in external files are read into memory once: its copies and
    the onnxruntime sessions built from them are then self-contained, wherever the model's
    folder is (this path holds the model in memory anyway; see the module's note)."""

    model: ir.Model
    readout: Readout = Readout()
    _overrides: tuple[Any, frozenset[str]] | None = field(default=None, init=False, repr=False)
    hint = "pass --inputs CALIB.npz"

    def __post_init__(self) -> None:
        ir.external_data.load_to_model(self.model)

    def find_sites(self, model: ir.Model) -> OnnxSites:
        return find_sites(model)

    def count(self, model: ir.Model) -> int:
        return count_params(model)

    def calibrate(self, batches: Sequence[Feeds], cross: Sequence[tuple[str, str]],
                  progress: bool = False) -> Calibration:
        return calibrate_onnx(self.model, batches, cross=cross, progress=progress)

    def outputs(self, model: ir.Model | Path | str, batches: Sequence[Feeds]) -> list[np.ndarray]:
        return outputs(model if isinstance(model, ir.Model) else Path(model), batches, self.readout)

    def blocks(self) -> list[Block]:
        return [s.block for s in find_spans(self.model, self.found.plannable)]

    def influence(self, batches: Sequence[Feeds]) -> dict[str, float]:
        return span_influence(self.model, find_spans(self.model, self.found.plannable), batches)

    def collapse(self, model: ir.Model, names: Sequence[str]) -> None:
        remove_spans(model, self.find_sites(model).plannable, names)

    def outputs_with(self, values: Mapping[str, np.ndarray], batches: Sequence[Feeds]) -> list[np.ndarray]:
        if self._overrides is None:  # one session for every candidate: the layers' tensors fed per run
            tensors = [x.tensor for site in self.found.plannable for x in site.slots]
            self._overrides = overridable(self.model, tensors)
        sess, fed = self._overrides
        if not set(values) <= fed:  # a tensor held by a Constant node, or bfloat16: build a copy
            return super().outputs_with(values, batches)
        return run(sess, batches, self.readout, {n: np.ascontiguousarray(a) for n, a in values.items()})

    def copy(self) -> ir.Model:
        return copy_model(self.model)

    def spaces(self, model: ir.Model, skipped: list[Skipped]) -> tuple[list[Space], Mapping[str, Site]]:
        return spaces_of(model, skipped)

    def read(self, model: ir.Model, names: Sequence[str]) -> dict[str, np.ndarray]:
        return read_tensors(model, names)

    def write(self, model: ir.Model, arrays: Mapping[str, np.ndarray]) -> None:
        write_tensors(model, arrays)

    def apply(self, model: ir.Model, found: Any, plan: FusionPlan, stats: Calibration | None) -> None:
        apply_plan(model, found, plan, stats=stats)

    def attach_parts(self, model: ir.Model, parts: Sequence[Part], rank: int) -> None:
        attach_parts(model, parts, rank)

    def factor(self, model: ir.Model, factors: Sequence[Factor]) -> None:
        factor_layers(model, factors)


def align_onnx(model: ir.Model, plan: FusionPlan, mode: str = "weights", calibration: Calibration | None = None,
               seed: int = 0) -> AlignReport:
    """Move each planned member into its anchor's coordinates, in ``model``'s initializers (in place)."""
    return align_model(OnnxFrontend(model), model, plan, mode, calibration, seed)


def fuse_keeping_onnx(model: ir.Model, config: FusionConfig, feed: Feeds | None, plan: FusionPlan | None = None,
                      progress: bool = False) -> Kept:
    """:func:`lfpass.core.keep.fuse_keeping` on one calibration ``.npz``'s arrays (first axis:
    samples; an array named ``labels`` holds labels for the ``accuracy`` metric), cut into batches."""
    batches: list[Feeds] = []
    labels = None
    if feed is not None:
        feed = dict(feed)
        label_array = feed.pop(LABELS, None)
        batches = split_feed(feed, model)
        n = sum(len(next(iter(b.values()))) for b in batches)
        if label_array is not None and (label_array.ndim == 0 or label_array.shape[0] != n):
            raise InputError(f"calibration {LABELS!r}: {label_array.shape[0] if label_array.ndim else 0} labels "
                             f"for {n} samples; give one label per sample")
        if label_array is not None:
            labels = np.array_split(label_array, len(batches))
    return fuse_keeping(OnnxFrontend(model, Readout.of(config)), config, batches, labels=labels, plan=plan,
                        progress=progress)
