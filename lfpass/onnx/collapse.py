"""Depth collapse in ONNX: a graph's residual blocks, their influence, and their removal.

A block is the set of nodes whose module path (the legacy exporter's node name,
the dynamo exporter's ``namespace`` metadata: :mod:`lfpass.onnx.names`) lies
under one indexed child of a container, ``encoder.layer.3`` say, the container
being the one the layer sites' names index at their last numeric component. A
block is removable when it reads exactly one value no other block reads (its
stream input) and exactly one of its values is read outside it (its stream
output), of the same shape: removing it re-points every reader of the output to
the input, and drops its nodes and the tensors only they read. The influence
(``1 - cos`` per position between the two) is measured by exposing both as
outputs of a copy run in onnxruntime. Planning is :mod:`lfpass.core.collapse`'s.

Files whose names say nothing of modules (converters such as Paddle2ONNX write
``conv2d_52.w_0``) are read by their structure instead: every ``Add`` of a value
and a branch computed from it, ``x + f(x)``, is a residual span, the branch's
nodes between ``x`` and the ``Add`` (a transformer's attention or MLP sublayer,
a ResNet block with an identity shortcut), when nothing outside reads them and
they hold weights. Spans inside a larger one are not listed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx_ir as ir

from lfpass.core.collapse import Block, enclosing, influence_of
from lfpass.core.errors import PlanError
from lfpass.core.sites import Site
from lfpass.onnx.names import from_namespace, from_node_name
from lfpass.onnx.runtime import exposing, session
from lfpass.onnx.sites import stored


@dataclass
class Span:
    """One block of the graph: its nodes, and its stream input and output (None: not removable)."""

    block: Block
    nodes: list[ir.Node]
    stream_in: ir.Value | None
    stream_out: ir.Value | None


def _dotted(path: str | None) -> str:
    return (path or "").strip("/").replace("/", ".")


def _path(node: ir.Node) -> str:
    return _dotted(from_node_name(node) or from_namespace(node))


def find_spans(model: ir.Model, sites: Sequence[Site]) -> list[Span]:
    """The blocks of ``model``'s main graph, in graph order, with their nodes and streams."""
    prefixes: dict[str, int] = {}
    layers: dict[str, list[str]] = {}
    for site in sites:
        path = _dotted(site.name)
        name = next((p for p in enclosing(path) if p != path), None)  # a layer alone is no block: p2o.Conv.12
        if name is not None:
            prefixes[name] = prefixes.get(name, 0) + (0 if site.parts else site.numel)
            layers.setdefault(name, []).append(site.name)
    if not prefixes:
        return residual_spans(model, sites)
    graph = model.graph
    members: dict[str, list[ir.Node]] = {name: [] for name in prefixes}
    for node in graph:
        path = _path(node) + "."
        owner = next((p for p in prefixes if path.startswith(p + ".")), None)
        if owner is not None:
            members[owner].append(node)
    readers_of: dict[int, set[str]] = {}
    for name, nodes in members.items():
        for n in nodes:
            for v in n.inputs:
                if v is not None and v.const_value is None and not v.is_initializer():
                    readers_of.setdefault(id(v), set()).add(name)
    spans = []
    outputs = set(map(id, graph.outputs))
    for name, nodes in members.items():
        if not nodes:
            continue
        mine = set(map(id, nodes))
        read = {id(v): v for n in nodes for v in n.inputs
                if v is not None and v.const_value is None and not v.is_initializer()
                and (v.producer() is None or id(v.producer()) not in mine)}
        stream_in = [v for k, v in read.items() if readers_of.get(k) == {name}]
        leaving = {id(o): o for n in nodes for o in n.outputs
                   if id(o) in outputs or any(id(u.node) not in mine for u in o.uses())}
        params = _own_params(nodes, mine)
        block = Block(name, params, prefixes[name], tuple(layers[name]))
        ok = len(stream_in) == 1 and len(leaving) == 1
        spans.append(Span(block, nodes, stream_in[0] if ok else None, next(iter(leaving.values())) if ok else None))
    return spans


def residual_spans(model: ir.Model, sites: Sequence[Site]) -> list[Span]:
    """The ``x + f(x)`` spans of ``model``'s main graph, in graph order, each named by its ``Add``'s
    output: the nodes computing ``f(x)`` from ``x`` (others they read, a mask say, stay), closed
    (only the ``Add`` reads them) and holding weights; none inside another."""
    graph = model.graph
    nodes = list(graph)
    index = {id(n): i for i, n in enumerate(nodes)}
    found = []
    for add in nodes:
        if add.op_type != "Add" or len(add.inputs) != 2 or not all(map(_dynamic, add.inputs)):
            continue
        for skip, branch in (add.inputs, reversed(add.inputs)):
            body = _branch(skip, branch)
            if body:
                break
        else:
            continue
        mine = set(map(id, body)) | {id(add)}
        if any(o in graph.outputs or any(id(u.node) not in mine for u in o.uses()) for n in body for o in n.outputs):
            continue  # read outside: removing it would cut something else
        params = _own_params(body, mine)
        if not params:
            continue
        body = sorted(body, key=lambda n: index[id(n)]) + [add]
        inside = _sites_within(body, mine, sites)
        found.append((mine, Span(Block(add.outputs[0].name or f"add.{index[id(add)]}", params,
                                       sum(s.numel for s in inside), tuple(s.name for s in inside)),
                                 body, skip, add.outputs[0])))
    return [span for mine, span in found if not any(mine < other for other, _ in found)]


def _dynamic(value: ir.Value | None) -> bool:
    return value is not None and stored(value) is None and not value.is_initializer()


def _branch(skip: ir.Value, branch: ir.Value) -> list[ir.Node]:
    """The nodes on the paths from ``skip`` to ``branch`` (empty when ``branch`` does not depend on it)."""
    seen: dict[int, ir.Node] = {}
    stack = [branch.producer()]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node
        stack.extend(v.producer() for v in node.inputs if _dynamic(v) and v is not skip)
    reaches: dict[int, bool] = {}

    def reach(node: ir.Node) -> bool:  # iterative: deep graphs overflow recursion
        todo = [node]
        while todo:
            n = todo[-1]
            if id(n) in reaches:
                todo.pop()
                continue
            ins = [v.producer() for v in n.inputs if _dynamic(v) and v is not skip and v.producer() is not None
                   and id(v.producer()) in seen]
            pending = [m for m in ins if id(m) not in reaches]
            if pending:
                todo.extend(pending)
                continue
            reaches[id(n)] = any(v is skip for v in n.inputs) or any(reaches[id(m)] for m in ins)
            todo.pop()
        return reaches[id(node)]

    return [n for n in seen.values() if reach(n)]


def _sites_within(nodes: list[ir.Node], mine: set[int], sites: Sequence[Site]) -> list[Site]:
    """The plannable layers whose tensors only these nodes read."""
    own = {v.name for n in nodes for v in n.inputs
           if v is not None and stored(v) is not None and all(id(u.node) in mine for u in v.uses())}
    return [s for s in sites if not s.parts and s.tensors and set(s.tensors) <= own]


def _own_params(nodes: list[ir.Node], mine: set[int]) -> int:
    """Elements of the stored tensors (initializers, ``Constant`` nodes) only these nodes read."""
    total, seen = 0, set()
    for n in nodes:
        for v in n.inputs:
            if v is None or id(v) in seen or stored(v) is None:
                continue
            seen.add(id(v))
            if all(id(u.node) in mine for u in v.uses()):
                total += int(np.prod(stored(v).shape))
    return total


def span_influence(model: ir.Model, spans: Sequence[Span], feeds: Sequence[dict[str, np.ndarray]]) -> dict[str, float]:
    """Each block's influence on ``feeds`` (NaN where it is not removable)."""
    probes = {v: ir.DataType.FLOAT for s in spans if s.stream_in is not None for v in (s.stream_in, s.stream_out)}
    sess = session(exposing(model, probes))
    names = [o.name for o in sess.get_outputs()]
    runs = [dict(zip(names, sess.run(None, feed))) for feed in feeds]
    fed = lambda v, run, feed: feed[v.name] if v.name in feed else run[v.name]  # noqa: E731
    out = {}
    for s in spans:
        if s.stream_in is None:
            out[s.block.name] = float("nan")
            continue
        xs = [np.asarray(fed(s.stream_in, r, f)) for r, f in zip(runs, feeds)]
        ys = [np.asarray(fed(s.stream_out, r, f)) for r, f in zip(runs, feeds)]
        if any(x.shape != y.shape for x, y in zip(xs, ys)):
            out[s.block.name] = float("nan")
        else:
            out[s.block.name] = influence_of(xs, ys)
    return out


def remove_spans(model: ir.Model, sites: Sequence[Site], names: Sequence[str]) -> None:
    """Remove the named blocks of ``model`` (a copy), in place: their output's readers read their
    input, their nodes and the tensors only they read go."""
    found = find_spans(model, sites)
    spans = {s.block.name: s for s in found}
    depth = {s.block.name: i for i, s in enumerate(found)}
    graph = model.graph
    for name in sorted(names, key=lambda n: -depth.get(n, -1)):  # deepest first: each one's input is still there
        span = spans.get(name)
        if span is None or span.stream_in is None:
            raise PlanError(f"block {name!r} cannot be removed from this graph (no single stream in and out)")
        out, source = span.stream_out, span.stream_in
        if out in graph.outputs:  # a graph output keeps its name: an Identity passes the stream on
            identity = ir.node("Identity", [source])
            graph.insert_after(span.nodes[-1], identity)
            keep = out.name
            out.name = None
            graph.outputs[list(graph.outputs).index(out)] = identity.outputs[0]
            identity.outputs[0].name, identity.outputs[0].type, identity.outputs[0].shape = keep, out.type, out.shape
        else:
            out.replace_all_uses_with(source)
        for node in reversed(span.nodes):
            for o in node.outputs:
                if o.uses():
                    raise PlanError(f"block {name!r}: {o.name!r} is read outside the block")
            graph.remove(node, safe=True)
    for node in list(graph):  # the Constant nodes only removed blocks read
        if node.op_type == "Constant" and not any(o.uses() or o in graph.outputs for o in node.outputs):
            graph.remove(node, safe=True)
    for value in list(graph.initializers.values()):
        if not value.uses() and value not in graph.outputs:
            del graph.initializers[value.name]
