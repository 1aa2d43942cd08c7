"""Alignment spaces of an ONNX graph (onnx-ir), and alignment in place on its initializers.

A ``"permute"`` space joins producers and consumers by a simple chain:
``MatMul`` (+ ``Add`` bias), ``Gemm`` or ``Conv`` -> elementwise ops (``Relu``,
``Gelu``, the exporters' erf-GELU ``Div``/``Erf``/``Add``/``Mul``, ``Sigmoid``,
``Tanh``, a ``Mul`` gate of two producers; constants only as scalars), with
an optional ``BatchNormalization`` whose four vectors then move too -> the
consumers' ``MatMul``/``Gemm``/``Conv``. Anything else on the way means no
space, and the reason is kept. Attention heads are not found here (FX only).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from lfpass.core.align import Move, Skipped, Space, collect
from lfpass.core.sites import Site
from lfpass.onnx.sites import OnnxSites, constant_source, find_sites, tensor_of

_ELEMENTWISE = {"Relu", "Gelu", "Erf", "Sigmoid", "Tanh", "Mul", "Add", "Sub", "Div", "Identity", "Dropout",
                "LeakyRelu", "Elu", "Softplus", "HardSigmoid", "HardSwish", "Neg", "Exp", "Pow", "Celu", "Selu",
                "Mish", "Softsign", "Clip"}


class _Layer:
    def __init__(self, site: Site, node: ir.Node, out: ir.Value, out_axis: int, in_axis: int, width: int,
                 fan_in: int):
        self.site, self.node, self.out = site, node, out
        self.out_axis, self.in_axis, self.width, self.fan_in = out_axis, in_axis, width, fan_in


def _layer(site: Site, node: ir.Node, found: OnnxSites) -> _Layer | str:
    sig = dict(site.signature)
    shape = sig["shape"]
    if sig.get("via"):
        return f"{site.name}: its weight is read through {', '.join(sig['via'])}"
    if node.op_type == "Conv":
        if sig.get("group", 1) != 1:
            return f"{site.name}: a grouped convolution"
        return _Layer(site, node, node.outputs[0], 0, 1, shape[0], shape[1])
    if node.op_type == "Gemm":
        if sig.get("transA"):
            return f"{site.name}: Gemm with transA"
        out_axis = 0 if sig.get("transB") else 1
        return _Layer(site, node, node.outputs[0], out_axis, 1 - out_axis, shape[out_axis], shape[1 - out_axis])
    if node.op_type == "MatMul" and sig.get("side") == "right" and len(shape) == 2:
        out = node.outputs[0]
        if len(site.tensors) > 1:  # the bias Add's output is the layer's output
            out = next(iter(out.uses())).node.outputs[0]
        return _Layer(site, node, out, 1, 0, shape[1], shape[0])
    return f"{site.name}: a {node.op_type} layer is not aligned"


class _Graph:
    def __init__(self, model: ir.Model):
        self.model = model
        self.found = find_sites(model)
        nodes = {n.name: n for n in model.graph}
        self.by_out: dict[ir.Value, _Layer] = {}
        self.by_node: dict[ir.Node, _Layer | str] = {}
        self.reasons: dict[str, str] = {}
        for site in self.found.sites:
            where = site.location.split(",")
            if len(where) != 1 or where[0] not in nodes:
                self.reasons[site.name] = "its weight is read by several nodes"
                continue
            layer = _layer(site, nodes[where[0]], self.found)
            self.by_node[nodes[where[0]]] = layer
            if isinstance(layer, str):
                self.reasons[site.name] = layer
            else:
                self.by_out[layer.out] = layer


def _scalar(value: ir.Value) -> bool:
    found = constant_source(value, allow=("Identity", "Cast"))
    return isinstance(found, tuple) and tensor_of(found[0]).size == 1


def _region(g: _Graph, start: _Layer) -> Space | str:
    producers, consumers, norms = [start], [], []
    values, queue = {start.out}, [start.out]
    while queue:
        value = queue.pop()
        if value.is_graph_output():
            return f"{value.name} is a graph output"
        for use in value.uses():
            node = use.node
            layer = g.by_node.get(node)
            if layer is not None:
                if isinstance(layer, str):
                    return layer
                if use.idx != 0:
                    return f"{node.name} reads it, but not as its input"
                if layer not in consumers:
                    consumers.append(layer)
                continue
            if node.op_type == "BatchNormalization" and use.idx == 0:
                holders = [constant_source(v, allow=("Identity",)) for v in node.inputs[1:5]]
                if not all(isinstance(h, tuple) for h in holders) or len(node.outputs) > 1 \
                        and any(o.uses() for o in node.outputs[1:]):
                    return f"{node.name}: a BatchNormalization without stored statistics"
                norms.append([h[0].name for h in holders])
            elif node.op_type in _ELEMENTWISE:
                why = _back(g, node, values, queue, producers)
                if why:
                    return why
            else:
                return f"{node.name} ({node.op_type}) uses it"
            for out in node.outputs[:1]:
                if out not in values:
                    values.add(out)
                    queue.append(out)
    if not consumers:
        return "its output reaches no layer"
    width = start.width
    moves: list[Move] = []
    for i, p in enumerate(producers):
        if p.width != width:
            return f"producers of different widths ({p.site.name})"
        moves.append(Move(f"p{i}.weight", p.site.weight, p.out_axis, "producer", p.site.name))
        if len(p.site.tensors) > 1:
            moves.append(Move(f"p{i}.bias", p.site.tensors[1], 0, "bias", p.site.name))
    for j, names in enumerate(norms):
        moves += [Move(f"bn{j}.{v}", n, 0, "norm") for v, n in zip(("weight", "bias", "mean", "var"), names)]
    for k, c in enumerate(consumers):
        if c.fan_in != width:
            return f"{c.site.name} reads {c.fan_in} features, not the {width} made"
        moves.append(Move(f"c{k}.weight", c.site.weight, c.in_axis, "consumer", c.site.name))
    return Space(producers[0].site.name, "permute", width, tuple(moves), tuple(p.site.name for p in producers),
                 tuple(c.site.name for c in consumers))


def _back(g: _Graph, node: ir.Node, values: set, queue: list, producers: list) -> str | None:
    """Every input of an elementwise node is in the space, a scalar, another producer's output, or
    made by elementwise ops from those (the erf-GELU's ``Erf(x / sqrt 2) + 1``)."""
    todo = [node]
    while todo:
        current = todo.pop()
        for other in current.inputs:
            if other is None or other in values or _scalar(other):
                continue
            maker = other.producer()
            if other in g.by_out:
                producers.append(g.by_out[other])
            elif maker is not None and maker.op_type in _ELEMENTWISE and maker not in g.by_node:
                todo.append(maker)
            else:
                return (f"{current.name or current.op_type} ({current.op_type}) also reads {other.name}, "
                        "which no layer of this space makes")
            values.add(other)
            queue.append(other)
    return None


def find_spaces(model: ir.Model, skipped: list[Skipped] | None = None) -> list[Space]:
    """Every permute space of the main graph; layers whose output is none are added to ``skipped``."""
    return _find(_Graph(model), skipped)


def _find(g: _Graph, skipped: list[Skipped] | None) -> list[Space]:
    return collect(((layer.site.name, _region(g, layer)) for layer in g.by_out.values()), reasons=g.reasons,
                   skipped=skipped)


def spaces_of(model: ir.Model, skipped: list[Skipped]) -> tuple[list[Space], dict[str, Site]]:
    """``model``'s alignment spaces and the sites they were found with, by name."""
    g = _Graph(model)
    return _find(g, skipped), g.found.by_name()


def _holders(model: ir.Model) -> dict[str, ir.Value]:
    """Every stored tensor by name: initializers, and the outputs of ``Constant`` nodes (a
    converter's weights are often those)."""
    out = {n.outputs[0].name: n.outputs[0] for n in model.graph
           if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and "value" in n.attributes}
    out.update(model.graph.initializers)
    return out


def read_tensors(model: ir.Model, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The named stored tensors of ``model`` (initializers or ``Constant`` nodes) as float64 arrays."""
    holders = _holders(model)
    return {n: np.asarray(tensor_of(holders[n]).numpy(), dtype=np.float64) for n in names}


def write_tensors(model: ir.Model, arrays: Mapping[str, np.ndarray]) -> None:
    """Store float64 ``arrays`` into ``model``'s tensors of those names, each in its own dtype."""
    holders = _holders(model)
    for name, array in arrays.items():
        holder = holders[name]
        tensor = ir.tensor(array.astype(tensor_of(holder).numpy().dtype), name=name)
        if holder.is_initializer():
            holder.const_value = tensor
        else:
            holder.producer().attributes["value"] = ir.AttrTensor("value", tensor)
            if holder.const_value is not None:
                holder.const_value = tensor
