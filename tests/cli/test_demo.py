"""The demo: train on real digits, fuse to 2x and 3.33x, retrain with ties kept."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch

import lfpass
from lfpass.cli import main
from lfpass.core.plan import FusionPlan
from lfpass.data import mnist_digits
from lfpass.demo import DEPTH, QUICK_TEST, QUICK_TRAIN, RATIOS, build_cnn, evaluate, format_table, run_demo
from lfpass.fx import find_sites


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return run_demo(quick=True, seconds=3, out_dir=out), out


def test_cnn_has_one_role_of_same_shaped_convs():
    sites = find_sites(build_cnn()).sites
    blocks = [s for s in sites if s.role == "blocks.*.conv"]
    assert [s.name for s in blocks] == [f"blocks.{i}.conv" for i in range(DEPTH)]
    assert len({s.class_key() for s in blocks}) == 1
    assert torch.equal(build_cnn(seed=3).blocks[0].conv.weight, build_cnn(seed=3).blocks[0].conv.weight)


def test_demo_rows_reach_each_ratio_within_one_group(demo):
    result, out = demo
    rows = result["rows"]
    assert [r["target_ratio"] for r in rows] == list(RATIOS)
    for r in rows:
        plan = FusionPlan.from_json((out / f"plan_r{r['target_ratio']:g}.json").read_text())
        numel = max(g.numel for g in plan.groups)
        assert r["params_before"] == result["params"]
        assert r["measured_ratio"] == pytest.approx(r["params_before"] / r["params_after"])
        assert r["measured_ratio"] >= r["target_ratio"]
        assert r["params_before"] / (r["params_after"] + numel) < r["target_ratio"]  # one group fewer falls short
        assert r["measured_ratio"] == pytest.approx(plan.ratio)


def test_demo_learns_and_keeps_ties_through_retraining(demo):
    result, _ = demo
    assert result["acc_before"] > 0.5  # chance is 0.1
    for r in result["rows"]:
        assert r["params_after_retrain"] == r["params_after"]
        assert r["acc_retrained"] > 0.5
        assert r["retrain_steps"] > 0


def test_demo_writes_models_and_plans(demo):
    result, out = demo
    names = {p.name for p in out.iterdir()}
    assert {"model.pt", "plan_r2.json", "plan_r3.33.json", "fused_r2.pt", "fused_r3.33.pt", "results.json"} <= names
    assert not any(n.startswith(".") for n in names)  # no temporary files left behind
    model = build_cnn()
    model.load_state_dict(torch.load(out / "model.pt"))
    data = mnist_digits(seed=0).head(QUICK_TRAIN, QUICK_TEST)
    assert evaluate(model, data.x_test, data.y_test) == result["acc_before"]
    plan = FusionPlan.from_json((out / "plan_r3.33.json").read_text())
    fused = lfpass.apply(model, plan)
    fused.load_state_dict(torch.load(out / "fused_r3.33.pt"))
    assert lfpass.unique_parameters(fused) == result["rows"][1]["params_after"]


def test_format_table_with_and_without_rich(monkeypatch):
    rows = [
        {"target_ratio": 2.0, "planned_ratio": 2.28, "measured_ratio": 2.28, "params_before": 65642,
         "params_after": 28778, "params_after_retrain": 28778, "acc_fused": 0.8, "acc_retrained": 0.97},
    ]
    for text in (format_table(rows, 0.98), _plain(monkeypatch, rows)):
        assert "65,642 / 28,778 = 2.28" in text and "98.00%" in text and "97.00%" in text


def _plain(monkeypatch, rows):
    monkeypatch.setitem(sys.modules, "rich.console", None)  # importing it now fails
    text = format_table(rows, 0.98)
    assert "┃" not in text
    return text


def _cells(line: str) -> list[str]:
    """The cells of a printed table row, drawn by rich (``│``) or as plain text (two spaces apart)."""
    return [c for c in re.split(r"\s*│\s*|\s{2,}", line.strip()) if c]


def _number(text: str) -> float:
    return float(text.replace(",", "").rstrip("%x"))


def test_cli_demo_quick(tmp_path, capsys):
    """The tables ``lfpass demo`` prints hold what the demo measured, and the measurements are sane."""
    out_dir = tmp_path / "cli"
    assert main(["demo", "--quick", "--out", str(out_dir)]) == 0
    captured = capsys.readouterr()
    assert "error" not in captured.err
    recorded = json.loads((out_dir / "results.json").read_text())
    lines = captured.out.splitlines()

    rows = [cells for cells in map(_cells, lines) if cells and re.fullmatch(r"[\d.]+ -> [\d.]+", cells[0])]
    assert [float(r[0].split(" -> ")[0]) for r in rows] == list(RATIOS)
    params = lfpass.unique_parameters(build_cnn())
    for cells, row in zip(rows, recorded["rows"]):
        target, planned = (float(v) for v in cells[0].split(" -> "))
        counts, ratio = cells[1].split(" = ")
        before, after = (_number(v) for v in counts.split(" / "))
        assert before == params == row["params_before"] and after == row["params_after"] < before
        assert float(ratio) == pytest.approx(before / after, abs=0.005) and float(ratio) >= target
        assert planned == pytest.approx(before / after, abs=0.005)
        assert _number(cells[2]) == after  # retraining kept every tie
        acc_before, acc_fused, acc_retrained = (_number(c) / 100 for c in cells[3:6])
        assert acc_fused == pytest.approx(row["acc_fused"], abs=5e-5)
        assert acc_retrained == pytest.approx(row["acc_retrained"], abs=5e-5)
        assert 0.5 < acc_before <= 1.0 and 0.0 <= acc_fused <= 1.0  # chance is 0.1
        assert acc_retrained >= acc_fused - 0.05  # retraining does not undo the fused model
        assert acc_retrained >= acc_before - 0.15  # ... and brings it back near the unfused one

    labels = ("exported original", "lfpass optimize --max-error", "fused x")
    onnx = [_cells(line) for line in lines if line.strip(" │").startswith(labels)]
    files = [out_dir / "cnn.onnx", out_dir / "cnn.fused.onnx", out_dir / f"cnn.retrained_r{RATIOS[-1]:g}.onnx"]
    assert len(onnx) == len(files)
    sizes = [f.stat().st_size for f in files]
    for cells, size in zip(onnx, sizes):
        assert _number(cells[1]) == pytest.approx(size / 1024, abs=0.05)
        assert _number(cells[2]) == pytest.approx(sizes[0] / size, abs=0.005)
    assert sizes[1] <= sizes[0] and sizes[2] < sizes[0] / 2  # sharing shrinks the files (the budget decides how far)
    assert "FAILED" not in captured.out and "What the numbers mean:" in captured.out  # a calm story, in words
    budgeted = recorded["onnx"][1]
    if budgeted["error"] is not None:  # verified on digits the planner never saw
        assert f"mean cosine of {1 - budgeted['error']:.3f}" in captured.out
        assert ("within the budget" in captured.out) == (budgeted["error"] <= budgeted["budget"])
    accuracies = [_number(cells[3]) / 100 for cells in onnx]
    assert accuracies[0] == pytest.approx(recorded["acc_before"], abs=0.005)  # onnxruntime agrees with torch
    assert accuracies[2] == pytest.approx(recorded["rows"][-1]["acc_retrained"], abs=0.005)


def test_cli_demo_unwritable_out(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["demo", "--quick", "--out", str(blocker / "sub")]) == 2
    assert "cannot create the demo folder" in capsys.readouterr().err


def test_demo_onnx_path_shrinks_files_and_agrees_with_pytorch(demo):
    result, out = demo
    original, optimized, retrained = result["onnx"]
    assert original["vs_pytorch"] < 1e-4 and retrained["vs_pytorch"] < 1e-4  # onnxruntime computes what torch does
    assert original["accuracy"] == pytest.approx(result["acc_before"], abs=0.005)
    assert retrained["accuracy"] == pytest.approx(result["rows"][-1]["acc_retrained"], abs=0.005)
    # the ties survive export: the file shrinks about as much as the unique parameters
    # (BatchNorm statistics, which are not parameters, stay per layer)
    assert original["bytes"] / retrained["bytes"] > 0.85 * result["rows"][-1]["measured_ratio"]
    # the plan menu lands on the parameter target (2x); BatchNorm statistics are bytes, not parameters
    assert original["bytes"] / optimized["bytes"] >= 1.9
    assert (out / "cnn.fused.onnx").is_file() and (out / "digits.npz").is_file()
