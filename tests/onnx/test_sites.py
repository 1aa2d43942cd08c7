"""Site finding in ONNX graphs built with onnx.helper: which nodes are layers, their
signatures, roles and names, and which weights are skipped (and why)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from lfpass.core.config import FusionConfig
from lfpass.onnx import analyze_onnx, find_sites

RNG = np.random.default_rng(0)


def _w(name: str, shape=(8, 8), dtype=np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(dtype), name)


def _model(nodes, initializers=(), inputs=None, outputs=None, opset=17) -> ir.Model:
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])]
    outputs = outputs or [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)]
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return ir.serde.deserialize_model(proto)


def _sig(site) -> dict:
    return dict(site.signature)


def test_gemm_signature_holds_trans_alpha_beta_and_bias():
    nodes = [
        helper.make_node("Gemm", ["x", "w0", "b0"], ["y0"], name="g0", transB=1),
        helper.make_node("Gemm", ["y0", "w1", "b1"], ["y1"], name="g1", transB=1),
        helper.make_node("Gemm", ["y1", "w2", "b2"], ["y2"], name="g2", transB=0),
        helper.make_node("Gemm", ["y2", "w3"], ["y3"], name="g3", transB=1, alpha=0.5),
    ]
    inits = [_w(f"w{i}") for i in range(4)] + [_w(f"b{i}", (8,)) for i in range(3)]
    sites = find_sites(_model(nodes, inits)).sites
    assert [s.kind for s in sites] == ["linear"] * 4
    sig = [_sig(s) for s in sites]
    assert sig[0]["transB"] == 1 and sig[2]["transB"] == 0 and sig[3]["alpha"] == 0.5
    assert sig[0]["bias"] is True and sig[0]["bias_shape"] == (8,) and sig[3]["bias"] is False
    assert sites[0].tensors == ("w0", "b0") and sites[0].numel == 72
    keys = {s.class_key(True) for s in sites}
    assert len(keys) == 3  # g0 and g1 agree; transB=0 and alpha=0.5 each differ
    assert sites[0].class_key(True) == sites[1].class_key(True)


def test_matmul_weight_on_either_side():
    nodes = [
        helper.make_node("MatMul", ["x", "wr"], ["a"], name="right"),
        helper.make_node("MatMul", ["wl", "a"], ["b"], name="left"),
        helper.make_node("MatMul", ["a", "b"], ["c"], name="activations"),
    ]
    found = find_sites(_model(nodes, [_w("wr"), _w("wl", (2, 2))]))
    assert [(s.name, _sig(s)["side"]) for s in found.sites] == [("right", "right"), ("left", "left")]
    assert found.skipped == []  # a product of two activations is no layer, and not a skip


def test_constant_weights_through_identity_transpose_cast():
    w16 = numpy_helper.from_array(RNG.standard_normal((8, 8)).astype(np.float16), "w16")
    nodes = [
        helper.make_node("Constant", [], ["wc"], value=_w("wc_value")),
        helper.make_node("MatMul", ["x", "wc"], ["y0"], name="const"),
        helper.make_node("Identity", ["wi"], ["wi_id"]),
        helper.make_node("MatMul", ["y0", "wi_id"], ["y1"], name="identity"),
        helper.make_node("Transpose", ["wt"], ["wt_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["y1", "wt_t"], ["y2"], name="transpose"),
        helper.make_node("Cast", ["w16"], ["w16_f"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["y2", "w16_f"], ["y3"], name="cast"),
        helper.make_node("Relu", ["wr"], ["wr_relu"]),
        helper.make_node("MatMul", ["y3", "wr_relu"], ["y4"], name="computed"),
    ]
    found = find_sites(_model(nodes, [_w("wi"), _w("wt"), w16, _w("wr")]))
    by = {s.name: s for s in found.sites}
    assert sorted(by) == ["cast", "const", "identity", "transpose"]
    assert _sig(by["identity"])["via"] == () and _sig(by["const"])["via"] == ()
    assert _sig(by["transpose"])["via"] == ("Transpose(perm=(1, 0))",)
    assert _sig(by["cast"])["dtype"] == "FLOAT16" and _sig(by["cast"])["via"][0].startswith("Cast(")
    assert by["const"].class_key(True) == by["identity"].class_key(True)
    assert by["transpose"].class_key(True) != by["identity"].class_key(True)
    assert found.load("w16").dtype == np.float32 and found.load("wc").shape == (8, 8)


def test_graph_input_weights_are_skipped_with_a_reason(tmp_path):
    nodes = [
        helper.make_node("MatMul", ["x", "w_fed"], ["y0"], name="fed"),
        helper.make_node("MatMul", ["y0", "w_default"], ["y1"], name="overridable"),
        helper.make_node("MatMul", ["y1", "w0"], ["y2"], name="/blocks/blocks.0/MatMul"),
        helper.make_node("MatMul", ["y2", "w1"], ["y3"], name="/blocks/blocks.1/MatMul"),
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8]),
        helper.make_tensor_value_info("w_fed", TensorProto.FLOAT, [8, 8]),
        helper.make_tensor_value_info("w_default", TensorProto.FLOAT, [8, 8]),  # an initializer a caller may override
    ]
    model = _model(nodes, [_w("w_default"), _w("w0"), _w("w1")], inputs=inputs)
    found = find_sites(model)
    assert [s.name for s in found.sites] == ["blocks/blocks.0/MatMul", "blocks/blocks.1/MatMul"]
    assert len(found.skipped) == 2
    assert all("graph input" in s for s in found.skipped)
    assert "fed" in found.skipped[0] and "overridable" in found.skipped[1]

    path = tmp_path / "fed.onnx"
    ir.save(model, path)
    plan = analyze_onnx(path, FusionConfig(target_ratio=1.1))
    assert "graph input" in plan.message and "w_fed" in plan.message
    assert "graph input" in plan.explain()


def test_roles_from_legacy_names_initializers_and_namespace():
    nodes = [
        helper.make_node("MatMul", ["x", "onnx::MatMul_7"], ["a"], name="/encoder/layer.3/attention/self/query/MatMul"),
        helper.make_node("Gemm", ["a", "layer1.0.conv1.weight"], ["b"], name="node_Gemm_295"),
        helper.make_node("MatMul", ["b", "val_55"], ["c"], name="node_MatMul_54"),
        helper.make_node("MatMul", ["c", "anon"], ["d"], name="n4"),
    ]
    nodes[2].metadata_props.add(
        key="namespace",
        value=": __main__.W/model: m.BertModel/model.encoder.layer.0.attention.self.key: torch.nn.modules.linear.Linear"
        "/linear_1: aten.linear.default",
    )
    inits = [_w("onnx::MatMul_7"), _w("layer1.0.conv1.weight"), _w("val_55"), _w("anon")]
    sites = find_sites(_model(nodes, inits)).sites
    assert [(s.name, s.role) for s in sites] == [
        ("encoder/layer.3/attention/self/query/MatMul", "encoder/layer.*/attention/self/query/MatMul"),
        ("layer1.0.conv1", "layer1.*.conv1"),
        ("model.encoder.layer.0.attention.self.key", "model.encoder.layer.*.attention.self.key"),
        ("n4", ""),  # nothing carries a path: grouped by signature alone
    ]


def test_names_are_unique_and_stable():
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"y{i - 1}", f"w{i}"], [f"y{i}"], name="same")
             for i in range(3)]
    model = _model(nodes, [_w(f"w{i}") for i in range(3)])
    first = [s.name for s in find_sites(model).sites]
    assert len(set(first)) == 3 and first[0] == "same"
    assert first == [s.name for s in find_sites(model).sites]


def test_one_tensor_read_twice_is_one_site():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="/l/first/MatMul"),
             helper.make_node("MatMul", ["a", "w"], ["b"], name="/l/second/MatMul")]
    sites = find_sites(_model(nodes, [_w("w")])).sites
    assert len(sites) == 1 and sites[0].location == "/l/first/MatMul,/l/second/MatMul"


def test_conv_signature_fills_default_attributes():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["a"], name="/c/c.0/Conv"),
        helper.make_node("Conv", ["a", "w1"], ["b"], name="/c/c.1/Conv", strides=[1, 1], pads=[0, 0, 0, 0], group=1),
        helper.make_node("Conv", ["b", "w2"], ["c"], name="/c/c.2/Conv", dilations=[2, 2]),
        helper.make_node("ConvTranspose", ["c", "w3"], ["d"], name="/c/c.3/ConvTranspose", output_padding=[0, 0]),
    ]
    inits = [_w(f"w{i}", (4, 4, 3, 3)) for i in range(4)]
    sites = find_sites(_model(nodes, inits, inputs=[x])).sites
    assert [s.kind for s in sites] == ["conv", "conv", "conv", "conv_transpose"]
    assert sites[0].signature == sites[1].signature
    assert sites[0].signature != sites[2].signature
    assert _sig(sites[0])["kernel_shape"] == (3, 3) and _sig(sites[3])["output_padding"] == (0, 0)


def test_weight_read_inside_a_subgraph_is_left_alone():
    then = helper.make_graph([helper.make_node("MatMul", ["x", "w0"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2, 8])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 8])])
    nodes = [
        helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other),
        helper.make_node("MatMul", ["y", "w0"], ["z0"], name="/l/l.0/MatMul"),
        helper.make_node("MatMul", ["z0", "w1"], ["z1"], name="/l/l.1/MatMul"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8]),
              helper.make_tensor_value_info("cond", TensorProto.BOOL, [])]
    found = find_sites(_model(nodes, [_w("w0"), _w("w1")], inputs=inputs))
    assert [s.name for s in found.sites] == ["l/l.1/MatMul"]
    assert "subgraph" in found.skipped[0]


@pytest.mark.parametrize("op", ["Gemm", "MatMul"])
def test_both_sides_constant_is_not_a_layer(op):
    nodes = [helper.make_node(op, ["a", "b"], ["c"], name="folded"), helper.make_node("Add", ["x", "c"], ["y"])]
    found = find_sites(_model(nodes, [_w("a"), _w("b")]))
    assert found.sites == [] and found.skipped == []
