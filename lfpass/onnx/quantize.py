"""Quantization after fusion: onnxruntime's quantizers, each shared tensor quantized once.

Sharing and quantization compound: a tensor several layers read is stored once,
and quantized it is stored once in 8 or 4 bits. onnxruntime's tools do the
quantizing (``quantize_dynamic``: per-channel int8 weights, activations
quantized at run time; ``quantize_static`` in the QDQ format with calibration
inputs; ``MatMulNBitsQuantizer``: 8- or 4-bit block-wise weights for
``MatMul`` and 4-bit blocks for ``Gather`` tables, the embeddings, computed in
float). What they lack, and this module adds, is only this:

- **one orientation per weight.** The quantizers take a weight only when it is
  an initializer feeding the node directly: a weight reached through a
  ``Transpose`` (as exporters write ``nn.Linear``) stays float, and a ``Gemm``
  with ``transB`` gets a transposed copy of its weight per reading path
  (``quantize_dynamic``) or none at all (the 4-bit quantizer skips ``Gemm``).
  So before quantizing, every ``Transpose`` of an initializer is folded into
  one transposed initializer (one per tensor, however many read it) and every
  plain ``Gemm`` on an initializer becomes ``MatMul`` (+ ``Add`` for its bias),
  its weight stored ``[in, out]`` once;
- **one table for an embedding tied to its head.** A language model's table is
  also its head's weight, transposed: the head is quantized as a MatMul weight
  and the ``Gather`` reads that quantized tensor (:mod:`lfpass.onnx.tied`)
  rather than a second copy the tools would make;
- **no duplicates after.** Scales and zero points that come out bit-identical
  (and any other equal tensors) are stored once;
- **weight-only passes composed.** ``int8-weights`` and ``int4`` run the tools
  in turn on what the previous one left: 4-bit blocks first (``int4``), then
  8-bit blocks for the ``MatMul`` weights kept wider (all of them under
  ``int8-weights``), then ``quantize_dynamic`` restricted to ``Gather`` for the
  tables 4 bits do not take. Under a budget each weight gets its own width
  (:func:`quantize_within`);
- **blocks no deeper than the weights.** A block size past the shallowest
  MatMul weight's depth pads every block of it (a depth of 64 in blocks of 128
  stores twice its bytes): the block is the largest power of two that fits;
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
from lfpass.onnx.rewrite import FreshNames, add_initializer, take_over
from lfpass.onnx.save import needs_external
from lfpass.onnx.tied import find_ties, tie_tables

log = logging.getLogger(__name__)

MODES = ("int8", "int8-weights", "int4")  # weights and activations; weights only (8-bit blocks); 4-bit blocks
WEIGHT_ONLY = ("int8-weights", "int4")
QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
                           "ConvInteger", "QLinearMatMul", "QLinearConv", "MatMulNBits", "QGemm",
                           "DynamicQuantizeMatMul", "QAttention", "GatherBlockQuantized"})
_WEIGHTED = {"MatMul": 1, "Gemm": 1, "Conv": 1}  # op -> the input holding its weight
_TABLES = {"Gather": 0}  # op -> the input holding a table (an embedding) when it is a float 2-D initializer
_FLOATS = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
BLOCK = 32  # 4-bit: weights per scale along the input axis
BLOCK8 = 128  # 8-bit weight-only blocks: as accurate as 32 on MiniLM (0.0007 vs 0.0006), 4% smaller
GATHER_OPSET = 21  # 4-bit Gather tables are int4 tensors, which need opset 21


class QuantizeError(InputError):
    """A model these quantizers cannot take (already quantized, integer weights, no MatMul for 4 bits)."""


@dataclass
class QuantReport:
    """What quantization did: ``method``; weight tensors quantized, and those read by several
    nodes among them (each stored once); weights left in float, and (``int4``) those kept at 8
    bits, by why; tensors folded or rewritten beforehand and duplicates removed after."""

    mode: str
    method: str
    quantized: int = 0
    shared: int = 0
    float_left: dict[str, str] = field(default_factory=dict)
    eight_bit: dict[str, str] = field(default_factory=dict)
    prepared: dict[str, int] = field(default_factory=dict)
    deduplicated: int = 0
    tied: dict[str, str] = field(default_factory=dict)  # embedding table -> the head whose quantized tensor it reads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        left = f", {len(self.float_left)} left in float" if self.float_left else ""
        wider = f", {len(self.eight_bit)} of them at 8 bits" if self.eight_bit else ""
        tied = (f", {len(self.tied)} embedding table(s) stored as their output head's quantized weight"
                if self.tied else "")
        return (f"{self.mode}: {self.quantized} weight tensors quantized ({self.shared} of them read by several "
                f"nodes, each stored once){wider}{tied}{left}; {self.method}")


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
    if mode in WEIGHT_ONLY and not ops & {"MatMul", "Gemm", "Gather"}:
        return (f"{mode} quantizes MatMul weights and Gather tables (onnxruntime's MatMulNBits); the model has "
                "neither: nothing quantized")
    return ""


def prepare(model: ir.Model) -> dict[str, int]:
    """Every weight read in one orientation, in place: ``Transpose`` nodes of initializers
    folded (one transposed initializer per tensor and permutation) and plain ``Gemm``
    nodes on an initializer rewritten as ``MatMul`` (+ ``Add``). Returns how many of each."""
    graph, names = model.graph, FreshNames(model)
    made: dict[tuple[str, tuple[int, ...]], ir.Value] = {}
    counts = {"constants as initializers": lift_constants(graph), "transposes folded": 0, "gemms as matmul": 0}

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
        take_over(out, result)
        graph.remove(node, safe=True)
        counts["gemms as matmul"] += 1
    _drop_unused(graph)
    return counts


def lift_constants(graph: ir.Graph) -> int:
    """``Constant`` nodes holding a weight (read, directly or through a ``Transpose``, as a
    MatMul/Gemm/Conv weight, or as a Gather's table; as converters such as Paddle2ONNX write them)
    become initializers of the same name (the quantizers take initializers only; onnxruntime
    treats both as constants). How many were lifted."""
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
    """Whether ``value`` is a MatMul/Gemm/Conv weight input, directly or through ``Transpose`` nodes,
    or a Gather's table."""
    return any(_read_as_weight(u.node.outputs[0]) if u.node.op_type == "Transpose"
               else _WEIGHTED.get(u.node.op_type, _TABLES.get(u.node.op_type)) == u.idx for u in value.uses())


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
    """Float initializers feeding a MatMul/Gemm/Conv weight input or a Gather's table (2-D or more)
    -> the names of the nodes reading them."""
    out: dict[str, list[str]] = {}
    for node in model.graph:
        at = _WEIGHTED.get(node.op_type, _TABLES.get(node.op_type))
        if at is None or len(node.inputs) <= at or not _initializer(node.inputs[at]):
            continue
        weight = node.inputs[at]
        if weight.const_value.dtype in _FLOATS and len(weight.const_value.shape) >= 2:
            out.setdefault(weight.name, []).append(node.name)
    return out


def quantize(model: ir.Model, mode: str, feeds: Sequence[dict[str, np.ndarray]] | None = None,
             keep_float: Sequence[str] = (), block_size: int = BLOCK,
             eight_bit: Sequence[str] = ()) -> tuple[ir.Model, QuantReport]:
    """``model`` quantized to ``mode`` by onnxruntime's tools (a new model; ``model`` is prepared
    in place first, see :func:`prepare`). int8: dynamic per-channel, or static QDQ on ``feeds``
    (calibration batches) when given; int8-weights: 8-bit blocks of :data:`BLOCK8` for
    ``MatMul`` weights, 8-bit per-channel ``Gather`` tables; int4: 4-bit blocks of
    ``block_size`` for both, ``eight_bit`` naming weights kept at 8 bits instead.
    ``keep_float``: weights (names after :func:`prepare`) left in float, their readers
    excluded. A :class:`QuantizeError` when the model cannot be quantized."""
    why = refusal(model, mode)
    if why:
        raise QuantizeError(why)
    ir.external_data.load_to_model(model)  # the tools read a file of its own, not the input's data file
    prepared = prepare(model)
    _name_nodes(model)
    readers = weight_readers(model)
    ops = {n.name: n.op_type for n in model.graph}
    if mode in WEIGHT_ONLY and not any(ops[n] in ("MatMul", "Gather") for r in readers.values() for n in r):
        raise QuantizeError(f"{mode} quantizes MatMul weights and Gather tables (onnxruntime's MatMulNBits); the "
                            "model has no MatMul on a weight and no Gather on a float table: nothing quantized")
    ties = _tables_to_tie(model, mode, keep_float, eight_bit)
    exclude = sorted({n for w in keep_float for n in readers.get(w, [])} | set(ties))
    wider = sorted({n for w in eight_bit for n in readers.get(w, [])}) if mode == "int4" else []
    with tempfile.TemporaryDirectory(prefix="lfpass-quantize-") as tmp, _quiet("root"):
        large = needs_external(model)  # past protobuf's 2 GB: the tools read and write external data
        source = Path(tmp) / "prepared.onnx"
        ir.save(model, source, external_data="prepared.data" if large else None)
        if mode in WEIGHT_ONLY:
            out, method = _weight_only(source, model, mode, exclude, wider, block_size, large)
        else:
            out = Path(tmp) / "quantized.onnx"
            method = _run(source, out, feeds, exclude, large)
        quantized = ir.load(out)
        ir.external_data.load_to_model(quantized)  # in memory before the folder goes
    report = QuantReport(mode, method, prepared=prepared)
    report.tied = tie_tables(quantized, ties)
    report.deduplicated = deduplicate(quantized)
    left = weight_readers(quantized)
    for name in readers:
        if name in left:
            report.float_left[name] = "kept in float" if name in keep_float else "not quantized by the tool"
        else:
            report.quantized += 1
            report.shared += len(readers[name]) > 1
            if mode == "int4" and name in eight_bit:
                report.eight_bit[name] = "kept at 8 bits"
    return quantized, report


def _tables_to_tie(model: ir.Model, mode: str, keep_float: Sequence[str], eight_bit: Sequence[str]) -> dict[str, str]:
    """The ``Gather`` nodes whose table will read its head's quantized tensor (:mod:`lfpass.onnx.tied`)
    -> the head: not when either is kept in float, nor when the table is kept at 8 bits and its
    head is not."""
    nodes = {n.name: n for n in model.graph}
    ties = {}
    for gather, head in find_ties(model).items():
        table = nodes[gather].inputs[0].name
        if table in keep_float or head in keep_float or (mode == "int4" and table in eight_bit
                                                          and head not in eight_bit):
            continue
        ties[gather] = head
    return ties


def _name_nodes(model: ir.Model) -> None:
    """Every node named (the tools exclude nodes by name)."""
    names = FreshNames(model)
    for node in model.graph:
        if not node.name:
            node.name = names.fresh(node.op_type)


def _raise_opset(source: Path, large: bool, version: int) -> tuple[Path, str]:
    """``source`` converted to opset ``version`` by onnx's version converter, when below it; the
    model to quantize and a note ("" when nothing was done). A :class:`ValueError` when the
    converter fails (it has no adapter for some node)."""
    import onnx
    from onnx import version_converter

    model = onnx.load(str(source), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset >= version:
        return source, ""
    try:
        onnx.load_external_data_for_model(model, str(source.parent))
        converted = version_converter.convert_version(model, version)
    except Exception as exc:  # the converter's own error types: no adapter for some node
        raise ValueError(f"opset {opset} could not be raised to {version} ({exc})") from exc
    metadata = {n.name: list(n.metadata_props) for n in model.graph.node if n.name and n.metadata_props}
    for node in converted.graph.node:  # the converter drops what exporters write per node (module paths)
        if node.name in metadata and not node.metadata_props:
            node.metadata_props.extend(metadata[node.name])
    target = source.with_name(f"opset{version}.onnx")
    onnx.save(converted, str(target), save_as_external_data=large, location=f"opset{version}.data" if large else None)
    return target, f"opset {opset} raised to {version} (onnx version converter)"


def _run(source: Path, out: Path, feeds: Sequence[dict[str, np.ndarray]] | None, exclude: list[str],
         large: bool) -> str:
    """int8 weights and activations: static QDQ on ``feeds`` when given, else dynamic."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, \
        quantize_static

    if feeds:
        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.batches = iter(list(feeds))

            def get_next(self) -> dict[str, np.ndarray] | None:
                return next(self.batches, None)

        # DequantizeLinear's ``axis`` exists from opset 13, and quantize_static writes it without
        # raising the opset (the file then fails to load): older models are raised first
        try:
            source, raised = _raise_opset(source, large, 13)
            per_channel, note = True, f"; {raised} for per-channel scales" if raised else ""
        except ValueError as exc:
            log.info("%s: weights per tensor", exc)
            per_channel, note = False, f"; {exc}: per-tensor scales"
        quantize_static(source, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                        op_types_to_quantize=list(_WEIGHTED), use_external_data_format=large)
        return (f"static int8 QDQ of MatMul/Gemm/Conv, {'per-channel' if per_channel else 'per-tensor'} weights, "
                f"calibrated on {len(feeds)} batches (onnxruntime quantize_static){note}")
    quantize_dynamic(source, out, per_channel=True, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                     use_external_data_format=large)
    return "dynamic int8, per-channel weights (onnxruntime quantize_dynamic)"


def _weight_only(source: Path, model: ir.Model, mode: str, exclude: list[str], wider: list[str],
                 block_size: int, large: bool) -> tuple[Path, str]:
    """The weight-only passes on ``source``, each on what the one before wrote: 4-bit blocks of
    ``block_size`` for MatMul weights and Gather tables but ``exclude`` and ``wider`` (int4);
    8-bit blocks for the MatMul weights still float but ``exclude``; ``quantize_dynamic`` for the
    Gather tables still float but ``exclude``, 8 bits per channel. The last file written, and
    the method in words."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    ops = {n.name: n.op_type for n in model.graph}
    readers = weight_readers(model)
    nodes = {n for r in readers.values() for n in r}
    depths = [model.graph.initializers[w].const_value.shape[0] for w, r in readers.items() if ops[r[0]] == "MatMul"]
    block8, block_size = block_size_for(BLOCK8, depths), block_size_for(block_size, depths)
    gathers = sorted(n for n in nodes if ops[n] == "Gather" and n not in exclude)
    step = iter(range(1, 10))
    said: list[str] = []

    def nbits(path: Path, bits: int, block: int, skip: list[str], op_types: tuple[str, ...]) -> Path:
        target = path.with_name(f"pass{next(step)}.onnx")
        quantizer = MatMulNBitsQuantizer(str(path), bits=bits, block_size=block, is_symmetric=True,
                                         nodes_to_exclude=skip, op_types_to_quantize=op_types,
                                         quant_axes=(("MatMul", 0), ("Gather", 1)))
        quantizer.process()
        quantizer.model.save_model_to_file(str(target), use_external_data_format=large)
        return target

    path, tables4 = source, []
    if mode == "int4":
        tables4 = [g for g in gathers if g not in wider]
        if tables4:
            try:
                path, raised = _raise_opset(path, large, GATHER_OPSET)
                said += [f"{raised} for 4-bit tables"] if raised else []
            except ValueError as exc:
                said.append(f"Gather tables at 8 bits: {exc}")
                tables4 = []
        path = nbits(path, 4, block_size, exclude + wider, ("MatMul", "Gather") if tables4 else ("MatMul",))
        said.insert(0, f"4-bit symmetric blocks of {block_size} for MatMul weights"
                    + (f" and {len(tables4)} Gather tables" if tables4 else ""))
    eight = [n for n in nodes if ops[n] == "MatMul" and n not in exclude and (mode != "int4" or n in wider)]
    if eight:
        path = nbits(path, 8, block8, exclude, ("MatMul",))
        said.append(f"8-bit symmetric blocks of {block8} for {len(eight)} MatMul weights")
    rest = [g for g in gathers if g not in tables4]
    if rest:
        target = path.with_name(f"pass{next(step)}.onnx")
        quantize_dynamic(path, target, per_channel=True, weight_type=QuantType.QInt8, op_types_to_quantize=["Gather"],
                         nodes_to_quantize=rest, use_external_data_format=large)
        path = target
        said.append(f"8-bit per-channel Gather tables (quantize_dynamic) for {len(rest)}")
    return path, f"weights only, computed in float: {'; '.join(said)} (onnxruntime MatMulNBitsQuantizer)"


def block_size_for(largest: int, depths: Sequence[int]) -> int:
    """The block size for weights of these input depths: ``largest``, or the greatest power of two
    (16 at least, as MatMulNBits needs) no deeper than the shallowest weight, whose blocks
    would otherwise be mostly padding (a depth of 64 in blocks of 128 stores twice its bytes)."""
    shallowest = min(depths, default=largest)
    return max(16, min(largest, 1 << (max(shallowest, 1).bit_length() - 1)))


# -- under a budget ------------------------------------------------------------------------------

def emulate(weight: np.ndarray, mode: str, axis: int, block_size: int = BLOCK) -> np.ndarray:
    """What quantizing keeps of a float ``weight`` (float64): int8, symmetric per channel along
    ``axis`` (the output channels); int8-weights and int4, symmetric blocks (of :data:`BLOCK8`
    8-bit, of ``block_size`` 4-bit) along the other axis of a 2-D weight. An estimate for
    ranking layers, not the tools' exact arithmetic."""
    w = np.asarray(weight, dtype=np.float64)
    if mode == "int8":
        other = tuple(i for i in range(w.ndim) if i != axis)
        scale = np.max(np.abs(w), axis=other, keepdims=True) / 127.0
        return np.round(w / np.where(scale > 0, scale, 1.0)) * scale
    if axis == 0:  # blocks run along the other axis
        return emulate(w.T, mode, 1, block_size).T
    block, top = (block_size, 7) if mode == "int4" else (BLOCK8, 127)
    k = w.shape[0]
    pad = (-k) % block
    blocks = np.pad(w, ((0, pad), (0, 0))).reshape(-1, block, w.shape[1])
    scale = np.max(np.abs(blocks), axis=1, keepdims=True) / top
    q = np.clip(np.round(blocks / np.where(scale > 0, scale, 1.0)), -top - 1, top) * scale
    return q.reshape(-1, w.shape[1])[:k]


def sensitivity_order(model: ir.Model, mode: str, feeds: Sequence[dict[str, np.ndarray]], readout: Any,
                      block_size: int = BLOCK) -> list[str]:
    """The prepared ``model``'s weights (and tables) the tools quantize in ``mode``, the one whose
    quantization alone moves the outputs on ``feeds`` most first: each weight's quantized values
    (:func:`emulate`) fed to one session in turn (:func:`lfpass.onnx.frontend.overridable`), the
    rest float."""
    from lfpass.core.quality import relative_change
    from lfpass.onnx.frontend import overridable, run

    readers = weight_readers(model)
    ops = {n.name: n.op_type for n in model.graph}
    sess, fed = overridable(model, list(readers))
    reference = run(sess, feeds, readout)
    moved = {}
    for name, nodes in readers.items():
        op = ops.get(nodes[0])
        if name not in fed or (mode in WEIGHT_ONLY and op not in ("MatMul", "Gather")):
            continue  # the weight-only tools take MatMul weights and Gather tables only
        array = read_array(model.graph.initializers[name].const_value)
        if mode in WEIGHT_ONLY and array.ndim != 2:
            continue
        axis = 0 if op in ("Conv", "Gather") else array.ndim - 1  # the output channels (a table's rows)
        values = emulate(array, mode, axis, block_size).astype(array.dtype)
        moved[name] = relative_change(reference, run(sess, feeds, readout, {name: values}))
    return sorted(moved, key=lambda n: -moved[n])


def quantize_within(model: ir.Model, mode: str, budget: float, error_of: Any, choose: Sequence[dict[str, np.ndarray]],
                    readout: Any, feeds: Sequence[dict[str, np.ndarray]] | None = None,
                    block_size: int = BLOCK) -> tuple[ir.Model, QuantReport, float]:
    """``model`` quantized as far as keeps ``error_of(quantized) <= budget``, each weight at its
    own width. Weights are ranked by :func:`sensitivity_order` on ``choose``; the most sensitive
    are kept wider, how many found by bisection (each step one quantizer run, measured end to
    end). int4: the fewest kept at 8 bits; if all at 8 bits still break the budget, the fewest
    kept in float (the rest at 8 bits). int8 and int8-weights: the fewest kept in float.
    Returns the model, the report (``float_left`` and ``eight_bit`` name what was kept wider,
    and why) and its error. Keeping every weight in float is the prepared float model, which
    keeps the budget when ``error_of(model)`` does."""
    from lfpass.onnx.frontend import copy_model

    prepared = prepare(model)
    order = sensitivity_order(model, mode, choose, readout, block_size)
    n = len(order)
    tried: dict[tuple[int, int], tuple[ir.Model, QuantReport, float]] = {}

    def attempt(floats: int, eights: int) -> tuple[ir.Model, QuantReport, float]:
        """The first ``floats`` of the order in float, the next ``eights`` at 8 bits, the rest at ``mode``."""
        if (floats, eights) not in tried:
            quantized, report = quantize(copy_model(model), mode, feeds, order[:floats], block_size,
                                         order[floats:floats + eights])
            tried[floats, eights] = (quantized, report, error_of(quantized))
        return tried[floats, eights]

    key = None
    if mode == "int4":  # the 8-bit rung first: every weight at 8 bits is checked, not assumed
        eights = _fewest(lambda k: attempt(0, k)[2] <= budget, n, n_holds=False)
        key = (0, eights) if eights is not None else None
    if key is None:
        floats = _fewest(lambda k: k < n and attempt(k, n - k if mode == "int4" else 0)[2] <= budget, n)
        key = (floats, n - floats if mode == "int4" else 0)
    steps = len(tried)
    why = f"(error <= {budget:g}; {steps} quantizer runs measured end to end)"
    if key[0] >= n:  # every weight in float: quantizing nothing keeps the float model, smaller and exact
        report = QuantReport(mode, f"nothing quantized: quantizing any weight broke the budget {why}")
        report.float_left = {name: "quantizing it broke the budget" for name in order}
        report.prepared = prepared
        return model, report, error_of(model)
    quantized, report, error = attempt(*key)
    report.prepared = prepared  # the copies were prepared already: what preparing did is the first count
    for name in order[:key[0]]:
        report.float_left[name] = f"quantizing it broke the budget {why}"
    for name in order[key[0]:key[0] + key[1]]:
        report.eight_bit[name] = f"4 bits broke the budget {why}"
    return quantized, report, error


def _fewest(holds: Any, n: int, n_holds: bool = True) -> int | None:
    """The least ``k`` in ``0..n`` with ``holds(k)``, ``holds`` monotone (false, then true), by
    bisection; ``holds(n)`` is assumed when ``n_holds``, else checked (None when false)."""
    if holds(0):
        return 0
    if not n_holds and not holds(n):
        return None
    lo, hi = 0, n  # lo breaks, hi holds
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if holds(mid) else (mid, hi)
    return hi
