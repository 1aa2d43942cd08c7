"""A generic training loop that keeps the ties of a fused model.

A fused model holds one ``nn.Parameter`` in several modules; ``parameters()``
yields it once, so the optimizer updates it once with the gradients of every
use summed by autograd. Nothing here knows about fusion beyond that: the loop
takes a model (plain or wrapped in DistributedDataParallel), an iterator of
batches, a loss function, an optimizer, and optionally an evaluation to run
every so many steps.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any], torch.Tensor]
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


@dataclass
class TrainStats:
    """What one call of :func:`train_steps` did: per-step losses (this process's), the wall
    time, evaluations as ``(step, metrics)``, and whether it stopped on a NaN/Inf loss."""

    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    evals: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    diverged: bool = False

    @property
    def steps(self) -> int:
        return len(self.losses)

    @property
    def loss(self) -> float:
        """The mean loss of the last tenth of the steps (at least one): where training ended."""
        if not self.losses:
            return math.nan
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return sum(tail) / len(tail)


def make_optimizer(name: str, params: Iterable[nn.Parameter], lr: float,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """``adamw``, ``adam`` or ``sgd`` (momentum 0.9) over ``params``."""
    params = list(params)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r} (known: adamw, adam, sgd)")


def carry_state(old: torch.optim.Optimizer | None, new: torch.optim.Optimizer) -> int:
    """Give ``new`` the state ``old`` held for the parameters both optimise (the same objects),
    so tensors a fusion left alone keep their moments; returns how many carried over."""
    if old is None:
        return 0
    carried = 0
    for group in new.param_groups:
        for p in group["params"]:
            if p in old.state:
                new.state[p] = old.state[p]
                carried += 1
    return carried


def to_device(batch: Any, device: torch.device | str | None) -> Any:
    """``batch`` (a tensor, or tuples, lists and dicts of them) on ``device``."""
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_steps(
    model: nn.Module,
    batches: Iterator[Any],
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer | OptimizerFactory,
    steps: int,
    *,
    lr_at: Callable[[int], float] | None = None,
    frozen: Sequence[torch.Tensor] = (),
    freeze_steps: int = 0,
    device: torch.device | str | None = None,
    evaluate: Callable[[], dict[str, float]] | None = None,
    eval_every: int = 0,
    progress: bool = True,
    desc: str = "train",
    postfix: dict[str, Any] | None = None,
    reduce_loss: Callable[[torch.Tensor], float] | None = None,
    frozen_norms: bool = False,
) -> TrainStats:
    """Train ``model`` in place for ``steps`` steps of ``loss_fn(model, batch)``.

    ``optimizer`` is an optimizer or a factory called with the model's
    parameters (each shared tensor once). ``lr_at(step)`` sets the learning
    rate of each step. The ``frozen`` tensors get no update for the first
    ``freeze_steps`` steps; with ``frozen_norms`` BatchNorm layers stay in
    eval mode (:func:`training`). With
    ``evaluate`` and ``eval_every``, metrics are taken every that many steps
    and shown on the bar (with ``postfix``). ``reduce_loss`` turns a step's loss
    into the number recorded (under DDP, its mean over the ranks, so every rank
    records the global batch's loss and takes the same decisions). A NaN or
    Inf loss stops the loop (``diverged``): the caller decides whether that is
    an error.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer(model.parameters())
    stats, started, shown, ema = TrainStats(), time.perf_counter(), dict(postfix or {}), math.nan
    bar = tqdm(total=steps, desc=desc, unit="step", file=sys.stderr, leave=False, disable=not progress)
    training(model, frozen_norms)
    for step in range(steps):
        if lr_at is not None:
            _set_lr(optimizer, lr_at(step))
        loss = loss_fn(model, to_device(next(batches), device))
        value = reduce_loss(loss.detach()) if reduce_loss else float(loss.detach())
        if not math.isfinite(value):
            stats.diverged = True
            log.warning("%s: loss is %s at step %d; stopping", desc, value, step)
            break
        _update(optimizer, loss, frozen if step < freeze_steps else ())
        stats.losses.append(value)
        ema = value if math.isnan(ema) else 0.9 * ema + 0.1 * value
        if evaluate is not None and eval_every and (step + 1) % eval_every == 0:
            stats.evals.append((step + 1, evaluate()))
            shown["quality"] = f"{stats.evals[-1][1]['quality']:.4g}"
            training(model, frozen_norms)
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.4g}", **shown)
    bar.close()
    stats.seconds = time.perf_counter() - started
    return stats


def training(model: nn.Module, frozen_norms: bool = False) -> None:
    """``model`` in train mode; with ``frozen_norms`` its BatchNorm layers (any norm keeping
    running statistics) stay in eval mode: they normalise by the original's statistics and
    update none (their affine weights still train)."""
    model.train()
    if frozen_norms:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
                module.eval()


def _update(optimizer: torch.optim.Optimizer, loss: torch.Tensor, frozen: Sequence[torch.Tensor]) -> None:
    """One optimizer step on ``loss``, leaving ``frozen`` as they are: their gradients are dropped
    after the backward pass (so under DDP every rank still joins the same all-reduce), and
    optimizers skip a parameter without a gradient, weight decay included."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for t in frozen:
        t.grad = None
    optimizer.step()
