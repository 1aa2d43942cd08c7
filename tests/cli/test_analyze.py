import json
import textwrap

import pytest

from lfpass.cli import main

FACTORY = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(16, 16) for _ in range(4))

        def forward(self, x):
            for b in self.blocks:
                x = torch.relu(b(x))
            return x

    def make():
        torch.manual_seed(0)
        return Net()

    def not_a_model():
        return 3
    """
)


@pytest.fixture
def factory(tmp_path):
    path = tmp_path / "models.py"
    path.write_text(FACTORY)
    return path


def test_analyze_factory_prints_table_writes_heatmap_and_plan(factory, tmp_path, capsys):
    heatmap, plan = tmp_path / "h.png", tmp_path / "plan.json"
    code = main(["analyze", f"{factory}:make", "--heatmap", str(heatmap), "--plan-out", str(plan), "--ratio", "1.5"])
    out = capsys.readouterr().out
    assert code == 0
    assert "blocks.*  linear (16, 16)  (4 layers)" in out and "blocks.0" in out and "[fused]" in out
    assert heatmap.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(plan.read_text())["ratio"] >= 1.5


@pytest.mark.parametrize(
    "args, message",
    [
        (["analyze", "no_such_module_xyz:make"], "cannot import no_such_module_xyz"),
        (["analyze", "{factory}:absent"], "has no callable 'absent'"),
        (["analyze", "{factory}:not_a_model"], "not a torch.nn.Module"),
        (["analyze", "{factory}"], "expected MODULE:FACTORY"),
        (["analyze", "{factory}:make", "--metric", "nope"], "unknown 'nope'"),
        (["analyze", "{factory}:make", "--ratio", "0.5"], "target_ratio"),
        (["analyze", "{factory}:make", "--ratio", "nan"], "target_ratio"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(factory, capsys, args, message):
    code = main([a.format(factory=factory) for a in args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1 and err.startswith("lfpass: error:")
