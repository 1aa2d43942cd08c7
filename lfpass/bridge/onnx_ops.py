"""What onnx2torch lacks for the torch exporters' own output, added through its converter
registry (:func:`install`, called by :func:`lfpass.bridge.to_torch.to_torch`).

onnx2torch covers operators as of opset 17. The dynamo exporter writes opset 18 and
newer, whose ``Shape``, ``Reshape``, ``Cast``, ... have new schema versions that only
widened the types they accept (float8, int4, bfloat16): for those, the converter of the
last version whose meaning is the same is registered again under the new version. The
operators onnx2torch has no converter for at all, that Hugging Face exports use
(``Gelu``, opset 20), or whose new version moved an attribute to an input
(``ReduceMean`` 18, ``Split`` 18), get one here; so do ``Reshape(allowzero=1)`` and
``Flatten`` at the input's rank, where onnx2torch's own fail. Its modules' ONNX export
reads the opset from where torch 2.9+ no longer keeps it; that lookup is pointed at
the TorchScript exporter's globals. Nothing is registered twice; a version whose meaning
changed and has no converter here is left out, so such a file still gets one line naming
the operator.
"""

from __future__ import annotations

import torch
from torch import nn

# (operator, schema version onnx2torch lacks): the version whose converter means the same
SAME_AS: dict[tuple[str, int], int] = {
    ("Shape", 19): 15, ("Shape", 21): 15,
    ("Cast", 19): 13, ("Cast", 21): 13,  # 19: the saturate attribute, for float8 targets only
    ("Transpose", 21): 13, ("Unsqueeze", 21): 13,
    ("Identity", 19): 16, ("Identity", 21): 16,
    ("Constant", 19): 13, ("Constant", 21): 13,
    ("ConstantOfShape", 20): 9, ("ConstantOfShape", 21): 9,
    ("Equal", 19): 13, ("GreaterOrEqual", 16): 12, ("LessOrEqual", 16): 12,
    ("Where", 16): 9, ("IsNaN", 20): 13, ("IsInf", 20): 10,
}


class Gelu(nn.Module):
    """ONNX ``Gelu`` (opset 20): exact (``approximate="none"``) or tanh-approximated."""

    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(x, approximate=self.approximate)


def _gelu(node, graph):  # noqa: ARG001 - onnx2torch's converter signature
    from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node

    approximate = node.attributes.get("approximate", "none")
    if isinstance(approximate, bytes):
        approximate = approximate.decode()
    return OperationConverterResult(torch_module=Gelu(approximate), onnx_mapping=onnx_mapping_from_node(node))


class ReshapeAllowZero(nn.Module):
    """ONNX ``Reshape`` with ``allowzero=1``: a 0 in the shape is a dimension of size 0 (as in
    ``torch.reshape``), not "copy the input's"; the dynamo exporter writes it on every Reshape."""

    def forward(self, x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        return torch.reshape(x, [int(d) for d in shape])


def _reshape(node, graph):  # noqa: ARG001
    from onnx2torch.node_converters.reshape import OnnxReshape
    from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node

    module = ReshapeAllowZero() if node.attributes.get("allowzero", 0) == 1 else OnnxReshape()
    return OperationConverterResult(torch_module=module, onnx_mapping=onnx_mapping_from_node(node))


class Flatten(nn.Module):
    """ONNX ``Flatten``: ``[prod(dims before axis), prod(dims from axis)]``, for any axis
    (onnx2torch's fails on an axis equal to the input's rank, as the legacy exporter writes
    for BERT's attention mask)."""

    def __init__(self, axis: int = 1) -> None:
        super().__init__()
        self.axis = axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = self.axis + x.dim() if self.axis < 0 else self.axis
        lead = 1
        for d in x.shape[:axis]:
            lead = lead * d
        return x.reshape(lead, -1)


def _flatten(node, graph):  # noqa: ARG001
    from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node

    return OperationConverterResult(torch_module=Flatten(node.attributes.get("axis", 1)),
                                    onnx_mapping=onnx_mapping_from_node(node))


class SplitInto(nn.Module):
    """ONNX ``Split`` 18 with ``num_outputs``: that many chunks of ``ceil(size / n)`` along
    ``axis``, the last one smaller."""

    def __init__(self, axis: int, outputs: int) -> None:
        super().__init__()
        self.axis, self.outputs = axis, outputs

    def forward(self, x: torch.Tensor, split: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        if split is not None:
            return tuple(torch.split(x, [int(v) for v in split], dim=self.axis))
        size = x.shape[self.axis]
        return tuple(torch.split(x, (size + self.outputs - 1) // self.outputs, dim=self.axis))


def _split(node, graph):  # noqa: ARG001
    from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node

    module = SplitInto(node.attributes.get("axis", 0), node.attributes.get("num_outputs", len(node.output_values)))
    return OperationConverterResult(torch_module=module, onnx_mapping=onnx_mapping_from_node(node))


class ReduceMean(nn.Module):
    """ONNX ``ReduceMean`` 18, whose axes are an input (a constant here, read at conversion)."""

    def __init__(self, axes: list[int] | None, keepdims: bool, noop: bool) -> None:
        super().__init__()
        self.axes, self.keepdims, self.noop = axes, keepdims, noop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.axes:
            return x if self.noop else x.mean(dim=tuple(range(x.dim())), keepdim=self.keepdims)
        return x.mean(dim=tuple(self.axes), keepdim=self.keepdims)


def _reduce_mean(node, graph):
    from onnx2torch.utils.common import OnnxMapping, OperationConverterResult, get_const_value

    axes = None
    if len(node.input_values) > 1 and node.input_values[1]:
        try:
            axes = [int(a) for a in get_const_value(node.input_values[1], graph).reshape(-1).tolist()]
        except KeyError:
            raise NotImplementedError("ReduceMean with axes computed at run time") from None
    module = ReduceMean(axes, bool(node.attributes.get("keepdims", 1)),
                        bool(node.attributes.get("noop_with_empty_axes", 0)))
    return OperationConverterResult(torch_module=module,
                                    onnx_mapping=OnnxMapping(inputs=(node.input_values[0],),
                                                             outputs=node.output_values))


class _ExportGlobals:
    """What onnx2torch's ``get_onnx_version`` reads, where torch 2.9+ keeps it (the TorchScript
    exporter's globals): its modules ask it while being exported to ONNX."""

    @property
    def GLOBALS(self):  # noqa: N802 - the name onnx2torch reads
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS

        return GLOBALS


_NEW = {("Gelu", 20): _gelu, ("ReduceMean", 18): _reduce_mean, ("Reshape", 19): _reshape, ("Reshape", 21): _reshape, ("Flatten", 21): _flatten,
        ("Split", 18): _split}
_REPLACED = {("Reshape", 14): _reshape,  # onnx2torch's refuses allowzero=1
             ("Flatten", 9): _flatten, ("Flatten", 11): _flatten, ("Flatten", 13): _flatten}


def install() -> int:
    """Register the converters above that onnx2torch does not have yet; how many were added."""
    from onnx.defs import ONNX_DOMAIN
    from onnx2torch.node_converters import registry

    added = 0
    for (op, version), same in SAME_AS.items():
        new = registry.OperationDescription(ONNX_DOMAIN, op, version)
        old = registry.OperationDescription(ONNX_DOMAIN, op, same)
        if new not in registry._CONVERTER_REGISTRY and old in registry._CONVERTER_REGISTRY:
            registry._CONVERTER_REGISTRY[new] = registry._CONVERTER_REGISTRY[old]
            added += 1
    for (op, version), converter in _NEW.items():
        if registry.OperationDescription(ONNX_DOMAIN, op, version) not in registry._CONVERTER_REGISTRY:
            registry.add_converter(op, version)(converter)
            added += 1
    for (op, version), converter in _REPLACED.items():
        registry._CONVERTER_REGISTRY[registry.OperationDescription(ONNX_DOMAIN, op, version)] = converter
    from onnx2torch.utils import common

    if not hasattr(common.symbolic_helper, "GLOBALS") and not hasattr(common.symbolic_helper,
                                                                       "_export_onnx_opset_version"):
        common.symbolic_helper = _ExportGlobals()
    return added
