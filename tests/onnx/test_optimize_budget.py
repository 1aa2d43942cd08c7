"""``lfpass optimize model.onnx --inputs calib.npz --max-error E`` on an exported CNN.

The CNN has four same-shaped convolutions: blocks 1 and 2 are near-copies of
each other (sharing them costs almost nothing), the others are unrelated (sharing
any of them wrecks the output). A budget must find the cheap pair, refuse the
rest, and report an error the written file really has on held-out inputs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from lfpass.cli import main
from lfpass.core.quality import output_error
from lfpass.onnx.load import load_model
from lfpass.onnx.optimize import optimize
from lfpass.onnx.sites import find_sites


class _Cnn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Sequential() for _ in range(4))
        for b in self.blocks:
            b.add_module("conv", nn.Conv2d(8, 8, 3, padding=1))
        with torch.no_grad():
            self.blocks[2].conv.weight.copy_(self.blocks[1].conv.weight + 1e-3 * torch.randn(8, 8, 3, 3))
            self.blocks[2].conv.bias.copy_(self.blocks[1].conv.bias + 1e-3)  # equal biases would be one tensor
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        for b in self.blocks:
            x = torch.relu(b.conv(x)) + x
        return self.head(x.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    folder = tmp_path_factory.mktemp("budget")
    model = _Cnn().eval()
    path = folder / "cnn.onnx"
    torch.onnx.export(model, (torch.randn(2, 1, 8, 8),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}})
    x = np.random.default_rng(1).standard_normal((64, 1, 8, 8)).astype(np.float32)
    calib = folder / "calib.npz"
    np.savez(calib, x=x)
    return path, calib, x


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_budget_finds_the_cheap_pair_and_keeps_the_error(cnn, tmp_path):
    path, calib, x = cnn
    before = path.read_bytes()
    out = tmp_path / "fused.onnx"
    result = optimize(path, out, {"target_ratio": None, "max_error": 1e-3, "cross_role": True, "actions": ["tie"]},
                      inputs=calib)
    assert path.read_bytes() == before
    weights = {s.name: s.weight for s in find_sites(load_model(path)).sites}
    assert [{weights[m] for m in g.members} for g in result.plan.groups] == [
        {"blocks.1.conv.weight", "blocks.2.conv.weight"}]
    assert result.ratio > 1.0 and result.params_after == result.plan.params_after
    assert result.error is not None and result.error <= 1e-3 and result.within_budget
    # the error is the written file's on the held-out share (the last quarter of 8 batches)
    held = x[-16:]
    assert result.error == pytest.approx(output_error([_run(path, held)], [_run(out, held)]), rel=1e-6, abs=1e-9)
    onnx.checker.check_model(str(out))
    refused = [why for *_, why in result.plan.decisions if "over the budget" in why]
    assert refused, "the unrelated pairs must be measured and refused"


def test_a_forced_ratio_says_what_it_costs(cnn, tmp_path):
    path, calib, _ = cnn
    result = optimize(path, tmp_path / "f.onnx", {"target_ratio": 1.5, "max_error": 1.0, "cross_role": True,
                                                         "actions": ["tie"]}, inputs=calib)
    assert result.plan.ratio >= 1.5
    assert result.error is not None and result.error > 1e-3  # unrelated layers had to share
    assert "target 1.5 is reached" in result.plan.message and "costs output cosine" in result.plan.message


def test_cli_reports_the_budget(cnn, tmp_path, capsys):
    path, calib, _ = cnn
    report = tmp_path / "r.json"
    code = main(["optimize", str(path), "-o", str(tmp_path / "c.onnx"), "--inputs", str(calib),
                 "--max-error", "0.001", "--cross-role", "--actions", "tie", "--report", str(report)])
    out = capsys.readouterr().out
    assert code == 0
    assert "held out" in out and "budget 0.001: kept" in out
    data = json.loads(report.read_text())
    assert data["max_error"] == 0.001 and data["error"] <= 0.001 and data["target_ratio"] is None
    assert data["error_curve"] and data["groups"] == 1


def test_budget_options_need_inputs(cnn, tmp_path, capsys):
    path, _, _ = cnn
    code = main(["optimize", str(path), "-o", str(tmp_path / "d.onnx"), "--max-error", "0.01"])
    err = capsys.readouterr().err
    assert code == 2 and "--inputs" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "d.onnx").exists()


def test_analyze_refuses_budget_options(cnn, capsys):
    path, _, _ = cnn
    assert main(["analyze", str(path), "--max-error", "0.01"]) == 2
    assert "optimize" in capsys.readouterr().err


def test_corrections_in_onnx_are_counted(cnn, tmp_path):
    path, calib, _ = cnn
    result = optimize(path, tmp_path / "r.onnx", {"target_ratio": None, "max_error": 1e-3, "cross_role": True,
                                                  "residual_rank": 1, "merge": "regmean"}, inputs=calib)
    assert result.plan.groups and result.params_after == result.plan.params_after
    assert all(g.extra == len(g.members) * (1 * (8 + 72) + 8) for g in result.plan.groups)
    assert result.error <= 1e-3
    onnx.checker.check_model(str(tmp_path / "r.onnx"))


@pytest.mark.parametrize("align", ["weights", "activations"])
def test_alignment_in_onnx_makes_a_shuffled_copy_free_to_share(tmp_path, align):
    from tests.fx.test_api import _Ffn

    path = tmp_path / "ffn.onnx"
    torch.onnx.export(_Ffn().eval(), (torch.randn(2, 8),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32))
    weights = {s.name: s.weight for s in find_sites(load_model(path)).sites}
    first_two = [n for n, w in weights.items() if w.startswith(("blocks.0.", "blocks.1."))]
    config = {"target_ratio": None, "threshold": -1.0, "cross_role": True, "include": first_two, "actions": ["tie"]}
    plain = optimize(path, tmp_path / "plain.onnx", {**config, "merge": "mean", "align": "none", "max_error": 1.0}, inputs=calib)
    aligned = optimize(path, tmp_path / "aligned.onnx", {**config, "align": align}, inputs=calib)
    assert len(aligned.plan.groups) == len(plain.plan.groups) == 2
    assert plain.error > 1e-3
    assert aligned.error < 1e-9 and aligned.params_after == aligned.plan.params_after


def test_auto_options_under_a_budget_are_chosen_by_measurement_in_onnx(tmp_path):
    from tests.fx.test_api import _Ffn

    path = tmp_path / "ffn.onnx"
    torch.onnx.export(_Ffn().eval(), (torch.randn(2, 8),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32))
    result = optimize(path, tmp_path / "auto.onnx", {"target_ratio": None, "max_error": 0.05, "actions": "tie"},
                      inputs=calib)
    assert "alignment measured (ratio within the budget: weights" in result.plan.message
    assert set(result.defaults) == {"merge", "align"} and result.defaults["align"] == result.plan.align
    assert result.defaults["merge"] == result.merge or not result.plan.groups


def test_by_default_the_budget_spends_itself_on_the_plan_menu(cnn, tmp_path):
    """With calibration inputs and no actions named, the plan menu plans: ties, residuals, shared
    bases and per-layer low rank priced in closed form, checked end to end at a few points."""
    path, calib, x = cnn
    out = tmp_path / "menu.onnx"
    result = optimize(path, out, {"target_ratio": None, "max_error": 0.02}, inputs=calib)
    plan = result.plan
    assert "plan menu (tie, residual, basis, lowrank)" in plan.message and "measured end to end at" in plan.message
    assert result.defaults["actions"] == "tie,residual,basis,lowrank"
    assert plan.factors and result.ratio > 1.0
    assert result.params_after == plan.params_after  # the plan's count is the written file's
    assert result.error is not None and result.within_budget
    held = x[-16:]
    assert result.error == pytest.approx(output_error([_run(path, held)], [_run(out, held)]), rel=1e-6, abs=1e-9)
    onnx.checker.check_model(str(out))
