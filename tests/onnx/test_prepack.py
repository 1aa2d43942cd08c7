"""``--hold-shared-once`` (:mod:`lfpass.onnx.prepack`): each tensor two or more pre-packing nodes
read is declared an overridable initializer (a graph input with its stored default), so
onnxruntime does not pack a copy per node; tensors one node reads stay constants; the outputs
are unchanged and nothing new needs feeding."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from lfpass.onnx.prepack import hold_shared_once


def _model(path):
    rng = np.random.default_rng(0)
    shared, own = (rng.standard_normal((16, 16)).astype(np.float32) for _ in range(2))
    nodes = [helper.make_node("MatMul", ["x", "shared"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("MatMul", ["b", "shared"], ["c"]), helper.make_node("MatMul", ["c", "own"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16])],
                              [numpy_helper.from_array(shared, "shared"), numpy_helper.from_array(own, "own")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _run(model, x):
    data = ir.to_proto(model).SerializeToString() if isinstance(model, ir.Model) else str(model)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_only_the_shared_tensor_becomes_overridable_and_the_outputs_stay(tmp_path):
    path = _model(tmp_path / "m.onnx")
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    model = ir.load(path)
    assert hold_shared_once(model) == ["shared"]
    assert [v.name for v in model.graph.inputs] == ["x", "shared"]
    assert "own" in model.graph.initializers and model.graph.initializers["shared"].const_value is not None
    np.testing.assert_array_equal(_run(model, x), _run(path, x))
    assert hold_shared_once(model) == []  # marked once


def test_a_converters_shared_weight_in_a_constant_node_is_held_once_too(tmp_path):
    """Converters (Paddle2ONNX) write weights as Constant nodes, which cannot be overridden: the
    shared one becomes an initializer of the same name first."""
    proto = onnx.load(_model(tmp_path / "m.onnx"))
    shared = next(t for t in proto.graph.initializer if t.name == "shared")
    proto.graph.node.insert(0, helper.make_node("Constant", [], ["shared"], value=shared))
    proto.graph.initializer.remove(shared)
    path = tmp_path / "converter.onnx"
    onnx.save(proto, path)
    x = np.random.default_rng(3).standard_normal((2, 16)).astype(np.float32)
    model = ir.load(path)
    assert hold_shared_once(model) == ["shared"]
    assert not any(n.op_type == "Constant" for n in model.graph)
    np.testing.assert_array_equal(_run(model, x), _run(path, x))


def test_the_cli_writes_a_file_holding_its_shared_tensors_once_even_with_nothing_to_fuse(tmp_path):
    path = _model(tmp_path / "m.onnx")
    out = tmp_path / "held.onnx"
    done = subprocess.run([sys.executable, "-m", "lfpass.cli", "optimize", str(path), "-o", str(out), "--ratio", "1",
                           "--hold-shared-once"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "declared overridable" in done.stderr + done.stdout
    inputs = [i.name for i in onnx.load(out).graph.input]
    assert inputs == ["x", "shared"]
    x = np.random.default_rng(2).standard_normal((2, 16)).astype(np.float32)
    np.testing.assert_array_equal(_run(out, x), _run(path, x))


def test_with_distill_the_flag_is_refused_in_one_line(tmp_path, capsys):
    from lfpass.cli import main

    path = _model(tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=np.zeros((8, 16), np.float32))
    assert main(["optimize", str(path), "--distill", str(tmp_path / "c.npz"), "--hold-shared-once"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--hold-shared-once" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz", "m.onnx"]  # nothing written
