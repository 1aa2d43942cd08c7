"""lfpass as an Olive pass (``lfpass[olive]``): the example workflows in ``examples/olive`` run a
real CNN (MNIST digits) and a small BERT classifier through ``LfpassFusion``, and Olive's own
evaluation reports the size, latency and accuracy of the input and of the output model. Offline,
telemetry off."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("olive", reason="the Olive pass needs the extra: pip install lfpass[olive]")
os.environ["OLIVE_DISABLE_TELEMETRY"] = "1"

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "olive"


def _workflow(name: str, tmp_path: Path, monkeypatch) -> dict:
    for f in EXAMPLES.iterdir():
        shutil.copy(f, tmp_path / f.name)
    monkeypatch.chdir(tmp_path)  # the workflow's relative paths (model, user_script, outputs) are the folder's
    from lfpass.olive_pass import run

    run(tmp_path / f"{name}.json")
    out = tmp_path / "olive-out" / name
    return {"input": json.loads((out / "input_model_metrics.json").read_text()),
            "output": json.loads((out / "metrics.json").read_text()), "folder": out}


def test_a_trained_cnn_through_olive_is_smaller_and_olive_measures_its_accuracy(tmp_path, monkeypatch):
    from lfpass.bridge.export import export
    from lfpass.data import mnist_digits
    from lfpass.demo import build_cnn
    from lfpass.demo.training import train

    data = mnist_digits(seed=0).head(1000, 200)
    model = build_cnn(seed=0)
    train(model, data, 3.0, min_steps=60)
    export(model.eval(), data.x_test[:8], tmp_path / "cnn.onnx", dynamic_shapes=({0: "batch"},),
           input_names=["x"], output_names=["logits"])
    metrics = _workflow("cnn", tmp_path, monkeypatch)
    before, after = metrics["input"], metrics["output"]
    assert after["size-bytes"]["value"] < before["size-bytes"]["value"] / 1.5  # lfpass fused it
    assert before["accuracy-accuracy_score"]["value"] > 0.5  # a trained CNN, on real digits
    assert after["accuracy-accuracy_score"]["value"] >= before["accuracy-accuracy_score"]["value"] - 0.1
    assert after["latency-avg"]["value"] > 0
    report = next((tmp_path / "olive-cache").rglob("lfpass_report.json"))
    figures = json.loads(report.read_text())
    assert figures["error"] <= 0.02 and figures["params_after"] < figures["params_before"]


def test_a_small_bert_classifier_through_olive(tmp_path, monkeypatch):
    """Olive's accuracy here is agreement with the original classifier's classes (the dataset's
    labels are what the input model picks): 1.0 for the input, what fusion kept for the output."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                     intermediate_size=128, num_labels=4)
    torch.manual_seed(0)
    bert = transformers.BertForSequenceClassification(config).eval()

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).logits

    ids = torch.randint(5, 120, (2, 16))
    with torch.no_grad():
        torch.onnx.export(Logits().eval(), (ids, torch.ones_like(ids)), str(tmp_path / "bert.onnx"), dynamo=False,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_axes={"input_ids": {0: "n"}, "attention_mask": {0: "n"}})
    metrics = _workflow("bert", tmp_path, monkeypatch)
    before, after = metrics["input"], metrics["output"]
    assert before["accuracy-accuracy_score"]["value"] == pytest.approx(1.0)
    assert 0.5 <= after["accuracy-accuracy_score"]["value"] <= 1.0
    assert after["size-bytes"]["value"] <= before["size-bytes"]["value"]
    assert after["latency-avg"]["value"] > 0
