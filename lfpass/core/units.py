"""Attention and MLP units, found from layer names alone (no table per architecture).

A transformer repeats one block (``encoder.layer.3``, ``h.3``, ``layers.3``,
``encoder_layer_3``): the block is the path up to its last index. Inside a
block, the linear layers under a child named like attention (``attention``,
``attn``, ``self_attn``, ``self_attention``, ``crossattention``) form one
attention unit per such child; the block's other linear layers form its MLP
unit (``mlp``, ``intermediate`` + ``output``, ``linear1`` + ``linear2``,
``gate/up/down_proj``). A unit is a :class:`~lfpass.core.sites.Site` whose slots
are its layers' slots, named by their path inside the unit
(``self.query.weight``, ``c_attn.bias``), and whose signature is its layers'
signatures by that path: two units share only when they are built alike.

Both frontends name layers by module path (FX by attribute path; ONNX by
node name, initializer name or the exporter's namespace), so the same units
come out of a PyTorch model and of its ONNX export. Planning by
``granularity = "block"`` puts units in place of their layers, so one
decision fuses a whole unit or none of it.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

from lfpass.core.sites import Site, Slot, role_of

UNIT_KINDS = ("attention", "mlp")
_INDEX = re.compile(r"^(?:\d+|.*\D_\d+)$")  # "3" or "encoder_layer_3"
_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)
_SEP = re.compile(r"[./]")
_OP_SUFFIX = re.compile(r"^(MatMul|Gemm)(_\d+)?$")  # the legacy exporter's node names end in the op


def _path(site: Site) -> list[str]:
    """The site's name as path components (``.`` and ``/`` alike; an ONNX node name
    keeps its op-type suffix, which tells two layers of one module apart)."""
    return [p for p in _SEP.split(site.name.split("#")[0]) if p]


def _split_block(parts: list[str]) -> tuple[list[str], list[str]] | None:
    """``(block, rest)``: the path up to the last index above the layer itself (``mlp.0``
    is a layer, not a block), and what follows."""
    layer = len(parts) - 1 - (len(parts) > 1 and bool(_OP_SUFFIX.match(parts[-1])))
    for i in range(layer - 1, -1, -1):
        if _INDEX.match(parts[i]):
            return parts[: i + 1], parts[i + 1:]
    return None


def _unit_of(rest: list[str]) -> tuple[str, list[str]]:
    """``(kind, path of the unit inside the block)`` of a layer at ``rest`` in its block
    (a layer named after its attention module, as a packed ``in_proj`` may be, is in it)."""
    for i, part in enumerate(rest):
        if _ATTENTION.search(part):
            return "attention", rest[: i + 1]
    return "mlp", []


def find_units(sites: Iterable[Site]) -> list[Site]:
    """The attention and MLP units of ``sites`` (linear layers only), in site order."""
    sites = list(sites)
    units: dict[tuple[str, ...], tuple[str, list[tuple[str, Site]]]] = {}
    for site in sites:
        if site.kind != "linear" or site.parts:
            continue
        parts = _path(site)
        split = _split_block(parts)
        if split is None:
            continue
        block, rest = split
        kind, inner = _unit_of(rest)
        key = (*block, *inner) if kind == "attention" else (*block, "<mlp>")
        rel = ".".join(rest[len(inner):])
        units.setdefault(key, (kind, []))[1].append((rel, site))
    taken = {s.name for s in sites}
    return [_unit(key, kind, members, taken) for key, (kind, members) in units.items() if len(members) >= 2]


def _mlp_name(block: Sequence[str], members: list[tuple[str, Site]]) -> tuple[str, list[tuple[str, Site]]]:
    """An MLP unit's name: the block plus the layers' common first component (``mlp``),
    which then leaves their in-unit paths; else ``block.mlp``."""
    firsts = {rel.split(".")[0] for rel, _ in members}
    if len(firsts) == 1 and all("." in rel for rel, _ in members):
        head = firsts.pop()
        return ".".join((*block, head)), [(rel.partition(".")[2], s) for rel, s in members]
    return ".".join((*block, "mlp")), members


def _unit(key: tuple[str, ...], kind: str, members: list[tuple[str, Site]], taken: set[str]) -> Site:
    if kind == "mlp":
        name, members = _mlp_name(key[:-1], members)
    else:
        name = ".".join(key)
    if name in taken:  # a layer already has the module's name (a packed in_proj named by its module)
        name = f"{name}:{kind}"
    members = sorted(members, key=lambda m: m[0])
    slots = tuple(Slot(f"{rel}.{x.name}" if rel else x.name, x.tensor, x.kind) for rel, s in members for x in s.slots)
    signature = tuple((rel, (s.kind, s.signature)) for rel, s in members)
    return Site(
        name=name, kind=kind, role=role_of(name), signature=signature, slots=slots,
        numel=sum(s.numel for _, s in members), location=",".join(s.location for _, s in members if s.location),
        parts=tuple(s.name for _, s in members),
    )
