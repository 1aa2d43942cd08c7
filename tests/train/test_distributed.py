"""Retraining under torchrun: two CPU processes (gloo) against one process with the same global batch.

The file is also the worker torchrun starts: ``python -m torch.distributed.run
--nproc_per_node 2 --standalone tests/train/test_distributed.py OUT CKPT``; each
rank records what it ended with in ``OUT.RANK`` for the test to compare.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

import lfpass
from lfpass.train import ImageClassification, Schedule, retrain

FUSION = lfpass.FusionConfig(target_ratio=1.8, ratio_scope="layers")
SCHEDULE = Schedule(stages=2, steps_per_stage=12, lr=3e-3, batch_size=32, seed=1)


class Net(nn.Module):
    def __init__(self, depth: int = 4, width: int = 16):
        super().__init__()
        self.inp = nn.Linear(8, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        x = torch.relu(self.inp(x))
        for b in self.blocks:
            x = x + torch.relu(b(x))
        return self.head(x)


class Seen(ImageClassification):
    """The task, noting the size and first value of the first batch this process trained on."""

    seen: int = 0
    first: float = 0.0

    def loss(self, model, batch):
        if not self.seen:
            self.seen, self.first = len(batch[0]), float(batch[0][0, 0])
        return super().loss(model, batch)


def problem() -> tuple[Net, Seen]:
    """Four Gaussian clusters in 8 dimensions and a small residual MLP, the same in every process."""
    gen = torch.Generator().manual_seed(0)
    centres = 2 * torch.randn(4, 8, generator=gen)
    y = torch.arange(256) % 4
    x = centres[y] + torch.randn(256, 8, generator=gen)
    torch.manual_seed(0)
    return Net(), Seen(x[:192], y[:192], x[192:], y[192:])


def ties_kept(model: nn.Module, plans) -> bool:
    return all(len({id(model.get_submodule(m).weight) for m in g.members}) == 1 for p in plans for g in p.groups)


def run(checkpoint_dir: str | None = None) -> dict:
    model, task = problem()
    result = retrain(model, task, FUSION, SCHEDULE, checkpoint_dir=checkpoint_dir, progress=False)
    return {
        "plans": [p.to_json() for p in result.plans],
        "losses": [r.train_loss for r in result.history],
        "quality": [r.quality for r in result.history],
        "ties": ties_kept(result.model, result.plans),
        "unique": lfpass.unique_parameters(result.model),
        "seen": task.seen,
        "first": task.first,
        "digest": [float(p.detach().double().sum()) for p in result.model.parameters()],
    }


def test_two_processes_match_one(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           __file__, str(tmp_path / "rank"), str(tmp_path / "ckpt")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank.{r}").read_text()) for r in (0, 1)]
    alone = run()
    assert len(ranks) == 2
    assert ranks[0]["plans"] == ranks[1]["plans"]  # rank 0 planned, rank 1 applied the same plan
    assert ranks[0]["digest"] == ranks[1]["digest"]  # DDP kept the weights identical, bit for bit
    assert all(r["ties"] for r in ranks) and ranks[0]["unique"] == ranks[1]["unique"] == alone["unique"]
    members = lambda plans: [[g["members"] for g in json.loads(p)["groups"]] for p in plans]  # noqa: E731
    assert members(ranks[0]["plans"]) == members(alone["plans"])  # scores differ in the last bits only
    assert [r["seen"] for r in ranks] == [16, 16] and alone["seen"] == 32  # each rank half the global batch ...
    assert ranks[0]["first"] != ranks[1]["first"]  # ... and a different half
    # DDP averages the two halves' gradients: the one-process gradient, up to float32 summation order.
    # Measured: the losses agree to ~1e-7 relative after 24 Adam steps; 1e-5 leaves room for another
    # machine's rounding and is far below what a wrong shard, a lost tie or a skipped all-reduce costs.
    for a, b in zip(ranks[0]["losses"], alone["losses"]):
        assert abs(a - b) <= 1e-5 * abs(b), (ranks[0]["losses"], alone["losses"])
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["run.json", "stage-002.pt"]


if __name__ == "__main__":  # one torchrun worker, as a user's script: retrain joins the group and leaves it
    torch.set_num_threads(1)
    mine = run(sys.argv[2])
    Path(f"{sys.argv[1]}.{os.environ['RANK']}").write_text(json.dumps(mine))  # the test's own record, per rank
