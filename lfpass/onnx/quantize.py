"""Quantization after fusion: onnxruntime's quantizers, each shared tensor quantized once.

Sharing and quantization compound: a tensor several layers read is stored once,
and quantized it is stored once in 8 or 4 bits. onnxruntime's tools do the
quantizing (``quantize_dynamic``: per-channel int8 weights, activations
quantized at run time; ``quantize_static`` in the QDQ format with calibration
inputs; ``MatMulNBitsQuantizer``: 4-bit block-wise weights for ``MatMul``).
What they lack, and this module adds, is only this:

- **one orientation per weight.** The quantizers take a weight only when it is
  an initializer feeding the node directly: a weight reached through a
  ``Transpose`` (as exporters write ``nn.Linear``) stays float, and a ``Gemm``
  with ``transB`` gets a transposed copy of its weight per reading path
  (``quantize_dynamic``) or none at all (the 4-bit quantizer skips ``Gemm``).
  So before quantizing, every ``Transpose`` of an initializer is folded into
  one transposed initializer (one per tensor, however many read it) and every
  plain ``Gemm`` on an initializer becomes ``MatMul`` (+ ``Add`` for its bias),
  its weight stored ``[in, out]`` once;
- **no duplicates after.** Scales and zero points that come out bit-identical
  (and any other equal tensors) are stored once;
- **what was not done, said.** A model already quantized, or whose weights are
  integer or float8, is refused in one line; a 4-bit run on a model with no
  ``MatMul`` says so; weights left in float (excluded, or of ops the tool
  does not quantize) are counted in the report.

Everything else (which ops are quantized, scales, packing) is the tools' own.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from lfpass.core.errors import InputError
from lfpass.onnx.load import _quiet, read_array
from lfpass.onnx.rewrite import FreshNames, add_initializer
from lfpass.onnx.save import needs_external

log = logging.getLogger(__name__)

MODES = ("int8", "int4")
QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
                           "ConvInteger", "QLinearMatMul", "QLinearConv", "MatMulNBits", "QGemm",
                           "DynamicQuantizeMatMul", "QAttention", "GatherBlockQuantized"})
_WEIGHTED = {"MatMul": 1, "Gemm": 1, "Conv": 1}  # op -> the input holding its weight
_FLOATS = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
BLOCK = 32  # 4-bit: weights per scale along the input axis


class QuantizeError(InputError):
    """A model these quantizers cannot take (already quantized, integer weights, no MatMul for 4 bits)."""


@dataclass
class QuantReport:
    """What quantization did: ``method``; weight tensors quantized, and those read by several
    nodes among them (each stored once); weights left in float, by why; tensors folded or
    rewritten beforehand and duplicates removed after."""

    mode: str
    method: str
    quantized: int = 0
    shared: int = 0
    float_left: dict[str, str] = field(default_factory=dict)
    prepared: dict[str, int] = field(default_factory=dict)
    deduplicated: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        left = f", {len(self.float_left)} left in float" if self.float_left else ""
        return (f"{self.mode}: {self.quantized} weight tensors quantized ({self.shared} of them read by several "
                f"nodes, each stored once){left}; {self.method}")


def refusal(model: ir.Model, mode: str) -> str:
    """Why ``model`` cannot be quantized to ``mode`` ("" when it can)."""
    if mode not in MODES:
        return f"--quantize must be one of {', '.join(MODES)}, got {mode!r}"
    ops = {n.op_type for n in model.graph}
    done = sorted(ops & QUANTIZED_OPS)
    if done:
        return f"the model is already quantized (it has {', '.join(done)} nodes): nothing quantized again"
    for node in model.graph:
        at = _WEIGHTED.get(node.op_type)
        weight = node.inputs[at] if at is not None and len(node.inputs) > at else None
        if weight is not None and weight.const_value is not None and weight.const_value.dtype not in _FLOATS:
            return (f"{node.op_type} {node.name!r} reads {weight.name!r} as {weight.const_value.dtype.name}: "
                    "integer and float8 weights are quantized already")
    if mode == "int8":
        opset = model.opset_imports.get("", 0)
        if opset < 10:
            return f"int8 quantization needs opset 10 or later (QuantizeLinear, MatMulInteger); the model is {opset}"
    if mode == "int4" and "MatMul" not in ops and "Gemm" not in ops:
        return "int4 quantizes MatMul weights (onnxruntime's MatMulNBits); the model has none: nothing quantized"
    return ""


def prepare(model: ir.Model) -> dict[str, int]:
    """Every weight read in one orientation, in place: ``Transpose`` nodes of initializers
    folded (one transposed initializer per tensor and permutation) and plain ``Gemm``
    nodes on an initializer rewritten as ``MatMul`` (+ ``Add``). Returns how many of each."""
    graph, names = model.graph, FreshNames(model)
    made: dict[tuple[str, tuple[int, ...]], ir.Value] = {}
    counts = {"constants as initializers": _lift_constants(graph), "transposes folded": 0, "gemms as matmul": 0}

    def transposed(value: ir.Value, perm: tuple[int, ...]) -> ir.Value:
        key = (value.name, perm)
        if key not in made:
            array = np.ascontiguousarray(np.transpose(read_array(value.const_value), perm))
            made[key] = add_initializer(graph, names.fresh(f"{value.name}.T"), array)
        return made[key]

    for node in list(graph):
        if node.op_type != "Transpose" or not _initializer(node.inputs[0]):
            continue
        source = node.inputs[0]
        rank = len(source.const_value.shape)
        perm_attr = node.attributes.get("perm")
        perm = tuple(perm_attr.as_ints()) if perm_attr is not None else tuple(reversed(range(rank)))
        node.outputs[0].replace_all_uses_with(transposed(source, perm))
        graph.remove(node, safe=True)
        counts["transposes folded"] += 1
    for node in list(graph):
        if node.op_type != "Gemm" or len(node.inputs) < 2 or not _initializer(node.inputs[1]):
            continue
        attrs = {k: a.value for k, a in node.attributes.items()}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            continue
        weight = node.inputs[1]
        if len(weight.const_value.shape) != 2:
            continue
        if attrs.get("transB", 0):
            weight = transposed(weight, (1, 0))
        out = node.outputs[0]
        matmul = ir.node("MatMul", [node.inputs[0], weight], name=f"{node.name}/MatMul" if node.name else None)
        graph.insert_before(node, matmul)
        result = matmul.outputs[0]
        result.name = names.fresh(f"{out.name}.matmul")
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            add = ir.node("Add", [result, node.inputs[2]], name=f"{node.name}/Add" if node.name else None)
            graph.insert_before(node, add)
            result = add.outputs[0]
            result.name = names.fresh(f"{out.name}.add")
        _take_over(graph, out, result)
        graph.remove(node, safe=True)
        counts["gemms as matmul"] += 1
    _drop_unused(graph)
    return counts


def _lift_constants(graph: ir.Graph) -> int:
    """``Constant`` nodes holding a weight (read, directly or through a ``Transpose``, as a
    MatMul/Gemm/Conv weight; as converters such as Paddle2ONNX write them) become initializers
    of the same name: the quantizers take initializers only."""
    lifted = 0
    for node in list(graph):
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or "value" not in node.attributes:
            continue
        out = node.outputs[0]
        if not _read_as_weight(out):
            continue
        tensor = node.attributes["value"].as_tensor()
        value = ir.Value(name=out.name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype),
                         const_value=tensor)
        name = out.name
        out.name = None
        out.replace_all_uses_with(value, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        value.name = name
        graph.register_initializer(value)
        lifted += 1
    return lifted


def _read_as_weight(value: ir.Value) -> bool:
    """Whether ``value`` is a MatMul/Gemm/Conv weight input, directly or through ``Transpose`` nodes."""
    return any(_read_as_weight(u.node.outputs[0]) if u.node.op_type == "Transpose"
               else _WEIGHTED.get(u.node.op_type) == u.idx for u in value.uses())


def _take_over(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """``new`` stands for ``old`` everywhere, graph outputs (and their names) included."""
    name, shape, dtype = old.name, old.shape, old.type
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    old.name = None
    new.name, new.shape, new.type = name, shape, dtype


def _initializer(value: ir.Value | None) -> bool:
    return value is not None and value.is_initializer() and value.const_value is not None


def _drop_unused(graph: ir.Graph) -> int:
    unused = [v for v in graph.initializers.values() if not v.uses() and v not in graph.outputs]
    for v in unused:
        del graph.initializers[v.name]
    return len(unused)


def deduplicate(model: ir.Model) -> int:
    """Initializers equal in dtype, shape and bytes stored once (their readers re-pointed);
    how many were removed."""
    graph, seen, removed = model.graph, {}, 0
    for value in list(graph.initializers.values()):
        if value in graph.inputs or value in graph.outputs:
            continue
        tensor = value.const_value
        key = (tensor.dtype, tuple(tensor.shape), hashlib.sha256(tensor.tobytes()).hexdigest())
        if key in seen:
            value.replace_all_uses_with(seen[key])
            del graph.initializers[value.name]
            removed += 1
        else:
            seen[key] = value
    return removed


def weight_readers(model: ir.Model) -> dict[str, list[str]]:
    """Float initializers feeding a MatMul/Gemm/Conv weight input -> the names of the nodes reading them."""
    out: dict[str, list[str]] = {}
    for node in model.graph:
        at = _WEIGHTED.get(node.op_type)
        if at is None or len(node.inputs) <= at or not _initializer(node.inputs[at]):
            continue
        weight = node.inputs[at]
        if weight.const_value.dtype in _FLOATS and len(weight.const_value.shape) >= 2:
            out.setdefault(weight.name, []).append(node.name)
    return out


def quantize(model: ir.Model, mode: str, feeds: Sequence[dict[str, np.ndarray]] | None = None,
             keep_float: Sequence[str] = (), block_size: int = BLOCK) -> tuple[ir.Model, QuantReport]:
    """``model`` quantized to ``mode`` by onnxruntime's tools (a new model; ``model`` is prepared
    in place first, see :func:`prepare`). int8: dynamic per-channel, or static QDQ on ``feeds``
    (calibration batches) when given; int4: 4-bit blocks of ``block_size`` for ``MatMul``.
    ``keep_float``: weight initializers (names after :func:`prepare`) left in float, their
    readers excluded. A :class:`QuantizeError` when the model cannot be quantized."""
    why = refusal(model, mode)
    if why:
        raise QuantizeError(why)
    ir.external_data.load_to_model(model)  # the tools read a file of its own, not the input's data file
    prepared = prepare(model)
    if mode == "int4" and not any(n.op_type == "MatMul" and _initializer(n.inputs[1]) for n in model.graph):
        raise QuantizeError("int4 quantizes MatMul weights (onnxruntime's MatMulNBits); the model has no MatMul on "
                            "a weight: nothing quantized")
    _name_nodes(model)
    readers = weight_readers(model)
    exclude = sorted({n for w in keep_float for n in readers.get(w, [])})
    with tempfile.TemporaryDirectory(prefix="lfpass-quantize-") as tmp, _quiet("root"):
        large = needs_external(model)  # past protobuf's 2 GB: the tools read and write external data
        source = Path(tmp) / "prepared.onnx"
        ir.save(model, source, external_data="prepared.data" if large else None)
        out = Path(tmp) / "quantized.onnx"
        method = _run(source, out, mode, feeds, exclude, block_size, large)
        quantized = ir.load(out)
        ir.external_data.load_to_model(quantized)  # in memory before the folder goes
    report = QuantReport(mode, method, prepared=prepared)
    report.deduplicated = deduplicate(quantized)
    left = weight_readers(quantized)
    for name in readers:
        if name in left:
            report.float_left[name] = "kept in float" if name in keep_float else "not quantized by the tool"
        else:
            report.quantized += 1
            report.shared += len(readers[name]) > 1
    return quantized, report


def _name_nodes(model: ir.Model) -> None:
    """Every node named (the tools exclude nodes by name)."""
    names = FreshNames(model)
    for node in model.graph:
        if not node.name:
            node.name = names.fresh(node.op_type)


def _opset_13(source: Path, large: bool) -> tuple[Path, bool, str]:
    """A model per-channel QDQ can take: ``DequantizeLinear``'s ``axis`` exists from opset 13, and
    ``quantize_static`` writes it without raising the opset (the file then fails to load). An
    older model is converted by onnx's version converter; where that fails, its weights are
    quantized per tensor. Returns the model to quantize, whether per channel, and a note."""
    import onnx
    from onnx import version_converter

    model = onnx.load(str(source), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset >= 13:
        return source, True, ""
    try:
        onnx.load_external_data_for_model(model, str(source.parent))
        converted = version_converter.convert_version(model, 13)
        target = source.with_name("opset13.onnx")
        onnx.save(converted, str(target), save_as_external_data=large, location="opset13.data" if large else None)
    except Exception as exc:  # the converter's own error types: no adapter for some node
        log.info("opset %d -> 13 failed (%s): weights per tensor", opset, exc)
        return source, False, f"; opset {opset} could not be raised to 13 for per-channel scales"
    return target, True, f"; opset {opset} raised to 13 for per-channel scales (onnx version converter)"


def _run(source: Path, out: Path, mode: str, feeds: Sequence[dict[str, np.ndarray]] | None,
         exclude: list[str], block_size: int, large: bool) -> str:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, \
        quantize_static

    if mode == "int4":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(str(source), bits=4, block_size=block_size, is_symmetric=True,
                                         nodes_to_exclude=exclude)
        quantizer.process()
        quantizer.model.save_model_to_file(str(out), use_external_data_format=large)
        return f"4-bit symmetric blocks of {block_size} (onnxruntime MatMulNBitsQuantizer)"
    if feeds:
        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.batches = iter(list(feeds))

            def get_next(self) -> dict[str, np.ndarray] | None:
                return next(self.batches, None)

        source, per_channel, note = _opset_13(source, large)
        quantize_static(source, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                        op_types_to_quantize=list(_WEIGHTED), use_external_data_format=large)
        return (f"static int8 QDQ of MatMul/Gemm/Conv, {'per-channel' if per_channel else 'per-tensor'} weights, "
                f"calibrated on {len(feeds)} batches (onnxruntime quantize_static){note}")
    quantize_dynamic(source, out, per_channel=True, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                     use_external_data_format=large)
    return "dynamic int8, per-channel weights (onnxruntime quantize_dynamic)"


# -- under a budget ------------------------------------------------------------------------------

def emulate(weight: np.ndarray, mode: str, axis: int, block_size: int = BLOCK) -> np.ndarray:
    """What quantizing keeps of a float ``weight`` (float64): int8, symmetric per channel along
    ``axis`` (the output channels); int4, symmetric blocks of ``block_size`` along the other
    axis of a 2-D weight. An estimate for ranking layers, not the tools' exact arithmetic."""
    w = np.asarray(weight, dtype=np.float64)
    if mode == "int8":
        other = tuple(i for i in range(w.ndim) if i != axis)
        scale = np.max(np.abs(w), axis=other, keepdims=True) / 127.0
        return np.round(w / np.where(scale > 0, scale, 1.0)) * scale
    k = w.shape[0]
    pad = (-k) % block_size
    blocks = np.pad(w, ((0, pad), (0, 0))).reshape(-1, block_size, w.shape[1])
    scale = np.max(np.abs(blocks), axis=1, keepdims=True) / 7.0
    q = np.clip(np.round(blocks / np.where(scale > 0, scale, 1.0)), -8, 7) * scale
    return q.reshape(-1, w.shape[1])[:k]


def sensitivity_order(model: ir.Model, mode: str, feeds: Sequence[dict[str, np.ndarray]], readout: Any,
                      block_size: int = BLOCK) -> list[str]:
    """The prepared ``model``'s weights, the one whose quantization alone moves the outputs on
    ``feeds`` most first: each weight's quantized values (:func:`emulate`) fed to one session
    in turn (:func:`lfpass.onnx.frontend.overridable`), the rest float."""
    from lfpass.core.quality import relative_change
    from lfpass.onnx.frontend import overridable, run

    readers = weight_readers(model)
    ops = {n.name: n.op_type for n in model.graph}
    sess, fed = overridable(model, list(readers))
    reference = run(sess, feeds, readout)
    moved = {}
    for name, nodes in readers.items():
        if name not in fed:
            continue
        tensor = model.graph.initializers[name].const_value
        array = read_array(tensor)
        axis = 0 if ops.get(nodes[0]) == "Conv" else array.ndim - 1
        if mode == "int4" and (array.ndim != 2 or ops.get(nodes[0]) != "MatMul"):
            continue  # the 4-bit quantizer takes MatMul weights only
        values = emulate(array, mode, axis, block_size).astype(array.dtype)
        moved[name] = relative_change(reference, run(sess, feeds, readout, {name: values}))
    return sorted(moved, key=lambda n: -moved[n])


def quantize_within(model: ir.Model, mode: str, budget: float, error_of: Any, choose: Sequence[dict[str, np.ndarray]],
                    readout: Any, feeds: Sequence[dict[str, np.ndarray]] | None = None,
                    block_size: int = BLOCK) -> tuple[ir.Model, QuantReport, float]:
    """``model`` quantized with as few weights left in float as keeps ``error_of(quantized) <=
    budget``: weights ranked by :func:`sensitivity_order` on ``choose``, the number kept in float
    found by bisection (each step one quantizer run, measured end to end). Returns the model,
    the report (``float_left`` names what was kept in float and why) and its error. Keeping
    every weight in float is the prepared float model, which keeps the budget when
    ``error_of(model)`` does."""
    from lfpass.onnx.frontend import copy_model

    prepared = prepare(model)
    order = sensitivity_order(model, mode, choose, readout, block_size)
    tried: dict[int, tuple[ir.Model, QuantReport, float]] = {}

    def attempt(k: int) -> tuple[ir.Model, QuantReport, float]:
        if k not in tried:
            quantized, report = quantize(copy_model(model), mode, feeds, order[:k], block_size)
            tried[k] = (quantized, report, error_of(quantized))
        return tried[k]

    lo, hi = -1, len(order)  # lo: the most in float known to break the budget; hi: keeps it (assumed)
    if attempt(0)[2] <= budget:
        hi = 0
    else:
        lo = 0
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if attempt(mid)[2] <= budget:
                hi = mid
            else:
                lo = mid
    steps = len(tried)
    if hi >= len(order):  # every weight in float: quantizing nothing keeps the float model, smaller and exact
        report = QuantReport(mode, f"nothing quantized: quantizing any weight broke the budget (error <= {budget:g}; "
                                   f"{steps} quantizer runs measured end to end)")
        report.float_left = {name: "quantizing it broke the budget" for name in order}
        report.prepared = prepared
        return model, report, error_of(model)
    quantized, report, error = attempt(hi)
    report.prepared = prepared  # the copies were prepared already: what preparing did is the first count
    why = f"quantizing it broke the budget (error <= {budget:g}; {steps} quantizer runs measured end to end)"
    for name in order[:hi]:
        report.float_left[name] = why
    return quantized, report, error
