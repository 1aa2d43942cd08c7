"""Which layer an ONNX node is: a stable name and a role, from what the exporters write.

- torch's legacy exporter names nodes after the module path:
  ``/encoder/layer.3/attention/self/query/MatMul`` is the layer
  ``encoder/layer.3/attention/self/query/MatMul`` with role
  ``encoder/layer.*/attention/self/query/MatMul``;
- the dynamo exporter names nodes ``node_Conv_295``, but keeps parameter names
  on initializers (``layer1.0.conv1.weight`` is module ``layer1.0.conv1``) and
  writes the module path into the node's ``namespace`` metadata property
  (``: ResNet/layer1: Sequential/.../linear: aten.linear.default``), which
  still holds when the weight was folded into an anonymous ``val_55``;
- where nothing carries a path, the role is empty and sites are grouped by
  signature alone.
"""

from __future__ import annotations

import re

import onnx_ir as ir

from lfpass.core.sites import role_of

_PARAM_PATH = re.compile(r"^[A-Za-z_][\w\-]*(?:\.[\w\-]+)+$")
_OP_CLASS = re.compile(r"^(aten|prims|onnx|torch\.ops)\.")


def from_node_name(node: ir.Node) -> str | None:
    name = node.name or ""
    return name.strip("/") if name.startswith("/") and "/" in name.strip("/") else None


def _from_initializer(weight: ir.Value) -> str | None:
    """``a.b.weight`` is layer ``a.b``; ``attn.in_proj_weight`` is ``attn.in_proj`` (as
    the FX frontend names them); any other parameter name is a layer of its own."""
    name = weight.name or ""
    if not weight.is_initializer() or not _PARAM_PATH.match(name):
        return None
    parent, _, attr = name.rpartition(".")
    if attr == "weight":
        return parent
    if attr.endswith("_weight"):
        return f"{parent}.{attr[: -len('_weight')]}"
    return name


def from_namespace(node: ir.Node) -> str | None:
    """The innermost module path in the dynamo exporter's ``namespace`` property."""
    namespace = node.metadata_props.get("namespace", "")
    path, kind = None, ""
    for segment in namespace.split("/"):
        where, _, cls = segment.partition(": ")
        if where and cls and not _OP_CLASS.match(cls.strip()):
            path, kind = where.strip(), cls.strip()
    if path and kind.endswith("MultiheadAttention"):  # its own projection is the packed in_proj (as FX names it)
        return f"{path}.in_proj"
    return path or None


def layer_name(node: ir.Node, weight: ir.Value) -> tuple[str, str]:
    """``(name, role)`` of the layer ``node`` computes with ``weight``.

    Sources, in order: a legacy path-like node name, a parameter-like
    initializer name, the ``namespace`` metadata; else the node's (or the
    weight's) own name with an empty role, so only signatures group it.
    """
    for source in (from_node_name(node), _from_initializer(weight), from_namespace(node)):
        if source:
            return source, role_of(source)
    return node.name or weight.name or node.op_type, ""
