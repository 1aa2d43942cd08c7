"""How a batch is given to a model, everywhere lfpass runs one: a tensor is the one
positional input, a tuple or list the positional inputs, a mapping (a tokenizer's
output too) the keyword inputs."""

from __future__ import annotations

from typing import Any, Mapping


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
