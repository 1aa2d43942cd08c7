"""Turn a model into a torch.fx GraphModule."""

from __future__ import annotations

import logging
from typing import Any, Mapping

import torch
from torch import nn

from lfpass.core.errors import TraceError, first_line

log = logging.getLogger(__name__)


def trace(model: nn.Module, example_inputs: Any = None) -> torch.fx.GraphModule:
    """``torch.fx.symbolic_trace``, falling back to ``torch.export`` with ``example_inputs``.

    ``example_inputs`` is a tuple of positional inputs, a single tensor, or a
    dict of keyword inputs. Models with data-dependent control flow (most
    Hugging Face transformers) need them.
    """
    if isinstance(model, torch.fx.GraphModule):
        return model
    try:
        return torch.fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure falls back to export
        fx_error = exc
    if example_inputs is None:
        raise TraceError(
            f"cannot trace {type(model).__name__}: torch.fx.symbolic_trace failed "
            f"({_short(fx_error)}), and torch.export needs example inputs"
        )
    args, kwargs = _split_inputs(example_inputs)
    try:
        was_training = model.training
        gm = torch.export.export(model, args, kwargs).module()
        model.train(was_training)
        log.info("traced %s with torch.export (symbolic_trace failed: %s)", type(model).__name__, _short(fx_error))
        return gm
    except Exception as exc:  # noqa: BLE001
        raise TraceError(
            f"cannot trace {type(model).__name__}: torch.fx.symbolic_trace failed ({_short(fx_error)}); "
            f"torch.export failed ({_short(exc)})"
        ) from exc


def _split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    return tuple(example_inputs), {}


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {first_line(exc)}"
