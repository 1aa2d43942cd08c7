"""Load a model from ``MODULE:FACTORY`` (or ``path/to/file.py:FACTORY``)."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

from torch import nn

from lfpass.core.errors import InputError


def load_factory(spec: str) -> tuple[nn.Module, Any]:
    """Call the factory named by ``spec``; it returns a model, or ``(model, example_inputs)``."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise InputError(f"{spec}: expected MODULE:FACTORY (e.g. torchvision.models:resnet18) or a .onnx file")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise InputError(f"{spec}: no such file {path}")
            loader = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's to fix
        raise InputError(f"{spec}: cannot import {module_name} ({type(exc).__name__}: {exc})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise InputError(f"{spec}: {module_name} has no callable {attr!r}")
    try:
        made = factory()
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{spec}: the factory failed ({type(exc).__name__}: {exc})") from None
    model, example = (made if isinstance(made, tuple) else (made, None))
    if not isinstance(model, nn.Module):
        raise InputError(f"{spec}: the factory returned {type(model).__name__}, not a torch.nn.Module")
    return model.eval(), example
