"""Low-rank parts in PyTorch: a residual per member of a fused group, and the ASVD baseline.

:func:`attach_residuals` gives every member layer of a fused model (anchor
too) its own rank-``r`` correction of what sharing took from it,
``W_member - W_shared`` (:func:`lfpass.core.lowrank.residual`), so its output is
``shared(x) + up(down(x))``:

- a called module (``nn.Linear``, transformers' ``Conv1D``, ``nn.Conv*d``) is
  replaced by :class:`ResidualLinear` holding the old module as ``base``, so the
  shared ``nn.Parameter`` stays one object (ties kept, gradients summed);
  a convolution's ``down`` has the layer's kernel, stride, padding and
  dilation and ``r`` output channels, its ``up`` is a 1x1 convolution;
- a ``call_function`` site (``torch.export`` graphs: ``aten.linear``,
  ``aten.mm``/``addmm``/``matmul`` with the weight on the right, ``aten.conv*``)
  gets two more calls of the same op and an ``add`` after it, reading new
  parameters ``<layer>.lfpass_down.weight`` and ``<layer>.lfpass_up.weight``.

:func:`factorize` is the activation-aware SVD baseline sharing must beat at
equal parameters: each chosen layer becomes :class:`LowRank` (``down`` then
``up``, the bias on ``up``); :func:`factorize_to_params` picks one fraction of
full rank for all of them to land at, never above, a parameter count.

Every new tensor is an ordinary ``nn.Parameter``: retrainable.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import fx, nn

from lfpass.core.calibration import Calibration
from lfpass.core.errors import PlanError
from lfpass.core.layers import orient
from lfpass.core.lowrank import (Member, Part, activation_svd, bias_delta, lookup, member_factors, plain_svd,
                                 residual_parts, uniform_ranks)
from lfpass.core.plan import FusionPlan
from lfpass.core.sites import Site
from lfpass.fx.sites import (CONV_OPS, FUNCTIONAL, LINEAR_OPS, MM_OPS, FxSites, SiteFinder, bind_args, find_sites,
                             is_conv1d_hf, layer_path, tensor_names, to_numpy, to_torch, unique_parameters)

log = logging.getLogger(__name__)
aten = torch.ops.aten

Array = np.ndarray | torch.Tensor


class ResidualLinear(nn.Module):
    """``base(x) + up(down(x))``: a layer that reads a shared tensor, plus its own low-rank part
    (a linear layer or a convolution alike)."""

    def __init__(self, base: nn.Module, down: nn.Module, up: nn.Module):
        super().__init__()
        self.base, self.down, self.up = base, down, up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x))


class LowRank(nn.Module):
    """``up(down(x))``: a layer factored into two thinner ones (``up`` holds the bias)."""

    def __init__(self, down: nn.Module, up: nn.Module):
        super().__init__()
        self.down, self.up = down, up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


def _numpy(array: Array) -> np.ndarray:
    return to_numpy(array) if isinstance(array, torch.Tensor) else np.asarray(array)


# -- residuals -----------------------------------------------------------------------------------

def attach_residuals(module: nn.Module, plan: FusionPlan, originals: Mapping[str, Array], rank: int,
                     calibration: Calibration | None = None,
                     sites: FxSites | Mapping[str, Site] | None = None, bias: bool = True) -> nn.Module:
    """Give each member layer of ``plan`` in the fused ``module`` (in place) its rank-``rank``
    correction of ``original - shared``. ``originals``: each member layer's weight (and bias)
    before fusion, keyed by tensor name (or layer name), as
    :func:`lfpass.core.lowrank.capture_originals` takes them. ``calibration``: activation-aware
    factors; without it, plain SVD. ``bias``: a member whose bias the merge changed gets
    ``original - shared`` back as ``up``'s bias (``out`` more parameters); ``sites``: the
    model's sites before fusion (see :func:`lfpass.core.lowrank.plan_members`)."""
    originals = {k: _numpy(v) for k, v in originals.items()}
    return attach_parts(module, residual_parts(plan, originals, calibration, sites, bias), rank)


def attach_parts(module: nn.Module, parts: Sequence[Part], rank: int) -> nn.Module:
    """Write each part as ``layer(x) + up(down(x))`` into ``module`` (in place): a called module
    becomes :class:`ResidualLinear`; a ``call_function`` layer gets two more calls and an ``add``."""
    graph_sites = _call_function_nodes(module) if isinstance(module, fx.GraphModule) else {}
    layers = frozenset(p.member.layer for p in parts)
    with torch.no_grad():
        for part in parts:
            if _called_as_module(module, part.member.layer):
                _attach_module(module, part, rank)
            else:
                _attach_function(module, part, _nodes_of(module, part.member, graph_sites, layers), rank)
    if isinstance(module, fx.GraphModule):
        module.graph.lint()
        module.recompile()
    log.info("attached rank-%d residuals to %d layers", rank, len(parts))
    return module


def _called_as_module(module: nn.Module, layer: str) -> bool:
    if not isinstance(module, fx.GraphModule):
        return True
    for node in module.graph.nodes:
        if node.op == "call_module" and (node.target == layer or layer.startswith(node.target + ".")):
            return True
    return False


def _param(array: np.ndarray, like: torch.Tensor, shape: Sequence[int]) -> nn.Parameter:
    return nn.Parameter(to_torch(np.ascontiguousarray(array).reshape(shape), like), requires_grad=like.requires_grad)


def _attach_module(root: nn.Module, part: Part, rank: int) -> None:
    m, original = part.member, part.original
    owner_path, _, attr = m.layer.rpartition(".")
    owner = root.get_submodule(owner_path) if owner_path else root
    mod = getattr(owner, attr)
    if isinstance(mod, ResidualLinear):
        raise PlanError(f"layer {m.layer!r} already has a residual")
    if isinstance(owner, nn.MultiheadAttention) or not (
            isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)) or is_conv1d_hf(mod)):
        raise PlanError(f"layer {m.layer!r} ({type(mod).__name__}): residuals are made for linear layers, "
                        "transformers' Conv1D and convolutions only")
    weight = mod.weight
    if tuple(original.shape) != tuple(weight.shape):
        raise PlanError(f"layer {m.layer!r}: an original weight of shape {original.shape} does not fit "
                        f"{tuple(weight.shape)}")
    u, v = member_factors(part, _oi(original, mod), _oi(to_numpy(weight), mod), rank)
    r = u.shape[1]
    if isinstance(mod, nn.modules.conv._ConvNd):
        down, up = _conv_pair(mod, r, u, v)
    else:
        out, in_ = u.shape[0], v.shape[1]
        down = nn.Linear(in_, r, bias=False, device=weight.device, dtype=weight.dtype)
        up = nn.Linear(r, out, bias=False, device=weight.device, dtype=weight.dtype)
        down.weight, up.weight = _param(v, weight, (r, in_)), _param(u, weight, (out, r))
    delta = bias_delta(part, to_numpy(mod.bias)) if mod.bias is not None else None
    if delta is not None:
        up.bias = _param(delta, mod.bias, delta.shape)
    setattr(owner, attr, ResidualLinear(mod, down, up))


def _oi(w: np.ndarray, mod: nn.Module) -> np.ndarray:
    """A module's weight as a matrix ``[out, in]`` (transformers' Conv1D stores ``[in, out]``)."""
    return orient(w, "in_out" if is_conv1d_hf(mod) else "out_in")


def _conv_pair(mod: nn.modules.conv._ConvNd, r: int, u: np.ndarray, v: np.ndarray) -> tuple[nn.Module, nn.Module]:
    """``down``: the layer's geometry, ``r`` channels out; ``up``: 1x1, ``r`` channels in."""
    if mod.transposed or mod.groups != 1:
        raise PlanError("residuals are made for ungrouped, not transposed, convolutions only")
    w = mod.weight
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[w.dim() - 2]
    kw = dict(bias=False, device=w.device, dtype=w.dtype)
    down = cls(mod.in_channels, r, mod.kernel_size, stride=mod.stride, padding=mod.padding,
               dilation=mod.dilation, padding_mode=mod.padding_mode, **kw)
    up = cls(r, mod.out_channels, 1, **kw)
    down.weight = _param(v, w, (r, *w.shape[1:]))
    up.weight = _param(u, w, (w.shape[0], r) + (1,) * (w.dim() - 2))
    return down, up


# -- call_function sites (torch.export graphs) -----------------------------------------------------

@dataclass
class _GraphSite:
    node: fx.Node
    op: Any
    layers: tuple[str, ...]  # the layer it may be, best guess first: fusion re-points a member's weight read
    target: str  # the weight's attribute path
    layout: str
    bias: str  # the bias's attribute path, "" when none


def _call_function_nodes(gm: fx.GraphModule) -> dict[str, _GraphSite]:
    """Each call_function layer node by node name, with the layers it may be: the module that
    made the call (its stack) reading the weight's attribute, then the attribute's own layer."""
    canonical, tensors, _ = tensor_names(gm)
    finder = SiteFinder(gm, canonical)
    out = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        hit = finder.function_site(node, tensors)
        if not hit:
            continue
        _, sig, target, names = hit
        stack = node.meta.get("nn_module_stack") or {}
        caller = list(stack.values())[-1][0] if stack else ""
        attr = target.rpartition(".")[2]
        layers = tuple(dict.fromkeys(([layer_path(f"{caller}.{attr}")] if caller else []) + [layer_path(target)]))
        out[node.name] = _GraphSite(node, FUNCTIONAL.get(node.target, node.target), layers, target,
                                    dict(sig).get("layout", "out_in"), _bias_path(gm, node, names))
    return out


def _bias_path(gm: fx.GraphModule, node: fx.Node, names: tuple[str, ...]) -> str:
    """The attribute path the node reads its bias through (the graph's, not the canonical name)."""
    if len(names) < 2:
        return ""
    op = FUNCTIONAL.get(node.target, node.target)
    a = bind_args(op, node.args, node.kwargs)
    arg = a.get("bias") if "bias" in a else a.get("self")
    while isinstance(arg, fx.Node) and arg.op != "get_attr":
        arg = arg.args[0] if arg.args else None
    return arg.target if isinstance(arg, fx.Node) else ""


def _nodes_of(gm: nn.Module, m: Member, graph_sites: Mapping[str, _GraphSite],
              layers: frozenset[str]) -> list[_GraphSite]:
    """The graph nodes of member layer ``m``: by the node names sites recorded before fusion, else
    each node is the first of its possible layers that the plan names."""
    if m.location:
        found = [graph_sites[n] for n in m.location.split(",") if n in graph_sites]
    else:
        found = [s for s in graph_sites.values() if next((x for x in s.layers if x in layers), None) == m.layer]
    if not found:
        raise PlanError(f"layer {m.layer!r} is not in the fused module (neither a called module nor a graph node)")
    return found


def _register(gm: nn.Module, path: str, param: nn.Parameter) -> str:
    owner: nn.Module = gm
    parts = path.split(".")
    for part in parts[:-1]:
        if not hasattr(owner, part):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    owner.register_parameter(parts[-1], param)
    return path


def _attach_function(gm: fx.GraphModule, part: Part, nodes: list[_GraphSite], rank: int) -> None:
    m, original = part.member, part.original
    first = nodes[0]
    weight = gm.get_parameter(first.target)
    if tuple(original.shape) != tuple(weight.shape):
        raise PlanError(f"layer {m.layer!r}: an original weight of shape {original.shape} does not fit "
                        f"{tuple(weight.shape)}")
    transposed = first.layout == "in_out"
    if first.layout.startswith("left"):
        raise PlanError(f"layer {m.layer!r}: a weight multiplying from the left gets no residual")
    layout = "in_out" if transposed else "out_in"
    u, v = member_factors(part, orient(original, layout), orient(to_numpy(weight), layout), rank)
    r = u.shape[1]
    conv = first.op in CONV_OPS or first.op is aten.convolution.default
    shape_v = (r, *weight.shape[1:]) if conv else (r, v.shape[1])
    shape_u = (u.shape[0], r) + (1,) * (weight.dim() - 2) if conv else (u.shape[0], r)
    down = _register(gm, f"{m.layer}.lfpass_down.weight", _param(v, weight, shape_v))
    up = _register(gm, f"{m.layer}.lfpass_up.weight", _param(u, weight, shape_u))
    bias = None
    if first.bias:
        current = gm.get_parameter(first.bias)
        delta = bias_delta(part, to_numpy(current))
        if delta is not None:
            bias = _register(gm, f"{m.layer}.lfpass_up.bias", _param(delta, current, delta.shape))
    for site in nodes:
        _insert(gm.graph, site, down, up, bias, conv, weight.dim() - 2)


def _input_of(site: _GraphSite) -> fx.Node:
    op = site.op
    a = bind_args(op, site.node.args, site.node.kwargs)
    if op in LINEAR_OPS or op in CONV_OPS or op is aten.convolution.default:
        return a["input"]
    if op in MM_OPS:
        return a["mat1"] if "mat1" in a else a["self"]
    raise PlanError(f"no residual for a {op} node")


def _insert(graph: fx.Graph, site: _GraphSite, down: str, up: str, bias: str | None, conv: bool, nd: int) -> None:
    node, x = site.node, _input_of(site)
    with graph.inserting_after(node):
        v = graph.get_attr(down)
    with graph.inserting_after(v):
        u = graph.get_attr(up)
    last = u
    if bias:
        with graph.inserting_after(u):
            last = b = graph.get_attr(bias)
    else:
        b = None
    with graph.inserting_after(last):
        if not conv:
            low = graph.call_function(aten.linear.default, (x, v))
            with graph.inserting_after(low):
                high = graph.call_function(aten.linear.default, (low, u, b))
        else:
            a = bind_args(site.op, node.args, node.kwargs)
            if site.op is aten.convolution.default:
                low = graph.call_function(site.op, (x, v, None, a["stride"], a["padding"], a["dilation"], False,
                                                    a["output_padding"], 1))
                ones, zeros = [1] * nd, [0] * nd
                with graph.inserting_after(low):
                    high = graph.call_function(site.op, (low, u, b, ones, zeros, ones, False, zeros, 1))
            else:
                if int(a["groups"]) != 1:
                    raise PlanError("residuals are made for ungrouped convolutions only")
                low = graph.call_function(site.op, (x, v, None, a["stride"], a["padding"], a["dilation"], 1))
                plain = {1: aten.conv1d.default, 2: aten.conv2d.default, 3: aten.conv3d.default}[nd]
                with graph.inserting_after(low):
                    high = graph.call_function(plain, (low, u, b))
    with graph.inserting_after(high):
        total = graph.call_function(aten.add.Tensor, (node, high))
    node.replace_all_uses_with(total, delete_user_cb=lambda user: user is not total)


# -- counting ------------------------------------------------------------------------------------

# -- the ASVD baseline ---------------------------------------------------------------------------

def _factorable(module: nn.Module, kinds: Sequence[str], layers: Sequence[str] | None) -> dict[str, nn.Module]:
    """Chosen layers that are called modules holding their own, untied weight."""
    found = find_sites(module)
    out = {}
    wanted = set(layers) if layers is not None else None
    for site in found.sites:
        if site.kind not in kinds or (wanted is not None and site.name not in wanted):
            continue
        try:
            mod = module.get_submodule(site.name)
        except AttributeError:
            mod = None
        tied = any(len(found.holders[t]) > 1 for t in site.tensors)
        ok = isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or (mod is not None and is_conv1d_hf(mod))
        if ok and isinstance(mod, nn.modules.conv._ConvNd) and mod.groups != 1:
            ok = False
        if not ok or tied:
            if wanted is not None:
                raise PlanError(f"layer {site.name!r} cannot be factored (not a module of its own, grouped, "
                                "or its weight is tied)")
            continue
        out[site.name] = mod
    if wanted is not None and wanted - set(out):
        raise PlanError(f"no such layer to factor: {sorted(wanted - set(out))[0]!r}")
    return out


def _dims(mod: nn.Module) -> tuple[int, int]:
    w = mod.weight
    if is_conv1d_hf(mod):
        return int(w.shape[1]), int(w.shape[0])
    return int(w.shape[0]), int(np.prod(w.shape[1:]))


def factorize(module: nn.Module, layers: Sequence[str] | None, rank: int | Mapping[str, int],
              calibration: Calibration | None = None, kinds: Sequence[str] = ("linear",),
              inplace: bool = False) -> nn.Module:
    """Replace each chosen layer by :class:`LowRank` factors of rank ``rank`` (one rank, or one
    per layer name), activation-aware with ``calibration`` (keyed by weight tensor name).
    ``layers=None``: every layer of ``kinds`` that is a module of its own."""
    if not inplace:
        module = copy.deepcopy(module)
    chosen = _factorable(module, kinds, layers)
    ranks = rank if isinstance(rank, Mapping) else {name: rank for name in chosen}
    with torch.no_grad():
        for name, r in ranks.items():
            _factor_layer(module, name, chosen[name], r, calibration)
    if isinstance(module, fx.GraphModule):
        module.recompile()
    return module


def _factor_layer(root: nn.Module, name: str, mod: nn.Module, rank: int, calibration: Calibration | None) -> None:
    weight = mod.weight
    w = _oi(to_numpy(weight), mod)
    stats = None
    if calibration is not None:
        stats = lookup(calibration, Member(0, name, f"{name}.weight"), "calibration statistics")
    u, v = activation_svd(w, stats, rank) if stats is not None else plain_svd(w, rank)
    r = u.shape[1]
    bias = mod.bias
    if isinstance(mod, nn.modules.conv._ConvNd):
        down, up = _conv_pair(mod, r, u, v)
        if bias is not None:
            up.bias = bias
    else:
        out, in_ = w.shape
        kw = dict(device=weight.device, dtype=weight.dtype)
        down, up = nn.Linear(in_, r, bias=False, **kw), nn.Linear(r, out, bias=bias is not None, **kw)
        down.weight, up.weight = _param(v, weight, (r, in_)), _param(u, weight, (out, r))
        if bias is not None:
            up.bias = bias
    owner_path, _, attr = name.rpartition(".")
    setattr(root.get_submodule(owner_path) if owner_path else root, attr, LowRank(down, up))


def factorize_to_params(module: nn.Module, target_params: int, calibration: Calibration | None = None,
                        kinds: Sequence[str] = ("linear",), layers: Sequence[str] | None = None,
                        inplace: bool = False) -> tuple[nn.Module, float]:
    """:func:`factorize` at one fraction of full rank for every chosen layer, the largest whose
    unique parameter count stays at or below ``target_params``. Returns the model and the fraction."""
    chosen = _factorable(module, kinds, layers)
    dims = {name: _dims(mod) for name, mod in chosen.items()}
    dense = sum(o * i for o, i in dims.values())
    budget = target_params - (unique_parameters(module) - dense)
    try:
        ranks, fraction = uniform_ranks(dims, budget)
    except PlanError as exc:
        raise PlanError(f"cannot factor down to {target_params:,} parameters: {exc}") from None
    return factorize(module, list(ranks), ranks, calibration, kinds, inplace), fraction
