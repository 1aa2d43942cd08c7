"""Rewriting ONNX graphs built with onnx.helper: how many tensors are shared, the
structure (checker, unique parameters), the numbers in onnxruntime, and the
cases where nothing may change."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from lfpass.core.config import FusionConfig, load_pipeline
from lfpass.core.errors import PlanError
from lfpass.core.plan import FusionGroup, FusionPlan
from lfpass.core.planner import plan_fusion
from lfpass.onnx import apply_plan, find_sites, optimize
from lfpass.onnx.load import count_params, load_model

LOSSLESS = load_pipeline(Path(__file__).parents[2] / "passes" / "lossless.toml")
WIDTH = 16


def _save(tmp_path: Path, nodes, initializers, name="m.onnx", inputs=None) -> Path:
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])]
    outputs = [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, ["batch", WIDTH])]
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / name
    onnx.save(model, path)
    return path


def mlp(tmp_path: Path, pattern=(0, 1, 0, 1, 0, 1), constant: bool = False, transpose: bool = False,
        extra=(), name: str = "m.onnx") -> Path:
    """Block ``i`` holds copy number ``pattern[i]`` of a few random weights and biases:
    blocks with the same number are bit-identical, in separate tensors."""
    rng = np.random.default_rng(0)
    base = [rng.standard_normal((WIDTH, WIDTH)).astype(np.float32) * 0.3 for _ in range(max(pattern) + 1)]
    bias = [rng.standard_normal(WIDTH).astype(np.float32) * 0.1 for _ in range(max(pattern) + 1)]
    nodes, inits, h = [], [], "x"
    for i, k in enumerate(pattern):
        w = numpy_helper.from_array(base[k].copy(), f"blocks.{i}.fc.weight")
        if constant:
            nodes.append(helper.make_node("Constant", [], [w.name], value=w))
        else:
            inits.append(w)
        inits.append(numpy_helper.from_array(bias[k].copy(), f"blocks.{i}.fc.bias"))
        wname = w.name
        if transpose:
            nodes.append(helper.make_node("Transpose", [w.name], [f"{w.name}_t"], perm=[1, 0]))
            wname = f"{w.name}_t"
        nodes += [
            helper.make_node("MatMul", [h, wname], [f"mm{i}"], name=f"/blocks/blocks.{i}/fc/MatMul"),
            helper.make_node("Add", [f"mm{i}", f"blocks.{i}.fc.bias"], [f"add{i}"]),
            helper.make_node("Relu", [f"add{i}"], [f"h{i}"]),
        ]
        h = f"h{i}"
    return _save(tmp_path, nodes + list(extra), inits, name=name)


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


X = np.random.default_rng(1).standard_normal((4, WIDTH)).astype(np.float32)


@pytest.mark.parametrize("form", ["initializer", "constant", "transpose"])
def test_bit_identical_blocks_fuse_losslessly(tmp_path, form):
    src = mlp(tmp_path, constant=form == "constant", transpose=form == "transpose")
    out = tmp_path / "fused.onnx"
    result = optimize(src, out, LOSSLESS)
    assert len(result.plan.groups) == 2  # blocks 0/2/4 and 1/3/5
    assert result.params_before - result.params_after == 4 * (WIDTH * WIDTH + WIDTH)  # weights and Add biases
    onnx.checker.check_model(str(out), full_check=True)
    fused = onnx.load(out)
    weights = {n.input[1] for n in fused.graph.node if n.op_type == "MatMul"}
    assert len(weights) == (2 if form != "transpose" else 6)  # a Transpose per block, reading 2 tensors
    assert np.array_equal(_run(src, X), _run(out, X))
    assert result.validation.passed and all(o.max_abs == 0.0 for o in result.validation.outputs)
    assert out.stat().st_size < src.stat().st_size


def test_constant_anchor_after_its_members_is_hoisted(tmp_path):
    src = mlp(tmp_path, constant=True)
    model = load_model(src)
    found = find_sites(model)
    names = [s.name for s in found.sites]
    group = FusionGroup(members=(names[4], names[2], names[0]), rule="keep", score=1.0, cls="", numel=WIDTH * WIDTH)
    plan = plan_fusion(found.sites, found.load, LOSSLESS, count_params(model))
    plan = dataclasses.replace(plan, groups=(group,))
    assert apply_plan(model, found, plan) == 1
    out = tmp_path / "hoisted.onnx"
    ir.save(model, out)
    onnx.checker.check_model(str(out), full_check=True)  # topologically sorted: the anchor moved up
    assert np.array_equal(_run(src, X), _run(out, X))


def test_bias_read_by_other_layers_stays_out_of_the_group(tmp_path):
    rng = np.random.default_rng(2)
    t = lambda name, shape: numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)  # noqa: E731
    nodes = [  # like the legacy exporter, which stores equal biases once: a, b and c read one bias tensor
        helper.make_node("Gemm", ["x", "wa", "shared_bias"], ["ya"], name="/l/l.0/Gemm", transB=1),
        helper.make_node("Gemm", ["ya", "wb", "shared_bias"], ["yb"], name="/l/l.1/Gemm", transB=1),
        helper.make_node("Gemm", ["yb", "wc", "shared_bias"], ["yc"], name="/other/Gemm", transB=1),
        helper.make_node("Gemm", ["yc", "wd", "bd"], ["yd"], name="/l/l.2/Gemm", transB=1),
    ]
    inits = [t("wa", (WIDTH, WIDTH)), t("wb", (WIDTH, WIDTH)), t("wc", (WIDTH, WIDTH)), t("wd", (WIDTH, WIDTH)),
             t("shared_bias", (WIDTH,)), t("bd", (WIDTH,))]
    src = _save(tmp_path, nodes, inits)
    sites = {s.name: s for s in find_sites(load_model(src)).sites}
    assert sites["l/l.0/Gemm"].tensors == ("wa",) and sites["l/l.2/Gemm"].tensors == ("wd", "bd")
    assert sites["l/l.0/Gemm"].class_key() != sites["l/l.2/Gemm"].class_key()  # own bias or not: apart
    result = optimize(src, tmp_path / "out.onnx", FusionConfig(target_ratio=1.01), check=False)
    assert [g.members for g in result.plan.groups] == [("l/l.0/Gemm", "l/l.1/Gemm")]
    assert result.params_before - result.params_after == WIDTH * WIDTH == result.plan.groups[0].saved
    fused = onnx.load(tmp_path / "out.onnx")
    inits_after = {i.name: numpy_helper.to_array(i) for i in fused.graph.initializer}
    reads = {n.name: list(n.input) for n in fused.graph.node}
    assert reads["/l/l.0/Gemm"][1:] == reads["/l/l.1/Gemm"][1:] == ["wa", "shared_bias"]
    assert np.array_equal(inits_after["shared_bias"], numpy_helper.to_array(inits[4]))
    assert "wb" not in inits_after


def test_float16_weights_stay_float16(tmp_path):
    rng = np.random.default_rng(3)
    base = rng.standard_normal((WIDTH, WIDTH)).astype(np.float16)
    nodes, inits, h = [], [], "x"
    for i in range(3):
        inits.append(numpy_helper.from_array(base.copy(), f"w{i}"))
        nodes += [helper.make_node("Cast", [f"w{i}"], [f"wf{i}"], to=TensorProto.FLOAT),
                  helper.make_node("MatMul", [h, f"wf{i}"], [f"h{i}"], name=f"/l/l.{i}/MatMul")]
        h = f"h{i}"
    src = _save(tmp_path, nodes, inits)
    result = optimize(src, tmp_path / "out.onnx", LOSSLESS)
    fused = onnx.load(tmp_path / "out.onnx")
    assert [i.data_type for i in fused.graph.initializer] == [TensorProto.FLOAT16]
    assert result.params_after == WIDTH * WIDTH and result.validation.passed
    assert np.array_equal(_run(src, X), _run(tmp_path / "out.onnx", X))


def test_plan_for_another_model_is_refused(tmp_path):
    model = load_model(mlp(tmp_path))
    found = find_sites(model)
    plan = FusionPlan(groups=(FusionGroup(("nope", "blocks/blocks.0/fc/MatMul"), "mean", 1.0, "", 1),),
                      metric="cosine", scope="model", params_before=1, params_after=1, layer_params_before=1,
                      layer_params_after=1, max_ratio=1.0)
    with pytest.raises(PlanError, match="no layer 'nope'"):
        apply_plan(model, found, plan)
    before = ir.serde.serialize_model(model).SerializeToString()
    with pytest.raises(PlanError, match="two groups"):
        a, b, c = (s.name for s in found.sites[:3])
        groups = (FusionGroup((a, c), "keep", 1, "", 1), FusionGroup((c, a), "keep", 1, "", 1))
        twice = dataclasses.replace(plan, groups=groups)
        apply_plan(model, found, twice)
    assert ir.serde.serialize_model(model).SerializeToString() == before  # checked before anything changed


def test_nothing_similar_enough_rewrites_nothing(tmp_path):
    src = mlp(tmp_path)
    config = FusionConfig(metric="cosine", target_ratio=None, threshold=1.5)
    result = optimize(src, tmp_path / "out.onnx", config)
    assert result.plan.groups == () and not result.written
    assert "nothing to fuse" in result.message
    assert not (tmp_path / "out.onnx").exists()


def test_if_subgraphs_are_left_exactly_as_they_are(tmp_path):
    then = helper.make_graph(
        [helper.make_node("Mul", ["h5", "two"], ["t"])], "then", [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["batch", WIDTH])],
        [numpy_helper.from_array(np.full(WIDTH, 2.0, np.float32), "two")],
    )
    other = helper.make_graph([helper.make_node("MatMul", ["h5", "blocks.0.fc.weight"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, ["batch", WIDTH])])
    branch = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
              helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.zeros((), np.float32))),
              helper.make_node("Greater", ["s", "zero"], ["cond"]),
              helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)]
    src = mlp(tmp_path, extra=branch)
    model = onnx.load(src)
    result = optimize(src, tmp_path / "out.onnx", LOSSLESS)
    members = [m for g in result.plan.groups for m in g.members]
    assert len(result.plan.groups) == 2 and "blocks/blocks.0/fc/MatMul" not in members  # read in a branch
    assert any("subgraph" in s for s in result.skipped)
    fused = onnx.load(tmp_path / "out.onnx")
    if_before = next(n for n in model.graph.node if n.op_type == "If")
    if_after = next(n for n in fused.graph.node if n.op_type == "If")
    assert if_after.SerializeToString() == if_before.SerializeToString()
    for x in (X, -X):  # both branches
        assert np.array_equal(_run(src, x), _run(tmp_path / "out.onnx", x))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pattern=st.lists(st.integers(0, 3), min_size=2, max_size=7))
def test_lossless_plans_are_exact_on_generated_graphs(tmp_path, pattern):
    """Whatever blocks repeat, a lossless plan stores each distinct weight once and changes no output."""
    src = mlp(tmp_path, pattern=tuple(pattern), name=f"p{'-'.join(map(str, pattern))}.onnx")
    out = src.with_suffix(".fused.onnx")
    result = optimize(src, out, LOSSLESS, check=False)
    distinct, blocks = len(set(pattern)), len(pattern)
    assert len(result.plan.groups) == sum(pattern.count(k) > 1 for k in set(pattern))
    assert result.params_after == distinct * (WIDTH * WIDTH + WIDTH)  # a MatMul site owns the bias of its Add
    if result.written:
        onnx.checker.check_model(str(out), full_check=True)
        assert np.array_equal(_run(src, X), _run(out, X))
    else:
        assert distinct == blocks
