"""`lfpass retrain` recipes and `lfpass optimize --distill`: the CLI drives the training
API end to end (tiny models and data built here; quality on real data is in
docs/RETRAIN.md, made by tools/retrain_experiments.py)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from lfpass import cli
from lfpass.core.errors import ConfigError
from lfpass.recipe import load_recipe

FACTORY = '''
import torch
from torch import nn

def make():
    torch.manual_seed(0)
    blocks = [nn.Linear(16, 16) for _ in range(4)]
    layers = [nn.Linear(8, 16), nn.ReLU()]
    for b in blocks:
        layers += [b, nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(16, 3)), torch.randn(2, 8)
'''


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


@pytest.fixture
def recipe(tmp_path) -> Path:
    (tmp_path / "factory.py").write_text(FACTORY)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((240, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0.5).astype(np.int64)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    path = tmp_path / "r.toml"
    path.write_text(f'target_ratio = 1.5\nratio_scope = "layers"\n[train]\nmodel = "{tmp_path}/factory.py:make"\n'
                    f'task = "classification"\ndata = "{tmp_path}/data.npz"\nstages = 2\nsteps_per_stage = 20\n'
                    f'batch_size = 16\n')
    return path


def test_recipe_keys_are_checked_and_named(tmp_path, recipe):
    config, parsed = load_recipe(recipe)
    assert config.target_ratio == 1.5 and parsed.task == "classification"
    assert parsed.make_schedule().stages == 2 and parsed.make_schedule(stages=3).stages == 3
    bad = tmp_path / "bad.toml"
    for text, says in (("[train]\nmodel = 'm:f'\ntask = 'classification'\nstagez = 2\n", "unknown key 'stagez'"),
                       ("[train]\nmodel = 'm:f'\ntask = 'classification'\nlr = -1\n", "lr"),
                       ("[train]\nmodel = 'm:f'\ntask = 'regression'\n", "train.task"),
                       ("target_ratio = 2\n", r"no \[train\] section"),
                       ("[train]\nmodel = 'm.onnx'\ntask = 'classification'\n", "distillation")):
        bad.write_text(text)
        with pytest.raises(ConfigError, match=says):
            load_recipe(bad)


def test_retrain_command_fuses_in_stages_exports_and_reports(tmp_path, recipe, capsys):
    code, out, err = _run(capsys, "retrain", "--pipeline", recipe, "-o", tmp_path / "m.onnx", "--report",
                          tmp_path / "r.json")
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    history = report["retrain"]["history"]
    assert [h["stage"] for h in history] == [1, 2] and history[-1]["layer_ratio"] >= 1.5
    assert report["retrain"]["unique_params"] == report["export"]["params_torch"]
    assert report["export"]["passed"] and (tmp_path / "m.onnx").exists()
    onnx.checker.check_model(str(tmp_path / "m.onnx"))
    assert "stage" in out and "export" in out


def test_retrain_refuses_to_overwrite_its_data(tmp_path, recipe, capsys):
    code, _, err = _run(capsys, "retrain", "--pipeline", recipe, "--report", tmp_path / "data.npz")
    assert code == 2 and "would overwrite" in err


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(16, 16) for _ in range(4))

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block(x))
        return x


def test_legacy_onnx_goes_through_distillation_and_back(tmp_path, capsys):
    torch.manual_seed(0)
    src = tmp_path / "mlp.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Mlp().eval(), (torch.randn(2, 16),), str(src), dynamo=False, opset_version=17,
                          input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    np.savez(tmp_path / "in.npz", x=np.random.default_rng(0).standard_normal((128, 16)).astype(np.float32))
    before = src.read_bytes()
    out = tmp_path / "mlp.small.onnx"
    code, stdout, err = _run(capsys, "optimize", src, "--distill", tmp_path / "in.npz", "--ratio", "1.5",
                             "--scope", "layers", "--stages", "2", "--steps", "30", "-o", out, "--report",
                             tmp_path / "r.json")
    assert code in (0, 1), err
    assert src.read_bytes() == before
    report = json.loads((tmp_path / "r.json").read_text())
    assert code == (0 if report["against_original"]["passed"] else 1)  # the written file's comparison decides
    assert report["export"]["passed"] and report["export"]["max_abs"] < 1e-4 * max(1.0, report["export"]["scale"])
    assert report["ratio"] >= 1.5 and report["bytes_after"] < report["bytes_before"]
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    weights = [onnx.numpy_helper.to_array(t) for t in proto.graph.initializer if len(t.dims) == 2]
    merged = sum(len(g["members"]) - 1 for plan in report["retrain"]["plans"] for g in plan["groups"])
    assert merged >= 1 and len(weights) == 4 - merged  # each shared tensor stored once
    assert len({w.tobytes() for w in weights}) == len(weights)
    for stage in report["retrain"]["history"]:  # distilling from the original wins back what fusing lost
        assert stage["quality"] > stage["quality_fused"]
    assert report["against_original"]["outputs"] and report["against_original"]["samples"] == 1
