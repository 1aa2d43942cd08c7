"""Layers written through shared bases (or per-layer low rank) in an ONNX graph (onnx-ir), in place.

The core gives each layer ``y = W x + b`` (``W``: ``[out, in]``) a
:class:`lfpass.core.bases.Factor`: ``W ~ U B`` with ``B`` (``down``, ``[r, in]``) one
tensor for every layer of the same basis key and ``U`` (``up``, ``[out, r]``) the
layer's own. The layer's node stays where it is (its name, output, bias, Gemm
``alpha``/``beta`` and any bias ``Add`` after it unchanged) and reads a new input,
the basis's product ``low``, and ``U`` in place of its weight; per layer kind:

- ``MatMul`` ``x @ W^T`` (the weight read as ``[in, out]``): ``low = x @ B^T`` (a new
  ``MatMul`` before it), then ``low @ U^T``: the node's inputs become ``low`` and ``U^T``
  (``[r, out]``);
- ``Gemm`` ``alpha * x @ W' + beta * C`` (``transA = 0``): ``low = x @ B^T``, and the node
  reads ``low`` and ``U`` in the orientation it reads its weight (``U`` when ``transB``,
  ``U^T`` otherwise), so ``alpha * (x B^T) U^T + beta * C = alpha * x (U B)^T + beta * C``;
- ``Conv`` (``group = 1``): ``W`` is ``[out, C * prod(k)]`` against patches in
  ``(channel, *kernel)`` order, so ``B`` reshaped to ``[r, C, *k]`` is a convolution with
  the layer's own geometry (strides, pads, dilations, ``auto_pad``), without bias, giving
  ``low`` (``r`` channels at the output's resolution); the node becomes a 1x1 convolution
  (``U`` as ``[out, r, 1, ..., 1]``, strides and dilations 1, no padding) of ``low`` with
  its own bias.

``B`` (as ``B^T`` or as a kernel) is one initializer per basis key, read by every
member's new node; each ``U`` one initializer per layer, read by all its nodes. The
layer's old weight, and the ``Identity``/``Transpose``/``Cast`` nodes that fed it, are
removed once nothing reads them, so the model's unique parameters fall by exactly
what :attr:`lfpass.core.plan.Factored.saved` predicts. Every factor is checked against
the graph before anything is written: a refusal leaves the model as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from lfpass.core.errors import PlanError
from lfpass.onnx.lowrank import _ONNX_DOMAINS, _as_read, _attr, _nodes_of, _oi
from lfpass.onnx.rewrite import FreshNames, _remove_dead, add_initializer
from lfpass.onnx.sites import constant_source

if TYPE_CHECKING:
    from lfpass.core.bases import Factor
    from lfpass.core.lowrank import Member

log = logging.getLogger(__name__)


@dataclass
class _Site:
    """One node of a factored layer, checked, with what it will read."""

    node: ir.Node
    up: np.ndarray  # the layer's coefficients as this node reads its weight
    form: str  # how: "in_out" (MatMul, Gemm without transB), "out_in" (Gemm with transB) or "conv"
    patch: tuple[int, ...] = ()  # a Conv's (in_channels, *kernel)


@dataclass
class _Basis:
    """One basis key: the tensor its members' new nodes read, and how it is read."""

    array: np.ndarray  # B^T ([in, r]) for MatMul / Gemm, B as a kernel ([r, C, *k]) for Conv
    conv: bool
    anchor: Member  # the first member, which names it
    down: np.ndarray  # the core's [r, in] factor, to check that every member gave the same
    value: ir.Value | None = None


def factor_layers(model: ir.Model, factors: Sequence[Factor]) -> int:
    """Write each factor's layer in ``model`` as ``up(down(x))`` with its own bias (in place);
    factors of one ``basis`` key read one ``down`` initializer. Returns the layers written.
    Every factor is checked before the first write (errors name the layer)."""
    graph = model.graph
    by_name = {node.name: node for node in graph if node.name}
    bases: dict[str, _Basis] = {}
    planned: list[tuple[Factor, list[_Site]]] = []
    seen: set[str] = set()
    owners: dict[int, str] = {}  # node -> the layer that rewrites it
    for f in factors:
        m = f.member
        if m.layer in seen:
            raise PlanError(f"layer {m.layer!r} is factored twice")
        seen.add(m.layer)
        nodes = _nodes_of(graph, m, by_name)
        for node in nodes:
            if owners.setdefault(id(node), m.layer) != m.layer:
                raise PlanError(f"layer {m.layer!r}: node {node.name!r} is also layer {owners[id(node)]!r}")
        sites = [_plan_node(node, f) for node in nodes]
        _plan_basis(bases, f, sites)
        planned.append((f, sites))

    names = FreshNames(model)
    node_names = {node.name for node in graph if node.name}
    old: list[ir.Value] = []
    for f, sites in planned:
        m = f.member
        basis = bases[f.basis]
        if basis.value is None:
            basis.value = add_initializer(graph, names.fresh(f"{basis.anchor.layer}.basis"),
                                          np.ascontiguousarray(basis.array))
        ups: dict[str, ir.Value] = {}  # one per orientation the layer's nodes read (one, in practice)
        for site in sites:
            if site.form not in ups:
                ups[site.form] = add_initializer(graph, names.fresh(f"{m.layer}.coeff"),
                                                 np.ascontiguousarray(site.up))
            old.append(site.node.inputs[1])
            _rewrite(graph, site, basis, ups[site.form], m, names, node_names)
    removed = _remove_dead(graph, old)
    log.info("factored %d layers through %d bases; removed %d dead tensors and nodes", len(planned), len(bases),
             removed)
    return len(planned)


# -- checking, before any write -----------------------------------------------------------------------

def _plan_node(node: ir.Node, f: Factor) -> _Site:
    """``node`` checked as a layer that ``f`` fits, with the coefficients it will read."""
    m, op = f.member, node.op_type
    if node.domain not in _ONNX_DOMAINS or op not in ("MatMul", "Gemm", "Conv"):
        raise PlanError(f"layer {m.layer!r}: a {op} node cannot be factored (MatMul, Gemm, Conv only)")
    if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
        raise PlanError(f"layer {m.layer!r}: node {node.name!r} has no input or weight")
    if op == "MatMul" and isinstance(constant_source(node.inputs[0]), tuple):
        raise PlanError(f"layer {m.layer!r}: its weight multiplies from the left, so it cannot be factored")
    if op == "Gemm" and _attr(node, "transA", 0):
        raise PlanError(f"layer {m.layer!r}: a Gemm with transA cannot be factored")
    if op == "Conv" and _attr(node, "group", 1) != 1:
        raise PlanError(f"layer {m.layer!r}: a grouped Conv (group={_attr(node, 'group', 1)}) cannot be factored")
    if not isinstance(constant_source(node.inputs[1]), tuple):
        raise PlanError(f"layer {m.layer!r}: node {node.name!r} does not read a constant weight")
    read = _as_read(node.inputs[1])
    if op != "Conv" and read.ndim != 2:
        raise PlanError(f"layer {m.layer!r}: a {read.ndim}-D weight cannot be factored")
    if op == "Conv" and read.ndim < 3:
        raise PlanError(f"layer {m.layer!r}: a Conv weight of shape {read.shape} cannot be factored")
    out, in_ = _oi(node, read).shape
    down, up = np.asarray(f.down), np.asarray(f.up)
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0] or up.shape[0] != out \
            or down.shape[1] != in_:
        raise PlanError(f"layer {m.layer!r}: factors up {up.shape} and down {down.shape} do not fit its weight, "
                        f"{out}x{in_} as a matrix")
    up = up.astype(read.dtype, copy=False)  # the node reads its weight in this dtype (after any Cast)
    if op == "Conv":
        return _Site(node, up.reshape((out, up.shape[1]) + (1,) * (read.ndim - 2)), "conv", tuple(read.shape[1:]))
    if op == "Gemm" and _attr(node, "transB", 0):
        return _Site(node, up, "out_in")
    return _Site(node, up.T, "in_out")


def _plan_basis(bases: dict[str, _Basis], f: Factor, sites: list[_Site]) -> None:
    """Record ``f``'s basis, or check it against the one its key already has."""
    m = f.member
    down = np.asarray(f.down)
    for site in sites:
        conv = site.form == "conv"
        array = down.astype(site.up.dtype, copy=False)
        array = array.reshape((down.shape[0], *site.patch)) if conv else array.T
        known = bases.get(f.basis)
        if known is None:
            bases[f.basis] = _Basis(array, conv, m, down)
            continue
        if known.conv != conv or known.array.shape != array.shape or known.array.dtype != array.dtype:
            raise PlanError(f"layer {m.layer!r} cannot share basis {f.basis!r} with {known.anchor.layer!r}: "
                            f"it would read it as {array.dtype.name} {array.shape}, not "
                            f"{known.array.dtype.name} {known.array.shape}")
        if known.down is not down and not np.array_equal(known.down, down):
            raise PlanError(f"layer {m.layer!r} gives basis {f.basis!r} other values than {known.anchor.layer!r}")


# -- writing ----------------------------------------------------------------------------------------------

def _rewrite(graph: ir.Graph, site: _Site, basis: _Basis, up: ir.Value, m: Member, names: FreshNames,
             node_names: set[str]) -> None:
    node, x = site.node, site.node.inputs[0]
    r = basis.array.shape[0] if basis.conv else basis.array.shape[1]
    base = node.name or m.layer
    low = ir.Value(name=names.fresh(f"{base}.low"), type=x.type or up.type)
    if basis.conv:
        attrs = dict(node.attributes.items())
        new = ir.node("Conv", [x, basis.value], attrs, name=_node_name(f"{base}/lfpass_basis", node_names),
                      outputs=[low])
        shape = node.outputs[0].shape
        if shape is not None and len(shape) >= 2:
            low.shape = ir.Shape([shape[0], r, *shape.dims[2:]])
        nd = len(site.patch) - 1
        node.attributes.pop("auto_pad", None)
        for key, value in (("kernel_shape", [1] * nd), ("strides", [1] * nd), ("pads", [0] * (2 * nd)),
                           ("dilations", [1] * nd)):
            node.attributes[key] = ir.AttrInt64s(key, value)
    else:
        new = ir.node("MatMul", [x, basis.value], name=_node_name(f"{base}/lfpass_basis", node_names),
                      outputs=[low])
        if x.shape is not None and len(x.shape) >= 1:
            low.shape = ir.Shape([*x.shape.dims[:-1], r])
    graph.insert_before(node, new)
    node.replace_input_with(0, low)
    node.replace_input_with(1, up)


def _node_name(base: str, used: set[str]) -> str:
    name, k = base, 1
    while name in used:
        k += 1
        name = f"{base}{k}"
    used.add(name)
    return name
