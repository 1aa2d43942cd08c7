"""A site's layers as the matrices ``W`` of ``y = W x + b``, for what needs layers' inputs.

Data-aware merging and the output-error metric weigh a weight by what its
layer is fed (a calibration Gram, :mod:`lfpass.core.calibration`), so they need
each layer's weight as ``[out, in]``, the orientation its Gram is in, and its
bias beside it. A site's slots are one layer's (``weight``, ``bias``) or a
unit's (``q.weight``, ``q.bias``, ...): a layer is a weight slot and the bias
slot of the same prefix.

The orientation comes from the signature, whichever frontend wrote it: FX's
``layout`` (``out_in``, ``in_out``), ONNX's side, ``Transpose``\\s passed
through and Gemm's ``transB``. A convolution's weight ``[out, in/g, *k]`` is
``[out, in/g * prod(k)]`` against patches in ``(channel, *kernel)`` order.
What has no such matrix (a weight multiplying from the left, a grouped or
transposed convolution, a Gemm with ``alpha``/``beta``/``transA``) says why.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from lfpass.core.calibration import Calibration
from lfpass.core.sites import Signature, Site, Slot

_TRANSPOSE = re.compile(r"^Transpose\((?:perm=\(([^)]*)\))?")


@dataclass(frozen=True)
class Layer:
    """One layer of a site: its weight slot, its bias slot (if any), kind and signature.
    ``prefix`` is its path in a unit (``""`` for a layer site)."""

    prefix: str
    weight: Slot
    bias: Slot | None
    kind: str
    signature: Signature

    def label(self, site: str) -> str:
        return f"{site}.{self.prefix}" if self.prefix else site


def _prefix(slot: Slot) -> str:
    return slot.name.rpartition(".")[0]


def layers_of(site: Site) -> list[Layer]:
    """The layers of ``site``, in the order of its weight slots."""
    if site.parts:  # a unit: its signature is ((path, (kind, signature)), ...)
        inner = {rel: value for rel, value in site.signature}
    else:
        inner = {"": (site.kind, site.signature)}
    biases = {_prefix(x): x for x in site.slots if not x.compared}
    out = []
    for x in site.compared:
        prefix = _prefix(x)
        kind, signature = inner.get(prefix, (site.kind, ()))
        out.append(Layer(prefix, x, biases.get(prefix), kind, signature))
    return out


def _flips(via: Any) -> int | None:
    """How many axis swaps the ops between a 2-D ONNX weight and its reader make (None: not 2-D swaps)."""
    flips = 0
    for op in via or ():
        match = _TRANSPOSE.match(op)
        if not match:
            continue  # Cast, Identity: same axes
        perm = [int(p) for p in (match.group(1) or "1,0").split(",") if p.strip()]
        if perm == [1, 0]:
            flips += 1
        elif perm != [0, 1]:
            return None
    return flips


def layout_of(layer: Layer) -> tuple[str | None, str]:
    """``("out_in" | "in_out", "")``: how the stored weight maps to ``[out, in]``; or
    ``(None, why)`` when it has no such matrix."""
    return signature_layout(layer.kind, layer.signature)


def signature_layout(kind: str, signature: Any) -> tuple[str | None, str]:
    """:func:`layout_of` for a layer given by its kind and signature."""
    f = dict(signature)
    shape = tuple(f.get("shape", ()))
    if kind == "conv":
        groups = f.get("groups", f.get("group", 1))
        if groups != 1:
            return None, f"a grouped convolution (groups={groups})"
        return "out_in", ""
    if kind != "linear":
        return None, f"a {kind} layer"
    if len(shape) != 2:
        return None, f"a {len(shape)}-D weight"
    if "layout" in f:  # FX
        layout = f["layout"]
        return (layout, "") if layout in ("out_in", "in_out") else (None, f"weight layout {layout}")
    if f.get("op") == "com.microsoft.Attention":
        return "in_out", ""
    if f.get("side") != "right":
        return None, "the weight multiplies from the left"
    flips = _flips(f.get("via"))
    if flips is None:
        return None, "the weight passes through a Transpose that is no 2-D swap"
    if "transB" in f:  # Gemm
        if f.get("transA") or f.get("alpha", 1.0) != 1.0 or f.get("beta", 1.0) != 1.0:
            return None, "a Gemm with transA, alpha or beta"
        flips += int(f["transB"])
    return ("out_in" if flips % 2 else "in_out"), ""


def orient(array: Any, layout: str) -> np.ndarray:
    """The weight as read (``layout``: ``out_in`` or ``in_out``) as ``[out, in]`` in its own dtype
    (a convolution's as ``[out, in/g * prod(k)]``): the one place orientation is applied."""
    a = np.asarray(array)
    return a.T if layout == "in_out" else a.reshape(a.shape[0], -1)


def to_matrix(array: np.ndarray, layout: str) -> np.ndarray:
    """The stored weight as float64 ``[out, in]`` (:func:`orient`, widened)."""
    a = np.asarray(array)
    a = a.astype(np.float32) if a.dtype.itemsize < 4 else a  # bfloat16 widens exactly through float32
    return orient(a.astype(np.float64, copy=False), layout)


def input_width(site: Site) -> int:
    """The width of a layer site's input (a linear layer's features, a convolution's
    ``in_channels``), by :func:`layout_of`; where the weight has no ``[out, in]`` matrix
    (it multiplies from the left, say), the larger side, as a bound."""
    layer = layers_of(site)[0]
    sig = dict(layer.signature)
    shape = tuple(sig["shape"])
    if layer.kind == "conv":
        return int(shape[1]) * int(sig.get("groups", sig.get("group", 1)))
    layout, _ = layout_of(layer)
    if layout is None:
        return int(max(shape))
    return int(shape[1] if layout == "out_in" else shape[0])


def from_matrix(matrix: np.ndarray, layout: str, shape: tuple[int, ...]) -> np.ndarray:
    """:func:`to_matrix`'s inverse (float64)."""
    return np.ascontiguousarray(matrix.T) if layout == "in_out" else matrix.reshape(shape)


def augmented(weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """``[W b]`` (float64), or ``W`` alone without a bias."""
    if bias is None:
        return weight
    b = np.asarray(bias)
    b = (b.astype(np.float32) if b.dtype.itemsize < 4 else b).astype(np.float64).reshape(-1, 1)
    return np.hstack([weight, b])


def input_moment(stats: Calibration, layer: Layer, dim: int) -> tuple[np.ndarray | None, str]:
    """The layer's input second moment per sample (augmented with the constant 1 when it
    has a bias): ``[dim (+1), dim (+1)]``; or ``(None, why)``."""
    s = stats.layers.get(layer.weight.tensor)
    if s is None or s.count <= 0:
        return None, f"no calibration statistics for {layer.weight.tensor!r}"
    if s.dim != dim:
        return None, f"calibration statistics of {layer.weight.tensor!r} are over {s.dim} inputs, the weight takes {dim}"
    gram = s.augmented() if layer.bias is not None else s.gram
    return gram / s.count, ""
