"""Sites: the weight-bearing layers of a model, described without any IR.

A site is what the planner reasons about: its kind (linear, conv, ...), its
role (the module path with layer indices replaced by ``*``), a signature that
must match exactly for two sites to share a tensor, and the names of the
tensors it owns (weight first, then bias). Frontends find sites; the core
never looks at a graph.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

_INDEX = re.compile(r"^\d+$")
_SPLIT = re.compile(r"([./])")

Signature = tuple[tuple[str, Any], ...]


def role_of(path: str) -> str:
    """The role of a module path: numeric components become ``*``.

    ``encoder.layer.3.attention.self.query`` -> ``encoder.layer.*.attention.self.query``;
    ``/encoder/layer.3/attention/self/query/MatMul`` -> ``encoder/layer.*/attention/self/query/MatMul``.
    """
    parts = _SPLIT.split(path.strip("/"))
    return "".join("*" if _INDEX.match(p) else p for p in parts)


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def make_signature(**fields: Any) -> Signature:
    """A hashable, order-independent signature from keyword fields."""
    return tuple(sorted((k, _freeze(v)) for k, v in fields.items()))


@dataclass(frozen=True)
class Site:
    """One weight-bearing layer (or unit of layers) that may share its tensors."""

    name: str
    kind: str
    role: str
    signature: Signature
    tensors: tuple[str, ...]
    numel: int
    location: str = ""

    @property
    def weight(self) -> str:
        return self.tensors[0]

    def class_key(self, cross_role: bool = False) -> str:
        """The compatibility class: sites share a tensor only inside one class."""
        sig = ",".join(f"{k}={v}" for k, v in self.signature)
        return f"{self.kind}[{sig}]" if cross_role else f"{self.role}|{self.kind}[{sig}]"

    def signature_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.signature}
