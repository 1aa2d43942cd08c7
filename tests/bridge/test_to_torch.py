"""ONNX -> PyTorch for retraining: onnx2torch after folding constants, MatMul weights as
parameters named after their nodes, and a one-line refusal where onnx2torch cannot go."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import lfpass
from lfpass.bridge.to_torch import to_torch
from lfpass.core.errors import InputError
from lfpass.fx.sites import find_sites


class Attention(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.q, self.o = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        return self.o(torch.tanh(self.q(x)))


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.attn = Attention(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x):
        return x + self.mlp(x + self.attn(x))


class Net(nn.Module):
    def __init__(self, width: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(width) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.fixture(scope="module")
def legacy_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("legacy") / "net.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Net().eval(), (torch.randn(2, 5, 16),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"])
    return path


def test_legacy_export_converts_exactly_with_layers_and_units(legacy_file):
    module = to_torch(legacy_file)
    x = np.random.default_rng(0).standard_normal((2, 5, 16)).astype(np.float32)
    session = ort.InferenceSession(str(legacy_file), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ours = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours, session.run(None, {"x": x})[0], atol=1e-5)
    found = find_sites(module)
    matmuls = [s for s in found.sites if s.name.endswith("MatMul")]
    assert len(matmuls) == 12  # q, o and the two MLP layers of three blocks, all trainable parameters
    assert all(isinstance(module.get_parameter(s.tensors[0]), nn.Parameter) for s in matmuls)
    assert {u.kind for u in found.units} == {"attention", "mlp"} and len(found.units) == 6


def test_the_converted_model_fuses_and_keeps_its_ties(legacy_file):
    module = to_torch(legacy_file)
    fused, plan = lfpass.fuse(module, target_ratio=1.5, ratio_scope="layers", granularity="block")
    assert plan.groups and all(g.cls.kind in ("attention", "mlp") for g in plan.groups)
    assert lfpass.unique_parameters(fused) == plan.params_after < lfpass.unique_parameters(module)
    with torch.no_grad():
        assert torch.isfinite(fused(torch.randn(2, 5, 16))).all()


def test_an_operator_onnx2torch_lacks_is_one_line_naming_it(tmp_path):
    node = helper.make_node("DFT", ["x"], ["y"])  # a signal op onnx2torch has no converter for
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 2])])
    path = tmp_path / "dft.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(InputError, match=r"cannot convert DFT .*lfpass optimize") as info:
        to_torch(path)
    assert "\n" not in str(info.value)


def test_a_shared_initializer_stays_one_parameter(tmp_path):
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="/a/MatMul"),
             helper.make_node("MatMul", ["a", "w"], ["y"], name="/b/MatMul")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    path = tmp_path / "tied.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    module = to_torch(path)
    assert lfpass.unique_parameters(module) == 16


def test_opset_20_operators_the_dynamo_exporter_writes_convert_and_keep_open_dims(tmp_path):
    """Gelu, Reshape(allowzero=1), Split(num_outputs), Shape and Flatten at the input's rank:
    what onnx2torch lacks for Hugging Face files from either exporter (lfpass.bridge.onnx_ops)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from lfpass.bridge.to_torch import to_torch

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32), "w")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Gelu", ["h"], ["g"], approximate="tanh"),
        helper.make_node("Shape", ["g"], ["s"]),
        helper.make_node("Reshape", ["g", "s"], ["r"], allowzero=1),
        helper.make_node("Split", ["r"], ["a", "b"], axis=2, num_outputs=2),
        helper.make_node("Add", ["a", "b"], ["y"]),
        helper.make_node("Flatten", ["y"], ["f"], axis=3),
    ]
    graph = helper.make_graph(nodes, "ops", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "t", 4])],
                              [helper.make_tensor_value_info("f", TensorProto.FLOAT, None)], [w])
    path = tmp_path / "ops.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(path))
    module = to_torch(path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(2, 3, 4), (5, 1, 4)]:  # another batch and length than any seen before
        x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
        expected = session.run(None, {"x": x})[0]
        got = module(torch.from_numpy(x)).detach().numpy()
        assert got.shape == expected.shape == (shape[0] * shape[1] * 3, 1)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
