"""An embedding table tied to its output head, quantized once.

Language models read one matrix ``W`` (``vocab x width``) twice: as the table a
``Gather`` looks tokens up in, and transposed as the head's weight that scores
the vocabulary. The tie is the model's largest tensor (GPT-2: 38.6 M of its
124 M parameters). Before quantizing, :func:`lfpass.onnx.quantize.prepare`
folds the head's ``Transpose`` into an initializer ``W.T`` so the MatMul
quantizers take it; left to themselves the tools then quantize ``W`` a second
time for the ``Gather`` (``quantize_dynamic``: per tensor; the 4-bit quantizer:
an ``int4`` table), so the tie is stored twice. The legacy exporter writes the
two orientations as two initializers from the start.

Here the table is stored once: a ``Gather`` whose table is the transpose of a
quantized MatMul weight (found by value, so a legacy file's two copies count)
is left out of the tools' run and then reads the head's quantized tensor:

- int8 (``MatMulInteger`` or ``DequantizeLinear`` on ``W.T`` as ``[width,
  vocab]`` int8, a scale per vocabulary row): the token columns are gathered
  as int8 and scaled by their rows' scales (``Gather`` on axis 1, then
  ``Transpose``, ``Cast``, ``Mul``);
- weight-only (``MatMulNBits``: ``B`` is ``[vocab, blocks, bytes]``, a row
  per token already): onnxruntime's ``GatherBlockQuantized`` reads ``B`` as it
  is, its blocks along the last axis.

A table is tied only when its head is quantized at least as wide as the table
would have been (a table kept in float, or at 8 bits where its head has 4,
keeps its own copy). The result is the head's rounding, per row: no worse than
the per-tensor scale ``quantize_dynamic`` gives a table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from lfpass.onnx.load import read_array
from lfpass.onnx.rewrite import FreshNames, add_initializer, take_over

def find_ties(model: ir.Model) -> dict[str, str]:
    """``Gather`` nodes (by name) whose table is an initializer equal to the transpose of another
    initializer read as a ``MatMul`` weight -> that weight's name. Run after ``prepare`` (heads
    read through a ``Transpose`` or a ``Gemm`` with ``transB`` are plain MatMul weights then)."""
    heads: dict[tuple[int, int], list[ir.Value]] = {}
    for node in model.graph:
        if node.op_type == "MatMul" and len(node.inputs) > 1 and _float_matrix(node.inputs[1]):
            value = node.inputs[1]
            if value not in heads.get(tuple(value.const_value.shape), []):
                heads.setdefault(tuple(value.const_value.shape), []).append(value)
    ties: dict[str, str] = {}
    for node in model.graph:
        if not _lookup_of(node) or not _float_matrix(node.inputs[0]):
            continue
        table = node.inputs[0]
        rows, cols = table.const_value.shape
        candidates = heads.get((cols, rows), [])
        if not candidates:
            continue
        array = read_array(table.const_value)
        head = next((h for h in candidates if np.array_equal(read_array(h.const_value).T, array)), None)
        if head is not None:
            ties[node.name] = head.name
    return ties


def _float_matrix(value: ir.Value | None) -> bool:
    return (value is not None and value.is_initializer() and value.const_value is not None
            and value.const_value.dtype.is_floating_point() and len(value.const_value.shape) == 2)


@dataclass
class _Int8:
    """A head stored ``[width, vocab]`` in 8 bits, a scale (and zero point) per vocabulary column."""

    data: ir.Value
    scale: ir.Value
    zero_point: ir.Value | None


@dataclass
class _Float:
    """A float head stored ``[width, vocab]``: the table's own values, transposed."""

    data: ir.Value


@dataclass
class _Blocks:
    """A head in MatMulNBits' layout: ``B`` ``[vocab, blocks, bytes]``, scales ``[vocab, blocks]``."""

    data: ir.Value
    scales: ir.Value
    bits: int
    block_size: int
    width: int


def _quantized_head(graph: ir.Graph, head: str) -> _Int8 | _Blocks | None:
    """How the tools stored the MatMul weight ``head`` (onnxruntime's names: ``{head}_quantized``
    and ``{head}_scale``; ``{head}_Q4``/``_Q8`` for MatMulNBits); None when they did not."""
    for node in graph:
        if node.op_type == "MatMulInteger" and len(node.inputs) > 1 and node.inputs[1].name == f"{head}_quantized":
            scale = graph.initializers.get(f"{head}_scale")
            zero = node.inputs[3] if len(node.inputs) > 3 else None
            return _Int8(node.inputs[1], scale, zero) if _per_column(node.inputs[1], scale, 1) else None
        if node.op_type == "DequantizeLinear" and node.inputs[0].name == f"{head}_quantized":
            axis = node.attributes.get("axis")
            zero = node.inputs[2] if len(node.inputs) > 2 else None
            ok = _per_column(node.inputs[0], node.inputs[1], axis.as_int() if axis is not None else 1)
            return _Int8(node.inputs[0], node.inputs[1], zero) if ok else None
        if (node.op_type == "MatMulNBits" and node.domain == "com.microsoft"
                and node.inputs[1].name in (f"{head}_Q4", f"{head}_Q8")):
            if len(node.inputs) > 3 and node.inputs[3] is not None:
                return None  # asymmetric blocks: their zero points are packed differently for the Gather
            attrs = node.attributes
            return _Blocks(node.inputs[1], node.inputs[2], attrs["bits"].as_int(), attrs["block_size"].as_int(),
                           attrs["K"].as_int())
    return None


def _per_column(data: ir.Value, scale: ir.Value | None, axis: int) -> bool:
    """Whether ``scale`` is one per column of the 2-D 8-bit ``data`` (along ``axis``), or one for all."""
    if scale is None or scale.const_value is None or data.const_value is None:
        return False
    size = int(np.prod(scale.const_value.shape, dtype=np.int64))
    return size == 1 or (len(scale.const_value.shape) == 1 and axis in (1, -1)
                         and size == data.const_value.shape[1])


def tie_tables(model: ir.Model, ties: Mapping[str, str]) -> dict[str, str]:
    """Each ``Gather`` of ``ties`` (left float by the tools) made to read its head's quantized
    tensor instead of its own table, in place; the tables now stored once -> their heads.
    A Gather whose head the tools did not quantize is left as it is."""
    graph, names = model.graph, FreshNames(model)
    nodes = {n.name: n for n in graph}
    done: dict[str, str] = {}
    for gather_name, head in ties.items():
        gather = nodes.get(gather_name)
        form = _quantized_head(graph, head)
        if gather is None or form is None:
            continue
        done[gather.inputs[0].name] = head
        _replace_lookup(graph, names, gather, form)
    return done


def lay_out_tables(model: ir.Model) -> dict[str, str]:
    """A float table also read, transposed, as a MatMul weight stored once, in the head's
    orientation, in place. The dynamo exporter writes a tied head as a ``Transpose`` of the table,
    which onnxruntime folds into a second, transposed copy when it makes the session (GPT-2: 154
    MB more); the legacy exporter writes the two orientations as two initializers. The MatMuls
    read the transposed initializer and the lookups gather its columns; the values are the
    same, bit for bit. The tables laid out so -> their transposed initializer's name."""
    graph, names = model.graph, FreshNames(model)
    tables = [v for v in graph.initializers.values() if _float_matrix(v)]
    for table in tables:
        users = list(table.uses())
        gathers = [u.node for u in users if u.idx == 0 and _lookup_of(u.node)]
        transposes = [u.node for u in users if u.node.op_type == "Transpose" and _swaps(u.node)
                      and all(v.node.op_type == "MatMul" and v.idx == 1 for v in u.node.outputs[0].uses())]
        if not gathers or not transposes or len(gathers) + len(transposes) != len(users):
            continue
        head = add_initializer(graph, names.fresh(f"{table.name}.T"),
                               np.ascontiguousarray(read_array(table.const_value).T))
        for node in transposes:  # the head reads a transposed initializer: the table is then tied by value
            node.outputs[0].replace_all_uses_with(head)
            graph.remove(node, safe=True)
    done: dict[str, str] = {}
    nodes = {n.name: n for n in graph}
    for gather, head in find_ties(model).items():  # the legacy exporter's tie too: two initializers, equal
        done[nodes[gather].inputs[0].name] = head
        _replace_lookup(graph, names, nodes[gather], _Float(graph.initializers[head]))
    return done


def _lookup_of(node: ir.Node) -> bool:
    """Whether ``node`` looks rows up in its first input: a standard ``Gather`` on axis 0."""
    axis = node.attributes.get("axis")
    return node.op_type == "Gather" and node.domain in ("", "ai.onnx") and (axis is None or axis.as_int() == 0)


def _swaps(node: ir.Node) -> bool:
    """Whether the ``Transpose`` ``node`` swaps the two axes of a matrix."""
    perm = node.attributes.get("perm")
    return perm is None or tuple(perm.as_ints()) == (1, 0)


def _replace_lookup(graph: ir.Graph, names: FreshNames, gather: ir.Node, form: _Float | _Int8 | _Blocks) -> None:
    """``gather`` (a lookup in a table) replaced by the same lookup in ``form``, its output's name
    kept; the table dropped once nothing reads it."""
    table = gather.inputs[0]
    new, out = _lookup(graph, names, form, gather.inputs[1], gather.name)
    for node in new:
        graph.insert_before(gather, node)
    take_over(gather.outputs[0], out)
    graph.remove(gather, safe=True)
    if not table.uses() and table.name in graph.initializers:
        del graph.initializers[table.name]


def _lookup(graph: ir.Graph, names: FreshNames, form: _Float | _Int8 | _Blocks, ids: ir.Value,
            base: str) -> tuple[list[ir.Node], ir.Value]:
    """The nodes that look ``ids`` up in the head's tensor (``form``: float, 8-bit or blocks), and
    the value they give: the table's rows, dequantized, shaped ``ids.shape + [width]``."""
    made: list[ir.Node] = []

    def const(label: str, array: np.ndarray) -> ir.Value:
        return add_initializer(graph, names.fresh(f"{base}/{label}"), np.asarray(array))

    def op(kind: str, inputs: Sequence[ir.Value | None], domain: str = "", **attrs: object) -> ir.Value:
        node = ir.node(kind, list(inputs), attrs, domain=domain, name=names.fresh(f"{base}/{kind}"))
        node.outputs[0].name = names.fresh(f"{base}/{kind}.out")
        made.append(node)
        return node.outputs[0]

    id_shape = op("Shape", [ids])
    if isinstance(form, _Blocks):
        blocks = form.data.const_value.shape[1]
        scales = op("Reshape", [form.scales, const("scales_shape", np.array([-1, blocks, 1], np.int64))])
        rows = op("GatherBlockQuantized", [form.data, ids, scales], domain="com.microsoft", gather_axis=0,
                  quantize_axis=2, block_size=form.block_size, bits=form.bits)
        padded = blocks * form.block_size
        shape = op("Concat", [id_shape, const("width", np.array([padded], np.int64))], axis=0)
        out = op("Reshape", [rows, shape])
        if padded != form.width:
            out = op("Slice", [out, const("start", np.array([0], np.int64)),
                               const("end", np.array([form.width], np.int64)), const("axis", np.array([-1], np.int64))])
        return made, out
    width = form.data.const_value.shape[0]
    flat = op("Reshape", [ids, const("flat", np.array([-1], np.int64))])
    columns = op("Gather", [form.data, flat], axis=1)  # [width, tokens]
    values = op("Transpose", [columns], perm=[1, 0])
    shape = op("Concat", [id_shape, const("width", np.array([width], np.int64))], axis=0)
    if isinstance(form, _Float):
        return made, op("Reshape", [values, shape])
    values = op("Cast", [values], to=form.scale.const_value.dtype)
    column = const("column", np.array([-1, 1], np.int64))
    zero = form.zero_point
    if zero is not None and zero.const_value is not None and np.any(read_array(zero.const_value)):
        offsets = zero if _one(zero) else op("Gather", [zero, flat])
        values = op("Sub", [values, op("Reshape", [op("Cast", [offsets], to=form.scale.const_value.dtype), column])])
    scale = form.scale
    if not _one(scale):
        scale = op("Reshape", [op("Gather", [scale, flat]), column])
    values = op("Mul", [values, scale])
    return made, op("Reshape", [values, shape])


def _one(value: ir.Value) -> bool:
    """Whether the constant ``value`` holds a single number (a per-tensor scale or zero point)."""
    return int(np.prod(value.const_value.shape, dtype=np.int64)) == 1
