"""Depth collapse (:mod:`lfpass.core.collapse`): the least influential residual blocks are removed
from the graph, in PyTorch and in ONNX; the count is the plan's, a budget is kept end to end, and
what cannot be collapsed says so in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import lfpass
from lfpass.core.config import FusionConfig
from lfpass.core.errors import ConfigError, PlanError
from lfpass.fx.collapse import SkipBlock


class ResBlock(nn.Module):
    def __init__(self, width: int, scale: float = 1.0):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)
        with torch.no_grad():
            self.fc2.weight.mul_(scale)
            self.fc2.bias.mul_(scale)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class Net(nn.Module):
    """Six residual blocks; blocks 2 and 4 barely turn the stream (their output scaled by 0.01)."""

    def __init__(self, width: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(8, width)
        self.blocks = nn.ModuleList(ResBlock(width, 0.01 if i in (2, 4) else 1.0) for i in range(6))
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def batches(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 8, generator=g) for _ in range(n)]


def test_the_least_influential_blocks_go_first_and_the_count_is_the_plans():
    model = Net().eval()
    per_block = sum(p.numel() for p in model.blocks[0].parameters())
    target = lfpass.unique_parameters(model) / (lfpass.unique_parameters(model) - 2 * per_block)
    fused, plan = lfpass.fuse(model, FusionConfig(target_ratio=target - 1e-6, actions="collapse"),
                              calibration=batches())
    assert set(plan.dropped) == {"blocks.2", "blocks.4"}
    assert all(isinstance(fused.blocks[i], SkipBlock) for i in (2, 4))
    assert lfpass.unique_parameters(fused) == plan.params_after
    assert isinstance(model.blocks[2], ResBlock)  # the input model is untouched
    x = batches(1, seed=7)[0]
    with torch.no_grad():
        want, got = model(x), fused(x)
    assert torch.nn.functional.cosine_similarity(want, got).min() > 0.99
    assert "blocks.2" in plan.explain() and "influence" in plan.message


def test_a_budget_removes_as_many_blocks_as_keep_it():
    model = Net().eval()
    _, loose = lfpass.fuse(model, FusionConfig(target_ratio=None, max_error=0.5, actions="collapse"),
                           calibration=batches(12))
    _, tight = lfpass.fuse(model, FusionConfig(target_ratio=None, max_error=1e-3, actions="collapse"),
                           calibration=batches(12))
    assert set(tight.dropped) <= {"blocks.2", "blocks.4"} and len(tight.dropped) >= 1
    assert len(loose.dropped) > len(tight.dropped) and tight.error <= 1e-3
    assert "measured least end to end" in tight.message


def test_collapse_with_other_actions_needs_a_budget_and_all_need_calibration_inputs():
    with pytest.raises(ConfigError, match="give max_error"):
        FusionConfig(actions="collapse,lowrank")
    assert FusionConfig(actions="collapse,lowrank", max_error=0.1).menu(True) == ("lowrank",)
    with pytest.raises(ConfigError, match="need calibration inputs"):
        lfpass.fuse(Net().eval(), FusionConfig(target_ratio=1.2, actions="collapse"))


def test_collapse_then_the_menu_removes_the_blocks_the_budget_allows_and_plans_the_rest():
    """Depth first: the two near-idle blocks go (a third breaks the budget), and low rank on the
    layers left reaches the target; every plan within the budget, the removed blocks' layers
    not factored."""
    model = Net().eval()
    total = lfpass.unique_parameters(model)
    config = FusionConfig(target_ratio=1.6, max_error=0.01, actions="collapse,lowrank")
    fused, plan = lfpass.fuse(model, config, calibration=batches(12))
    assert set(plan.dropped) == {"blocks.2", "blocks.4"} and plan.factors
    factored = {m for f in plan.factors for m in f.members}
    assert not any(m.startswith(("blocks.2.", "blocks.4.")) for m in factored)
    assert plan.ratio >= 1.6 - 1e-9 and lfpass.unique_parameters(fused) == plan.params_after
    assert plan.params_after < total - 2 * sum(p.numel() for p in model.blocks[0].parameters())
    assert plan.error <= 0.01 and "depth first" in plan.message
    assert all(isinstance(fused.blocks[i], SkipBlock) for i in (2, 4))
    # with no target: as many blocks as the budget allows, then the menu as far as it goes
    _, free = lfpass.fuse(model, FusionConfig(target_ratio=None, max_error=0.01, actions="collapse,lowrank"),
                          calibration=batches(12))
    assert set(free.dropped) == {"blocks.2", "blocks.4"} and free.factors and free.error <= 0.01
    # blocks that reach the target alone leave nothing for the menu
    _, depth = lfpass.fuse(model, FusionConfig(target_ratio=1.4, max_error=0.01, actions="collapse,lowrank"),
                           calibration=batches(12))
    assert set(depth.dropped) == {"blocks.2", "blocks.4"} and not depth.factors


def test_a_model_without_a_stack_of_residual_blocks_says_so():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    with pytest.raises(PlanError, match="no stack of two or more residual blocks"):
        lfpass.fuse(model, FusionConfig(target_ratio=1.2, actions="collapse"), calibration=batches())


@pytest.fixture(scope="module", params=["legacy", "dynamo"])
def exported(request, tmp_path_factory):
    model = Net().eval()
    path = tmp_path_factory.mktemp("collapse") / f"net.{request.param}.onnx"
    with torch.no_grad():
        if request.param == "legacy":
            torch.onnx.export(model, (torch.randn(2, 8),), str(path), dynamo=False, input_names=["x"],
                              dynamic_axes={"x": {0: "n"}})
        else:
            torch.onnx.export(model, (torch.randn(2, 8),), str(path), dynamo=True, input_names=["x"],
                              dynamic_shapes=({0: torch.export.Dim("n")},))
    calib = path.with_suffix(".npz")
    np.savez(calib, x=np.concatenate([b.numpy() for b in batches(12)]))
    return model, path, calib


def test_onnx_blocks_are_removed_and_the_stream_rewired(exported, tmp_path):
    import onnx
    import onnxruntime as ort

    model, path, calib = exported
    per_block = sum(p.numel() for p in model.blocks[0].parameters())
    total = lfpass.unique_parameters(model)
    config = FusionConfig(target_ratio=total / (total - 2 * per_block) - 1e-6, actions="collapse")
    done = lfpass.optimize(path, tmp_path / "collapsed.onnx", config, inputs=calib, check=False)
    assert set(done.plan.dropped) == {"blocks.2", "blocks.4"}, done.plan.message
    assert done.params_after == done.plan.params_after == total - 2 * per_block
    before, after = onnx.load(path), onnx.load(tmp_path / "collapsed.onnx")
    assert len(after.graph.node) < len(before.graph.node)  # fewer nodes run: the blocks are gone
    onnx.checker.check_model(after, full_check=True)
    x = batches(1, seed=7)[0].numpy()
    want = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(tmp_path / "collapsed.onnx")).run(None, {"x": x})[0]
    cos = (want * got).sum(1) / np.linalg.norm(want, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.min() > 0.99


def test_a_collapsed_model_retrains_with_the_blocks_gone():
    from lfpass.train import Distillation, Schedule, retrain

    model = Net().eval()
    task = Distillation.from_model(model, torch.randn(96, 8), eval_fraction=0.25)
    config = FusionConfig(target_ratio=1.2, actions="collapse")
    result = retrain(model, task, config, Schedule(stages=1, steps_per_stage=5, lr=1e-3, batch_size=16),
                     calibration=batches(), progress=False)
    assert set(result.plans[0].dropped) <= {"blocks.2", "blocks.4"} and result.plans[0].dropped
    assert all(isinstance(result.model.blocks[int(b.rsplit(".", 1)[1])], SkipBlock) for b in result.plans[0].dropped)
    assert lfpass.unique_parameters(result.model) == result.plans[0].params_after


def test_a_deep_stack_goes_by_influence_with_a_bisection_over_how_many():
    """Past GREEDY blocks, measuring every removal is too dear: blocks go least influential first
    and the budget is found by bisection (a few end-to-end runs, not one per block)."""
    from lfpass.core.collapse import GREEDY, Block, plan_collapse
    from lfpass.core.plan import FusionPlan

    n = GREEDY + 4
    blocks = [Block(f"layer.{i}", 100, 100) for i in range(n)]
    influence = {b.name: (i * 7 % n) / n for i, b in enumerate(blocks)}
    base = FusionPlan((), "cosine", "model", 100 * n + 50, 100 * n + 50, 100 * n, 100 * n, 1.0)
    runs = []

    def evaluate(plan):  # the error grows with every block removed
        runs.append(plan)
        return 0.01 * len(plan.dropped)

    plan = plan_collapse(base, blocks, influence, FusionConfig(target_ratio=None, max_error=0.055), evaluate)
    assert len(plan.dropped) == 5 and len(runs) <= 5
    least = sorted(influence, key=influence.get)[:5]
    assert set(plan.dropped) == set(least)


def _anonymous(path, out):
    """``path`` with every node, initializer and value renamed ``n17``/``t3``/``v5`` and no
    metadata: a converter's file, whose names say nothing of modules."""
    import onnx

    model = onnx.load(path)
    keep = {v.name for v in (*model.graph.input, *model.graph.output)}
    names: dict[str, str] = {}
    rename = lambda n, prefix: n if not n or n in keep else names.setdefault(n, f"{prefix}{len(names)}")  # noqa: E731
    for t in model.graph.initializer:
        t.name = rename(t.name, "t")
    for i, node in enumerate(model.graph.node):
        node.name = f"n{i}"
        del node.metadata_props[:]
        node.input[:] = [rename(x, "v") for x in node.input]
        node.output[:] = [rename(x, "v") for x in node.output]
    for v in model.graph.value_info:
        v.name = rename(v.name, "v")
    onnx.save(model, out)
    return out


def test_a_converters_file_is_collapsed_by_its_residual_structure(exported, tmp_path):
    """No module paths: each ``x + f(x)`` with weights is a block, named by its Add's output."""
    import onnx
    import onnx_ir as ir
    import onnxruntime as ort

    from lfpass.onnx.collapse import residual_spans
    from lfpass.onnx.sites import find_sites

    model, path, calib = exported
    anonymous = _anonymous(path, tmp_path / "anonymous.onnx")
    graph = ir.load(anonymous)
    spans = residual_spans(graph, find_sites(graph).plannable)
    per_block = sum(p.numel() for p in model.blocks[0].parameters())
    assert len(spans) == 6 and all(s.block.params == per_block for s in spans)
    assert all(s.stream_in is not None and s.nodes[-1].op_type == "Add" for s in spans)
    total = lfpass.unique_parameters(model)
    config = FusionConfig(target_ratio=total / (total - 2 * per_block) - 1e-6, actions="collapse")
    done = lfpass.optimize(anonymous, tmp_path / "collapsed.onnx", config, inputs=calib, check=False)
    assert set(done.plan.dropped) == {spans[2].block.name, spans[4].block.name}, done.plan.message
    assert done.params_after == total - 2 * per_block
    onnx.checker.check_model(onnx.load(tmp_path / "collapsed.onnx"), full_check=True)
    x = batches(1, seed=7)[0].numpy()
    want = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(tmp_path / "collapsed.onnx")).run(None, {"x": x})[0]
    cos = (want * got).sum(1) / np.linalg.norm(want, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.min() > 0.99
