"""Shared bases and per-layer low rank in PyTorch: each layer written as ``up(down(x))``.

The core (:func:`lfpass.core.bases.plan_factors`) gives each layer of a plan's
``factors`` a ``down`` (``[r, in]``, one tensor per basis, however many layers
read it) and its own ``up`` (``[out, r]``); here they become modules:

- a called module (``nn.Linear``, transformers' ``Conv1D``, ``nn.Conv*d``) is
  replaced by :class:`~lfpass.fx.lowrank.LowRank`: ``down`` a linear layer (a
  convolution with the layer's kernel, stride, padding and dilation and ``r``
  output channels) whose weight is the basis's one ``nn.Parameter``, shared by
  every member (ties kept, gradients summed in retraining); ``up`` a linear
  layer (a 1x1 convolution) holding the member's coefficients and its own bias;
- a ``call_function`` layer (``torch.export`` graphs) is replaced by two calls
  of ``aten.linear`` (``aten.conv*``) reading ``<anchor>.lfpass_basis.weight``
  and ``<layer>.lfpass_coeff.weight``, the bias the node read kept as it was.

The old weights are dropped, so the unique parameter count is the plan's.
Everything new is an ordinary ``nn.Parameter``: retrainable.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from torch import fx, nn

from lfpass.core.bases import Factor
from lfpass.core.errors import PlanError
from lfpass.fx.lowrank import (LowRank, _call_function_nodes, _called_as_module, _GraphSite, _input_of,
                               _nodes_of, _param, _register)
from lfpass.fx.rewrite import delete_unread
from lfpass.fx.sites import CONV_OPS, bind_args, is_conv1d_hf

log = logging.getLogger(__name__)
aten = torch.ops.aten


def factor_layers(module: nn.Module, factors: Sequence[Factor]) -> nn.Module:
    """Write each factor's layer as ``up(down(x))`` in ``module`` (in place); one ``nn.Parameter``
    per basis key. Every layer is checked before anything is written."""
    graph_sites = _call_function_nodes(module) if isinstance(module, fx.GraphModule) else {}
    layers = frozenset(f.member.layer for f in factors)
    checked = []
    for f in factors:
        if _called_as_module(module, f.member.layer):
            checked.append((f, _module_of(module, f), None))
        else:
            nodes = _nodes_of(module, f.member, graph_sites, layers)
            _check_nodes(module, f, nodes)
            checked.append((f, None, nodes))
    shared: dict[str, nn.Parameter] = {}  # basis key -> its one Parameter
    paths: dict[str, str] = {}  # basis key -> where a graph reads it
    dropped: set[str] = set()
    with torch.no_grad():
        for f, mod, nodes in checked:
            if mod is not None:
                _replace_module(module, f, mod, shared)
            else:
                dropped.update(_replace_nodes(module, f, nodes, shared, paths))
    if isinstance(module, fx.GraphModule):
        _drop_unread(module, dropped)
        module.graph.lint()
        module.recompile()
    log.info("factored %d layers through %d bases", len(factors), len({f.basis for f in factors}))
    return module


# -- called modules ------------------------------------------------------------------------------

def _module_of(root: nn.Module, f: Factor) -> nn.Module:
    owner_path, _, attr = f.member.layer.rpartition(".")
    try:
        owner = root.get_submodule(owner_path) if owner_path else root
        mod = getattr(owner, attr)
    except AttributeError:
        raise PlanError(f"layer {f.member.layer!r} is not in the model") from None
    ok = isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)) or is_conv1d_hf(mod)
    if isinstance(owner, nn.MultiheadAttention) or not ok:
        raise PlanError(f"layer {f.member.layer!r} ({type(mod).__name__}): factors are written for linear layers, "
                        "transformers' Conv1D and convolutions only")
    if isinstance(mod, nn.modules.conv._ConvNd) and (mod.transposed or mod.groups != 1):
        raise PlanError(f"layer {f.member.layer!r}: a grouped or transposed convolution cannot be factored")
    out, in_ = f.up.shape[0], f.down.shape[1]
    w = mod.weight
    have = (w.shape[1], w.shape[0]) if is_conv1d_hf(mod) else (w.shape[0], w[0].numel())
    if tuple(have) != (out, in_):
        raise PlanError(f"layer {f.member.layer!r}: factors for a {out}x{in_} matrix do not fit its weight "
                        f"{tuple(w.shape)}")
    return mod


def _replace_module(root: nn.Module, f: Factor, mod: nn.Module, shared: dict[str, nn.Parameter]) -> None:
    w = mod.weight
    r, out = f.down.shape[0], f.up.shape[0]
    kw = dict(device=w.device, dtype=w.dtype)
    if isinstance(mod, nn.modules.conv._ConvNd):
        cls = type(mod)
        down = cls(mod.in_channels, r, mod.kernel_size, stride=mod.stride, padding=mod.padding,
                   dilation=mod.dilation, padding_mode=mod.padding_mode, bias=False, **kw)
        up = cls(r, out, 1, bias=False, **kw)
        down_shape, up_shape = (r, *w.shape[1:]), (out, r) + (1,) * (w.dim() - 2)
    else:
        in_ = f.down.shape[1]
        down, up = nn.Linear(in_, r, bias=False, **kw), nn.Linear(r, out, bias=False, **kw)
        down_shape, up_shape = (r, in_), (out, r)
    if f.basis not in shared:
        shared[f.basis] = _param(f.down, w, down_shape)
    down.weight = shared[f.basis]
    up.weight = _param(f.up, w, up_shape)
    up.bias = mod.bias  # the layer's own bias, the same Parameter (a tie on it stays)
    owner_path, _, attr = f.member.layer.rpartition(".")
    setattr(root.get_submodule(owner_path) if owner_path else root, attr, LowRank(down, up))


# -- call_function nodes ---------------------------------------------------------------------------

def _check_nodes(gm: nn.Module, f: Factor, nodes: Sequence[_GraphSite]) -> None:
    for site in nodes:
        if site.layout.startswith("left"):
            raise PlanError(f"layer {f.member.layer!r}: a weight multiplying from the left cannot be factored")
        if _is_conv(site):
            a = bind_args(site.op, site.node.args, site.node.kwargs)
            if int(a.get("groups", 1)) != 1 or a.get("transposed", False):
                raise PlanError(f"layer {f.member.layer!r}: a grouped or transposed convolution cannot be factored")


def _is_conv(site: _GraphSite) -> bool:
    return site.op in CONV_OPS or site.op is aten.convolution.default


def _replace_nodes(gm: fx.GraphModule, f: Factor, nodes: Sequence[_GraphSite], shared: dict[str, nn.Parameter],
                   paths: dict[str, str]) -> set[str]:
    """Replace each node of the layer by ``up(down(x))``; returns the weight paths it read."""
    weight = gm.get_parameter(nodes[0].target)
    conv = _is_conv(nodes[0])
    r, out = f.down.shape[0], f.up.shape[0]
    nd = weight.dim() - 2
    down_shape = (r, *weight.shape[1:]) if conv else (r, f.down.shape[1])
    up_shape = (out, r) + (1,) * nd if conv else (out, r)
    if conv and weight[0].numel() != f.down.shape[1] or not conv and weight.numel() != out * f.down.shape[1]:
        raise PlanError(f"layer {f.member.layer!r}: factors for a {out}x{f.down.shape[1]} matrix do not fit its "
                        f"weight {tuple(weight.shape)}")
    if f.basis not in shared:
        shared[f.basis] = _param(f.down, weight, down_shape)
    if f.basis not in paths:
        paths[f.basis] = _register(gm, f"{f.member.layer}.lfpass_basis.weight", shared[f.basis])
    basis = paths[f.basis]
    coeff = _register(gm, f"{f.member.layer}.lfpass_coeff.weight", _param(f.up, weight, up_shape))
    for site in nodes:
        _replace_node(gm.graph, site, basis, coeff, conv, nd)
    return {site.target for site in nodes}


def _bias_arg(site: _GraphSite) -> fx.Node | None:
    a = bind_args(site.op, site.node.args, site.node.kwargs)
    if "bias" in a:
        return a["bias"]
    if site.op is aten.addmm.default:
        return a["self"]
    return None


def _replace_node(graph: fx.Graph, site: _GraphSite, basis: str, coeff: str, conv: bool, nd: int) -> None:
    node, x, bias = site.node, _input_of(site), _bias_arg(site)
    with graph.inserting_before(node):
        b, c = graph.get_attr(basis), graph.get_attr(coeff)
        if not conv:
            low = graph.call_function(aten.linear.default, (x, b))
            new = graph.call_function(aten.linear.default, (low, c, bias))
        else:
            a = bind_args(site.op, node.args, node.kwargs)
            ones, zeros = [1] * nd, [0] * nd
            if site.op is aten.convolution.default:
                low = graph.call_function(site.op, (x, b, None, a["stride"], a["padding"], a["dilation"], False,
                                                    a["output_padding"], 1))
                new = graph.call_function(site.op, (low, c, bias, ones, zeros, ones, False, zeros, 1))
            else:
                low = graph.call_function(site.op, (x, b, None, a["stride"], a["padding"], a["dilation"], 1))
                new = graph.call_function(site.op, (low, c, bias, ones, zeros, ones, 1))
    new.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def _drop_unread(gm: fx.GraphModule, paths: set[str]) -> None:
    """Erase ``get_attr`` nodes nothing uses, then delete the weights at ``paths`` nothing reads."""
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    changed = True
    while changed:  # a view of a weight (t, permute) left without users goes too
        changed = False
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and not node.users and node.target in (aten.t.default,
                                                                                  aten.permute.default,
                                                                                  aten.transpose.int):
                gm.graph.erase_node(node)
                changed = True
        for node in list(gm.graph.nodes):
            if node.op == "get_attr" and not node.users:
                gm.graph.erase_node(node)
                changed = True
    delete_unread(gm, paths)
