"""What retraining needs of a task, and the batching every task shares.

A task gives batches to train on, a loss, and an evaluation whose ``quality``
entry decides a stage (``higher_is_better`` says which way is good). Batches
are drawn as *global* batches from a seeded stream and each rank keeps its own
equal share, so a run on N processes sees exactly the samples a one-process
run sees, and DDP's averaged gradient is the one-process gradient.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from lfpass.core.errors import ConfigError

Inputs = torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor]


@runtime_checkable
class Task(Protocol):
    """A training objective and its measure of quality."""

    name: str
    higher_is_better: bool

    def train_batches(self, batch_size: int, *, seed: int, rank: int = 0, world: int = 1) -> Iterator[Any]:
        """Endless batches: this rank's share of each global batch of ``batch_size``."""

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The scalar loss of ``model`` on one batch (already on the model's device)."""

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Held-out metrics; ``quality`` is the one a stage is judged by."""


def share(batch_size: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s part of a global batch of ``batch_size``: equal parts, so the mean of the
    ranks' mean losses is the global batch's mean loss."""
    if batch_size % world:
        raise ConfigError(f"batch_size: {batch_size} does not split evenly over {world} processes")
    part = batch_size // world
    return slice(rank * part, (rank + 1) * part)


def index_batches(n: int, batch_size: int, *, seed: int, rank: int = 0, world: int = 1) -> Iterator[torch.Tensor]:
    """Endless batches of indices into ``n`` samples: seeded epoch permutations cut into global
    batches of ``batch_size`` (running on into the next epoch), of which this rank keeps its share."""
    if n < 1:
        raise ConfigError("the task has no training samples")
    mine = share(batch_size, rank, world)
    gen = torch.Generator().manual_seed(seed)
    stream = torch.empty(0, dtype=torch.long)
    while True:
        while stream.numel() < batch_size:
            stream = torch.cat([stream, torch.randperm(n, generator=gen)])
        batch, stream = stream[:batch_size], stream[batch_size:]
        yield batch[mine]


def device_of(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters live (the CPU for a model without any)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def count(inputs: Inputs) -> int:
    """The number of samples (the leading dimension) of a tensor, a tuple or a dict of tensors."""
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0])
    values = list(inputs.values()) if isinstance(inputs, Mapping) else list(inputs)
    if not values:
        raise ConfigError("inputs: empty")
    sizes = {int(v.shape[0]) for v in values}
    if len(sizes) != 1:
        raise ConfigError(f"inputs: the tensors hold different numbers of samples {sorted(sizes)}")
    return sizes.pop()


def select(inputs: Inputs, index: torch.Tensor | slice) -> Inputs:
    """The samples ``index`` of every tensor in ``inputs``."""
    if isinstance(inputs, torch.Tensor):
        return inputs[index]
    if isinstance(inputs, Mapping):
        return {k: v[index] for k, v in inputs.items()}
    return tuple(v[index] for v in inputs)



def main_output(output: Any) -> torch.Tensor:
    """The tensor a model's output stands for: itself, its ``logits`` or ``last_hidden_state``
    (Hugging Face outputs), or the first element of a tuple or dict."""
    if isinstance(output, torch.Tensor):
        return output
    for key in ("logits", "last_hidden_state"):
        value = output.get(key) if isinstance(output, Mapping) else getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (list, tuple)) and output:
        return main_output(output[0])
    raise TypeError(f"cannot find a tensor in the model's output ({type(output).__name__})")
