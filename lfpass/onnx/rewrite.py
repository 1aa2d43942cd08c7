"""Apply a fusion plan to an ONNX graph (onnx-ir), in place.

For each group, member 0 is the anchor. The core merges each slot
(:func:`lfpass.core.merge.merged_slots`, as for the FX frontend); this module only
writes the result into the graph, so every member reads one initializer
holding the merged tensor:

- weight slot: a site owns its weight, so every read of a member's weight
  (through its ``Transpose``/``Cast`` nodes too) is re-pointed to the anchor's
  tensor, which takes the merged values (a ``Constant`` anchor moves to the
  top of the graph, so every reader comes after it);
- bias slot: the legacy exporter lets layers with equal biases read one
  tensor, so only the members' own bias inputs are re-pointed, to a fresh
  initializer unless the anchor's bias is read by nothing else.

Only what the rewrite made dead is removed (the members' old tensors and the
``Identity``/``Transpose``/``Cast``/``Constant`` nodes that fed them), so a
graph is never changed beyond the plan. Subgraphs are not touched.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

import numpy as np
import onnx_ir as ir

from lfpass.core.dtypes import bit_equal
from lfpass.core.errors import PlanError
from lfpass.core.merge import merged_slots
from lfpass.core.plan import FusionPlan, check_plan
from lfpass.onnx.load import read_array
from lfpass.onnx.sites import OnnxSites

if TYPE_CHECKING:
    from lfpass.core.calibration import Calibration

log = logging.getLogger(__name__)

Store = Callable[[np.ndarray, str], ir.TensorProtocol]  # a merged array -> the tensor the graph keeps


def in_memory(array: np.ndarray, name: str) -> ir.TensorProtocol:
    return ir.Tensor(array, name=name)


_REMOVABLE = ("Constant", "Identity", "Transpose", "Cast")


class FreshNames:
    """Fresh value names that clash with nothing in the model (subgraphs included)."""

    def __init__(self, model: ir.Model):
        self.used: set[str] = set()
        for graph in (model.graph, *model.graph.subgraphs()):
            self.used.update(v.name for v in (*graph.inputs, *graph.initializers.values()) if v.name)
            self.used.update(o.name for n in graph for o in n.outputs if o.name)

    def fresh(self, base: str) -> str:
        name, k = f"{base}.lfpass", 1
        while name in self.used:
            k += 1
            name = f"{base}.lfpass{k}"
        self.used.add(name)
        return name


def _as_array(merged: np.ndarray, like: ir.TensorProtocol) -> np.ndarray:
    """The merged tensor, contiguous, in ``like``'s dtype (merges already return it: no float32 trip)."""
    if merged.dtype != like.dtype.numpy():
        raise PlanError(f"merged {like.name!r} came back as {merged.dtype.name}, not {like.dtype.name}")
    return np.ascontiguousarray(merged)


def take_over(old: ir.Value, new: ir.Value) -> None:
    """``new`` stands for ``old`` everywhere, graph outputs included, under ``old``'s name, shape and type."""
    name, shape, dtype = old.name, old.shape, old.type
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    old.name = None
    new.name, new.shape, new.type = name, shape, dtype


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray, store: Store = in_memory) -> ir.Value:
    tensor = store(array, name)
    value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def apply_plan(model: ir.Model, found: OnnxSites, plan: FusionPlan, stats: Calibration | None = None,
               store: Store = in_memory) -> int:
    """Make each group of ``plan`` read one merged tensor per slot; returns groups applied
    (``stats``: the calibration a data-aware rule such as ``regmean`` merges by). ``store``
    turns each merged initializer into the tensor the graph keeps: in memory by default;
    ``optimize`` appends it to the output's data file instead
    (:class:`lfpass.onnx.save.DataFile`), so one slot's arrays are in memory at a time."""
    sites = found.by_name()
    check_plan(plan, sites)
    graph = model.graph
    names = FreshNames(model)
    dead: list[ir.Value] = []
    for merged in merged_slots(plan, sites, found.load_exact, stats=stats):
        holders = [found.values[x.tensor] for x in merged.members]
        like = found.tensor(merged.members[0].tensor)
        if merged.members[0].kind == "weight":
            dead += _share_weight(graph, holders, merged.array, like, store)
        elif any(h is not holders[0] for h in holders):
            edges = [e for x in merged.members for e in found.bias_edges[x.tensor]]
            dead += _share_bias(graph, holders[0], edges, merged.array, like, names, store)
    removed = _remove_dead(graph, dead)
    log.info("applied %d groups; removed %d dead tensors and nodes", len(plan.groups), removed)
    return len(plan.groups)


def _set_value(graph: ir.Graph, holder: ir.Value, array: np.ndarray, like: ir.TensorProtocol,
               store: Store) -> None:
    """Give ``holder`` the merged values; a ``Constant`` holder moves to the top of the
    graph, so members that come before it can read it."""
    changed = not bit_equal(array, read_array(like))
    if holder.is_initializer():
        if changed:
            holder.const_value = store(array, holder.name)
        return
    node = holder.producer()
    if changed:
        node.attributes["value"] = ir.AttrTensor("value", ir.Tensor(array, name=holder.name))
    if graph[0] is not node:
        graph.remove(node)
        graph.insert_before(graph[0], node)


def _share_weight(graph, holders, merged, like, store) -> list[ir.Value]:
    anchor = holders[0]
    _set_value(graph, anchor, _as_array(merged, like), like, store)
    for h in holders[1:]:
        h.replace_all_uses_with(anchor)
    return holders[1:]


def _share_bias(graph, anchor, edges, merged, like, names, store) -> list[ir.Value]:
    """Re-point the members' bias inputs; the anchor's bias keeps its value for any other reader."""
    array = _as_array(merged, like)
    mine = {(id(n), i) for n, i in edges}
    if bit_equal(array, read_array(like)) or all((id(u.node), u.idx) in mine for u in anchor.uses()):
        _set_value(graph, anchor, array, like, store)
        shared = anchor
    else:
        shared = add_initializer(graph, names.fresh(anchor.name), array, store)
    old = []
    for node, i in edges:
        if node.inputs[i] is not shared:
            old.append(node.inputs[i])
            node.replace_input_with(i, shared)
    return old


def _remove_dead(graph: ir.Graph, values: list[ir.Value]) -> int:
    """Remove the given values, and the pass-through nodes feeding them, once nothing reads them."""
    removed = 0
    work = list(values)
    while work:
        value = work.pop()
        if value.uses() or value.is_graph_output() or value.is_graph_input():
            continue
        if value.is_initializer():
            if graph.initializers.get(value.name) is value:
                del graph.initializers[value.name]
                removed += 1
            continue
        node = value.producer()
        if node is None or node.graph is not graph or node.op_type not in _REMOVABLE:
            continue
        if any(o.uses() or o.is_graph_output() for o in node.outputs):
            continue
        inputs = [v for v in node.inputs if v is not None]
        graph.remove(node, safe=True)
        removed += 1
        work.extend(inputs)
    return removed
