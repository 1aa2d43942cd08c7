"""Quantization-aware retraining (:mod:`lfpass.train.qat`): the grid is onnxruntime's to the bit,
a shared weight is rounded once, and ``optimize --distill --quantize int4`` writes a file that
computes what was retrained, closer to the original than rounding alone."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from lfpass.core.config import FusionConfig
from lfpass.onnx.quantize import quantize
from lfpass.train import Distillation, Schedule
from lfpass.train.errors import TrainingError
from lfpass.train.qat import Grid, QuantAware, fake_quantize, retrain_quantized, rounded, snap
from tests.onnx.test_quantize import Blocks

pytest.importorskip("onnx2torch")


@pytest.mark.parametrize("mode, bits, block", [("int4", 4, 32), ("int8-weights", 8, 64)])
def test_weights_on_the_grid_are_what_onnxruntime_writes_to_the_bit(mode, bits, block):
    """``rounded`` values quantized again by onnxruntime's MatMulNBits come back unchanged."""
    w = torch.randn(96, 40, generator=torch.Generator().manual_seed(0))
    on_grid = rounded(w, Grid(bits, block, axis=0)).numpy()
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 96])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 40])],
                              [numpy_helper.from_array(on_grid, "w")])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    quantized, _ = quantize(model, mode)  # blocks of 64 for 8 bits: no deeper than the weight (96)
    got = ort.InferenceSession(ir.to_proto(quantized).SerializeToString()).run(None, {"x": np.eye(96,
                                                                                          dtype=np.float32)})[0]
    assert np.array_equal(got, on_grid)
    assert np.abs(on_grid - w.numpy()).max() > 0  # rounding did something
    levels = np.unique(np.round(on_grid[:block, 0] / np.abs(on_grid[:block, 0]).max() * 2 ** (bits - 1)))
    assert len(levels) <= 2 ** bits


def test_the_gradient_passes_straight_through_and_a_tie_is_rounded_once():
    w = torch.randn(64, 8, requires_grad=True)
    fake_quantize(w, Grid(4, 32)).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    shared = torch.nn.Parameter(torch.randn(16, 16))
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16))
    model[0].weight = model[1].weight = shared
    grids = {"0.weight": Grid(4, 16, 1), "1.weight": Grid(4, 16, 1)}
    out = QuantAware(model, grids)(torch.randn(4, 16))
    assert out.shape == (4, 16) and len(QuantAware(model, grids).grids) == 1
    snap(model, grids)
    assert model[0].weight is model[1].weight and torch.equal(shared.data, rounded(shared.data, Grid(4, 16, 1)))
    with pytest.raises(TrainingError, match="one tensor on two grids"):
        snap(model, {"0.weight": Grid(4, 16, 1), "1.weight": Grid(8, 16, 1)})


def test_retraining_on_the_grid_beats_rounding_alone():
    torch.manual_seed(0)
    model = Blocks(depth=4, width=64).eval()
    x = torch.randn(256, 64)
    task = Distillation.from_model(model, x, eval_fraction=0.25)
    grids = {f"blocks.{i}.weight": Grid(4, 32, 1) for i in range(4)}
    done = retrain_quantized(model, grids, task, Schedule(stages=1, steps_per_stage=150, lr=1e-3), progress=False)
    assert done.kept and done.quality > done.quality_rounded
    for i in range(4):  # every chosen weight is left on its grid
        w = model.blocks[i].weight.data
        assert torch.equal(w, rounded(w, Grid(4, 32, 1)))


def test_distill_with_int4_writes_the_retrained_weights_and_beats_rounding(tmp_path, capsys):
    from lfpass.cli import main

    torch.manual_seed(0)
    src, calib, out, report = (tmp_path / n for n in ("m.onnx", "c.npz", "o.onnx", "r.json"))
    with torch.no_grad():
        torch.onnx.export(Blocks(depth=4).eval(), (torch.randn(2, 64),), str(src), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "n"}})
    np.savez(calib, x=np.random.default_rng(0).standard_normal((256, 64)).astype(np.float32))
    rc = main(["optimize", str(src), "--distill", str(calib), "--ratio", "1", "--quantize", "int4", "--steps", "150",
               "-o", str(out), "--report", str(report)])
    err = capsys.readouterr().err
    assert rc in (0, 1) and "internal error" not in err, err
    assert "quantization-aware retraining" in err and "quantized int4" in err
    data = json.loads(report.read_text())
    assert data["qat"]["kept"] and data["qat"]["quality"] > data["qat"]["quality_rounded"]
    assert data["quantized"]["quantized"] == 5 and data["bytes_after"] < data["bytes_before"] / 4
    assert "written back into the input's graph (10 tensors)" in data["export"]["exporter"]  # weights, biases
    assert data["export"]["passed"]  # the float file with the retrained weights computes what PyTorch does
    written = onnx.load(out)
    assert {n.op_type for n in written.graph.node} >= {"MatMulNBits"}
    assert not list(tmp_path.glob(".*"))  # the float export in between is gone
    held = np.random.default_rng(5).standard_normal((64, 64)).astype(np.float32)
    cos = lambda a, b: float(np.mean(np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))  # noqa: E731
    want = ort.InferenceSession(str(src)).run(None, {"x": held})[0]
    rtn, _ = quantize(ir.load(src), "int4")
    alone = ort.InferenceSession(ir.to_proto(rtn).SerializeToString()).run(None, {"x": held})[0]
    got = ort.InferenceSession(str(out)).run(None, {"x": held})[0]
    assert cos(want, got) > cos(want, alone)  # retrained onto the grid: closer than rounding alone


def test_distillation_pooled_over_the_mask_compares_sentence_embeddings():
    """``pool=masked_mean(...)``: padding positions do not count, in the loss and in the quality."""
    from lfpass.train.distil import masked_mean

    class Tokens(torch.nn.Module):
        def forward(self, x, mask):
            return x * 2.0

    x = torch.randn(8, 5, 4)
    mask = torch.ones(8, 5, dtype=torch.long)
    mask[:, 3:] = 0
    task = Distillation(Tokens(), (x, mask), (x, mask), pool=masked_mean(1))

    class Padded(torch.nn.Module):  # the teacher's function where the mask keeps, anything where it does not
        def forward(self, x, mask):
            return torch.where(mask.unsqueeze(-1).bool(), x * 2.0, torch.full_like(x, 99.0))

    assert task.evaluate(Padded())["quality"] == pytest.approx(1.0)
    assert float(task.loss(Padded(), (x, mask))) == pytest.approx(0.0, abs=1e-10)
    unpooled = Distillation(Tokens(), (x, mask), (x, mask))
    assert unpooled.evaluate(Padded())["quality"] < 0.9


def test_a_table_on_the_grid_is_what_the_4_bit_gather_writes_to_the_bit():
    """An embedding table rounded by ``rounded`` (blocks along each row) comes back unchanged from
    onnxruntime's 4-bit ``GatherBlockQuantized``: the grid the retraining rounds tables on."""
    table = torch.randn(50, 64, generator=torch.Generator().manual_seed(0))
    on_grid = rounded(table, Grid(4, 32, axis=1)).numpy()
    graph = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["y"])], "g",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 64])],
                              [numpy_helper.from_array(on_grid, "table")])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    quantized, report = quantize(model, "int4", block_size=32)
    assert report.quantized == 1
    got = ort.InferenceSession(ir.to_proto(quantized).SerializeToString()).run(None, {"ids": np.arange(50)})[0]
    assert np.array_equal(got, on_grid)


def test_an_onnx_files_table_is_rounded_while_the_rest_retrains(tmp_path):
    from lfpass.bridge.distill import weight_grids
    from lfpass.bridge.to_torch import to_torch

    class Lookup(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(40, 64)
            self.out = torch.nn.Linear(64, 64)

        def forward(self, ids):
            return self.out(torch.tanh(self.embed(ids)))

    torch.manual_seed(0)
    path = tmp_path / "lookup.onnx"
    torch.onnx.export(Lookup().eval(), (torch.randint(0, 40, (2, 5)),), str(path), dynamo=False,
                      input_names=["ids"], dynamic_axes={"ids": {0: "b", 1: "s"}}, opset_version=17)
    module = to_torch(path)
    grids = weight_grids(module, "int4")
    tables = [n for n in grids if n in dict(module.named_buffers())]
    assert len(tables) == 1 and grids[tables[0]] == Grid(4, 32, 1)
    assert tables[0] not in weight_grids(module, "int8-weights")  # 8-bit tables are rows, not blocks
    original = module.get_buffer(tables[0]).clone()
    task = Distillation.from_model(module, torch.randint(0, 40, (64, 5)), eval_fraction=0.25)
    seen = []
    evaluate = task.evaluate
    task.evaluate = lambda m: (seen.append(m.get_buffer(tables[0]).clone()), evaluate(m))[1]  # what it measured
    retrain_quantized(module, grids, task, Schedule(stages=1, steps_per_stage=5, lr=1e-3), progress=False)
    assert seen and all(torch.equal(t, rounded(original, Grid(4, 32, 1))) for t in seen)  # measured rounded
    assert torch.equal(module.get_buffer(tables[0]), original)  # and put back: the quantizer rounds it alike
    out, calib = tmp_path / "out.onnx", tmp_path / "calib.npz"
    np.savez(calib, ids=np.random.default_rng(0).integers(0, 40, (128, 5)))
    from lfpass.cli import main

    assert main(["optimize", str(path), "--distill", str(calib), "--ratio", "1", "--quantize", "int4", "--steps",
                 "10", "-o", str(out), "--report", str(tmp_path / "r.json")]) in (0, 1)
    assert "written back" in json.loads((tmp_path / "r.json").read_text())["export"]["exporter"]
