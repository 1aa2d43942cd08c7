"""A shared tensor held once by an onnxruntime session, pre-packing or not.

onnxruntime pre-packs the constant weight of each ``MatMul``/``Gemm``/``Conv`` (and
of their integer and 4-bit forms) into its kernel's own layout when it makes the
session, per node: a tensor that k nodes read is then held k times packed, beside
the original. On a GPT-2 fused to 1.52x fewer bytes, the session holds 1.30x less
memory than the original's (``tools/bench_ram.py --model gpt2``): the shared bytes
come back as packed copies. With ``session.disable_prepacking`` every session
holds its file's bytes once, but every weight then runs unpacked.

:func:`hold_shared_once` keeps pre-packing for the weights one node reads and
turns it off for the shared ones only: each shared initializer is also declared a
graph input (an *overridable initializer*, its stored value the default), which
onnxruntime does not treat as a constant, so no node packs it. The outputs are
unchanged and no caller needs to feed the new inputs; the price is that the
nodes reading a shared tensor run on the unpacked layout (GPT-2: about 1.18x
the latency of the packed session, timed by hand, for 0.86x of its memory),
with none of the graph optimizations that need them constant (onnxruntime says
so, one warning per tensor, at its default log level).
"""

from __future__ import annotations

import onnx_ir as ir

from lfpass.onnx.quantize import lift_constants

# op -> the input holding the weight its kernel pre-packs
PACKED = {"MatMul": 1, "Gemm": 1, "Conv": 1, "ConvTranspose": 1, "MatMulInteger": 1, "ConvInteger": 1,
          "MatMulNBits": 1, "DynamicQuantizeMatMul": 1, "MatMulIntegerToFloat": 1, "QLinearMatMul": 3,
          "QLinearConv": 3, "QGemm": 3}


def hold_shared_once(model: ir.Model) -> list[str]:
    """Each initializer that two or more nodes read as a pre-packed weight declared a graph input
    too (its value the default), in place; their names. Tensors ``lfpass`` shares are the ones
    this finds, but any file's are taken; weights held in ``Constant`` nodes (as converters
    write them) become initializers of the same name first."""
    graph = model.graph
    lift_constants(graph)  # a converter's weights in Constant nodes: only an initializer can be overridden
    readers: dict[str, int] = {}
    for node in graph:
        at = PACKED.get(node.op_type)
        if at is None or len(node.inputs) <= at:
            continue
        weight = node.inputs[at]
        if weight is not None and weight.is_initializer() and weight.const_value is not None:
            readers[weight.name] = readers.get(weight.name, 0) + 1
    inputs = set(graph.inputs)
    marked = []
    for name, count in readers.items():
        value = graph.initializers[name]
        if count > 1 and value not in inputs:
            graph.inputs.append(value)
            marked.append(name)
    return marked
