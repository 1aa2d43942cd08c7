"""Calibration of a PyTorch model: its layers' input statistics over a few batches.

The model runs once over the batches, under ``torch.no_grad()`` and in eval
mode (its mode is restored after), and each layer site's input is folded into
float64 sums (:mod:`lfpass.core.calibration`) as it passes; activations are never
kept. Inputs are seen where the layer is called:

- a module (``nn.Linear``, ``nn.Conv*d``, transformers' ``Conv1D``,
  ``nn.MultiheadAttention``'s packed input projection: its query), in a plain
  module or a ``symbolic_trace``d graph: a forward pre-hook;
- a ``call_function`` node (``aten.linear``, ``aten.conv*``, ``addmm``/``mm``/
  ``matmul`` on a ``get_attr`` weight), as ``torch.export`` writes them: an
  :class:`torch.fx.Interpreter` that reads the node's activation argument.

A convolution's input becomes its patches (its own stride, padding and
dilation), flattened in the weight's ``(channel, *kernel)`` order. Layers with
no ``[out, in]`` view of their input (grouped or transposed convolutions, a
weight multiplying from the left) are skipped, with the reason logged.
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn
from tqdm.auto import tqdm

from lfpass.core.calibration import Calibration, CalibrationError, LayerStats
from lfpass.core.sites import Site
from lfpass.fx.batches import as_call
from lfpass.fx.sites import FUNCTIONAL, MM_OPS, bind_args, find_sites, is_conv1d_hf

log = logging.getLogger(__name__)

_CHUNK = 1 << 15  # patch rows folded into the Gram at a time


@dataclass
class _Conv:
    """How a convolution turns its input into patches."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]  # (before, after) per spatial dim
    dilation: tuple[int, ...]
    mode: str = "zeros"


def _pads(padding: Any, kernel: Sequence[int], dilation: Sequence[int]) -> tuple[tuple[int, int], ...]:
    nd = len(kernel)
    if padding == "valid":
        return ((0, 0),) * nd
    if padding == "same":  # torch puts the odd one after
        total = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return tuple((t // 2, t - t // 2) for t in total)
    pads = tuple(padding) if isinstance(padding, (list, tuple)) else (padding,) * nd
    pads = pads * nd if len(pads) == 1 else pads
    return tuple((int(p), int(p)) for p in pads)


def _tuple(value: Any, nd: int) -> tuple[int, ...]:
    value = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    return tuple(int(v) for v in (value * nd if len(value) == 1 else value))


def patches(x: torch.Tensor, conv: _Conv) -> torch.Tensor:
    """``x`` (``[N, C, *spatial]``) as the rows a convolution's weight meets:
    ``[N * positions, C * prod(kernel)]``, entries in ``(channel, *kernel)`` order."""
    nd = len(conv.kernel)
    if any(p for pair in conv.padding for p in pair):
        flat = [p for pair in reversed(conv.padding) for p in pair]  # F.pad: last dim first
        x = F.pad(x, flat, mode="constant" if conv.mode == "zeros" else conv.mode)
    for i, (k, s, d) in enumerate(zip(conv.kernel, conv.stride, conv.dilation)):
        x = x.unfold(2 + i, d * (k - 1) + 1, s)[..., ::d]  # [N, C, ..., out_i, ..., k_i] appended last
    # x: [N, C, *out, *kernel] -> [N, *out, C, *kernel]
    order = [0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd)]
    return x.permute(order).reshape(-1, x.shape[1] * math.prod(conv.kernel))


def channels(x: torch.Tensor, conv: _Conv | None) -> torch.Tensor:
    """The input's channel vector at each sample position: ``[positions, C]``."""
    if conv is None:
        return x.reshape(-1, x.shape[-1])
    return x.movedim(1, -1).reshape(-1, x.shape[1])


@dataclass
class _Recorder:
    """Folds inputs into per-layer float64 sums; keeps this batch's channel vectors only
    for layers in a cross pair."""

    kernels: dict[str, int]
    convs: dict[str, _Conv | None]
    crossed: set[str]
    sums: dict[str, list[torch.Tensor | int]] = field(default_factory=dict)
    batch: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def add(self, name: str, x: torch.Tensor) -> None:
        conv = self.convs[name]
        x = x.detach()
        if conv is not None and x.dim() == len(conv.kernel) + 1:
            x = x.unsqueeze(0)  # an unbatched input
        if name in self.crossed:
            self.batch.setdefault(name, []).append(channels(x, conv).to("cpu", torch.float64))
        rows = patches(x, conv) if conv is not None else x.reshape(-1, x.shape[-1])
        acc = self.sums.get(name)
        if acc is None:
            d = rows.shape[1]
            acc = self.sums[name] = [torch.zeros(d, d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64), 0]
        for start in range(0, rows.shape[0], _CHUNK):
            part = rows[start:start + _CHUNK].to("cpu", torch.float64)
            acc[0].addmm_(part.T, part)  # type: ignore[union-attr]
            acc[1].add_(part.sum(0))  # type: ignore[union-attr]
        acc[2] += rows.shape[0]  # type: ignore[operator]

    def end_batch(self, cross: dict[tuple[str, str], torch.Tensor], pairs: Sequence[tuple[str, str]]) -> None:
        seen = {k: torch.cat(v) for k, v in self.batch.items()}
        for a, b in pairs:
            xa, xb = seen.get(a), seen.get(b)
            if xa is None or xb is None or xa.shape[0] != xb.shape[0]:
                continue
            part = xa.T @ xb
            cross[(a, b)] = part if (a, b) not in cross else cross[(a, b)] + part
        self.batch.clear()

    def result(self) -> dict[str, LayerStats]:
        return {name: LayerStats(g.numpy(), t.numpy(), int(n), self.kernels[name])  # type: ignore[union-attr]
                for name, (g, t, n) in self.sums.items()}


def _module_conv(mod: nn.Module) -> _Conv:
    nd = mod.weight.dim() - 2
    kernel = tuple(mod.weight.shape[2:])
    dilation = _tuple(mod.dilation, nd)
    return _Conv(kernel, _tuple(mod.stride, nd), _pads(mod.padding, kernel, dilation), dilation, mod.padding_mode)


def _site_conv(site: Site, weight: torch.Tensor) -> _Conv:
    f = dict(site.signature)
    kernel = tuple(weight.shape[2:])
    nd = len(kernel)
    dilation = _tuple(f.get("dilation", 1), nd)
    return _Conv(kernel, _tuple(f.get("stride", 1), nd), _pads(f.get("padding", 0), kernel, dilation), dilation,
                 f.get("padding_mode", "zeros"))


def _skip(site: Site) -> str:
    """Why a site's input has no ``[positions, in]`` view here ('' when it has one)."""
    f = dict(site.signature)
    if site.kind == "conv_transpose":
        return "a transposed convolution"
    if site.kind == "conv" and f.get("groups", 1) != 1:
        return f"a grouped convolution (groups={f['groups']})"
    if str(f.get("layout", "")).startswith("left"):
        return "its weight multiplies from the left"
    if site.kind == "conv" and len(f.get("shape", ())) - 2 not in (1, 2, 3):
        return "a convolution of unknown rank"
    return ""


class _Watch(fx.Interpreter):
    """Runs a graph node by node, handing the activation argument of site nodes to ``record``."""

    def __init__(self, gm: fx.GraphModule, watch: dict[str, tuple[str, str]], recorder: _Recorder) -> None:
        super().__init__(gm)
        self.watch = watch  # node name -> (weight tensor name, layout)
        self.recorder = recorder

    def run_node(self, n: fx.Node) -> Any:
        hit = self.watch.get(n.name)
        if hit is not None and n.op == "call_function":
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            x = _activation(n.target, args, kwargs)
            if isinstance(x, torch.Tensor):
                self.recorder.add(hit[0], x)
        return super().run_node(n)


def _activation(target: Any, args: tuple, kwargs: dict) -> Any:
    """The data input of a site call (the weight on the right: a layer never matched from the left here)."""
    op = FUNCTIONAL.get(target, target)
    if op in MM_OPS:
        a = bind_args(op, args, kwargs)
        return a["mat1"] if "mat1" in a else a["self"]
    return args[0] if args else kwargs.get("input")


def _flat_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list[Any]:
    """The graph's placeholder values for a call ``gm(*args, **kwargs)``."""
    spec = getattr(gm, "_in_spec", None)
    if spec is None:
        bound = inspect.signature(gm.forward).bind(*args, **kwargs)
        bound.apply_defaults()
        return list(bound.arguments.values())
    # torch.export: (args, kwargs) as exported, flattened by the module's pytree spec;
    # arguments are first bound by name, so a dict batch may name positional ones
    from torch.fx._pytree import tree_flatten_spec

    names = list(inspect.signature(gm.forward).parameters)
    bound = inspect.signature(gm.forward).bind(*args, **kwargs).arguments
    n = spec.children_specs[0].num_children
    positional = tuple(bound[p] for p in names[:n] if p in bound)
    keywords = {p: bound[p] for p in names[n:] if p in bound}
    return list(tree_flatten_spec((positional, keywords), spec))


def calibrate_fx(
    module: nn.Module,
    batches: Iterable[Any],
    sites: Sequence[Site] | None = None,
    cross: Iterable[tuple[str, str]] = (),
    progress: bool = False,
) -> Calibration:
    """Input statistics of ``module``'s layer sites over ``batches``, keyed by weight tensor name.

    Each batch is a tensor, a tuple of tensors (positional arguments) or a dict
    (keyword arguments). ``sites`` defaults to ``find_sites(module).sites``.
    ``cross``: pairs of weight names whose inputs' channel vectors are also
    multiplied together at the same positions (``sum x_a x_b^T``), in batches
    where both layers ran on as many positions. A layer that never ran has no
    entry; no batch at all is a :class:`CalibrationError`."""
    found = find_sites(module)
    pairs = [tuple(p) for p in cross]
    kernels, convs, hooks, watch = _watch_list(module, found, list(found.sites if sites is None else sites))
    recorder = _Recorder(kernels, convs, {n for p in pairs for n in p})
    handles = [mod.register_forward_pre_hook(_hook(recorder, name), with_kwargs=True) for mod, name in hooks]
    interpreted = isinstance(module, fx.GraphModule) and any(
        n.op == "call_function" and n.name in watch for n in module.graph.nodes)
    cross_sums: dict[tuple[str, str], torch.Tensor] = {}
    count = 0
    modes = [(m, m.training) for m in module.modules()]
    try:
        _set_eval(module)
        with torch.no_grad():
            for batch in tqdm(batches, desc="calibration", unit="batch", disable=not progress, leave=False):
                args, kwargs = as_call(batch)
                if interpreted:
                    _Watch(module, watch, recorder).run(*_flat_inputs(module, args, kwargs))  # type: ignore[arg-type]
                else:
                    module(*args, **kwargs)
                recorder.end_batch(cross_sums, pairs)
                count += 1
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    if count == 0:
        raise CalibrationError("no calibration batches")
    return Calibration(recorder.result(), {k: v.numpy() for k, v in cross_sums.items()}, count)


def _watch_list(module: nn.Module, found: Any, sites: Sequence[Site]):
    """What to record per layer: its patch size, its conv geometry, the module to hook (a
    called layer) and the graph nodes to watch (``call_function`` layers), by weight name."""
    modules = {_weight_of(mod): (path, mod) for path, mod in module.named_modules() if _weight_of(mod) is not None}
    kernels: dict[str, int] = {}
    convs: dict[str, _Conv | None] = {}
    hooks, watch = [], {}
    for site in sites:
        why = _skip(site)
        if why:
            log.info("calibration: layer %s skipped: %s", site.name, why)
            continue
        weight = found.params[site.weight]
        held = modules.get(id(weight))
        conv = None
        if site.kind == "conv":
            conv = _module_conv(held[1]) if held is not None else _site_conv(site, weight)
        kernels[site.weight] = math.prod(weight.shape[2:]) if site.kind == "conv" else 1
        convs[site.weight] = conv
        if held is not None and _is_layer_module(held[1]):
            hooks.append((held[1], site.weight))
        for node in site.location.split(","):
            watch[node] = (site.weight, dict(site.signature).get("layout", ""))
    return kernels, convs, hooks, watch


def _weight_of(mod: nn.Module) -> int | None:
    """id of the weight a layer module multiplies by (MultiheadAttention: its packed in_proj)."""
    if isinstance(mod, nn.MultiheadAttention):
        w = getattr(mod, "in_proj_weight", None)
    elif _is_layer_module(mod):
        w = getattr(mod, "weight", None)
    else:
        return None
    return id(w) if w is not None else None


def _is_layer_module(mod: nn.Module) -> bool:
    return isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd, nn.MultiheadAttention)) or is_conv1d_hf(mod)


def _hook(recorder: _Recorder, name: str):
    def pre_hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("query", kwargs.get("input", kwargs.get("x")))
        if isinstance(x, torch.Tensor):
            recorder.add(name, x)

    return pre_hook


def _set_eval(module: nn.Module) -> None:
    """Eval mode; an exported module, which refuses ``.eval()``, runs as it was captured."""
    try:
        module.eval()
    except (NotImplementedError, RuntimeError) as e:
        log.debug("calibration: %s", e)
