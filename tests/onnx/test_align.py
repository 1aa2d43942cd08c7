"""ONNX alignment on simple chains: outputs kept in onnxruntime, permuted copies recovered."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lfpass.core.align import Skipped
from lfpass.core.plan import FusionGroup, FusionPlan
from lfpass.core.sites import ClassKey
from lfpass.onnx.align import find_spaces
from lfpass.onnx.frontend import align_onnx


def plan_of(*groups):
    key = ClassKey("linear", ())
    return FusionPlan(tuple(FusionGroup(tuple(g), "mean", 1.0, key, 0) for g in groups), "cosine", "model",
                      0, 0, 0, 0, 1.0)


def mlp_branches(rng, d=6, h=10, copy=True, act="gelu", residual=False) -> onnx.ModelProto:
    """``y = mlp_a(x) + mlp_b(x)``; MatMul + Add bias, an erf-GELU (or Relu), MatMul; ``b`` a permuted copy."""
    w = {"a1": rng.standard_normal((d, h)), "ab1": rng.standard_normal(h), "a2": rng.standard_normal((h, d))}
    if copy:
        perm = rng.permutation(h)
        w.update(b1=w["a1"][:, perm], bb1=w["ab1"][perm], b2=w["a2"][perm])
    else:
        w.update(b1=rng.standard_normal((d, h)), bb1=rng.standard_normal(h), b2=rng.standard_normal((h, d)))
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in w.items()]
    inits += [numpy_helper.from_array(np.array(v, np.float32), k) for k, v in
              (("sqrt2", np.sqrt(2)), ("one", 1.0), ("half", 0.5))]
    nodes = []
    for p, b in (("a", "ab1"), ("b", "bb1")):
        nodes += [helper.make_node("MatMul", ["x", f"{p}1"], [f"{p}_mm"], name=f"{p}/fc1/MatMul"),
                  helper.make_node("Add", [f"{p}_mm", b], [f"{p}_h"], name=f"{p}/fc1/Add")]
        if act == "gelu":
            nodes += [helper.make_node("Div", [f"{p}_h", "sqrt2"], [f"{p}_d"]),
                      helper.make_node("Erf", [f"{p}_d"], [f"{p}_e"]),
                      helper.make_node("Add", [f"{p}_e", "one"], [f"{p}_e1"]),
                      helper.make_node("Mul", [f"{p}_h", f"{p}_e1"], [f"{p}_m"]),
                      helper.make_node("Mul", [f"{p}_m", "half"], [f"{p}_g"])]
            act_out = f"{p}_g"
        else:
            nodes.append(helper.make_node("Relu", [f"{p}_h"], [f"{p}_g"]))
            act_out = f"{p}_g"
        if residual:
            nodes.append(helper.make_node("Add", [act_out, "x_wide"], [f"{p}_rr"]))
            act_out = f"{p}_rr"
        nodes.append(helper.make_node("MatMul", [act_out, f"{p}2"], [f"{p}_y"], name=f"{p}/fc2/MatMul"))
    nodes.append(helper.make_node("Add", ["a_y", "b_y"], ["y"]))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", d])]
    if residual:
        inputs.append(helper.make_tensor_value_info("x_wide", TensorProto.FLOAT, ["n", h]))
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", d])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model: ir.Model | onnx.ModelProto, feeds: dict) -> np.ndarray:
    proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
    onnx.checker.check_model(proto)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_permuted_copy_recovered_outputs_kept(act):
    rng = np.random.default_rng(0)
    model = ir.serde.deserialize_model(mlp_branches(rng, act=act))
    feeds = {"x": rng.standard_normal((4, 6)).astype(np.float32)}
    before = run(model, feeds)
    spaces = find_spaces(model)
    assert sorted(s.key for s in spaces) == ["a/fc1/MatMul", "b/fc1/MatMul"] or len(spaces) == 2
    names = {s.name for s in __import__("lfpass.onnx.sites", fromlist=["x"]).find_sites(model).sites}
    fc1 = sorted(n for n in names if "fc1" in n)
    fc2 = sorted(n for n in names if "fc2" in n)
    report = align_onnx(model, plan_of(tuple(fc1), tuple(fc2)))
    (moved,) = report.aligned
    assert moved.after == pytest.approx(1.0, abs=1e-12) and moved.before < 0.6 and moved.floor < 1.0
    inits = model.graph.initializers
    assert np.array_equal(inits["a1"].const_value.numpy(), inits["b1"].const_value.numpy())
    assert np.array_equal(inits["a2"].const_value.numpy(), inits["b2"].const_value.numpy())
    np.testing.assert_allclose(run(model, feeds), before, rtol=1e-5, atol=1e-5 * np.abs(before).max())


def test_random_pair_outputs_kept():
    rng = np.random.default_rng(1)
    model = ir.serde.deserialize_model(mlp_branches(rng, copy=False))
    feeds = {"x": rng.standard_normal((4, 6)).astype(np.float32)}
    before = run(model, feeds)
    from lfpass.onnx.sites import find_sites
    names = sorted(s.name for s in find_sites(model).sites if "fc1" in s.name)
    report = align_onnx(model, plan_of(tuple(names)))
    (moved,) = report.aligned
    assert moved.after >= moved.before
    np.testing.assert_allclose(run(model, feeds), before, rtol=1e-5, atol=1e-5 * np.abs(before).max())


def test_residual_between_is_no_space():
    rng = np.random.default_rng(2)
    model = ir.serde.deserialize_model(mlp_branches(rng, residual=True, act="relu"))
    skipped: list[Skipped] = []
    assert find_spaces(model, skipped) == []
    assert any("x_wide" in s.reason for s in skipped)


def conv_bn_model(rng, ch=4) -> onnx.ModelProto:
    w = {"c1": rng.standard_normal((ch, 3, 3, 3)), "cb1": rng.standard_normal(ch),
         "s": rng.standard_normal(ch), "bb": rng.standard_normal(ch), "m": rng.standard_normal(ch),
         "v": rng.random(ch) + 0.5, "c2": rng.standard_normal((2, ch, 3, 3))}
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in w.items()]
    nodes = [helper.make_node("Conv", ["x", "c1", "cb1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["h", "s", "bb", "m", "v"], ["n"], name="bn"),
             helper.make_node("Relu", ["n"], ["r"]),
             helper.make_node("Conv", ["r", "c2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 5, 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_conv_bn_relu_conv_space_moves_batchnorm():
    from lfpass.core.align import Transform, transform_space
    rng = np.random.default_rng(3)
    model = ir.serde.deserialize_model(conv_bn_model(rng))
    feeds = {"x": rng.standard_normal((1, 3, 5, 5)).astype(np.float32)}
    before = run(model, feeds)
    (space,) = find_spaces(model)
    assert {m.tensor for m in space.moves} == {"c1", "cb1", "s", "bb", "m", "v", "c2"}
    inits = model.graph.initializers
    tensors = {m.tensor: inits[m.tensor].const_value.numpy() for m in space.moves}
    transform_space(space, Transform(rng.permutation(space.width)), tensors)
    for name, value in tensors.items():
        inits[name].const_value = ir.tensor(value, name=name)
    np.testing.assert_allclose(run(model, feeds), before, rtol=1e-5, atol=1e-5 * np.abs(before).max())
