"""Distillation from the original model: inputs are enough, no labels needed.

The teacher is a frozen copy of the original model (or any callable: an
onnxruntime session wrapper, a model on another device); the student, the
fused model, learns to reproduce its outputs (or hidden states that ``pick``
chooses) by mean squared error or cosine distance. Quality is the mean
cosine between student and teacher outputs on held-out inputs, each sample's
output flattened (1 is a perfect copy; higher is better).
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lfpass.core.errors import ConfigError
from lfpass.fx.batches import call
from lfpass.train.loop import to_device
from lfpass.train.task import Inputs, count, device_of, index_batches, main_output, select

LOSSES = ("mse", "cosine")
Pick = Callable[[Any], torch.Tensor]


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with no parameter requiring a gradient."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _tensors(output: Any) -> Any:
    """numpy arrays in an output (an onnxruntime session's list, say) as tensors."""
    if isinstance(output, np.ndarray):
        return torch.from_numpy(output)
    if isinstance(output, (list, tuple)):
        return type(output)(_tensors(o) for o in output)
    return output


class Distillation:
    """Match ``teacher``'s outputs on ``train_inputs``; quality is the mean cosine on ``eval_inputs``.

    Inputs are a tensor, a tuple of tensors (positional arguments) or a dict
    of tensors (keyword arguments), samples along the first dimension.
    ``pick(output)`` chooses the tensor compared (default: the output itself,
    its ``logits`` or ``last_hidden_state``, or its first element); ``pool(picked,
    inputs)``, differentiable, reduces it to what is compared (a sentence embedding
    pooled over the positions an attention mask keeps, see :func:`masked_mean`)."""

    name = "distillation"
    higher_is_better = True

    def __init__(self, teacher: Callable[..., Any], train_inputs: Inputs, eval_inputs: Inputs, *,
                 pick: Pick | None = None, loss: str = "mse", eval_batch_size: int = 64,
                 pool: Callable[[torch.Tensor, Any], torch.Tensor] | None = None) -> None:
        if loss not in LOSSES:
            raise ConfigError(f"loss: must be one of {', '.join(LOSSES)}, got {loss!r}")
        self.teacher, self.train_inputs, self.eval_inputs = teacher, train_inputs, eval_inputs
        self.n_train, self.n_eval = count(train_inputs), count(eval_inputs)
        self.pick: Pick = pick or main_output
        self.pool = pool
        self.kind, self.eval_batch_size = loss, eval_batch_size
        self._eval_targets: list[torch.Tensor] | None = None

    @classmethod
    def from_model(cls, model: nn.Module, inputs: Inputs, *, eval_fraction: float = 0.1, seed: int = 0,
                   **kwargs: Any) -> "Distillation":
        """Distil from a frozen copy of ``model``, holding out ``eval_fraction`` of ``inputs`` (seeded)."""
        if not 0.0 < eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction: must be in (0, 1), got {eval_fraction!r}")
        n = count(inputs)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        n_eval = max(1, int(round(n * eval_fraction)))
        if n - n_eval < 1:
            raise ConfigError(f"inputs: {n} samples are too few to hold {n_eval} out")
        return cls(frozen_copy(model), select(inputs, order[n_eval:]), select(inputs, order[:n_eval]), **kwargs)

    def targets(self, inputs: Inputs, device: torch.device) -> torch.Tensor:
        """The teacher's picked output on ``inputs``, on ``device``, with no gradient."""
        if isinstance(self.teacher, nn.Module) and device_of(self.teacher) != device:
            self.teacher = self.teacher.to(device)
        with torch.no_grad():
            return self._read(call(self.teacher, inputs), inputs).to(device)

    def _read(self, output: Any, inputs: Inputs) -> torch.Tensor:
        picked = self.pick(_tensors(output))
        return picked if self.pool is None else self.pool(picked, inputs)

    def train_batches(self, batch_size: int, *, seed: int, rank: int = 0, world: int = 1) -> Iterator[Any]:
        for idx in index_batches(self.n_train, batch_size, seed=seed, rank=rank, world=world):
            yield select(self.train_inputs, idx)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        student = self._read(call(model, batch), batch).float()
        teacher = self.targets(batch, student.device).float()
        if self.kind == "mse":
            return F.mse_loss(student, teacher)
        return 1.0 - F.cosine_similarity(_rows(student), _rows(teacher), dim=1).mean()

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Mean per-sample cosine to the teacher (``quality``) and mean squared error, held out."""
        model.eval()
        device = device_of(model)
        chunks = [slice(i, i + self.eval_batch_size) for i in range(0, self.n_eval, self.eval_batch_size)]
        if self._eval_targets is None:  # the teacher is fixed: ask it once
            self._eval_targets = [self.targets(to_device(select(self.eval_inputs, c), device), device).float().cpu()
                                  for c in chunks]
        cos_sum, sq_sum, elems = 0.0, 0.0, 0
        for c, target in zip(chunks, self._eval_targets):
            chunk = to_device(select(self.eval_inputs, c), device)
            student = self._read(call(model, chunk), chunk).float()
            target = target.to(device)
            cos_sum += float(F.cosine_similarity(_rows(student), _rows(target), dim=1).sum())
            sq_sum += float(((student - target) ** 2).sum())
            elems += target.numel()
        cosine = cos_sum / self.n_eval
        return {"quality": cosine, "cosine": cosine, "mse": sq_sum / max(elems, 1)}


def masked_mean(at: int | str) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """A ``pool`` for :class:`Distillation`: the mean over the positions (axis 1) the mask input
    ``at`` (a position in the inputs, or a name) keeps, as sentence embeddings are pooled."""
    def pool(picked: torch.Tensor, inputs: Any) -> torch.Tensor:
        mask = inputs[at].to(picked.dtype)
        mask = mask.reshape(*mask.shape, *([1] * (picked.dim() - mask.dim())))
        return (picked * mask).sum(1) / mask.sum(1).clamp_min(1e-9)

    return pool


def _rows(t: torch.Tensor) -> torch.Tensor:
    """One row per sample."""
    return t.reshape(t.shape[0], -1)
