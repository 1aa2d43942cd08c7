"""Calibration of an ONNX model in onnxruntime: its layers' input statistics.

Each layer site's data input (the ``MatMul``/``Gemm``/``Conv``'s activation,
found by :func:`lfpass.onnx.sites.find_sites`) is made an extra graph output of
a serialized copy; the copy runs on each feed dict and the values are folded
into float64 sums (:mod:`lfpass.core.calibration`), keyed by the site's weight
tensor name, as the FX frontend keys them. A convolution's input becomes its
patches (``im2col`` with the node's strides, pads and dilations), flattened in
the weight's ``(channel, *kernel)`` order, as ``torch.nn.functional.unfold``
orders them. The user's model is never changed: weights stored as external
data stay where they are and onnxruntime reads them from the model's folder.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from lfpass.core.calibration import Calibration, CalibrationError, LayerStats, accumulate
from lfpass.onnx.runtime import exposing, session
from lfpass.onnx.sites import find_sites, layer_kind, node_site

log = logging.getLogger(__name__)

_CHUNK = 1 << 15  # patch rows folded into the Gram at a time


def im2col(x: np.ndarray, kernel: Sequence[int], strides: Sequence[int], pads: Sequence[int],
           dilations: Sequence[int]) -> np.ndarray:
    """``x`` (``[N, C, *spatial]``) as ``[N * positions, C * prod(kernel)]`` patch rows,
    entries in ``(channel, *kernel)`` order; ``pads`` as ONNX writes them (all begins, then all ends)."""
    nd = len(kernel)
    width = [(int(pads[i]), int(pads[i + nd])) for i in range(nd)]
    if any(p for pair in width for p in pair):
        x = np.pad(x, [(0, 0), (0, 0), *width])
    spans = [d * (k - 1) + 1 for k, d in zip(kernel, dilations)]
    view = np.lib.stride_tricks.sliding_window_view(x, spans, axis=tuple(range(2, 2 + nd)))
    index = (slice(None), slice(None), *(slice(None, None, s) for s in strides), *(slice(None, None, d) for d in dilations))
    view = view[index]  # [N, C, *out, *kernel]
    order = [0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd)]
    return view.transpose(order).reshape(-1, x.shape[1] * math.prod(kernel))


def _channels(x: np.ndarray, conv: bool) -> np.ndarray:
    return np.moveaxis(x, 1, -1).reshape(-1, x.shape[1]) if conv else x.reshape(-1, x.shape[-1])


def _readers(model: ir.Model, weights: set[str]) -> dict[str, list[ir.Node]]:
    """The site nodes reading each weight tensor, in graph order."""
    out: dict[str, list[ir.Node]] = {}
    for node in model.graph:
        if layer_kind(node) is None:
            continue
        hit = node_site(node)
        if isinstance(hit, tuple) and hit[1].name in weights:
            out.setdefault(hit[1].name, []).append(node)
    return out


def _probe(node: ir.Node) -> tuple[ir.Value, dict[str, Any]] | str:
    """The node's data input and how to read it (``conv``: patch geometry; ``transpose``), or why not."""
    x = node.inputs[0] if node.inputs else None
    if x is None:
        return "no data input"
    attrs = {k: a.value for k, a in node.attributes.items()}
    if node.op_type == "ConvTranspose":
        return "a transposed convolution"
    if node.op_type == "Conv":
        if attrs.get("group", 1) != 1:
            return f"a grouped convolution (group={attrs['group']})"
        if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            return f"auto_pad={attrs['auto_pad']}"
        return x, {"conv": True, "attrs": attrs}
    if node.op_type == "Gemm":
        return x, {"transpose": bool(attrs.get("transA", 0))}
    return x, {}  # com.microsoft Attention: input 0 is the hidden state


def calibrate_onnx(
    model: str | os.PathLike | ir.Model,
    feeds_batches: Iterable[Mapping[str, np.ndarray]],
    cross: Iterable[tuple[str, str]] = (),
    progress: bool = False,
) -> Calibration:
    """Input statistics of the model's layer sites over ``feeds_batches`` (onnxruntime feed
    dicts), keyed by weight tensor name. ``cross`` as in :func:`lfpass.fx.calibrate.calibrate_fx`."""
    loaded = isinstance(model, ir.Model)
    ir_model = model if loaded else ir.load(os.fspath(model))
    base = (os.path.dirname(os.path.abspath(os.fspath(model))) if not loaded
            else _base_dir(ir_model))
    found = find_sites(ir_model)
    readers = _readers(ir_model, {s.weight for s in found.sites})
    probes: list[tuple[str, ir.Value, dict[str, Any]]] = []
    for site in found.sites:
        for node in readers.get(site.weight, []):
            hit = _probe(node) if dict(site.signature).get("side", "right") == "right" else "the weight multiplies from the left"
            if isinstance(hit, str):
                log.info("calibration: layer %s skipped: %s", site.name, hit)
                continue
            x, how = hit
            if how.get("conv"):
                shape = tuple(int(d) for d in found.tensor(site.weight).shape)
                how["geometry"] = _geometry(how.pop("attrs"), shape)
            probes.append((site.weight, x, how))
    session, names = _session(ir_model, probes, base)
    pairs = [tuple(p) for p in cross]
    crossed = {n for p in pairs for n in p}
    layers: dict[str, LayerStats] = {}
    cross_sums: dict[tuple[str, str], np.ndarray] = {}
    count = 0
    for feeds in tqdm(feeds_batches, desc="calibration", unit="batch", disable=not progress, leave=False):
        wanted = [n for n in names if n not in feeds]
        got = dict(zip(wanted, session.run(wanted, dict(feeds)))) if wanted else {}
        got.update({n: np.asarray(feeds[n]) for n in names if n in feeds})
        seen: dict[str, list[np.ndarray]] = {}
        for weight, x, how in probes:
            value = np.asarray(got[x.name])
            if how.get("transpose"):
                value = value.T
            geometry = how.get("geometry")
            if weight in crossed:
                seen.setdefault(weight, []).append(_channels(value, geometry is not None))
            rows = im2col(value, *geometry) if geometry is not None else value.reshape(-1, value.shape[-1])
            kernel = math.prod(geometry[0]) if geometry is not None else 1
            for start in range(0, max(rows.shape[0], 1), _CHUNK):
                layers[weight] = accumulate(layers.get(weight), rows[start:start + _CHUNK], kernel)
        for a, b in pairs:
            if a in seen and b in seen:
                xa, xb = np.concatenate(seen[a]).astype(np.float64), np.concatenate(seen[b]).astype(np.float64)
                if xa.shape[0] == xb.shape[0]:
                    cross_sums[(a, b)] = cross_sums.get((a, b), 0) + xa.T @ xb
        count += 1
    if count == 0:
        raise CalibrationError("no calibration batches")
    return Calibration(layers, cross_sums, count)


def _geometry(attrs: Mapping[str, Any], shape: tuple[int, ...]) -> tuple:
    nd = len(shape) - 2
    kernel = tuple(attrs.get("kernel_shape", shape[2:]))
    return (kernel, tuple(attrs.get("strides", (1,) * nd)), tuple(attrs.get("pads", (0,) * (2 * nd))),
            tuple(attrs.get("dilations", (1,) * nd)))


def _base_dir(model: ir.Model) -> str | None:
    """The folder an in-memory model's external data is read from (None: all inline)."""
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            return tensor.base_dir or None
    return None


def _session(model: ir.Model, probes: Sequence[tuple[str, ir.Value, dict]], base: str | None):
    """An onnxruntime session of ``model`` with the probed values as extra outputs (an untyped
    one takes its weight's type: Gemm/MatMul/Conv take data of the weight's type)."""
    graph = model.graph

    def dtype(weight: str) -> ir.DataType:
        tensor = graph.initializers[weight].const_value if weight in graph.initializers else None
        return tensor.dtype if tensor is not None else ir.DataType.FLOAT

    data = exposing(model, {x: dtype(weight) for weight, x, _ in probes})
    return session(data, base), list(dict.fromkeys(x.name for _, x, _ in probes))
