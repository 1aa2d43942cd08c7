"""Per-member low-rank residuals in an ONNX graph (onnx-ir), in place.

After a plan made several layers read one merged tensor, each member layer
(anchor too) gets its own rank-``r`` part of what it lost,
``W_member - W_shared`` (:func:`lfpass.core.lowrank.residual`), as new nodes beside
it; the algebra, per layer kind:

- ``MatMul`` ``x @ W`` (``W``: ``[in, out]`` as read): ``y + (x @ V^T) @ U^T``,
  added after the layer's bias ``Add`` when it has one (the same sum, and the
  ``MatMul`` + bias pattern stays whole for later passes);
- ``Gemm`` ``alpha * x @ B' + beta * C`` (``transA = 0``): ``alpha`` goes into ``U``,
  two ``MatMul`` nodes as above;
- ``Conv`` (``group = 1``): a ``Conv`` to ``r`` channels with the layer's
  attributes, then a 1x1 ``Conv`` back to ``out``.

A member whose bias the merge changed gets ``original - shared`` back as a
bias of its ``up`` part (``bias=True``). ``U`` and ``V`` are new initializers
(each stored once, with fresh names); nothing else in the graph changes.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from lfpass.core.calibration import Calibration
from lfpass.core.dtypes import round_to
from lfpass.core.errors import PlanError
from lfpass.core.layers import orient
from lfpass.core.lowrank import Member, Part, bias_delta, member_factors, residual_parts
from lfpass.core.plan import FusionPlan
from lfpass.core.sites import Site
from lfpass.onnx.names import from_namespace, from_node_name
from lfpass.onnx.rewrite import FreshNames, add_initializer
from lfpass.onnx.sites import OnnxSites, constant_source, tensor_of

log = logging.getLogger(__name__)

_ONNX_DOMAINS = ("", "ai.onnx")


def attach_residuals_onnx(model: ir.Model, plan: FusionPlan, originals: Mapping[str, np.ndarray], rank: int,
                          calibration: Calibration | None = None,
                          sites: OnnxSites | Mapping[str, Site] | None = None, bias: bool = True) -> int:
    """Give each member layer of ``plan`` in the fused ``model`` its rank-``rank`` correction; returns
    the layers changed. ``originals``: each member layer's weight (and bias) before fusion as stored,
    keyed by tensor name (or layer name): :func:`lfpass.core.lowrank.capture_originals`. ``sites``:
    the model's sites before fusion (the ``found`` given to ``apply_plan``), which name each layer's
    nodes; without them a layer is found by its node name or the exporter's namespace."""
    return attach_parts(model, residual_parts(plan, originals, calibration, sites, bias), rank)


def attach_parts(model: ir.Model, parts: Sequence[Part], rank: int) -> int:
    """Write each part beside its layer's nodes in ``model`` (in place); returns the layers changed."""
    names = FreshNames(model)
    graph = model.graph
    by_name = {node.name: node for node in graph if node.name}
    for part in parts:
        _attach(graph, _nodes_of(graph, part.member, by_name), part, rank, names)
    log.info("attached rank-%d residuals to %d layers", rank, len(parts))
    return len(parts)


def _nodes_of(graph: ir.Graph, m: Member, by_name: Mapping[str, ir.Node]) -> list[ir.Node]:
    if m.location:
        nodes = [by_name[n] for n in m.location.split(",") if n in by_name]
    else:
        nodes = [n for n in graph if n.op_type in ("MatMul", "Gemm", "Conv") and m.layer in
                 (from_node_name(n), from_namespace(n), n.name)]
    if not nodes:
        raise PlanError(f"layer {m.layer!r} is not in the fused model (pass the sites found before fusion)")
    return nodes


# -- reading a weight as the node reads it ------------------------------------------------------------

def _chain(value: ir.Value) -> tuple[ir.Value, list[ir.Node]]:
    """The constant holding ``value`` and the ``Identity``/``Transpose``/``Cast`` nodes from it to ``value``."""
    found = constant_source(value)
    if not isinstance(found, tuple):
        raise PlanError(f"{value.name!r} is not a constant weight")
    holder, ops = found[0], []
    while value is not holder:
        node = value.producer()
        ops.append(node)
        value = node.inputs[0]
    return holder, ops[::-1]


def _through(array: np.ndarray, ops: list[ir.Node]) -> np.ndarray:
    """``array`` passed through the chain's Transposes and Casts, as the layer reads it."""
    for node in ops:
        if node.op_type == "Transpose":
            perm = node.attributes.get("perm")
            array = np.transpose(array, tuple(perm.value) if perm is not None else None)
        elif node.op_type == "Cast":
            array = array.astype(ir.DataType(node.attributes["to"].value).numpy())
    return array


def _as_read(value: ir.Value, stored: np.ndarray | None = None) -> np.ndarray:
    holder, ops = _chain(value)
    return _through(tensor_of(holder).numpy() if stored is None else stored, ops)


# -- writing the residual -------------------------------------------------------------------------------

def _oi(node: ir.Node, read: np.ndarray) -> np.ndarray:
    """The weight as read by ``node`` as the matrix ``[out, in]`` of ``y = W x``: a MatMul reads
    ``[in, out]``, a Gemm by ``transB``, a Conv ``[out, in, *k]``."""
    transposed = node.op_type == "MatMul" or (node.op_type == "Gemm" and not _attr(node, "transB", 0))
    return orient(read, "in_out" if transposed else "out_in")


def _attr(node: ir.Node, name: str, default: Any) -> Any:
    a = node.attributes.get(name)
    return default if a is None else a.value


def _check(node: ir.Node, m: Member) -> None:
    if node.domain not in _ONNX_DOMAINS or node.op_type not in ("MatMul", "Gemm", "Conv"):
        raise PlanError(f"layer {m.layer!r}: a {node.op_type} node gets no residual (MatMul, Gemm, Conv only)")
    if node.op_type == "MatMul" and constant_source(node.inputs[0]) is not None and isinstance(constant_source(node.inputs[0]),
                                                                                         tuple):
        raise PlanError(f"layer {m.layer!r}: a weight multiplying from the left gets no residual")
    if node.op_type == "Gemm" and _attr(node, "transA", 0):
        raise PlanError(f"layer {m.layer!r}: a Gemm with transA gets no residual")
    if node.op_type == "Conv" and _attr(node, "group", 1) != 1:
        raise PlanError(f"layer {m.layer!r}: a grouped Conv gets no residual")


def _attach(graph: ir.Graph, nodes: list[ir.Node], part: Part, rank: int, names: FreshNames) -> None:
    m, original = part.member, part.original
    node = nodes[0]
    _check(node, m)
    read = _as_read(node.inputs[1])
    _, ops = _chain(node.inputs[1])
    if original.shape != tensor_of(_chain(node.inputs[1])[0]).numpy().shape:
        raise PlanError(f"layer {m.layer!r}: an original weight of shape {original.shape} does not fit the "
                        "shared one")
    member = _through(original, ops)
    u, v = member_factors(part, _oi(node, member), _oi(node, read), rank)
    r = u.shape[1]
    if node.op_type == "Gemm":
        u = round_to(u.astype(np.float64) * float(_attr(node, "alpha", 1.0)), u.dtype)
    if node.op_type == "Conv":
        v, u = v.reshape((r, *read.shape[1:])), u.reshape((read.shape[0], r) + (1,) * (read.ndim - 2))
    else:
        v, u = v.T, u.T
    vt = add_initializer(graph, names.fresh(f"{m.layer}.down.weight"), np.ascontiguousarray(v))
    ut = add_initializer(graph, names.fresh(f"{m.layer}.up.weight"), np.ascontiguousarray(u))
    delta = _bias_delta(node, part)
    db = add_initializer(graph, names.fresh(f"{m.layer}.up.bias"), delta) if delta is not None else None
    for n in nodes:
        _check(n, m)
        _insert(graph, n, vt, ut, db, names)


def _current_bias(node: ir.Node) -> tuple[np.ndarray, float] | None:
    """The layer's bias as read now and its scale (Gemm's ``beta``), or None."""
    if node.op_type == "MatMul":
        found = _matmul_bias(node)
        return (found, 1.0) if found is not None else None
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        found = constant_source(node.inputs[2], allow=("Identity",))
        if isinstance(found, tuple):
            return tensor_of(found[0]).numpy(), float(_attr(node, "beta", 1.0)) if node.op_type == "Gemm" else 1.0
    return None


def _matmul_bias(node: ir.Node) -> np.ndarray | None:
    uses = list(node.outputs[0].uses())
    if len(uses) != 1:
        return None
    add = uses[0].node
    if add.op_type != "Add" or add.domain not in _ONNX_DOMAINS or len(add.inputs) != 2:
        return None
    found = constant_source(add.inputs[1 - uses[0].idx], allow=("Identity",))
    return tensor_of(found[0]).numpy() if isinstance(found, tuple) else None


def _bias_delta(node: ir.Node, part: Part) -> np.ndarray | None:
    current = _current_bias(node)
    if current is None:
        return None
    delta = bias_delta(part, *current)
    if delta is None:
        return None
    return np.ascontiguousarray(delta.reshape(-1) if node.op_type == "Conv" else delta)


def _output(node: ir.Node) -> ir.Value:
    """Where the layer's result is complete: after its bias ``Add`` for a MatMul that has one."""
    out = node.outputs[0]
    if node.op_type == "MatMul" and _matmul_bias(node) is not None:
        return next(iter(out.uses())).node.outputs[0]
    return out


def _insert(graph: ir.Graph, node: ir.Node, vt: ir.Value, ut: ir.Value, bias: ir.Value | None,
            names: FreshNames) -> None:
    x, target = node.inputs[0], _output(node)
    base = target.name or node.name or "residual"

    def value(what: str) -> ir.Value:
        return ir.Value(name=names.fresh(f"{base}.{what}"))

    if node.op_type == "Conv":
        attrs = {k: a for k, a in node.attributes.items()}
        low = ir.node("Conv", [x, vt], attrs, name=f"{base}/lfpass_down", outputs=[value("down")])
        high = ir.node("Conv", [low.outputs[0], ut] + ([bias] if bias is not None else []),
                       name=f"{base}/lfpass_up", outputs=[value("up")])
        new = [low, high]
    else:
        low = ir.node("MatMul", [x, vt], name=f"{base}/lfpass_down", outputs=[value("down")])
        high = ir.node("MatMul", [low.outputs[0], ut], name=f"{base}/lfpass_up", outputs=[value("up")])
        new = [low, high]
        if bias is not None:
            new.append(ir.node("Add", [high.outputs[0], bias], name=f"{base}/lfpass_bias", outputs=[value("biased")]))
    total = ir.node("Add", [target, new[-1].outputs[0]], name=f"{base}/lfpass_add", outputs=[value("sum")])
    if target.type is not None:
        total.outputs[0].type, total.outputs[0].shape = target.type, target.shape
    after = target.producer()
    users = [(u.node, u.idx) for u in target.uses() if u.node is not total]
    graph.insert_after(after, [*new, total])
    for user, i in users:
        user.replace_input_with(i, total.outputs[0])
    if target.is_graph_output():  # the graph's output keeps its name: it now carries the sum
        outputs = graph.outputs
        index = [i for i, v in enumerate(outputs) if v is target]
        old_name, target.name = target.name, names.fresh(f"{base}.layer")
        total.outputs[0].name = old_name
        for i in index:
            outputs[i] = total.outputs[0]
