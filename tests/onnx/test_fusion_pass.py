"""The ONNX rewrite as an onnx-ir pass: in a PassManager beside onnx-ir's and onnxscript's
passes, idempotent, with its pre- and postconditions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_ir.passes.common import CheckerPass, RemoveUnusedNodesPass

from lfpass.core.config import load_pipeline
from lfpass.core.errors import PlanError
from lfpass.onnx import LayerFusionPass
from lfpass.onnx.load import count_params

W = 16
LOSSLESS = Path(__file__).parents[2] / "passes" / "lossless.toml"


def _model(copies: bool = True) -> ir.Model:
    """Four MatMul blocks; with ``copies``, blocks 2 and 3 are bit-identical to 0 and 1."""
    rng = np.random.default_rng(0)
    base = [rng.standard_normal((W, W)).astype(np.float32) for _ in range(4)]
    weights = [base[0], base[1], base[0], base[1]] if copies else base
    nodes, inits, h = [], [], "x"
    for i, w in enumerate(weights):
        inits.append(numpy_helper.from_array(w.copy(), f"b.{i}.weight"))
        nodes += [helper.make_node("MatMul", [h, f"b.{i}.weight"], [f"m{i}"], name=f"/b.{i}/MatMul"),
                  helper.make_node("Tanh", [f"m{i}"], [f"h{i}"])]
        h = f"h{i}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, W])],
                              [helper.make_tensor_value_info(h, TensorProto.FLOAT, [2, W])], inits)
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    proto = ir.serde.serialize_model(model)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_in_a_pass_manager_beside_other_passes_and_idempotent():
    model = _model()
    x = np.random.default_rng(1).standard_normal((2, W)).astype(np.float32)
    before, reference = count_params(model), _run(model, x)
    fusion = LayerFusionPass(load_pipeline(LOSSLESS))
    manager = ir.passes.PassManager([fusion, RemoveUnusedNodesPass(), CheckerPass(full_check=True)], steps=3)
    result = manager(model)
    assert result.modified and len(fusion.plan.groups) == 2
    assert count_params(model) == fusion.plan.params_after == before // 2
    assert len(model.graph.initializers) == 2  # each shared tensor stored once
    np.testing.assert_array_equal(_run(model, x), reference)  # copies merged: exact
    assert fusion(model).modified is False  # a model it fused is left as it is


def test_beside_onnxscripts_optimizer():
    onnxscript = pytest.importorskip("onnxscript")
    model = _model()
    x = np.ones((2, W), np.float32)
    reference = _run(model, x)
    LayerFusionPass(load_pipeline(LOSSLESS))(model)
    onnxscript.optimizer.optimize_ir(model)
    np.testing.assert_array_equal(_run(model, x), reference)


def test_nothing_to_fuse_is_not_modified():
    model = _model(copies=False)
    params = count_params(model)
    result = LayerFusionPass(load_pipeline(LOSSLESS))(model)
    assert result.modified is False and count_params(model) == params


def test_a_plan_for_another_model_is_refused():
    plan = LayerFusionPass(load_pipeline(LOSSLESS)).plan_for(_model())
    other = _model()
    other.graph.initializers["b.3.weight"].const_value = ir.Tensor(np.zeros((W, 2 * W), np.float32),
                                                                 name="b.3.weight")
    with pytest.raises(ir.passes.PreconditionError) as info:
        LayerFusionPass(plan=plan)(other)
    assert isinstance(info.value.__cause__, PlanError)


def test_a_given_plan_is_applied_and_its_figures_recounted():
    fusion = LayerFusionPass(load_pipeline(LOSSLESS))
    plan = fusion.plan_for(_model())
    edited = plan.take(1)  # a plan cut by hand: one group
    model = _model()
    applied = LayerFusionPass(plan=edited)
    assert applied(model).modified
    assert count_params(model) == applied.plan.params_after == plan.params_before - plan.groups[0].saved
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
