"""Every option of ``optimize`` on files lfpass did not make, run by absolute path from another
folder: a torchvision MobileNet from torch's dynamo exporter with external data (depthwise
convs, small tensors in the data file), and a converter-style CNN whose weights and BatchNorm
statistics are ``Constant`` nodes named unlike their nodes. Each run ends with a valid file
(onnx.checker, onnxruntime, every external tensor next to it) or a non-zero exit with one
line; never an internal error."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lfpass.cli import main

OPTIONS = {
    "plain": ["--ratio", "1.2"],
    "regmean": ["--ratio", "1.2", "--merge", "regmean", "--inputs", "{calib}"],
    "budget": ["--max-error", "0.05", "--inputs", "{calib}"],
    "align-weights": ["--ratio", "1.2", "--align", "weights"],
    "align-activations": ["--ratio", "1.2", "--align", "activations", "--inputs", "{calib}"],
    "residual": ["--ratio", "1.2", "--residual-rank", "4", "--inputs", "{calib}"],
    "everything": ["--max-error", "0.05", "--merge", "regmean", "--align", "activations", "--residual-rank", "4",
                   "--inputs", "{calib}"],
}


def _constant(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"const_{name}", value=numpy_helper.from_array(array, name))


def converter_cnn(path) -> None:
    """Conv / BN / depthwise conv / three alike 3x3 convs / Gemm, every tensor a Constant node
    (``conv2d_3.w_0``: a converter's names), node names ``p2o.Conv.N``."""
    rng = np.random.default_rng(0)
    nodes, k = [], 0

    def conv(x, cin, cout, kernel, group=1, bn=True):
        nonlocal k
        w, b = f"conv2d_{k}.w_0", f"conv2d_{k}.b_0"
        nodes.append(_constant(w, (rng.standard_normal((cout, cin // group, kernel, kernel)) / np.sqrt(cin * kernel))
                               .astype(np.float32)))
        nodes.append(_constant(b, (0.1 * rng.standard_normal(cout)).astype(np.float32)))
        y = f"conv{k}.tmp"
        nodes.append(helper.make_node("Conv", [x, w, b], [y], name=f"p2o.Conv.{k}", group=group,
                                      pads=[kernel // 2] * 4))
        if bn:
            names = [f"batch_norm_{k}.{s}" for s in ("w_0", "b_0", "w_1", "w_2")]
            for n, a in zip(names, (1 + 0.1 * rng.standard_normal(cout), 0.1 * rng.standard_normal(cout),
                                    0.1 * rng.standard_normal(cout), 1 + rng.random(cout))):
                nodes.append(_constant(n, a.astype(np.float32)))
            nodes.append(helper.make_node("BatchNormalization", [y] + names, [f"bn{k}.tmp"], name=f"p2o.BN.{k}"))
            y = f"bn{k}.tmp"
        nodes.append(helper.make_node("Relu", [y], [f"relu{k}.tmp"], name=f"p2o.Relu.{k}"))
        k += 1
        return f"relu{k - 1}.tmp"

    x = conv("image", 3, 16, 3)
    x = conv(x, 16, 16, 3, group=16)  # depthwise
    for _ in range(3):
        x = conv(x, 16, 16, 3)
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool"], name="p2o.Pool.0"))
    nodes.append(helper.make_node("Flatten", ["pool"], ["flat"], name="p2o.Flatten.0"))
    nodes.append(_constant("fc_0.w_0", (rng.standard_normal((16, 10)) / 4).astype(np.float32)))
    nodes.append(helper.make_node("MatMul", ["flat", "fc_0.w_0"], ["logits"], name="p2o.MatMul.0"))
    graph = helper.make_graph(nodes, "converted", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                                  ["n", 3, 16, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def mobilenet(path) -> None:
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=10).eval()
    torch.onnx.export(model, (torch.randn(2, 3, 32, 32),), str(path), dynamo=True, external_data=True,
                      input_names=["image"], dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)


ZOO = {"converter-cnn": (converter_cnn, (3, 16, 16)), "mobilenet-dynamo-external": (mobilenet, (3, 32, 32))}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    made = {}
    for name, (build, shape) in ZOO.items():
        folder = tmp_path_factory.mktemp(name)
        build(folder / "model.onnx")
        calib = tmp_path_factory.mktemp(f"{name}-calib") / "calib.npz"
        np.savez(calib, image=np.random.default_rng(1).standard_normal((24, *shape)).astype(np.float32))
        made[name] = (folder / "model.onnx", calib)
    return made


def _check_written(path) -> None:
    onnx.checker.check_model(str(path))
    proto = onnx.load(str(path), load_external_data=False)
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert all((path.parent / loc).exists() for loc in locations), locations
    assert locations <= {f"{path.name}.data"}, locations  # nothing points at the input's data file
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize("model", sorted(ZOO))
def test_every_option_on_files_lfpass_did_not_make(zoo, tmp_path, monkeypatch, capsys, model, option):
    source, calib = zoo[model]
    before = {p.name: p.read_bytes() for p in source.parent.iterdir()}
    monkeypatch.chdir(tmp_path)  # another folder; the model by absolute path
    out = tmp_path / "out" / "small.onnx"
    out.parent.mkdir()
    args = [a.format(calib=calib) for a in OPTIONS[option]]
    rc = main(["optimize", str(source), "-o", str(out), *args])
    err = capsys.readouterr().err
    assert "internal error" not in err, err
    assert rc in (0, 1), err
    if out.exists():
        _check_written(out)
    else:
        assert "nothing" in err.lower() or rc == 0, err
    assert {p.name: p.read_bytes() for p in source.parent.iterdir()} == before  # the input is never touched
