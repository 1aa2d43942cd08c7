"""``--quantize int8 | int4`` after fusion (:mod:`lfpass.onnx.quantize`): every shared tensor is one
quantized initializer read by all its members (weights read through ``Transpose`` nodes and
``Gemm`` with ``transB`` too); onnxruntime's outputs stay within a stated tolerance of the float
fused model; models the quantizers cannot take are refused in one line with nothing written."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import lfpass
from lfpass.core.config import FusionConfig
from lfpass.onnx.quantize import QuantizeError, deduplicate, prepare, quantize, weight_readers
from tests.onnx.test_factor import WIDTH, mlp

INT8 = 0.03  # relative L2 error of the outputs against the float fused model, dynamic per-channel int8
INT4 = 0.2  # 4-bit blocks of 32
_QUANT_TYPES = (TensorProto.INT8, TensorProto.UINT8, TensorProto.INT4, TensorProto.UINT4)


class Blocks(torch.nn.Module):
    def __init__(self, depth: int = 6, width: int = 64):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(depth))
        self.head = torch.nn.Linear(width, 10)

    def forward(self, x):
        for block in self.blocks:
            x = x + torch.relu(block(x))
        return self.head(x)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A residual MLP by the legacy exporter: every Linear a Gemm with transB=1."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("q") / "blocks.onnx"
    with torch.no_grad():
        torch.onnx.export(Blocks().eval(), (torch.randn(2, 64),), str(path), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "n"}})
    return path


def run(path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def run_model(model: ir.Model, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]


def quantized_weights(model: onnx.ModelProto) -> dict[str, int]:
    """Each integer weight initializer (2-D or more) -> how many nodes read it (through its
    DequantizeLinear in QDQ models)."""
    readers = collections.Counter(x for n in model.graph.node for x in n.input)
    dq = {n.input[0]: n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return {i.name: readers[dq.get(i.name, i.name)] for i in model.graph.initializer
            if i.data_type in _QUANT_TYPES and len(i.dims) >= 2}


@pytest.mark.parametrize("mode, tolerance", [("int8", INT8), ("int4", INT4)])
def test_each_shared_tensor_is_quantized_once_and_read_by_all_its_members(exported, tmp_path, mode, tolerance):
    config = FusionConfig(target_ratio=1.8, ratio_scope="layers", merge="mean")
    source = exported.read_bytes()
    fused = lfpass.optimize(exported, tmp_path / "fused.onnx", config, check=False)
    done = lfpass.optimize(exported, tmp_path / f"{mode}.onnx", config.replace(quantize=mode), check=False)
    assert fused.plan.groups and done.quantized is not None
    float_model = ir.load(tmp_path / "fused.onnx")
    prepare(float_model)  # the float fused model's weights, each read the way the quantized model reads it
    readers = sorted(len(r) for r in weight_readers(float_model).values())
    assert max(readers) > 1  # ties: one tensor, several readers
    written = onnx.load(tmp_path / f"{mode}.onnx")
    assert sorted(quantized_weights(written).values()) == readers  # one quantized tensor per shared tensor
    assert not weight_readers(ir.load(tmp_path / f"{mode}.onnx"))  # no weight left in float
    assert done.quantized.quantized == len(readers) and done.quantized.shared == sum(r > 1 for r in readers)
    assert done.params_after == fused.params_after and done.bytes_after < fused.bytes_after / 2  # graph overhead: tiny
    x = np.random.default_rng(1).standard_normal((16, 64)).astype(np.float32)
    want, got = run(tmp_path / "fused.onnx", x), run(tmp_path / f"{mode}.onnx", x)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < tolerance
    assert exported.read_bytes() == source  # the input file is never modified


def test_weights_read_through_transposes_are_folded_once_and_quantized():
    model = mlp(depth=4, transposed=True)  # MatMul(x, Transpose(W)) per layer, as exporters write Linear
    value = model.graph.initializers["blocks.0.fc.weight"]
    for i in (1, 2):  # three layers read one tensor through their own Transpose nodes
        for node in model.graph:
            if node.op_type == "Transpose" and node.inputs[0].name == f"blocks.{i}.fc.weight":
                node.replace_input_with(0, value)
    x = np.random.default_rng(0).standard_normal((8, WIDTH)).astype(np.float32)
    want = ort.InferenceSession(ir.to_proto(model).SerializeToString()).run(None, {"x": x})[0]
    quantized, report = quantize(model, "int8")
    assert report.prepared["transposes folded"] == 4
    counts = quantized_weights(ir.to_proto(quantized))
    assert sorted(counts.values()) == [1, 3]  # the shared tensor: one quantized copy, three readers
    got = ort.InferenceSession(ir.to_proto(quantized).SerializeToString()).run(None, {"x": x})[0]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < INT8


def test_static_int8_with_calibration_inputs_is_qdq_with_one_dequantize_per_tensor(exported, tmp_path):
    calib = tmp_path / "calib.npz"
    x = np.random.default_rng(2).standard_normal((128, 64)).astype(np.float32)
    np.savez(calib, x=x)
    config = FusionConfig(target_ratio=1.8, ratio_scope="layers", merge="mean", actions="tie")
    lfpass.optimize(exported, tmp_path / "fused.onnx", config, inputs=calib, check=False)
    quantized, report = quantize(ir.load(tmp_path / "fused.onnx"), "int8", [{"x": x[i:i + 32]} for i in (0, 32, 64)])
    assert "static int8 QDQ" in report.method
    written = ir.to_proto(quantized)
    dq = collections.Counter(n.input[0] for n in written.graph.node if n.op_type == "DequantizeLinear")
    assert max(dq.values()) == 1  # one DequantizeLinear per quantized tensor, read by every member
    assert max(quantized_weights(written).values()) > 1
    # through optimize, with inputs and no budget, static and dynamic are both measured and the better kept
    done = lfpass.optimize(exported, tmp_path / "s8.onnx", config.replace(quantize="int8"), inputs=calib, check=False)
    assert "int8 kept: static" in done.plan.message
    assert ("static" in done.quantized.method) == ("(static int8 kept" in done.plan.message)


def test_equal_scales_and_zero_points_are_stored_once():
    model = mlp(depth=2)
    zeros = np.zeros(WIDTH, np.int8)
    for name in ("a", "b"):
        model.graph.register_initializer(ir.Value(name=name, const_value=ir.tensor(zeros, name=name)))
    add = ir.node("Add", [model.graph.initializers["a"], model.graph.initializers["b"]])
    model.graph.append(add)
    model.graph.outputs.append(add.outputs[0])
    assert deduplicate(model) == 1 and add.inputs[0] is add.inputs[1]


def _conv_only() -> ir.Model:
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [w])
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _integer_weights() -> ir.Model:
    w = numpy_helper.from_array(np.ones((4, 4), np.int8), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.INT8, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.INT8, [2, 4])], [w])
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


@pytest.mark.parametrize("make, mode, says", [
    (_conv_only, "int4", "int4 quantizes MatMul weights"),
    (_integer_weights, "int8", "integer and float8 weights are quantized already"),
])
def test_what_the_quantizers_cannot_take_is_refused_in_one_line(make, mode, says):
    with pytest.raises(QuantizeError, match=says) as info:
        quantize(make(), mode)
    assert "\n" not in str(info.value)


def test_an_already_quantized_model_is_refused_and_nothing_is_written(exported, tmp_path):
    config = FusionConfig(target_ratio=1.8, ratio_scope="layers", merge="mean", quantize="int8")
    lfpass.optimize(exported, tmp_path / "q.onnx", config, check=False)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(QuantizeError, match="already quantized .*nothing quantized again"):
        lfpass.optimize(tmp_path / "q.onnx", tmp_path / "again.onnx", config, check=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_the_cli_quantizes_and_reports(exported, tmp_path, capsys):
    from lfpass.cli import main

    out = tmp_path / "cli.onnx"
    code = main(["optimize", str(exported), "--ratio", "1.8", "--scope", "layers", "--merge", "mean", "--quantize",
                 "int4", "-o", str(out), "--no-validate", "--report", str(tmp_path / "r.json")])
    assert code == 0 and out.exists()
    assert "quantized int4:" in capsys.readouterr().err
    import json

    report = json.loads((tmp_path / "r.json").read_text())
    assert report["quantized"]["mode"] == "int4" and report["quantized"]["quantized"] >= 4


@pytest.mark.slow
def test_a_model_past_2gb_is_quantized_through_external_data(tmp_path):
    """Nine 8192x8192 float32 MatMuls (2.4 GB): the quantizers read and write it as external data."""
    rng = np.random.default_rng(0)
    n, nodes, inits, h = 8192, [], [], "x"
    for i in range(9):
        inits.append(numpy_helper.from_array(rng.standard_normal((n, n), dtype=np.float32) * 0.01, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [h, f"w{i}"], [f"h{i}"]))
        h = f"h{i}"
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
                              [helper.make_tensor_value_info(h, TensorProto.FLOAT, [1, n])], inits)
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    del inits, graph
    quantized, report = quantize(model, "int8")
    assert report.quantized == 9 and len(quantized_weights(ir.to_proto(quantized))) == 9


def test_a_budget_holds_for_the_fused_and_quantized_model(exported, tmp_path):
    """Fusion is planned within what quantizing the original alone leaves of the budget; the
    written file's error on held-out inputs (never chosen on) keeps the budget."""
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(3).standard_normal((256, 64)).astype(np.float32))
    config = FusionConfig(target_ratio=None, max_error=0.01, quantize="int8")
    done = lfpass.optimize(exported, tmp_path / "b8.onnx", config, inputs=calib)
    assert done.written and done.quantized.quantized > 0 and done.error is not None
    assert done.error <= 0.01 and done.plan.max_error == 0.01
    assert "the original quantized to int8 alone measured" in done.plan.message
    assert "int8 kept: static" in done.plan.message  # static and dynamic both measured, the better kept
    assert ("static" in done.quantized.method) == ("(static int8 kept" in done.plan.message)


def _quarter_of(exported, mode: str, x: np.ndarray) -> float:
    """A quarter of the cosine error quantizing every weight of ``exported`` to ``mode`` costs on ``x``."""
    quantized, _ = quantize(ir.load(exported), mode)
    return float(1 - np.mean([np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) for a, b in
                              zip(run(exported, x), run_model(quantized, x))])) / 4


def _bits(path) -> list[int]:
    return sorted(a.i for n in onnx.load(path).graph.node if n.op_type == "MatMulNBits" for a in n.attribute
                  if a.name == "bits")


def _tight(exported, tmp_path, mode: str):
    """``optimize`` quantizing to ``mode`` under a quarter of what ``mode`` everywhere costs; the
    result and that budget."""
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(3).standard_normal((256, 64)).astype(np.float32))
    budget = _quarter_of(exported, mode, np.load(calib)["x"])
    config = FusionConfig(target_ratio=None, max_error=budget, quantize=mode)
    return lfpass.optimize(exported, tmp_path / "tight.onnx", config, inputs=calib), budget


def test_under_a_budget_int4_keeps_the_most_sensitive_weights_at_8_bits(exported, tmp_path):
    done, budget = _tight(exported, tmp_path, "int4")
    wider = done.quantized.eight_bit
    assert wider and all("4 bits broke the budget" in why for why in wider.values())
    assert not done.quantized.float_left and done.error <= budget * 1.5  # chosen on one share, verified on another
    bits = _bits(tmp_path / "tight.onnx")
    assert bits.count(8) == len(wider) and bits.count(4) == len(bits) - len(wider) > 0
    assert not weight_readers(ir.load(tmp_path / "tight.onnx"))


def test_layers_that_break_the_budget_stay_in_float_the_most_sensitive_first(exported, tmp_path):
    done, budget = _tight(exported, tmp_path, "int8")
    kept = done.quantized.float_left
    assert kept and all("broke the budget" in why for why in kept.values())
    assert 0 < done.quantized.quantized and done.error <= budget * 1.5
    assert len(weight_readers(ir.load(tmp_path / "tight.onnx"))) == len(kept)  # exactly those stayed float


def test_int8_weights_quantizes_matmul_weights_and_embedding_tables_in_8_bit_blocks(tmp_path):
    """Weight-only 8 bits: MatMulNBits for the Linear weights, quantize_dynamic for the Gather
    table; with int4 the table is a 4-bit GatherBlockQuantized (opset raised to 21)."""
    class Embedded(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(100, 64)
            self.blocks = Blocks()

        def forward(self, ids):
            return self.blocks(self.embed(ids))

    torch.manual_seed(0)
    path = tmp_path / "emb.onnx"
    with torch.no_grad():
        torch.onnx.export(Embedded().eval(), (torch.zeros(2, dtype=torch.long),), str(path), dynamo=False,
                          input_names=["ids"], dynamic_axes={"ids": {0: "n"}}, opset_version=17)
    ids = np.arange(100, dtype=np.int64)
    want = ort.InferenceSession(str(path)).run(None, {"ids": ids})[0]
    for mode, tolerance, table in (("int8-weights", 0.01, "DequantizeLinear"), ("int4", INT4, "GatherBlockQuantized")):
        quantized, report = quantize(ir.load(path), mode)
        assert report.quantized == 8 and not report.float_left  # 7 Linear weights and the table
        proto = ir.to_proto(quantized)
        ops = collections.Counter(n.op_type for n in proto.graph.node)
        assert ops["MatMulNBits"] == 7 and ops[table] >= 1 and "Gemm" not in ops
        got = ort.InferenceSession(proto.SerializeToString()).run(None, {"ids": ids})[0]
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < tolerance, mode


def test_weights_held_in_constant_nodes_are_lifted_and_quantized():
    """Converters (Paddle2ONNX: PP-OCR's files) hold weights in Constant nodes, which the quantizers
    reject ("Expected ... to be an initializer"): they become initializers of the same name."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Constant", [], ["w"], value=w),
                               helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    quantized, report = quantize(model, "int8")
    assert report.prepared["constants as initializers"] == 1 and report.quantized == 1
    assert list(quantized_weights(ir.to_proto(quantized)).values()) == [1]


@pytest.mark.parametrize("mode", ["int8-weights", "int4"])
def test_a_converters_constant_node_weights_and_table_take_the_weight_only_modes(mode):
    """Unrelated names, a MatMul weight and an embedding table both in Constant nodes (as converters
    write them): lifted, quantized, and the model still runs."""
    rng = np.random.default_rng(0)
    table = numpy_helper.from_array(rng.standard_normal((50, 64)).astype(np.float32), "p2o.w_0")
    w = numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "p2o.w_1")
    graph = helper.make_graph([helper.make_node("Constant", [], ["c0"], value=table),
                               helper.make_node("Constant", [], ["c1"], value=w),
                               helper.make_node("Gather", ["c0", "ids"], ["e"]),
                               helper.make_node("MatMul", ["e", "c1"], ["y"])], "g",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 32])])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    ids = np.arange(50, dtype=np.int64)
    want = ort.InferenceSession(ir.to_proto(model).SerializeToString()).run(None, {"ids": ids})[0]
    quantized, report = quantize(model, mode)
    assert report.prepared["constants as initializers"] == 2 and report.quantized == 2 and not report.float_left
    got = ort.InferenceSession(ir.to_proto(quantized).SerializeToString()).run(None, {"ids": ids})[0]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < (0.01 if mode == "int8-weights" else INT4)


def test_a_model_with_external_data_is_quantized(exported, tmp_path):
    """A file whose tensors live in a data file beside it (as the dynamo exporter writes large models)."""
    proto = onnx.load(exported)
    onnx.save(proto, tmp_path / "ext.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.onnx.data", size_threshold=0)
    config = FusionConfig(target_ratio=1.8, ratio_scope="layers", merge="mean", quantize="int8")
    done = lfpass.optimize(tmp_path / "ext.onnx", tmp_path / "out.onnx", config, check=False)
    assert done.quantized.quantized >= 4
    onnx.checker.check_model(str(tmp_path / "out.onnx"), full_check=True)


def test_static_int8_on_an_opset_12_model_raises_it_to_13_for_per_channel_scales(tmp_path):
    """quantize_static writes DequantizeLinear's axis (opset 13) into the model as it is: an
    opset-12 file (PP-OCR's) would not load."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 8, 8])], [w])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)]))
    feeds = [{"x": np.random.default_rng(i).standard_normal((2, 3, 8, 8)).astype(np.float32)} for i in range(4)]
    quantized, report = quantize(model, "int8", feeds)
    assert "raised to 13" in report.method and "per-channel" in report.method
    proto = ir.to_proto(quantized)
    onnx.checker.check_model(proto, full_check=True)
    ort.InferenceSession(proto.SerializeToString()).run(None, feeds[0])  # it loads and runs


def test_a_pipeline_file_asks_for_quantization_and_a_wrong_mode_is_one_line(tmp_path):
    from lfpass.core.config import load_pipeline
    from lfpass.core.errors import ConfigError

    (tmp_path / "q.toml").write_text('target_ratio = 1.5\nquantize = "int4"\n')
    assert load_pipeline(tmp_path / "q.toml").quantize == "int4"
    (tmp_path / "bad.toml").write_text('quantize = "int2"\n')
    with pytest.raises(ConfigError, match="quantize: must be one of none, int8, int8-weights, int4"):
        load_pipeline(tmp_path / "bad.toml")


def test_when_no_weight_can_be_quantized_within_the_budget_the_float_model_is_kept(exported, tmp_path):
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(3).standard_normal((256, 64)).astype(np.float32))
    done = lfpass.optimize(exported, tmp_path / "f.onnx", FusionConfig(target_ratio=None, max_error=1e-9,
                                                                     quantize="int4"), inputs=calib)
    assert done.quantized.quantized == 0 and "nothing quantized" in done.quantized.method
    assert not quantized_weights(onnx.load(tmp_path / "f.onnx")) and done.error <= 1e-6
