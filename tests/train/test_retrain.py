"""Iterative retraining: the target reached against the original, ties kept through training,
freezing, max_drop roll-back, NaN losses, and checkpoints that resume to the same end."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import lfpass
from lfpass.data import sklearn_digits
from lfpass.train import Distillation, ImageClassification, Schedule, TrainingError, retrain


class Net(nn.Module):
    """An MLP over 8x8 digits: six same-shaped residual blocks between an input layer and a head."""

    def __init__(self, depth: int = 6, width: int = 24):
        super().__init__()
        self.inp = nn.Linear(64, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        x = torch.relu(self.inp(x.flatten(1)))
        for b in self.blocks:
            x = x + torch.relu(b(x))
        return self.head(x)


@pytest.fixture(scope="module")
def digits() -> ImageClassification:
    """scikit-learn's 8x8 digits: 1437 to train, 360 to test."""
    return ImageClassification.from_split(sklearn_digits(seed=0))


@pytest.fixture(scope="module")
def trained(digits) -> Net:
    torch.manual_seed(0)
    net = Net()
    retrain_free = lfpass.train.train_steps
    retrain_free(net, digits.train_batches(64, seed=0), digits.loss,
                 lfpass.train.make_optimizer("adamw", net.parameters(), 3e-3), 150, progress=False)
    return net.eval()


LAYERS = lfpass.FusionConfig(target_ratio=2.2, ratio_scope="layers")  # ceiling 2.39: all six blocks one
QUICK = Schedule(stages=3, steps_per_stage=15, lr=1e-3, batch_size=64)


def shared_weights(model: nn.Module, plans) -> bool:
    """Every group of every stage still holds one and the same weight and bias object."""
    for plan in plans:
        for group in plan.groups:
            layers = [model.get_submodule(m) for m in group.members]
            if len({id(m.weight) for m in layers}) != 1 or len({id(m.bias) for m in layers}) != 1:
                return False
    return True


def test_iterative_schedule_reaches_the_target_against_the_original(trained, digits):
    result = retrain(trained, digits, LAYERS, QUICK, progress=False)
    original_layers = lfpass.train.scope_params(trained, LAYERS)
    assert [r.stage for r in result.history] == [1, 2, 3]
    assert all(r.layer_ratio >= t - 1e-9 for r, t in zip(result.history, QUICK.targets(2.2)))
    assert original_layers / lfpass.train.scope_params(result.model, LAYERS) >= 2.2
    assert result.history[-1].unique_params == result.unique_params == lfpass.unique_parameters(result.model)
    assert result.plans[0].params_before == lfpass.unique_parameters(trained)  # the input is untouched
    assert result.quality_original > 0.9 and result.history[-1].quality > 0.8  # retraining keeps it working
    json.dumps(result.to_dict(), allow_nan=False)  # the whole record is strict JSON
    for text in (p.to_json() for p in result.plans):
        assert lfpass.FusionPlan.from_json(text).to_json() == text


def test_training_keeps_the_ties(trained, digits):
    result = retrain(trained, digits, LAYERS, QUICK, progress=False)
    assert shared_weights(result.model, result.plans)
    before = {k: v.clone() for k, v in result.model.state_dict().items()}
    unique = lfpass.unique_parameters(result.model)
    lfpass.train.train_steps(result.model, digits.train_batches(64, seed=1), digits.loss,
                             lfpass.train.make_optimizer("sgd", result.model.parameters(), 0.05), 10, progress=False)
    assert lfpass.unique_parameters(result.model) == unique
    assert shared_weights(result.model, result.plans)
    assert any(not torch.equal(before[k], v) for k, v in result.model.state_dict().items())


def test_freezing_keeps_the_fused_tensors_for_freeze_steps(trained, digits):
    one = lambda **kw: Schedule(stages=1, batch_size=64, lr=1e-2, **kw)  # noqa: E731
    cfg = LAYERS.replace(target_ratio=1.5)
    fused = retrain(trained, digits, cfg, one(steps_per_stage=0), progress=False)
    frozen = retrain(trained, digits, cfg, one(steps_per_stage=8, freeze_steps=8, weight_decay=0.1), progress=False)
    free = retrain(trained, digits, cfg, one(steps_per_stage=8), progress=False)
    anchors = [g.members[0] for g in fused.plans[0].groups]
    assert anchors and [g.members for g in frozen.plans[0].groups] == [g.members for g in fused.plans[0].groups]
    for name in anchors:
        ref = fused.model.get_submodule(name).weight
        assert torch.equal(frozen.model.get_submodule(name).weight, ref)
        assert not torch.equal(free.model.get_submodule(name).weight, ref)
    assert not torch.equal(frozen.model.inp.weight, fused.model.inp.weight)  # the rest trained


def test_max_drop_rolls_back_the_stage_that_costs_too_much():
    """Stage 1 fuses exact copies (lossless, so no drop); stage 2 must fuse unlike layers and is undone."""
    torch.manual_seed(0)
    net = Net(depth=4).eval()
    with torch.no_grad():
        for i in (1,):
            net.blocks[i].load_state_dict(net.blocks[0].state_dict())
    task = Distillation.from_model(net, torch.randn(64, 64), eval_fraction=0.5)
    cfg = lfpass.FusionConfig(target_ratio=1.5, ratio_scope="layers", include=("blocks.*",))
    sched = Schedule(stages=2, steps_per_stage=0, max_drop=0.0)
    result = retrain(net, task, cfg, sched, progress=False)
    assert [r.rolled_back for r in result.history] == [False, True]
    assert result.to_dict()["history"][0]["train_loss"] is None  # no step trained: NaN, None in JSON
    assert [g.members for g in result.plans[0].groups] == [("blocks.0", "blocks.1")] and len(result.plans) == 1
    assert "stage 2" in result.stopped and "rolled back to stage 1" in result.stopped
    assert lfpass.unique_parameters(result.model) == result.plans[0].params_after
    x = torch.randn(8, 64)
    torch.testing.assert_close(result.model(x), net(x), atol=0, rtol=0)


def test_a_diverging_stage_is_rolled_back_or_reported(trained, digits):
    wild = Schedule(stages=2, steps_per_stage=20, lr=1e12, optimizer="sgd", batch_size=64)
    with pytest.raises(TrainingError, match="NaN or Inf"):
        retrain(trained, digits, LAYERS, wild, progress=False)
    result = retrain(trained, digits, LAYERS, Schedule(**{**wild.to_dict(), "max_drop": 0.5}), progress=False)
    assert result.history[0].rolled_back and result.plans == [] and "NaN" in result.stopped
    assert lfpass.unique_parameters(result.model) == lfpass.unique_parameters(trained)


class Stop(Exception):
    pass


def test_a_stopped_run_resumes_to_the_same_end(trained, digits, tmp_path):
    whole = retrain(trained, digits, LAYERS, QUICK, checkpoint_dir=tmp_path / "a", progress=False)

    def stop_after_first(row):
        if row.stage == 1:
            raise Stop()

    with pytest.raises(Stop):
        retrain(trained, digits, LAYERS, QUICK, checkpoint_dir=tmp_path / "b", progress=False,
                on_stage=stop_after_first)
    assert json.loads((tmp_path / "b" / "run.json").read_text())["stage"] == 1
    with pytest.raises(lfpass.LfpassError, match="resume=True"):
        retrain(trained, digits, LAYERS, QUICK, checkpoint_dir=tmp_path / "b", progress=False)
    with pytest.raises(lfpass.ConfigError, match="another schedule"):
        retrain(trained, digits, LAYERS, Schedule(**{**QUICK.to_dict(), "lr": 0.1}), checkpoint_dir=tmp_path / "b",
                resume=True, progress=False)
    resumed = retrain(trained, digits, LAYERS, QUICK, checkpoint_dir=tmp_path / "b", resume=True, progress=False)
    assert [p.to_json() for p in resumed.plans] == [p.to_json() for p in whole.plans]
    assert lfpass.unique_parameters(resumed.model) == lfpass.unique_parameters(whole.model)
    assert shared_weights(resumed.model, resumed.plans)
    for (k, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=k)  # same seeds, same data, same optimizer state
    assert [r.quality for r in resumed.history] == [r.quality for r in whole.history]
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["run.json", "stage-003.pt"]
    again = retrain(trained, digits, LAYERS, QUICK, checkpoint_dir=tmp_path / "b", resume=True, progress=False)
    assert len(again.history) == 3 and [p.to_json() for p in again.plans] == [p.to_json() for p in whole.plans]


def test_a_kill_between_the_state_and_run_json_leaves_the_last_stage(trained, digits, tmp_path, monkeypatch):
    """The state file is written first, then run.json: dying between them resumes from the stage before."""
    from lfpass.train import checkpoint

    real, calls = checkpoint.write_text, []

    def dies_at_stage_two(path, text):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(path, text)

    monkeypatch.setattr(checkpoint, "write_text", dies_at_stage_two)
    with pytest.raises(KeyboardInterrupt):
        retrain(trained, digits, LAYERS, QUICK, checkpoint_dir=tmp_path, progress=False)
    monkeypatch.setattr(checkpoint, "write_text", real)
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["stage"] == 1 and (tmp_path / run["state"]).is_file()
    resumed = retrain(trained, digits, LAYERS, QUICK, checkpoint_dir=tmp_path, resume=True, progress=False)
    whole = retrain(trained, digits, LAYERS, QUICK, progress=False)
    assert [p.to_json() for p in resumed.plans] == [p.to_json() for p in whole.plans]


@pytest.mark.parametrize("frontend", ["symbolic_trace", "export"])
def test_graph_modules_retrain_like_the_module(trained, digits, frontend):
    x = digits.x_train[:2]
    if frontend == "symbolic_trace":
        graph = torch.fx.symbolic_trace(trained)
    else:
        graph = torch.export.export(trained, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}}).module()
    sched = Schedule(stages=3, steps_per_stage=0)
    as_module = retrain(trained, digits, LAYERS, sched, progress=False)
    as_graph = retrain(graph, digits, LAYERS, sched, progress=False)
    assert [[g.members for g in p.groups] for p in as_graph.plans] == [[g.members for g in p.groups]
                                                                       for p in as_module.plans]
    assert lfpass.unique_parameters(as_graph.model) == as_graph.unique_params == as_module.unique_params
    torch.testing.assert_close(as_graph.model(digits.x_test), as_module.model(digits.x_test))


def test_retraining_starts_from_the_plan_menu_with_the_bases_kept(trained, digits):
    """With calibration, retrain fuses once by the plan menu (shared bases, low rank, ties, priced
    from the calibration statistics) and retrains from there: every basis stays one Parameter, the
    count stays the plan's, and the retrained model is no worse than the fused one on held-out digits."""
    calibration = [digits.x_train[i:i + 64] for i in range(0, 512, 64)]
    config = lfpass.FusionConfig(target_ratio=1.8, ratio_scope="layers", actions="basis,lowrank")
    schedule = Schedule(stages=1, steps_per_stage=30, lr=1e-3, batch_size=64)
    result = retrain(trained, digits, config, schedule, calibration=calibration, progress=False)
    plan = result.plans[0]
    assert any(f.action == "basis" for f in plan.factors) and plan.layer_ratio >= 1.8
    assert lfpass.unique_parameters(result.model) == plan.params_after
    for entry in plan.factors:
        assert len({id(result.model.get_submodule(m).down.weight) for m in entry.members}) == 1
    row = result.history[0]
    assert row.quality >= row.quality_fused - 1e-12  # retraining that loses is undone
    with pytest.raises(lfpass.ConfigError, match="pass stages=1"):
        retrain(trained, digits, config, Schedule(stages=2, steps_per_stage=5), calibration=calibration,
                progress=False)


class NormNet(nn.Module):
    """Same-shaped convolutions, each followed by a BatchNorm."""

    def __init__(self, depth: int = 3, ch: int = 6):
        super().__init__()
        self.stem = nn.Conv2d(1, ch, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(ch, ch, 3, padding=1), nn.BatchNorm2d(ch))
                                    for _ in range(depth))
        self.head = nn.Linear(ch, 4)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = torch.relu(block(x))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("norm_stats, kept", [("auto", True), ("frozen", True), ("update", False)])
def test_distilling_keeps_the_originals_batchnorm_statistics_unless_told(norm_stats, kept):
    """Distilling on a few calibration batches would re-estimate BatchNorm statistics from them:
    by default (auto) they stay the original's, and only the weights train."""
    torch.manual_seed(0)
    net = NormNet()
    with torch.no_grad():
        for block in net.blocks:  # statistics no calibration batch would give
            block[1].running_mean.uniform_(-1, 1)
            block[1].running_var.uniform_(0.5, 2)
    net.eval()
    task = Distillation.from_model(net, torch.randn(48, 1, 6, 6) * 3 + 1, eval_fraction=0.25)
    cfg = lfpass.FusionConfig(target_ratio=1.3, ratio_scope="layers", include=("blocks.*",), actions="tie")
    result = retrain(net, task, cfg, Schedule(stages=1, steps_per_stage=3, lr=1e-2, batch_size=12,
                                              norm_stats=norm_stats), progress=False)
    for before, after in zip(net.blocks, result.model.blocks):
        same = torch.equal(before[1].running_mean, after[1].running_mean)
        assert same == kept
    changed = any(not torch.equal(a, b) for a, b in zip(net.parameters(), result.model.parameters())
                  if a.shape == b.shape)
    assert changed  # the weights trained either way


def test_retraining_on_a_task_updates_batchnorm_by_default():
    assert not Schedule().frozen_norms(distilling=False) and Schedule().frozen_norms(distilling=True)
    assert Schedule(norm_stats="frozen").frozen_norms(distilling=False)
    with pytest.raises(lfpass.ConfigError, match="norm_stats: must be one of auto, update, frozen"):
        Schedule(norm_stats="fixed")
