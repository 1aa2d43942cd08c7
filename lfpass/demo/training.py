"""Training and evaluation for the demo: a time-budgeted AdamW loop that trains each
shared ``nn.Parameter`` once (so the gradients of every layer using it add up)."""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lfpass.data import Split

log = logging.getLogger(__name__)


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
