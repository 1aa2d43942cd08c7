"""Names of a package imported on first use (PEP 562): ``lfpass optimize model.onnx`` and the ONNX
path's inputs never pay for importing torch."""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping


def exports(package: str, namespace: dict[str, Any], table: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: each name of ``table`` (name -> the module that
    defines it) imported when first asked for, then kept in ``namespace``."""

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    return __getattr__
