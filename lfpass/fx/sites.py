"""Find the weight-bearing layers of a torch.fx graph (or of a plain nn.Module).

Two shapes of graph carry the same layers:

- ``call_module`` nodes on ``nn.Linear``, ``nn.Conv*d``, ``nn.ConvTranspose*d``
  and transformers' ``Conv1D`` (weight stored ``[in, out]``), as
  ``torch.fx.symbolic_trace`` writes them;
- ``call_function`` nodes (``aten.linear``, ``aten.conv*``, ``aten.convolution``,
  ``aten.addmm``/``mm``/``matmul`` and their ``torch.nn.functional`` forms) on
  ``get_attr`` weights, possibly through a transpose, as
  ``torch.export.export(...).module()`` writes them.

A ``call_module`` node on a leaf module that holds such layers
(``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``) yields those layers,
as the plain module does. Sites are named by layer (``lm_head``, not the tied
``transformer.wte`` tensor it reads), so a plan fits the module, its
symbolic trace and its exported graph alike.

A tensor is one site however many nodes use it, so a module called twice or a
parameter already tied is planned once. Only parameters are sites (the ratio
counts parameters; a buffer read as a weight is left alone), and a layer that
shares any other tensor with an earlier site (a tied bias) is not one, since
merging it would save less than the plan counts. Only float16, bfloat16,
float32 and float64 tensors are merged (exactly, in their own dtype): a layer
holding an integer, bool or float8 tensor is no site.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from lfpass.core.errors import PlanError
from lfpass.core.frontend import SiteTable
from lfpass.core.sites import Site, make_signature, role_of
from lfpass.core.units import find_units

log = logging.getLogger(__name__)

aten = torch.ops.aten

LINEAR_OPS = {aten.linear.default}
CONV_OPS = {
    aten.conv1d.default: (1, False), aten.conv2d.default: (2, False), aten.conv3d.default: (3, False),
    aten.conv1d.padding: (1, False), aten.conv2d.padding: (2, False), aten.conv3d.padding: (3, False),
    aten.conv_transpose1d.default: (1, True), aten.conv_transpose2d.input: (2, True),
    aten.conv_transpose3d.input: (3, True),
}
MM_OPS = {aten.addmm.default, aten.mm.default, aten.matmul.default}
FUNCTIONAL = {
    F.linear: aten.linear.default,
    F.conv1d: aten.conv1d.default, F.conv2d: aten.conv2d.default, F.conv3d: aten.conv3d.default,
    F.conv_transpose1d: aten.conv_transpose1d.default, F.conv_transpose2d: aten.conv_transpose2d.input,
    F.conv_transpose3d: aten.conv_transpose3d.input,
    torch.matmul: aten.matmul.default, operator.matmul: aten.matmul.default,
    torch.mm: aten.mm.default, torch.addmm: aten.addmm.default,
}
_PASS_THROUGH = {
    aten.alias.default, aten.alias_copy.default, aten.detach.default, aten.detach_copy.default,
    aten.clone.default, aten.contiguous.default, torch.Tensor.detach,
}
_PASS_THROUGH_METHODS = {"detach", "contiguous", "clone"}
_TRANSPOSE_2D = {  # a transpose whenever the tensor is 2-D (sites' weights are checked to be)
    aten.t.default, aten.t_copy.default, aten.numpy_T.default, aten.mT.default, aten.adjoint.default, torch.t,
}
_TRANSPOSE_DIMS = {aten.transpose.int, aten.transpose_copy.int, torch.transpose}
_PERMUTE = {aten.permute.default, aten.permute_copy.default, torch.permute}


@dataclass
class FxSites(SiteTable):
    """The sites of one module and how to reach their tensors."""

    sites: list[Site]
    params: dict[str, torch.Tensor]  # canonical tensor name -> tensor
    holders: dict[str, list[str]] = field(default_factory=dict)  # canonical name -> every attribute path
    units: list[Site] = field(default_factory=list)  # attention / MLP units over the layer sites

    def load_exact(self, name: str) -> np.ndarray:
        """A tensor's values in its own dtype (bfloat16 as ``ml_dtypes.bfloat16``), for merging."""
        return to_numpy(self.params[name])


MERGEABLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # as lfpass.core.dtypes.MERGEABLE


def unique_parameters(module: nn.Module) -> int:
    """Parameters of ``module``, counting a tensor shared by several layers once."""
    seen: set[tuple] = set()
    total = 0
    for p in module.parameters():  # already unique by object
        key = (p.untyped_storage().data_ptr(), p.storage_offset(), tuple(p.shape), tuple(p.stride()), p.device)
        if key in seen:
            continue
        seen.add(key)
        total += p.numel()
    return total


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """``t`` on the CPU as numpy, same dtype and bits (numpy has no bfloat16: ``ml_dtypes`` does)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def to_torch(array: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """``array`` as a tensor on ``like``'s device, in its dtype; bits kept (``to_numpy``'s inverse)."""
    array = np.ascontiguousarray(array)
    if array.dtype == ml_dtypes.bfloat16:
        t = torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    else:
        t = torch.from_numpy(array)
    if t.dtype != like.dtype:
        raise PlanError(f"a merged tensor came back as {t.dtype}, not {like.dtype}")
    return t.to(device=like.device)


def tensor_names(module: nn.Module) -> tuple[dict[int, str], dict[str, torch.Tensor], dict[str, list[str]]]:
    """Canonical name (first path) for every parameter and buffer, and all of its paths."""
    canonical: dict[int, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    holders: dict[str, list[str]] = {}
    named = list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False))
    for path, t in named:
        name = canonical.setdefault(id(t), path)
        tensors[name] = t
        holders.setdefault(name, []).append(path)
    return canonical, tensors, holders


def is_conv1d_hf(mod: nn.Module) -> bool:
    """transformers' ``Conv1D``: a linear layer with its weight stored ``[in, out]``."""
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf") and getattr(mod, "weight", None) is not None


def _ntuple(value: Any, n: int) -> Any:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value) if len(value) == n else tuple(int(v) for v in value) * (n // len(value))
    return (int(value),) * n


def _module_site(path: str, mod: nn.Module, canonical: dict[int, str]) -> tuple[str, Any, str, tuple[str, ...]] | None:
    """(kind, signature, layout, tensor names) of a module that is a site, else None."""
    bias = getattr(mod, "bias", None)
    if isinstance(mod, nn.Linear) or is_conv1d_hf(mod):
        w = mod.weight
        layout = "out_in" if isinstance(mod, nn.Linear) else "in_out"
        sig = make_signature(shape=tuple(w.shape), bias=bias is not None, layout=layout, dtype=str(w.dtype))
        kind = "linear"
    elif isinstance(mod, nn.modules.conv._ConvNd):
        w = mod.weight
        nd = w.dim() - 2
        kind = "conv_transpose" if mod.transposed else "conv"
        sig = make_signature(
            shape=tuple(w.shape), bias=bias is not None, stride=_ntuple(mod.stride, nd),
            padding=_ntuple(mod.padding, nd), dilation=_ntuple(mod.dilation, nd), groups=int(mod.groups),
            output_padding=_ntuple(mod.output_padding, nd), padding_mode=mod.padding_mode,
            layout="in_out" if mod.transposed else "out_in", dtype=str(w.dtype),
        )
    elif isinstance(mod, nn.MultiheadAttention) and getattr(mod, "in_proj_weight", None) is not None:
        w, bias = mod.in_proj_weight, mod.in_proj_bias  # q, k and v packed in one matrix, as torch.export reads it
        sig = make_signature(shape=tuple(w.shape), bias=bias is not None, layout="out_in", dtype=str(w.dtype))
        kind, path = "linear", f"{path}.in_proj"
    else:
        return None
    names = (canonical[id(w)],) + ((canonical[id(bias)],) if bias is not None else ())
    return kind, sig, path, names


def layer_path(path: str) -> str:
    """The layer an attribute path names: ``blk.weight`` is ``blk``; ``attn.in_proj_weight``
    is ``attn.in_proj`` (as the module frontend names it); any other attribute
    (``blk.w1``) is a layer of its own, so two weights of one module never share
    a name or a role."""
    parent, _, attr = path.rpartition(".")
    if attr == "weight" and parent:
        return parent
    if attr.endswith("_weight") and parent:
        return f"{parent}.{attr[: -len('_weight')]}"
    return path


def _owner(node: fx.Node, target: str, paths: list[str]) -> str:
    """The layer a weight read through ``get_attr`` belongs to, named as the module frontend names it.

    The tensor's canonical name would call GPT-2's head ``transformer.wte`` (the
    tied embedding), and torch.export reads a tied tensor through whichever of
    its paths it picked, so prefer the module that made the call (recorded in
    ``nn_module_stack``) when it holds the tensor; else the path the graph reads.
    """
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        caller = list(stack.values())[-1][0]
        for path in paths:
            if path.rpartition(".")[0] == caller:
                return layer_path(path)
    return layer_path(target)


def bind_args(op: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Arguments of an aten call by schema name, defaults filled in."""
    out: dict[str, Any] = {}
    for i, a in enumerate(op._schema.arguments):
        if i < len(args):
            out[a.name] = args[i]
        elif a.name in kwargs:
            out[a.name] = kwargs[a.name]
        else:
            out[a.name] = a.default_value if a.has_default_value() else None
    return out


def _is_transpose(node: fx.Node) -> bool:
    t = node.target
    if node.op == "call_function":
        if t in _TRANSPOSE_2D:
            return True
        if t in _TRANSPOSE_DIMS:
            return _swaps(node.args[1:3])
        if t in _PERMUTE:
            return _swaps_all(node.args[1])
        if t is getattr and node.args[1] in ("T", "mT"):
            return True
    if node.op == "call_method":
        if t == "t":
            return True
        if t == "transpose":
            return _swaps(node.args[1:3])
        if t == "permute":
            return _swaps_all(node.args[1] if len(node.args) == 2 else node.args[1:])
    return False


def _swaps(dims: Any) -> bool:
    """Two dims that swap the axes of a 2-D tensor."""
    return len(dims) == 2 and all(isinstance(d, int) for d in dims) and sorted(d % 2 for d in dims) == [0, 1]


def _swaps_all(dims: Any) -> bool:
    """A permutation that transposes a 2-D tensor."""
    return isinstance(dims, (list, tuple)) and len(dims) == 2 and _swaps(dims) and dims[0] % 2 == 1


class SiteFinder:
    def __init__(self, gm: fx.GraphModule, canonical: dict[int, str]):
        self.gm = gm
        self.canonical = canonical

    def const(self, arg: Any) -> tuple[str, bool, str] | None:
        """(canonical tensor name, transposed, attribute path read) when ``arg`` is a constant tensor."""
        transposed = False
        node = arg
        while isinstance(node, fx.Node):
            if node.op == "get_attr":
                try:  # parameters only: a buffer is not counted as a parameter, so sharing it saves none
                    t = self.gm.get_parameter(node.target)
                except AttributeError:
                    return None
                name = self.canonical.get(id(t))
                return (name, transposed, node.target) if name else None
            if _is_transpose(node):
                transposed = not transposed
            elif not (
                (node.op == "call_function" and node.target in _PASS_THROUGH)
                or (node.op == "call_method" and node.target in _PASS_THROUGH_METHODS)
            ):
                return None
            node = node.args[0]
        return None

    def function_site(self, node: fx.Node, tensors: dict[str, torch.Tensor]) -> tuple[str, Any, str, tuple[str, ...]] | None:
        op = FUNCTIONAL.get(node.target, node.target)
        if op in LINEAR_OPS:
            a = bind_args(op, node.args, node.kwargs)
            w, b = self.const(a["weight"]), self.const(a["bias"]) if a["bias"] is not None else None
            if w is None or w[1] or (a["bias"] is not None and b is None):
                return None
            shape = tuple(tensors[w[0]].shape)
            sig = make_signature(shape=shape, bias=b is not None, layout="out_in", dtype=str(tensors[w[0]].dtype))
            return "linear", sig, w[2], (w[0],) + ((b[0],) if b else ())
        if op in CONV_OPS:
            nd, transposed = CONV_OPS[op]
            a = bind_args(op, node.args, node.kwargs)
            if isinstance(a.get("padding"), str) and op in (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default):
                op = {aten.conv1d.default: aten.conv1d.padding, aten.conv2d.default: aten.conv2d.padding,
                      aten.conv3d.default: aten.conv3d.padding}[op]
                a = bind_args(op, node.args, node.kwargs)
            return self._conv(a, nd, transposed, tensors)
        if op is aten.convolution.default:
            a = bind_args(op, node.args, node.kwargs)
            nd = len(a["stride"])
            return self._conv(a, nd, bool(a["transposed"]), tensors)
        if op in MM_OPS:
            a = bind_args(op, node.args, node.kwargs)
            lhs, rhs = (a["mat1"], a["mat2"]) if "mat1" in a else (a["self"], a["other"] if "other" in a else a["mat2"])
            bias = None
            if op is aten.addmm.default:
                if a["beta"] != 1 or a["alpha"] != 1:
                    return None
                bias = self.const(a["self"])
                if bias is None or bias[1]:
                    return None
            w, side = self.const(rhs), "right"
            if w is None and bias is None:
                w, side = self.const(lhs), "left"
            if w is None or tensors[w[0]].dim() != 2:
                return None
            layout = ("out_in" if w[1] else "in_out") if side == "right" else ("left_in_out" if w[1] else "left_out_in")
            t = tensors[w[0]]
            sig = make_signature(shape=tuple(t.shape), bias=bias is not None, layout=layout, dtype=str(t.dtype))
            return "linear", sig, w[2], (w[0],) + ((bias[0],) if bias else ())
        return None

    def _conv(self, a: dict, nd: int, transposed: bool, tensors: dict[str, torch.Tensor]):
        w = self.const(a["weight"])
        b = self.const(a["bias"]) if a.get("bias") is not None else None
        if w is None or w[1] or (a.get("bias") is not None and b is None):
            return None
        t = tensors[w[0]]
        sig = make_signature(
            shape=tuple(t.shape), bias=b is not None, stride=_ntuple(a["stride"], nd),
            padding=_ntuple(a["padding"], nd), dilation=_ntuple(a["dilation"], nd), groups=int(a["groups"]),
            output_padding=_ntuple(a.get("output_padding") or 0, nd), padding_mode="zeros",
            layout="in_out" if transposed else "out_in", dtype=str(t.dtype),
        )
        return ("conv_transpose" if transposed else "conv"), sig, w[2], (w[0],) + ((b[0],) if b else ())


def find_sites(module: nn.Module) -> FxSites:
    """Every weight-bearing layer of ``module``, in graph (or module) order."""
    canonical, tensors, holders = tensor_names(module)
    found: dict[str, Site] = {}  # weight name -> site
    nodes: dict[str, list[str]] = {}
    owned: set[str] = set()  # every tensor name some site holds

    def add(kind: str, sig: Any, path: str, names: tuple[str, ...], where: str) -> None:
        odd = [n for n in names if tensors[n].dtype not in MERGEABLE]
        if odd:  # integer, bool, float8: merging would round them, or average codes
            log.debug("not a site: %s reads %s, a %s tensor", path, odd[0], tensors[odd[0]].dtype)
            return
        if names[0] in found:
            nodes[names[0]].append(where)
            return
        if owned.intersection(names):  # e.g. a bias tied to another layer's: sharing would not save numel
            log.debug("not a site: %s shares a tensor with another layer", path)
            return
        owned.update(names)
        numel = sum(tensors[n].numel() for n in names)
        found[names[0]] = Site(path, kind, role_of(path), sig, names, numel)
        nodes[names[0]] = [where]

    if isinstance(module, fx.GraphModule):
        finder = SiteFinder(module, canonical)
        for node in module.graph.nodes:
            if node.op == "call_module":  # a layer, or a leaf module holding layers (nn.MultiheadAttention)
                called = module.get_submodule(node.target)
                for path, sub in called.named_modules(prefix=node.target):
                    inner = _module_site(path, sub, canonical)
                    if inner:
                        add(*inner, where=node.name)
            elif node.op == "call_function":
                hit = finder.function_site(node, tensors)
                if hit:  # name the layer as the module frontend does
                    kind, sig, target, names = hit
                    add(kind, sig, _owner(node, target, holders[names[0]]), names, where=node.name)
    else:
        for path, mod in module.named_modules():
            hit = _module_site(path, mod, canonical)
            if hit:
                add(*hit, where=path)

    sites, seen = [], set()
    for weight, s in found.items():
        name = s.name if s.name not in seen else f"{s.name}#{len(seen)}"
        seen.add(name)
        sites.append(Site(name, s.kind, s.role, s.signature, s.tensors, s.numel, ",".join(nodes[weight])))
    return FxSites(sites, tensors, holders, units=find_units(sites))
