"""Sites: the weight-bearing layers of a model, described without any IR.

A site is what the planner reasons about: its kind (linear, conv, ...), its
role (the module path with layer indices replaced by ``*``), a signature that
must match exactly for two sites to share a tensor, and its named slots (the
tensors it owns: weights, which similarity compares, and biases). Frontends
find sites; the core never looks at a graph.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

_INDEX = re.compile(r"^\d+$")
_SUFFIX_INDEX = re.compile(r"^(.*\D_)\d+$")  # torchvision's "encoder_layer_3"
_SPLIT = re.compile(r"([./])")

Signature = tuple[tuple[str, Any], ...]


def role_of(path: str) -> str:
    """The role of a module path: indices become ``*`` (a numeric component, or a
    component's ``_N`` suffix), so every repeat of a block has one role.

    ``encoder.layer.3.attention.self.query`` -> ``encoder.layer.*.attention.self.query``;
    ``/encoder/layer.3/attention/self/query/MatMul`` -> ``encoder/layer.*/attention/self/query/MatMul``;
    ``encoder.layers.encoder_layer_3.mlp.0`` -> ``encoder.layers.encoder_layer_*.mlp.*``.
    """
    parts = _SPLIT.split(path.strip("/"))
    return "".join("*" if _INDEX.match(p) else _SUFFIX_INDEX.sub(r"\1*", p) for p in parts)


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def make_signature(**fields: Any) -> Signature:
    """A hashable, order-independent signature from keyword fields."""
    return tuple(sorted((k, _freeze(v)) for k, v in fields.items()))


def _format(signature: Signature) -> str:
    return ",".join(f"{k}={v}" for k, v in signature)


@dataclass(frozen=True)
class ClassKey:
    """A compatibility class: sites share tensors only inside one class.

    Same ``kind`` and ``signature`` always; and the same ``role`` unless the
    class was formed across roles (``role is None``). ``str()`` is a stable,
    readable form; :meth:`to_json`/:meth:`from_json` round-trip it exactly."""

    kind: str
    signature: Signature
    role: str | None = None

    def __str__(self) -> str:
        body = f"{self.kind}[{_format(self.signature)}]"
        return body if self.role is None else f"{self.role}|{body}"

    def field(self, name: str, default: Any = None) -> Any:
        """One signature field (``shape``, ``layout``, ...)."""
        return dict(self.signature).get(name, default)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "role": self.role, "signature": [[k, v] for k, v in self.signature]}

    @classmethod
    def from_json(cls, data: Any) -> "ClassKey":
        if not isinstance(data, dict) or not isinstance(data.get("kind"), str):
            raise TypeError(f"a class key must be an object with a kind, got {data!r}")
        signature = tuple((str(k), _freeze(v)) for k, v in data.get("signature", ()))
        return cls(data["kind"], signature, data.get("role"))


SLOT_KINDS = ("weight", "bias")


@dataclass(frozen=True)
class Slot:
    """One tensor of a site, by name: ``weight`` and ``bias`` for a layer; ``q.weight``,
    ``up.bias`` ... for a unit. Weights are what similarity compares; biases follow."""

    name: str
    tensor: str  # the tensor's name in the model
    kind: str = "weight"

    def __post_init__(self) -> None:
        if self.kind not in SLOT_KINDS:
            raise ValueError(f"slot {self.name!r}: kind must be one of {SLOT_KINDS}, got {self.kind!r}")

    @property
    def compared(self) -> bool:
        return self.kind == "weight"


def layer_slots(tensors: Sequence[str], prefix: str = "") -> tuple[Slot, ...]:
    """A layer's slots from its tensor names: the weight, then the bias if any."""
    if not 1 <= len(tensors) <= 2:
        raise ValueError(f"a layer has a weight and at most a bias, got {len(tensors)} tensors")
    return tuple(Slot(f"{prefix}{kind}", t, kind) for kind, t in zip(SLOT_KINDS, tensors))


@dataclass(frozen=True)
class Site:
    """One weight-bearing layer (or unit of layers) that may share its tensors.

    ``slots`` name its tensors; a plain tuple of tensor names is read as
    (weight, bias). A unit (an attention block, an MLP) lists the layer sites
    it covers in ``parts``: planning by block replaces them with it."""

    name: str
    kind: str
    role: str
    signature: Signature
    slots: tuple[Slot, ...]
    numel: int
    location: str = ""
    parts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.slots and all(isinstance(x, str) for x in self.slots):
            object.__setattr__(self, "slots", layer_slots(self.slots))
        if not self.slots or not all(isinstance(x, Slot) for x in self.slots):
            raise ValueError(f"site {self.name!r}: slots must be Slot objects or tensor names")
        if len({x.name for x in self.slots}) != len(self.slots):
            raise ValueError(f"site {self.name!r}: two slots share a name")

    @property
    def tensors(self) -> tuple[str, ...]:
        """Every tensor the site owns, in slot order."""
        return tuple(x.tensor for x in self.slots)

    @property
    def compared(self) -> tuple[Slot, ...]:
        """The slots similarity is measured on (the weights)."""
        return tuple(x for x in self.slots if x.compared)

    @property
    def weight(self) -> str:
        """The first compared tensor (a layer's weight)."""
        return self.compared[0].tensor

    def slot(self, name: str) -> Slot:
        for x in self.slots:
            if x.name == name:
                return x
        raise KeyError(f"site {self.name!r} has no slot {name!r}")

    def class_key(self, cross_role: bool = False) -> ClassKey:
        """The compatibility class: sites share a tensor only inside one class."""
        return ClassKey(self.kind, self.signature, None if cross_role else self.role)

    def signature_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.signature}
