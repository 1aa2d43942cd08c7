"""Alignment spaces of a torch.fx graph, found from its data flow, and alignment in place.

A ``"permute"`` space is the set of values between producers and consumers
joined only by elementwise ops: from a layer's output, every user must be an
elementwise op (an activation, dropout, a product or sum with a scalar or with
another producer's output: a gated MLP's gate and up move together), an
eval-mode BatchNorm (whose four vectors then move too), or a layer reading it
as its input (a consumer). Anything else (a residual add into the stream, a
LayerNorm, a reduction, a reshape, a graph output) means no space, and the
reason is kept.

A ``"heads"`` space is found at each attention core
(``scaled_dot_product_attention``, or ``matmul -> softmax -> matmul``): Q, K
and V must come straight from linear layers through a view that splits their
features into ``[heads, head_dim]`` and transposes, and the core's output must
go back through transposes and a reshape that joins ``[heads, head_dim]`` to a
linear layer (O). Anything else on the way (rotary embeddings, a packed q/k/v
split, a per-head bias) means no space, with the reason.

Names are shared between a module and its trace or export, so
:func:`align_fx` finds spaces on the graph and writes the moved tensors into
the module's own parameters and buffers, in place, by name.
"""

from __future__ import annotations

import contextlib
import logging
import operator
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from lfpass.core.align import Move, Skipped, Space, collect
from lfpass.core.errors import TraceError
from lfpass.core.sites import Site
from lfpass.fx.sites import FUNCTIONAL, bind_args, find_sites, tensor_names, to_torch

log = logging.getLogger(__name__)

aten = torch.ops.aten

_UNARY = {
    aten.relu.default, aten.gelu.default, aten.silu.default, aten.sigmoid.default, aten.tanh.default,
    aten.erf.default, aten.neg.default, aten.exp.default, aten.leaky_relu.default, aten.hardtanh.default,
    aten.hardswish.default, aten.hardsigmoid.default, aten.elu.default, aten.softplus.default, aten.mish.default,
    aten.relu6.default, aten.clamp.default, aten.dropout.default, aten.clone.default, aten.alias.default,
    aten.detach.default, aten.contiguous.default, aten.pow.Tensor_Scalar, aten.square.default,
    aten.mul.Scalar, aten.add.Scalar, aten.sub.Scalar, aten.div.Scalar, aten.rsub.Scalar, aten.feature_dropout.default,
    torch.relu, torch.sigmoid, torch.tanh, torch.erf, torch.exp, torch.neg, torch.clamp, torch.square,
    F.relu, F.gelu, F.silu, F.sigmoid, F.tanh, F.dropout, F.leaky_relu, F.hardtanh, F.hardswish, F.elu,
    F.softplus, F.mish, F.relu6, F.celu, F.selu, F.hardsigmoid, F.softsign, F.tanhshrink, F.logsigmoid,
}
_BINARY = {
    aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor, torch.mul, torch.add, torch.sub,
    torch.div, operator.mul, operator.add, operator.sub, operator.truediv, operator.neg,
}
_METHODS = {"relu", "sigmoid", "tanh", "mul", "add", "sub", "div", "neg", "exp", "clamp", "contiguous", "clone",
            "detach", "pow", "square", "__mul__", "__add__", "__sub__", "__truediv__", "__rmul__", "__radd__"}
_NOT_ELEMENTWISE_MODULES = (nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.Softmax2d, nn.MultiheadAttention, nn.GLU,
                            nn.PReLU)
_ELEMENTWISE_MODULES = (nn.Dropout, nn.Identity, nn.AlphaDropout)
_RESHAPE = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, torch.reshape}
_RESHAPE_METHODS = {"view", "reshape"}
_TRANSPOSE = {aten.transpose.int, torch.transpose, aten.permute.default, torch.permute}
_TRANSPOSE_METHODS = {"transpose", "permute"}
_HEAD_PASS = {aten.contiguous.default, aten.clone.default, aten.alias.default, aten.mul.Scalar, aten.div.Scalar,
              aten.mul.Tensor, aten.div.Tensor, operator.mul, operator.truediv, torch.mul, torch.div}
_SDPA = {aten.scaled_dot_product_attention.default, F.scaled_dot_product_attention}
_MATMUL = {aten.matmul.default, torch.matmul, operator.matmul, aten.bmm.default, torch.bmm}
_SCORE_OPS = {aten.softmax.int, aten._softmax.default, torch.softmax, F.softmax, aten.dropout.default, F.dropout,
              aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar,
              operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.mul, torch.div,
              aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten._to_copy.default, aten.to.dtype,
              aten.clone.default, aten.contiguous.default}
_SCORE_METHODS = {"softmax", "masked_fill", "to", "type_as", "float", "contiguous"}
_BATCH_NORM_ATEN = {aten._native_batch_norm_legit_no_training.default: (1, 2, 3, 4),
                    aten.batch_norm.default: (1, 2, 3, 4)}  # weight, bias, running_mean, running_var


@dataclass(frozen=True)
class _Layer:
    site: Site
    node: fx.Node
    out_axis: int
    in_axis: int
    width: int  # output size
    fan_in: int  # input size (channels for a convolution)


class _Graph:
    """A GraphModule with its sites indexed by node, and its tensors by canonical name."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.found = find_sites(gm)
        canonical, self.tensors, _ = tensor_names(gm)
        self.canonical = canonical
        nodes = {n.name: n for n in gm.graph.nodes}
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.layers: dict[fx.Node, _Layer | str] = {}
        for site in self.found.sites:
            where = site.location.split(",")
            layer = self._layer(site, nodes[where[0]]) if len(where) == 1 and where[0] in nodes else \
                f"{site.name}: its weight is used at {len(where)} places"
            for w in where:
                if w in nodes:
                    self.layers[nodes[w]] = layer

    def _layer(self, site: Site, node: fx.Node) -> _Layer | str:
        sig = dict(site.signature)
        shape = sig["shape"]
        if site.kind == "conv_transpose":
            return f"{site.name}: a transposed convolution (not aligned)"
        if site.kind == "conv":
            if sig.get("groups", 1) != 1:
                return f"{site.name}: a grouped convolution (its channels do not move freely)"
            return _Layer(site, node, 0, 1, shape[0], shape[1])
        layout = sig.get("layout")
        if layout == "out_in":
            return _Layer(site, node, 0, 1, shape[0], shape[1])
        if layout == "in_out":
            return _Layer(site, node, 1, 0, shape[1], shape[0])
        return f"{site.name}: weight multiplies from the left (not aligned)"

    def name_of(self, node: fx.Node) -> str | None:
        """The canonical tensor name a ``get_attr`` node reads."""
        if node.op != "get_attr":
            return None
        try:
            t = self.gm.get_parameter(node.target)
        except AttributeError:
            try:
                t = self.gm.get_buffer(node.target)
            except AttributeError:
                return None
        return self.canonical.get(id(t))

    def input_of(self, node: fx.Node) -> fx.Node | None:
        """The activation a layer node reads."""
        if node.op == "call_module":
            x = node.args[0] if node.args else node.kwargs.get("input")
            return x if isinstance(x, fx.Node) else None
        op = FUNCTIONAL.get(node.target, node.target)
        a = bind_args(op, node.args, node.kwargs)
        if op is aten.addmm.default:
            return a["mat1"]
        if "input" in a:
            return a["input"]
        return a.get("self")

    def layer(self, node: fx.Node) -> _Layer | str | None:
        return self.layers.get(node)

    def is_scalar_const(self, node: fx.Node) -> bool:
        name = self.name_of(node)
        return name is not None and self.tensors[name].numel() == 1

    def shape(self, node: fx.Node) -> tuple[int, ...] | None:
        val = node.meta.get("val", node.meta.get("tensor_meta"))
        shape = getattr(val, "shape", None)
        try:
            return tuple(int(s) for s in shape) if shape is not None else None
        except (TypeError, ValueError):
            return None


def _describe(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.name} ({target})"


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: out.append(n))
    return out


def _module(g: _Graph, node: fx.Node) -> nn.Module | None:
    return g.gm.get_submodule(node.target) if node.op == "call_module" else None


def _elementwise(g: _Graph, node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _UNARY or node.target in _BINARY
    if node.op == "call_method":
        return node.target in _METHODS
    mod = _module(g, node)
    if mod is None or isinstance(mod, _NOT_ELEMENTWISE_MODULES):
        return False
    if isinstance(mod, _ELEMENTWISE_MODULES):
        return True
    kind = type(mod)
    elementwise = kind.__module__ == "torch.nn.modules.activation" or kind.__name__.endswith("Activation")
    return elementwise and not any(True for _ in mod.parameters())


def _batch_norm(g: _Graph, node: fx.Node) -> tuple[fx.Node, list[tuple[str, str]]] | str | None:
    """``(input, [(vector, tensor name)])`` for an eval-mode BatchNorm; a reason when it is one that
    cannot move (training, no running statistics); None when the node is no BatchNorm."""
    vectors = ("weight", "bias", "running_mean", "running_var")
    mod = _module(g, node)
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        if mod.training or not mod.track_running_stats:
            return f"{_describe(node)} is a BatchNorm in training mode"
        names = [(v, g.canonical[id(getattr(mod, v))]) for v in vectors if getattr(mod, v, None) is not None]
        return node.args[0], names
    if node.op == "call_function" and node.target in _BATCH_NORM_ATEN:
        if node.target is aten.batch_norm.default and node.args[5]:
            return f"{_describe(node)} is a BatchNorm in training mode"
        given, source = {v: node.args[i] for v, i in zip(vectors, _BATCH_NORM_ATEN[node.target])}, node.args[0]
    elif node.op == "call_function" and node.target is F.batch_norm:
        a = dict(zip(("input", "running_mean", "running_var", "weight", "bias", "training"), node.args))
        a.update(node.kwargs)
        if a.get("training"):
            return f"{_describe(node)} is a BatchNorm in training mode"
        given, source = {v: a.get(v) for v in vectors}, a["input"]
    else:
        return None
    names = []
    for v, arg in given.items():  # the vectors that move with the channels: each a stored tensor, or none
        if arg is None:
            continue
        name = g.name_of(arg) if isinstance(arg, fx.Node) else None
        if name is None:
            return f"{_describe(node)}: its {v} is not a stored tensor"
        names.append((v, name))
    return source, names


class _Region:
    """The values reachable from one producer through elementwise ops, both ways."""

    def __init__(self, g: _Graph, start: fx.Node, width: int, features_last: bool):
        self.g = g
        self.width = width
        self.features_last = features_last
        self.producers: list[fx.Node] = [start]
        self.consumers: list[fx.Node] = []
        self.norms: list[tuple[fx.Node, list[tuple[str, str]]]] = []
        self.nodes: set[fx.Node] = {start}
        self.queue = [start]

    def grow(self) -> str | None:
        """Explore; a reason when the region is not a space."""
        while self.queue:
            node = self.queue.pop()
            if node not in self.producers:
                why = self._back(node)
                if why:
                    return why
            for user in node.users:
                why = self._forward(node, user)
                if why:
                    return why
        if not self.consumers:
            return "its output reaches no layer"
        return None

    def _add(self, node: fx.Node) -> None:
        if node not in self.nodes:
            self.nodes.add(node)
            self.queue.append(node)

    def _back(self, node: fx.Node) -> str | None:
        bn = _batch_norm(self.g, node)
        args = [bn[0]] if isinstance(bn, tuple) else _tensor_args(node)
        for arg in args:
            if arg in self.nodes:
                continue
            layer = self.g.layer(arg)
            if isinstance(layer, _Layer):
                self.producers.append(arg)
                self._add(arg)
            elif _elementwise(self.g, arg) or isinstance(_batch_norm(self.g, arg), tuple) or self._keeps(arg):
                self._add(arg)
            elif self.g.is_scalar_const(arg):
                continue
            else:
                return (f"{_describe(node)} also reads {_describe(arg)}, which no layer of this space makes "
                        "(a residual, or a per-channel constant)")
        return None

    def _forward(self, node: fx.Node, user: fx.Node) -> str | None:
        if user in self.nodes:
            return None
        if user.op == "output":
            return f"{node.name} is a graph output"
        layer = self.g.layer(user)
        if layer is not None:
            if isinstance(layer, str):
                return layer
            if self.g.input_of(user) is not node:
                return f"{_describe(user)} reads it, but not as its input"
            if user not in self.consumers:
                self.consumers.append(user)
            return None
        bn = _batch_norm(self.g, user)
        if isinstance(bn, str):
            return bn
        if bn is not None:
            if bn[0] is not node:
                return f"{_describe(user)} reads it, but not as its input"
            self.norms.append((user, bn[1]))
            self._add(user)
            return None
        if user.op == "call_function" and user.target is operator.getitem and \
                isinstance(_batch_norm(self.g, node), tuple):
            if user.args[1] != 0:
                return f"{_describe(user)} reads a BatchNorm's saved statistics"
            self._add(user)
            return None
        if _elementwise(self.g, user) or self._keeps(user):
            self._add(user)
            return None
        return f"{_describe(user)} uses it"

    def _keeps(self, node: fx.Node) -> bool:
        """A reshape that keeps the feature axis last and whole (``[B, S, F] <-> [B*S, F]``, as
        transformers' ``Conv1D`` does around its ``addmm``)."""
        if not self.features_last or not _is_reshape(node):
            return False
        before, after = self.g.shape(node.args[0]), self.g.shape(node)
        if before is not None and after is not None:
            return before[-1] == after[-1] == self.width
        shape = _shape_arg(node)
        return bool(shape) and shape[-1] == self.width


def _permute_space(g: _Graph, start: fx.Node) -> Space | str:
    layer = g.layer(start)
    if isinstance(layer, str):
        return layer
    region = _Region(g, start, layer.width, layer.site.kind == "linear")
    why = region.grow()
    if why:
        return why
    producers = sorted(region.producers, key=g.order.__getitem__)
    consumers = sorted(region.consumers, key=g.order.__getitem__)
    if set(producers) & set(consumers):
        return "a layer reads its own output space"
    width = layer.width
    moves: list[Move] = []
    for i, p in enumerate(producers):
        lp = g.layer(p)
        if not isinstance(lp, _Layer) or lp.width != width or lp.site.kind != layer.site.kind:
            return f"producers of different widths or kinds ({lp.site.name if isinstance(lp, _Layer) else p.name})"
        moves.append(Move(f"p{i}.weight", lp.site.weight, lp.out_axis, "producer", lp.site.name))
        if len(lp.site.tensors) > 1:
            moves.append(Move(f"p{i}.bias", lp.site.tensors[1], 0, "bias", lp.site.name))
    for j, (_, vectors) in enumerate(sorted(region.norms, key=lambda x: g.order[x[0]])):
        moves += [Move(f"bn{j}.{v}", name, 0, "norm") for v, name in vectors]
        if any(g.tensors[name].shape != (width,) for _, name in vectors):
            return "a BatchNorm over another number of channels"
    for k, c in enumerate(consumers):
        lc = g.layer(c)
        if lc.fan_in != width:
            return f"{lc.site.name} reads {lc.fan_in} features, not the {width} made"
        moves.append(Move(f"c{k}.weight", lc.site.weight, lc.in_axis, "consumer", lc.site.name))
    names = [g.layer(p).site.name for p in producers]
    return Space(names[0], "permute", width, tuple(moves), tuple(names),
                 tuple(g.layer(c).site.name for c in consumers))


# -- attention ------------------------------------------------------------------------------------------

def _is_reshape(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target in _RESHAPE) or (n.op == "call_method" and n.target in _RESHAPE_METHODS)


def _is_transpose(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target in _TRANSPOSE) or \
        (n.op == "call_method" and n.target in _TRANSPOSE_METHODS)


def _is_head_pass(g: _Graph, n: fx.Node) -> bool:
    """An op that leaves a ``[.., heads, .., head_dim]`` layout as it is: a copy, or a scale by a scalar."""
    if n.op == "call_method" and n.target in ("contiguous", "clone", "mul", "div", "__mul__", "__truediv__"):
        pass
    elif not (n.op == "call_function" and n.target in _HEAD_PASS):
        return False
    others = [a for a in _tensor_args(n)[1:]]
    return all(g.is_scalar_const(a) for a in others)


def _shape_arg(n: fx.Node) -> list[Any]:
    args = list(n.args[1:])
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        args = list(args[0])
    return args


def _dims(n: fx.Node, rank: int) -> list[int] | None:
    """A transpose's or permute's new order of the input's dims."""
    args = _shape_arg(n)
    if not all(isinstance(a, int) for a in args):
        return None
    name = n.target if isinstance(n.target, str) else n.target.__name__
    if "transpose" in str(name):
        if len(args) != 2:
            return None
        i, j = args[0] % rank, args[1] % rank
        order = list(range(rank))
        order[i], order[j] = order[j], order[i]
        return order
    return [a % rank for a in args] if len(args) == rank else None


def _relabel(g: _Graph, n: fx.Node, labels: tuple | None, width: int) -> tuple | str:
    """The dim labels after ``n`` (``"F"``: the whole feature axis; ``"H"``, ``"d"``: heads and head_dim)."""
    if _is_head_pass(g, n):
        return labels
    if _is_transpose(n):
        if labels is None or "F" in labels:
            return f"{_describe(n)} transposes before the heads are split"
        order = _dims(n, len(labels))
        return tuple(labels[i] for i in order) if order else f"{_describe(n)}: dims are not constants"
    if _is_reshape(n):
        shape = _shape_arg(n)
        before, after = g.shape(n.args[0]), g.shape(n)
        if before is not None and before == after and labels is not None:
            return labels
        last = shape[-1] if shape else None
        if labels is not None and labels[-1] == "F" and len(shape) >= 2 and isinstance(last, int) and last > 0 \
                and width % last == 0:
            heads = shape[-2]
            if isinstance(heads, int) and heads not in (-1, width // last):
                return f"{_describe(n)} does not split the features into heads"
            return (None,) * (len(shape) - 2) + ("H", "d")
        if labels is not None and labels[-2:] == ("H", "d") and (last == -1 or last == width):
            return (None,) * (len(shape) - 1) + ("F",)
        return f"{_describe(n)} reshapes in a way that is not a split into heads or a join of them"
    return f"{_describe(n)} is on the way"


def _chain_back(g: _Graph, node: fx.Node) -> tuple[fx.Node, list[fx.Node]] | str:
    """Walk back from an attention operand to the linear layer it comes from: ``(layer node, chain)``."""
    chain: list[fx.Node] = []
    while True:
        layer = g.layer(node)
        if isinstance(layer, _Layer):
            break
        if not (_is_reshape(node) or _is_transpose(node) or _is_head_pass(g, node)):
            if node.op == "call_function" and node.target is operator.getitem:
                return (f"{_describe(node)}: q, k and v are split from one packed projection "
                        "(not aligned)")
            return f"{_describe(node)} is between the projection and attention"
        chain.append(node)
        node = node.args[0]
        if not isinstance(node, fx.Node):
            return "the attention operand is no tensor from a layer"
    for n in [node, *chain]:
        if len(n.users) != 1:
            return f"{n.name} has other users than attention"
    return node, chain[::-1]


def _labels_through(g: _Graph, chain: list[fx.Node], width: int) -> tuple | str:
    labels: tuple | None = ("F",)
    for n in chain:
        labels = _relabel(g, n, labels, width)
        if isinstance(labels, str):
            return labels
    return labels


def _head_operand(g: _Graph, node: fx.Node, d_at: int) -> tuple[_Layer, int] | str:
    """``(projection layer, head_dim)`` of an attention operand whose heads sit at -3 and head_dim at
    ``d_at``."""
    found = _chain_back(g, node)
    if isinstance(found, str):
        return found
    layer_node, chain = found
    layer = g.layer(layer_node)
    labels = _labels_through(g, chain, layer.width)
    if isinstance(labels, str):
        return labels
    if len(labels) < 3 or labels[-3] != "H" or labels[d_at] != "d":
        return f"{layer.site.name}: heads are not laid out as [.., heads, tokens, head_dim]"
    d = next((s[-1] for s in (_shape_arg(n) for n in chain if _is_reshape(n)) if s and isinstance(s[-1], int)), None)
    if not d or layer.width % d:
        return f"{layer.site.name}: head_dim is not read from the reshape"
    return layer, d


def _output_layer(g: _Graph, core: fx.Node, width: int) -> _Layer | str:
    """The O projection after the attention core (through transposes and a join of the heads)."""
    labels: tuple | str = (None,) * 1 + ("H", None, "d")
    shape = g.shape(core)
    if shape is not None:
        labels = (None,) * (len(shape) - 3) + ("H", None, "d")
    node = core
    while True:
        if len(node.users) != 1:
            return f"{node.name} has more than one user after attention"
        user = next(iter(node.users))
        layer = g.layer(user)
        if layer is not None:
            if isinstance(layer, str):
                return layer
            if labels != (*labels[:-1], "F") or g.input_of(user) is not node:
                return f"{layer.site.name} does not read the joined heads"
            return layer
        labels = _relabel(g, user, labels, width)
        if isinstance(labels, str):
            return labels
        node = user


def _attention_core(g: _Graph, node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node, int] | str | None:
    """``(q, k, v, k's head_dim position)`` operands of an attention core, None when ``node`` is none."""
    if node.op == "call_function" and node.target in _SDPA:
        if node.kwargs.get("enable_gqa"):
            return "grouped-query attention (heads of K and V are shared)"
        return node.args[0], node.args[1], node.args[2], -1
    is_mm = (node.op == "call_function" and node.target in _MATMUL) or (node.op == "call_method" and node.target == "matmul")
    if not is_mm:
        return None
    probs = node.args[0]
    while isinstance(probs, fx.Node) and not ((probs.op == "call_function" and probs.target in _MATMUL)
                                              or (probs.op == "call_method" and probs.target == "matmul")):
        score_op = (probs.op == "call_function" and probs.target in _SCORE_OPS) or \
            (probs.op == "call_method" and probs.target in _SCORE_METHODS)
        if not score_op:
            return None
        probs = probs.args[0]
    if not isinstance(probs, fx.Node):
        return None
    return probs.args[0], probs.args[1], node.args[1], -2


def _heads_spaces(g: _Graph, core: fx.Node) -> list[Space] | str | None:
    found = _attention_core(g, core)
    if found is None or isinstance(found, str):
        return found
    q, k, v, k_d = found
    parts = [_head_operand(g, q, -1), _head_operand(g, k, k_d), _head_operand(g, v, -1)]
    for p in parts:
        if isinstance(p, str):
            return p
    (lq, dq), (lk, dk), (lv, dv) = parts
    if not (lq.width == lk.width and dq == dk):
        return f"{lq.site.name} and {lk.site.name}: Q and K heads differ"
    if lq.width // dq != lv.width // dv:
        return f"{lq.site.name} and {lv.site.name}: Q and V have different numbers of heads"
    out = _output_layer(g, core, lv.width)
    if isinstance(out, str):
        return out
    if out.fan_in != lv.width:
        return f"{out.site.name} reads {out.fan_in} features, not V's {lv.width}"
    qk = [Move("p0.weight", lq.site.weight, lq.out_axis, "producer", lq.site.name)]
    qk += [Move("p0.bias", lq.site.tensors[1], 0, "bias", lq.site.name)] if len(lq.site.tensors) > 1 else []
    qk += [Move("p1.weight", lk.site.weight, lk.out_axis, "producer", lk.site.name)]
    qk += [Move("p1.bias", lk.site.tensors[1], 0, "bias", lk.site.name)] if len(lk.site.tensors) > 1 else []
    vo = [Move("p0.weight", lv.site.weight, lv.out_axis, "producer", lv.site.name)]
    vo += [Move("p0.bias", lv.site.tensors[1], 0, "bias", lv.site.name)] if len(lv.site.tensors) > 1 else []
    vo += [Move("c0.weight", out.site.weight, out.in_axis, "consumer", out.site.name)]
    return [
        Space(f"{lq.site.name}:qk", "heads", lq.width, tuple(qk), (lq.site.name, lk.site.name), (),
              lq.width // dq, tied=f"{lv.site.name}:vo"),
        Space(f"{lv.site.name}:vo", "heads", lv.width, tuple(vo), (lv.site.name,), (out.site.name,),
              lv.width // dv, tied=f"{lq.site.name}:qk"),
    ]


def find_spaces(gm: fx.GraphModule, skipped: list[Skipped] | None = None) -> list[Space]:
    """Every space of ``gm`` that can be transformed without changing its function; when ``skipped``
    is given, each layer whose output is no space is appended with its reason."""
    g = _Graph(gm)
    return _find(g, skipped)


def _find(g: _Graph, skipped: list[Skipped] | None) -> list[Space]:
    spaces: list[Space] = []
    covered: set[str] = set()
    reasons: dict[str, str] = {}
    for node in g.gm.graph.nodes:
        found = _heads_spaces(g, node)
        if isinstance(found, list):
            spaces += found
            covered.update(p for s in found for p in s.producers)
        elif isinstance(found, str):
            reasons.setdefault(f"attention at {node.name}", found)
    def candidates():
        for node in g.gm.graph.nodes:
            layer = g.layer(node)
            if layer is None or isinstance(layer, _Layer) and layer.site.name in covered:
                continue
            yield (layer.site.name if isinstance(layer, _Layer) else node.name), _permute_space(g, node)

    return collect(candidates(), spaces, reasons, skipped)


# -- what the FX frontend answers for alignment -------------------------------------------------------

def spaces_of(gm: fx.GraphModule, skipped: list[Skipped]) -> tuple[list[Space], dict[str, Site]]:
    """``gm``'s alignment spaces and the sites they were found with, by name."""
    graph = _Graph(gm)
    return _find(graph, skipped), graph.found.by_name()


def read_tensors(module: nn.Module, names: Any) -> dict[str, Any]:
    """The named parameters and buffers of ``module`` as float64 arrays."""
    own = _module_tensors(module)
    missing = sorted(n for n in names if n not in own)
    if missing:
        raise TraceError(f"alignment: the traced graph names tensors the module does not hold ({missing[0]!r})")
    return {n: own[n].detach().cpu().double().numpy() for n in names}


def write_tensors(module: nn.Module, arrays: Any) -> None:
    """Store float64 ``arrays`` into ``module``'s tensors of those names, in each one's dtype."""
    own = _module_tensors(module)
    with torch.no_grad():
        for name, array in arrays.items():
            own[name].copy_(torch.from_numpy(array).to(own[name].dtype))


@contextlib.contextmanager
def holding(module: nn.Module, arrays: Mapping[str, np.ndarray]) -> Iterator[None]:
    """``module``'s named tensors holding ``arrays`` (each in the tensor's own dtype) for the
    block, their own values back after it, bit for bit; a name the module does not hold is a
    :class:`TraceError` before anything changes."""
    own = _module_tensors(module)
    missing = sorted(n for n in arrays if n not in own)
    if missing:
        raise TraceError(f"the module holds no tensor {missing[0]!r}")
    saved = {n: own[n].detach().clone() for n in arrays}
    try:
        with torch.no_grad():
            for name, array in arrays.items():
                own[name].copy_(to_torch(np.asarray(array), own[name]).reshape(own[name].shape))
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                own[name].copy_(value)


def _module_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``module`` by every path (a traced graph's canonical name is one)."""
    out: dict[str, torch.Tensor] = {}
    for path, t in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
        out.setdefault(path, t)
    return out
