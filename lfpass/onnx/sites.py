"""Find the weight-bearing layers of an ONNX graph as :class:`lfpass.core.sites.Site` objects.

A site is a ``Gemm``, ``MatMul``, ``Conv`` or ``ConvTranspose`` node of the
main graph whose weight is constant: an initializer, a ``Constant`` node, or
an ``Identity``/``Transpose``/``Cast`` of one (as the exporters write it). The
signature holds everything that must agree for two layers to share a tensor:
the weight's shape and dtype, the side it multiplies from and the ops it
passes through, the bias's shape, and every attribute of the node (defaults
filled in, so ``strides`` left out equals ``strides=[1, 1]``).

A tensor is one site however many nodes read it. A weight that is a graph
input (fed at run time, or an initializer a caller may override) is not
constant: that node is skipped and the reason kept for ``--explain``. So are
weights read inside an ``If``/``Loop``/``Scan`` body (subgraphs are left
exactly as they are) and weights that are graph outputs. Only float16,
bfloat16, float32 and float64 tensors are merged (exactly, in their own
dtype): a layer whose weight or bias is an integer, bool or float8 tensor is
skipped, with its reason.

A ``com.microsoft`` ``Attention`` node is a linear layer too: its constant
``weights`` input (``[hidden, 3 * hidden]``, q, k and v packed) with its
``bias`` is the input projection, and its signature holds ``op`` and the
node's attributes (``num_heads`` ...), so it shares only with its like.
``com.microsoft`` ``MultiHeadAttention`` (and ONNX's own ``Attention``) takes
q, k and v already projected (activations, not weights): its projections are
the ``MatMul`` sites before it, and the node itself is no site.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from lfpass.core.frontend import SiteTable
from lfpass.core.sites import Site, make_signature
from lfpass.core.units import find_units
from lfpass.onnx.load import read_array
from lfpass.onnx.names import layer_name

KINDS = {"Gemm": "linear", "MatMul": "linear", "Conv": "conv", "ConvTranspose": "conv_transpose"}
_PACKED_ATTENTION = ("com.microsoft", "Attention")  # weights = input 1 (q, k, v packed), bias = input 2
_PACKED_ATTENTION_DEFAULTS = {"unidirectional": 0, "qkv_hidden_sizes": (), "mask_filter_value": -10000.0,
                              "scale": 0.0, "do_rotary": 0, "rotary_embedding_dim": 0, "past_present_share_buffer": 0}
_PASS_THROUGH = ("Identity", "Transpose", "Cast")
_ONNX_DOMAINS = ("", "ai.onnx")
_MERGEABLE = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.FLOAT, ir.DataType.DOUBLE)  # as lfpass.core.dtypes.MERGEABLE


@dataclass
class OnnxSites(SiteTable):
    """The sites of one model and where their tensors live (external data is memory-mapped,
    read when asked)."""

    sites: list[Site]
    values: dict[str, ir.Value]  # tensor name -> initializer or Constant output holding it
    bias_edges: dict[str, list[tuple[ir.Node, int]]] = field(default_factory=dict)  # bias tensor -> its readers
    skipped: list[str] = field(default_factory=list)  # "node: why", for --explain
    units: list[Site] = field(default_factory=list)  # attention / MLP units over the layer sites

    def tensor(self, name: str) -> ir.TensorProtocol:
        return tensor_of(self.values[name])

    def load_exact(self, name: str) -> np.ndarray:
        """A tensor's values in its own dtype (bfloat16 as ``ml_dtypes.bfloat16``), for merging;
        external data is mapped for as long as the array lives (:func:`read_array`)."""
        return read_array(self.tensor(name))


Constant = tuple[ir.Value, tuple[str, ...]]  # the value holding the tensor, and the ops between it and the node


def constant_source(value: ir.Value | None, allow: tuple[str, ...] = _PASS_THROUGH) -> Constant | str | None:
    """``(holder, ops passed through)`` when ``value`` is constant; a reason string
    when it comes from a graph input; ``None`` when it is computed."""
    chain: list[str] = []
    while value is not None:
        if value.is_graph_input():
            return f"weight {value.name!r} is a graph input, so not constant"
        if value.is_initializer():
            return (value, tuple(reversed(chain))) if value.const_value is not None else None
        node = value.producer()
        if node is None or node.domain not in _ONNX_DOMAINS:
            return None
        if node.op_type == "Constant":
            return (value, tuple(reversed(chain))) if "value" in node.attributes else None
        if node.op_type not in allow or not node.inputs:
            return None
        if node.op_type != "Identity":
            attrs = ",".join(f"{k}={_attr(a)}" for k, a in sorted(node.attributes.items()))
            chain.append(f"{node.op_type}({attrs})")
        value = node.inputs[0]
    return None


def _attr(attr: ir.Attr) -> Any:
    value = attr.value
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return value.name if isinstance(value, ir.DataType) else value


def tensor_of(holder: ir.Value) -> ir.TensorProtocol:
    tensor = stored(holder)
    assert tensor is not None, holder.name
    return tensor


def stored(value: ir.Value) -> ir.TensorProtocol | None:
    """The tensor ``value`` holds: an initializer's, or a ``Constant`` node's (as converters write
    weights); None for a value computed at run time."""
    if value.const_value is not None:
        return value.const_value
    node = value.producer()
    if node is not None and node.op_type == "Constant" and "value" in node.attributes:
        return node.attributes["value"].as_tensor()
    return None


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if index < len(node.inputs) else None


def _conv_attrs(node: ir.Node, weight_shape: tuple[int, ...]) -> dict[str, Any]:
    nd = len(weight_shape) - 2
    attrs: dict[str, Any] = {
        "auto_pad": "NOTSET", "dilations": (1,) * nd, "group": 1, "kernel_shape": tuple(weight_shape[2:]),
        "pads": (0,) * (2 * nd), "strides": (1,) * nd,
    }
    if node.op_type == "ConvTranspose":
        attrs.update(output_padding=(0,) * nd, output_shape=())
    attrs.update({k: _attr(a) for k, a in node.attributes.items()})
    return attrs


def _is_packed_attention(node: ir.Node) -> bool:
    return (node.domain, node.op_type) == _PACKED_ATTENTION


def layer_kind(node: ir.Node) -> str | None:
    """The site kind of ``node``, or None when it is no layer."""
    if node.domain in _ONNX_DOMAINS:
        return KINDS.get(node.op_type)
    return "linear" if _is_packed_attention(node) else None


def _weight_side(node: ir.Node) -> tuple[str, Constant | str | None]:
    """Which side the weight multiplies from, and what ``constant_source`` says of it."""
    if node.op_type in ("Conv", "ConvTranspose") or _is_packed_attention(node):
        return "right", constant_source(_input(node, 1))
    a, b = constant_source(_input(node, 0)), constant_source(_input(node, 1))
    if isinstance(b, tuple) and isinstance(a, tuple):
        return "right", None  # both constant: a foldable expression, not a layer
    if isinstance(b, tuple) or isinstance(a, tuple):
        return ("right", b) if isinstance(b, tuple) else ("left", a)
    return "right", b if isinstance(b, str) else None  # a graph input on the right is a skipped weight


def _mergeable(tensor: ir.TensorProtocol) -> bool:
    """float16, bfloat16, float32 or float64: the dtypes a merge keeps exact."""
    return tensor.dtype in _MERGEABLE


def _not_float(slot: str, name: str, tensor: ir.TensorProtocol) -> str:
    dtype = tensor.dtype.name.lower()
    if tensor.dtype.is_floating_point():
        return f"{slot} {name!r} is {dtype}, a quantized floating-point type lfpass does not merge"
    return f"{slot} {name!r} is {dtype}, not a floating-point tensor"


def _shape_through(shape: tuple[int, ...], chain: tuple[str, ...]) -> tuple[int, ...]:
    """The weight's shape as the layer reads it, after the chain's Transposes (Casts keep it)."""
    for op in chain:
        if op.startswith("Transpose"):
            perm = re.search(r"perm=\(([^)]*)\)", op)
            order = [int(p) for p in perm.group(1).split(",") if p.strip()] if perm else list(range(len(shape)))[::-1]
            shape = tuple(shape[p] for p in order)
    return shape


Bias = tuple[ir.Value, tuple[ir.Node, int]]  # the bias holder, and the node input that reads it


def _bias_add(node: ir.Node, out: int) -> Bias | None:
    """The bias of ``x @ W`` when the product's only reader is ``Add`` of a constant
    vector of ``out`` values (how exporters write ``nn.Linear`` on 3-D inputs)."""
    product = node.outputs[0]
    uses = list(product.uses())
    if len(uses) != 1 or product.is_graph_output():
        return None
    add, index = uses[0].node, uses[0].idx
    if add.op_type != "Add" or add.domain not in _ONNX_DOMAINS or add.graph is not node.graph or len(add.inputs) != 2:
        return None
    other = 1 - index
    found = constant_source(add.inputs[other], allow=("Identity",))
    if not isinstance(found, tuple) or tuple(int(d) for d in tensor_of(found[0]).shape) != (out,):
        return None
    return found[0], (add, other)


def node_site(node: ir.Node) -> tuple[Any, ir.Value, Bias | None] | str | None:
    """``(signature, weight holder, bias)``, a reason the node was skipped, or
    ``None`` when it is no layer. Gemm and Conv carry their bias as an input;
    MatMul's bias is the constant of the Add that reads its product."""
    side, found = _weight_side(node)
    if not isinstance(found, tuple):
        return found
    holder, chain = found
    tensor = tensor_of(holder)
    shape = tuple(int(d) for d in tensor.shape)
    if node.op_type == "MatMul" and len(shape) < 2:
        return None
    for use in holder.uses():
        if use.node.graph is not node.graph:
            return f"weight {holder.name!r} is also read inside a subgraph (left as it is)"
    if holder.is_graph_output():
        return f"weight {holder.name!r} is a graph output"
    if not _mergeable(tensor):
        return _not_float("weight", holder.name, tensor)
    fields: dict[str, Any] = dict(shape=shape, dtype=tensor.dtype.name, side=side, via=chain)
    bias_index = 2 if node.op_type in ("Gemm", "Conv", "ConvTranspose") or _is_packed_attention(node) else None
    bias = None
    if bias_index is not None and _input(node, bias_index) is not None:
        found_bias = constant_source(_input(node, bias_index), allow=("Identity",))
        if isinstance(found_bias, tuple):
            bias = (found_bias[0], (node, bias_index))
        else:
            fields.update(bias="input")  # a bias computed at run time: only shares with the same
    elif node.op_type == "MatMul" and side == "right":
        bias = _bias_add(node, _shape_through(shape, chain)[-1])
    if bias is not None:
        btensor = tensor_of(bias[0])
        if not _mergeable(btensor):
            return _not_float("bias", bias[0].name, btensor)
        fields.update(bias=True, bias_shape=tuple(int(d) for d in btensor.shape), bias_dtype=btensor.dtype.name)
    else:
        fields.setdefault("bias", False)
    if node.op_type == "Gemm":
        attrs = {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 0}
        attrs.update({k: _attr(a) for k, a in node.attributes.items()})
        fields.update(attrs)
    elif _is_packed_attention(node):
        attrs = {**_PACKED_ATTENTION_DEFAULTS, **{k: _attr(a) for k, a in node.attributes.items()}}
        fields.update(attrs, op="com.microsoft.Attention")
    elif node.op_type != "MatMul":
        fields.update(_conv_attrs(node, shape))
    return make_signature(**fields), holder, bias


def find_sites(model: ir.Model) -> OnnxSites:
    """Every constant-weight layer of the main graph, in graph order."""
    values: dict[str, ir.Value] = {}
    found: dict[str, dict[str, Any]] = {}  # weight name -> site fields
    skipped: list[str] = []
    for node in model.graph:
        kind = layer_kind(node)
        if kind is None:
            continue
        hit = node_site(node)
        if isinstance(hit, str):
            skipped.append(f"{node.name or node.op_type}: {hit}")
            continue
        if hit is None:
            continue
        sig, holder, bias = hit
        entry = found.get(holder.name)
        if entry is None:
            name, role = layer_name(node, holder)
            found[holder.name] = entry = dict(
                name=name, role=role, kind=kind, sig=sig, weight=holder, bias=bias and bias[0],
                edges=[], nodes=[],
            )
        elif entry["sig"] != sig or entry["bias"] is not (bias[0] if bias else None):
            entry["conflict"] = f"weight {holder.name!r} is read by nodes that differ in attributes or bias"
        entry["nodes"].append(node.name or node.op_type)
        if bias is not None:
            entry["edges"].append(bias[1])
    _unshare_biases(found)
    sites: list[Site] = []
    bias_edges: dict[str, list[tuple[ir.Node, int]]] = {}
    seen: set[str] = set()
    for entry in found.values():
        if "conflict" in entry:
            skipped.append(f"{entry['name']}: {entry['conflict']}")
            continue
        holders = [entry["weight"]] + ([entry["bias"]] if entry["bias"] is not None else [])
        name = entry["name"] if entry["name"] not in seen else f"{entry['name']}#{len(seen)}"
        seen.add(name)
        for h in holders:
            values[h.name] = h
        numel = sum(tensor_of(h).size for h in holders)
        tensors = tuple(h.name for h in holders)
        sites.append(Site(name, entry["kind"], entry["role"], entry["sig"], tensors, numel, ",".join(entry["nodes"])))
        if entry["bias"] is not None:
            bias_edges[entry["bias"].name] = entry["edges"]
    return OnnxSites(sites, values, bias_edges, skipped, units=find_units(sites))


def _unshare_biases(found: dict[str, dict[str, Any]]) -> None:
    """A bias tensor that several layers already read (exporters store equal
    tensors, such as all-zero biases, once) belongs to no single layer: leave it
    out of those sites (they fuse by weight only, among themselves), so a group
    saves exactly what its members own."""
    readers: dict[str, int] = {}
    for entry in found.values():
        if entry["bias"] is not None:
            readers[entry["bias"].name] = readers.get(entry["bias"].name, 0) + 1
    for entry in found.values():
        bias = entry["bias"]
        if bias is not None and (readers[bias.name] > 1 or bias.name in found):
            entry["bias"], entry["edges"] = None, []
            # only layers whose bias is shared the same way may share a weight: their sites hold one tensor
            entry["sig"] = tuple((k, "shared" if k == "bias" else v) for k, v in entry["sig"])

