"""Per-member residuals in ONNX graphs built with onnx.helper: how many layers changed, the
structure (checker, parameters counted from the file), onnxruntime against the unfused model
(full-rank residuals give it back within float32 round-off, 1e-5), and refusals."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lfpass.core.calibration import Calibration, accumulate
from lfpass.core.errors import PlanError
from lfpass.core.lowrank import capture_originals, declined, residual_params
from lfpass.core.plan import FusionGroup, FusionPlan
from lfpass.onnx import apply_plan, find_sites
from lfpass.onnx.load import count_params
from lfpass.onnx.lowrank import attach_residuals_onnx

WIDTH = 12
ATOL = 1e-5


def _model(nodes, inits, in_shape, out_name, out_shape) -> ir.Model:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, out_shape)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(proto, full_check=True)
    return ir.serde.deserialize_model(proto)


def matmul_mlp(depth=4, seed=0, last_is_output=True) -> tuple[ir.Model, list[np.ndarray], list[np.ndarray]]:
    """``x -> (MatMul W_i, Add b_i, Tanh)*``; the last block's Add is the graph output."""
    rng = np.random.default_rng(seed)
    ws = [rng.standard_normal((WIDTH, WIDTH)).astype(np.float32) * 0.4 for _ in range(depth)]
    bs = [rng.standard_normal(WIDTH).astype(np.float32) * 0.1 for _ in range(depth)]
    nodes, inits, h = [], [], "x"
    for i in range(depth):
        inits += [numpy_helper.from_array(ws[i], f"blocks.{i}.fc.weight"),
                  numpy_helper.from_array(bs[i], f"blocks.{i}.fc.bias")]
        nodes += [helper.make_node("MatMul", [h, f"blocks.{i}.fc.weight"], [f"mm{i}"], name=f"/blocks.{i}/fc/MatMul"),
                  helper.make_node("Add", [f"mm{i}", f"blocks.{i}.fc.bias"], [f"fc{i}"], name=f"/blocks.{i}/fc/Add")]
        h = f"fc{i}"
        if i < depth - 1 or not last_is_output:
            nodes.append(helper.make_node("Tanh", [h], [f"act{i}"], name=f"/blocks.{i}/act"))
            h = f"act{i}"
    return _model(nodes, inits, ["batch", WIDTH], h, ["batch", WIDTH]), ws, bs


def gemm_mlp(depth=3, seed=1) -> ir.Model:
    rng = np.random.default_rng(seed)
    nodes, inits, h = [], [], "x"
    for i in range(depth):
        inits += [numpy_helper.from_array(rng.standard_normal((WIDTH, WIDTH)).astype(np.float32) * 0.4, f"l{i}.weight"),
                  numpy_helper.from_array(rng.standard_normal(WIDTH).astype(np.float32), f"l{i}.bias")]
        nodes += [helper.make_node("Gemm", [h, f"l{i}.weight", f"l{i}.bias"], [f"g{i}"], name=f"/l{i}/Gemm",
                                   transB=1, alpha=0.5, beta=2.0),
                  helper.make_node("Tanh", [f"g{i}"], [f"t{i}"], name=f"/l{i}/act")]
        h = f"t{i}"
    return _model(nodes, inits, ["batch", WIDTH], h, ["batch", WIDTH])


def conv_stack(depth=3, ch=4, seed=2, group=1) -> ir.Model:
    rng = np.random.default_rng(seed)
    nodes, inits, h = [], [], "x"
    for i in range(depth):
        inits += [numpy_helper.from_array(rng.standard_normal((ch, ch // group, 3, 3)).astype(np.float32) * 0.3,
                                          f"c{i}.weight"),
                  numpy_helper.from_array(rng.standard_normal(ch).astype(np.float32) * 0.1, f"c{i}.bias")]
        nodes += [helper.make_node("Conv", [h, f"c{i}.weight", f"c{i}.bias"], [f"conv{i}"], name=f"/c{i}/Conv",
                                   pads=[1, 1, 1, 1], strides=[1, 1], group=group),
                  helper.make_node("Relu", [f"conv{i}"], [f"r{i}"], name=f"/c{i}/act")]
        h = f"r{i}"
    return _model(nodes, inits, ["batch", ch, 6, 6], h, ["batch", ch, 6, 6])


def run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def fuse(model: ir.Model, *groups: tuple[str, ...]):
    found = find_sites(model)
    sites = found.by_name()
    made = tuple(FusionGroup(tuple(g), "mean", 1.0, sites[g[0]].class_key(), sites[g[0]].numel) for g in groups)
    before = count_params(model)
    after = before - sum(g.saved for g in made)
    plan = FusionPlan(groups=made, metric="cosine", scope="model", params_before=before, params_after=after,
                      layer_params_before=before, layer_params_after=after, max_ratio=1.0)
    originals = capture_originals(found, plan)
    assert apply_plan(model, found, plan) == len(groups)
    return found, plan, originals


def names(model: ir.Model, kind: str) -> list[str]:
    return [s.name for s in find_sites(model).sites if s.kind == kind]


@pytest.mark.parametrize("give_sites", [True, False])
def test_matmul_full_rank_residuals_give_the_unfused_model_back(give_sites):
    model, ws, bs = matmul_mlp()
    x = np.random.default_rng(3).standard_normal((8, WIDTH)).astype(np.float32)
    expected = run(model, x)
    members = names(model, "linear")[:3]
    before = count_params(model)
    found, plan, originals = fuse(model, tuple(members))
    assert not np.allclose(run(model, x), expected, atol=1e-3)
    n_nodes = len(list(model.graph))
    assert attach_residuals_onnx(model, plan, originals, WIDTH, sites=found if give_sites else None) == 3
    assert len(list(model.graph)) == n_nodes + 3 * 4  # down, up, bias Add, Add per member
    np.testing.assert_allclose(run(model, x), expected, atol=ATOL, rtol=0)
    per_member = WIDTH * (WIDTH + WIDTH) + WIDTH  # the factors and the bias given back
    assert count_params(model) == before - plan.groups[0].saved + 3 * per_member
    shared = [s for s in find_sites(model).sites if s.name == members[0]]
    assert len(shared) == 1  # the anchor's tensor: still one site, read by three layers


def test_residual_after_the_graph_output_keeps_its_name():
    model, _, _ = matmul_mlp(depth=3)
    x = np.random.default_rng(4).standard_normal((5, WIDTH)).astype(np.float32)
    expected = run(model, x)
    members = names(model, "linear")
    found, plan, originals = fuse(model, (members[0], members[2]))
    attach_residuals_onnx(model, plan, originals, WIDTH, sites=found)
    assert model.graph.outputs[0].name == "fc2"
    np.testing.assert_allclose(run(model, x), expected, atol=ATOL, rtol=0)


def test_low_rank_with_calibration_counts_and_improves():
    model, ws, bs = matmul_mlp(depth=3, last_is_output=False)
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((256, WIDTH)) * np.logspace(0, -2, WIDTH)).astype(np.float32)
    expected = run(model, x)
    cal, h = Calibration(), x.astype(np.float64)
    for i in range(3):  # each layer's input, by weight tensor name
        cal.layers[f"blocks.{i}.fc.weight"] = accumulate(None, h)
        h = np.tanh(h @ ws[i] + bs[i])
    members = names(model, "linear")
    before = count_params(model)
    errors = {}
    for label, c in (("plain", None), ("asvd", cal)):
        work = matmul_mlp(depth=3, last_is_output=False)[0]
        found, plan, originals = fuse(work, tuple(members))
        fused_error = np.linalg.norm(run(work, x) - expected)
        attach_residuals_onnx(work, plan, originals, 3, calibration=c, sites=found)
        assert count_params(work) == before - plan.groups[0].saved + 3 * (3 * 2 * WIDTH + WIDTH)
        errors[label] = np.linalg.norm(run(work, x) - expected) / np.linalg.norm(expected)
        assert errors[label] < fused_error / np.linalg.norm(expected)
    assert errors["asvd"] < errors["plain"], errors


def test_gemm_residuals():
    model = gemm_mlp()
    x = np.random.default_rng(6).standard_normal((4, WIDTH)).astype(np.float32)
    expected = run(model, x)
    before = count_params(model)
    found, plan, originals = fuse(model, tuple(names(model, "linear")))
    assert attach_residuals_onnx(model, plan, originals, WIDTH, sites=found) == 3
    np.testing.assert_allclose(run(model, x), expected, atol=ATOL, rtol=0)
    assert count_params(model) == before - plan.groups[0].saved + 3 * (2 * WIDTH * WIDTH + WIDTH)


def test_conv_residuals():
    model = conv_stack()
    x = np.random.default_rng(7).standard_normal((2, 4, 6, 6)).astype(np.float32)
    expected = run(model, x)
    before = count_params(model)
    found, plan, originals = fuse(model, tuple(names(model, "conv")))
    assert attach_residuals_onnx(model, plan, originals, 4, sites=found) == 3  # full rank: min(4, 4 * 9)
    np.testing.assert_allclose(run(model, x), expected, atol=ATOL, rtol=0)
    assert count_params(model) == before - plan.groups[0].saved + 3 * (4 * (4 * 9 + 4) + 4)


def test_refusals():
    model = conv_stack(ch=4, group=2)
    found, plan, originals = fuse(model, tuple(names(model, "conv")[:2]))
    # a grouped conv is declined per layer (and counted as nothing), never the whole run
    assert attach_residuals_onnx(model, plan, originals, 2, sites=found) == 0
    assert residual_params(found.by_name()[plan.groups[0].members[0]], 2, bias=True) == 0
    assert declined("conv", found.by_name()[plan.groups[0].members[0]].signature) == "a grouped convolution (groups=2)"
    model, _, _ = matmul_mlp()
    found, plan, originals = fuse(model, tuple(names(model, "linear")[:2]))
    with pytest.raises(PlanError, match="no original weight"):
        attach_residuals_onnx(model, plan, {}, 2, sites=found)
    stranger = dataclasses.replace(plan, groups=(dataclasses.replace(plan.groups[0], members=("nope", "nada")),))
    with pytest.raises(PlanError, match="not in the fused model"):
        attach_residuals_onnx(model, stranger, {"nope": originals[plan.groups[0].members[0]],
                                                "nada": originals[plan.groups[0].members[0]]}, 2)
