"""``optimize --distill`` on files lfpass did not make: a converter's CNN with BatchNorm (its
running statistics survive the conversion), written back with the input's opset and open batch
dimension, and an exit code that says what the written file's comparison said."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from lfpass.cli import main
from tests.onnx.test_real_files import converter_cnn  # the zoo of tools/zoo.py

pytest.importorskip("onnx2torch")


def test_distill_keeps_batchnorm_opset_and_dynamic_batch(tmp_path, capsys, monkeypatch):
    src, calib = tmp_path / "in" / "model.onnx", tmp_path / "calib.npz"
    src.parent.mkdir()
    converter_cnn(src)
    np.savez(calib, image=np.random.default_rng(0).standard_normal((40, 3, 16, 16)).astype(np.float32))
    monkeypatch.chdir(tmp_path)
    out, report = tmp_path / "out" / "small.onnx", tmp_path / "r.json"
    out.parent.mkdir()
    rc = main(["optimize", str(src), "--distill", str(calib), "--ratio", "1.2", "--stages", "1", "--steps", "3",
               "-o", str(out), "--report", str(report)])
    err = capsys.readouterr().err
    assert "internal error" not in err and rc in (0, 1), err
    written = onnx.load(str(out))
    onnx.checker.check_model(written)
    opset = {o.domain: o.version for o in written.opset_import}
    assert opset.get("", opset.get("ai.onnx")) == 13  # the input's own opset
    batch = written.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value  # any batch, as the input took
    passed = json.loads(report.read_text())["against_original"]["passed"]
    assert rc == (0 if passed else 1) and (passed or "validation outside tolerance" in err)


@pytest.mark.parametrize("flags", [["--align", "weights"], ["--merge", "regmean"], ["--max-error", "0.1"],
                                   ["--residual-rank", "2"], ["--ratio", "1.3", "--actions", "basis,lowrank"]])
def test_distill_takes_the_data_aware_options_and_the_budget(tmp_path, capsys, flags):
    src, calib, out, report = (tmp_path / n for n in ("model.onnx", "c.npz", "o.onnx", "r.json"))
    converter_cnn(src)
    np.savez(calib, image=np.random.default_rng(0).standard_normal((40, 3, 16, 16)).astype(np.float32))
    rc = main(["optimize", str(src), "--distill", str(calib), *flags, "--steps", "3", "-o", str(out),
               "--report", str(report)])
    err = capsys.readouterr().err
    assert "internal error" not in err and rc in (0, 1), err
    onnx.checker.check_model(onnx.load(str(out)))
    data = json.loads(report.read_text())
    plan = data["retrain"]["plans"][0]  # fused once by the keep-function pipeline, then distilled
    assert len(data["retrain"]["history"]) == 1 and data["retrain"]["history"][0]["steps"] == 3
    if "--max-error" in flags:
        assert plan["max_error"] == 0.1 and data["error"] is not None
        assert rc == (0 if data["error"] <= 0.1 else 1)
    if "--residual-rank" in flags:
        assert plan["residual_rank"] == 2
    if "--merge" in flags:
        assert {g["rule"] for g in plan["groups"]} <= {"regmean"}
    if "--actions" in flags:  # retrained from the menu's plan: bases and low-rank factors train, ties stay
        assert plan["factors"] and not plan["groups"]
        assert data["retrain"]["history"][0]["unique_params"] == plan["params_after"]


@pytest.mark.parametrize("extra, why", [(["--stages", "2"], "pass --stages 1"),
                                        (["--checkpoint-dir", "ck"], "fuses once and retrains once")])
def test_what_a_data_aware_distillation_cannot_do_is_refused_in_one_line(tmp_path, capsys, extra, why):
    src = tmp_path / "model.onnx"
    converter_cnn(src)
    np.savez(tmp_path / "c.npz", image=np.zeros((8, 3, 16, 16), np.float32))
    rc = main(["optimize", str(src), "--distill", str(tmp_path / "c.npz"), "--max-error", "0.1", *extra,
               "-o", str(tmp_path / "o.onnx")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and why in err[0] and not (tmp_path / "o.onnx").exists()


def test_retraining_that_loses_quality_after_a_data_aware_fuse_is_undone():
    import torch

    from lfpass import FusionConfig
    from lfpass.core.keep import fuse_keeping
    from lfpass.fx.frontend import FxFrontend
    from lfpass.train import Distillation, Schedule, retrain_fused

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    x = torch.randn(64, 8)
    task = Distillation.from_model(model, (x,), eval_fraction=0.25)
    batches = [(x[i:i + 8],) for i in range(0, 48, 8)]
    kept = fuse_keeping(FxFrontend(model, example_inputs=batches[0]), FusionConfig(target_ratio=1.2), batches)
    fused = {k: v.clone() for k, v in kept.model.state_dict().items()}
    result = retrain_fused(kept.model, kept.plan, model, task, Schedule(stages=1, steps_per_stage=5, lr=10.0),
                           progress=False)  # a learning rate that can only hurt
    row = result.history[0]
    assert "fused weights are kept" in result.stopped and row.quality == row.quality_fused
    assert all(torch.equal(v, fused[k]) for k, v in result.model.state_dict().items())
