"""How a batch is given to a model, everywhere lfpass runs one: a tensor is the one
positional input, a tuple or list the positional inputs, a mapping (a tokenizer's
output too) the keyword inputs."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping


def as_call(batch: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` for one batch."""
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


def call(model: Any, batch: Any) -> Any:
    """``model`` run on one batch."""
    args, kwargs = as_call(batch)
    return model(*args, **kwargs)


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[Any]:
    """``model`` in eval mode within the block; each module's own mode restored after it. The
    flags are set directly: a ``torch.export`` module refuses ``.eval()`` (it is traced in one mode)."""
    modes = [(m, m.training) for m in model.modules()]
    for module, _ in modes:
        module.training = False
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
