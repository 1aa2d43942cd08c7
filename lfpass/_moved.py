"""Import paths of lfpass 0.1 that moved when the package was layered (core, fx, onnx,
bridge): they keep working for one release, with a :class:`DeprecationWarning` naming
the new place. Each old module is a thin stand-in that reads its names from the new
module(s) on use, so nothing is imported before it is asked for."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from typing import Any

_CORE = ("align", "budget", "calibration", "config", "errors", "fileio", "layers", "lowrank", "metrics", "plan",
         "planner", "quality", "sites", "units")

MOVED: dict[str, tuple[str, ...]] = {
    **{f"lfpass.{m}": (f"lfpass.core.{m}",) for m in _CORE},
    "lfpass.merge": ("lfpass.core.merge", "lfpass.core.rules", "lfpass.core.dtypes"),
    "lfpass.api": ("lfpass.fx.api",),
    "lfpass.passes": ("lfpass.fx.fusion_pass",),
    "lfpass.onnx_export": ("lfpass.bridge.export",),
    "lfpass.onnx.to_torch": ("lfpass.bridge.to_torch",),
    "lfpass.onnx.distill": ("lfpass.bridge.distill",),
}
REMOVED_IN = "0.3"


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        targets = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {' / '.join(targets)}; the old path goes in lfpass {REMOVED_IN}",
                      DeprecationWarning, stacklevel=2)
        module = types.ModuleType(spec.name, f"Moved to {', '.join(targets)}.")

        def forward(name: str) -> Any:
            for target in targets:
                real = importlib.import_module(target)
                if hasattr(real, name):
                    return getattr(real, name)
            raise AttributeError(f"module {spec.name!r} (moved to {targets[0]}) has no attribute {name!r}")

        module.__getattr__ = forward  # type: ignore[attr-defined]
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        return None


def install() -> None:
    """Put the stand-ins on the import path (once)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
