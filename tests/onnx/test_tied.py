"""An embedding table tied to its output head is quantized once (:mod:`lfpass.onnx.tied`): the
``Gather`` reads the head's quantized tensor, in every mode, from either torch exporter (the
legacy one writes the tie as two initializers); the outputs stay within the quantizers' own
tolerance of the float model; a table kept in float, or not equal to its head, keeps its own."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from lfpass.onnx.quantize import quantize, weight_readers
from lfpass.onnx.optimize import optimize
from lfpass.onnx.tied import find_ties, lay_out_tables

VOCAB, WIDTH = 300, 96  # 96: 4-bit blocks of 32 fit, 8-bit blocks of 128 are padded (exercises the slice)
FLOAT = VOCAB * WIDTH * 4  # the float table's bytes
TOLERANCE = {"int8": 0.03, "int8-weights": 0.03, "int4": 0.25}


class TinyLM(torch.nn.Module):
    def __init__(self, tied: bool = True):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, WIDTH)
        self.mix = torch.nn.Linear(WIDTH, WIDTH)
        self.head = torch.nn.Linear(WIDTH, VOCAB, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.embed(ids))))


def _export(path, dynamo: bool, tied: bool = True):
    torch.manual_seed(0)
    model, ids = TinyLM(tied).eval(), torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        if dynamo:
            torch.onnx.export(model, (ids,), str(path), dynamo=True, input_names=["ids"], external_data=False,
                              dynamic_shapes={"ids": {0: "b", 1: "s"}})
        else:
            torch.onnx.export(model, (ids,), str(path), dynamo=False, input_names=["ids"], opset_version=17,
                              dynamic_axes={"ids": {0: "b", 1: "s"}})
    return path


@pytest.fixture(scope="module", params=["dynamo", "legacy"])
def lm(request, tmp_path_factory):
    return _export(tmp_path_factory.mktemp("tied") / f"{request.param}.onnx", request.param == "dynamo")


IDS = np.random.default_rng(1).integers(0, VOCAB, (3, 7)).astype(np.int64)


def _run(model) -> np.ndarray:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else \
        ir.to_proto(model).SerializeToString() if isinstance(model, ir.Model) else str(model)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"ids": IDS})[0]


def _big(model: ir.Model, nbytes: int = VOCAB * WIDTH // 2) -> list[str]:
    """Initializers of at least ``nbytes`` (a 4-bit vocabulary x width matrix): the table and its copies."""
    proto = ir.to_proto(model)
    return [t.name for t in proto.graph.initializer if numpy_helper.to_array(t).nbytes >= nbytes]


@pytest.mark.parametrize("mode", ["int8", "int8-weights", "int4"])
def test_a_table_tied_to_its_head_is_one_quantized_tensor(lm, mode):
    model = ir.load(lm)
    reference = _run(lm)
    quantized, report = quantize(model, mode)
    assert len(_big(quantized)) == 1, _big(quantized)
    assert len(report.tied) == 1
    assert not report.float_left and not weight_readers(quantized)  # every weight and the table quantized
    out = _run(quantized)
    assert out.shape == reference.shape
    assert np.linalg.norm(out - reference) / np.linalg.norm(reference) < TOLERANCE[mode]


def test_static_int8_ties_the_table_to_the_heads_dequantized_tensor(lm):
    model = ir.load(lm)
    feeds = [{"ids": np.random.default_rng(k).integers(0, VOCAB, (2, 6)).astype(np.int64)} for k in range(4)]
    reference = _run(lm)
    quantized, report = quantize(model, "int8", feeds)
    assert len(report.tied) == 1 and len(_big(quantized)) == 1
    out = _run(quantized)
    assert np.linalg.norm(out - reference) / np.linalg.norm(reference) < TOLERANCE["int8"]


def test_the_tied_lookup_is_the_heads_rows_exactly(tmp_path):
    """The table the Gather now reads is the head's quantized matrix, transposed: the embedding
    of each token is the head's dequantized row, to the float's rounding."""
    path = _export(tmp_path / "lm.onnx", dynamo=True)
    model = ir.load(path)
    embedding = next(n.outputs[0].name for n in model.graph if n.op_type == "Gather")
    quantized, _ = quantize(model, "int8")
    proto = ir.to_proto(quantized)
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    head = next(n for n in inits if n.endswith("_quantized") and inits[n].shape == (WIDTH, VOCAB))
    rows = (inits[head].astype(np.float32) - inits[head.replace("_quantized", "_zero_point")]) \
        * inits[head.replace("_quantized", "_scale")]
    proto.graph.output.append(onnx.helper.make_tensor_value_info(embedding, onnx.TensorProto.FLOAT, None))
    looked_up = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        [embedding], {"ids": IDS})[0]
    np.testing.assert_allclose(looked_up, rows.T[IDS], rtol=1e-6, atol=1e-7)


def test_a_table_kept_in_float_or_unlike_its_head_keeps_its_own_copy(tmp_path):
    tied = ir.load(_export(tmp_path / "tied.onnx", dynamo=True))
    table = next(n.inputs[0].name for n in tied.graph if n.op_type == "Gather")
    quantized, report = quantize(tied, "int8", keep_float=[table])
    assert not report.tied and table in weight_readers(quantized)
    untied = ir.load(_export(tmp_path / "untied.onnx", dynamo=True, tied=False))
    assert not find_ties(untied)
    quantized, report = quantize(untied, "int4")
    assert not report.tied and len(_big(quantized)) == 2


def test_a_float_tie_is_laid_out_once_in_the_heads_orientation_bit_for_bit(lm):
    """Float outputs: the table is stored transposed, as the head reads it, and the lookups gather
    its columns; no Transpose of an initializer is left for onnxruntime to fold into a copy."""
    model = ir.load(lm)
    reference = _run(lm)
    assert len(_big(model, FLOAT)) == (2 if "legacy" in lm.name else 1)
    laid = lay_out_tables(model)
    assert len(laid) == 1
    assert len(_big(model, FLOAT)) == 1
    assert not any(n.op_type == "Transpose" and n.inputs[0].is_initializer() for n in model.graph)
    np.testing.assert_array_equal(_run(model), reference)


def test_optimize_writes_a_fused_language_model_with_its_tie_stored_once(tmp_path):
    torch.manual_seed(0)

    class Deeper(TinyLM):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(WIDTH, WIDTH) for _ in range(2))

        def forward(self, ids):
            x = self.embed(ids)
            for layer in self.layers:
                x = torch.tanh(layer(x))
            return self.head(x)

    path = tmp_path / "deeper.onnx"
    torch.onnx.export(Deeper().eval(), (torch.randint(0, VOCAB, (2, 5)),), str(path), dynamo=True,
                      input_names=["ids"], external_data=False, dynamic_shapes={"ids": {0: "b", 1: "s"}})
    result = optimize(path, tmp_path / "out.onnx", {"actions": ["tie"], "target_ratio": 1.05})
    assert result.written and "stored once" in result.message
    assert len(_big(ir.load(tmp_path / "out.onnx"), FLOAT)) == 1
