"""An ONNX file as a PyTorch graph lfpass can fuse and retrain: the deployment path
ONNX -> onnx2torch -> fuse -> distil -> ONNX.

The file's constants are folded first (onnx-graphsurgeon), as onnx2torch needs.
onnx2torch keeps a ``MatMul``'s constant weight as a buffer read by an
``OnnxMatMul`` module; here each such node becomes ``torch.matmul`` on a
parameter, so the FX frontend sees a linear layer it may share and training
updates it. ``Gemm`` and ``Conv`` already come out as ``nn.Linear``/``nn.Conv*``.

onnx2torch covers opsets up to about 17; :mod:`lfpass.bridge.onnx_ops` adds
what the dynamo exporter's opset 18+ files need. Where an operator still has
no converter, one :class:`InputError` line names it and points to the
ONNX-only path (``lfpass optimize`` without retraining).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import fx, nn

from lfpass.core.errors import InputError, first_line
from lfpass.fx.rewrite import delete_unread

log = logging.getLogger(__name__)

_MISSING = re.compile(r"operation_type='(\w+)', version=(\d+)")


def to_torch(path: str | Path) -> fx.GraphModule:
    """The ONNX model at ``path`` as an ``fx.GraphModule`` in eval mode, its constant
    ``MatMul`` weights as parameters."""
    import onnx
    import onnx_graphsurgeon as gs
    from onnx2torch import convert

    from lfpass.bridge.onnx_ops import install
    from lfpass.onnx.load import read_model

    install()  # the newer opsets' versions of operators onnx2torch converts, and Gelu
    read_model(path)  # one-line errors for a missing, broken or invalid file
    try:
        graph = gs.import_onnx(onnx.load(str(path)))
        graph.fold_constants().cleanup()
        module = convert(gs.export_onnx(graph))
    except NotImplementedError as exc:
        found = _MISSING.search(str(exc))
        what = f"{found.group(1)} (opset {found.group(2)})" if found else first_line(exc)
        raise InputError(f"{path}: onnx2torch cannot convert {what} to PyTorch, so it cannot be retrained here; "
                         "every other option of `lfpass optimize` (budget, merge, align, residual) still "
                         "works on it") from None
    except Exception as exc:  # noqa: BLE001 - any conversion failure is a model lfpass cannot retrain
        raise InputError(f"{path}: cannot convert to PyTorch ({first_line(exc)})") from None
    module = module.eval()
    lifted = weights_as_parameters(module)
    log.info("converted %s: %d MatMul weights made parameters", path, lifted)
    return module


def weights_as_parameters(gm: fx.GraphModule) -> int:
    """Make each ``OnnxMatMul`` with a constant floating-point right operand a
    ``torch.matmul`` on a parameter held by that module as ``weight`` (so the layer
    is named after its ONNX node, as ``Gemm``/``Conv`` layers are); returns how many
    were changed. A constant two nodes read becomes one parameter both hold."""
    lifted: dict[tuple, list[nn.Parameter]] = {}
    sources: set[str] = set()
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or type(gm.get_submodule(node.target)).__name__ != "OnnxMatMul":
            continue
        weight = node.args[1] if len(node.args) == 2 else None
        if not isinstance(weight, fx.Node) or weight.op != "get_attr":
            continue
        tensor = _attr(gm, weight.target)
        if not torch.is_tensor(tensor) or not tensor.is_floating_point() or tensor.dim() < 2:
            continue
        sources.add(weight.target)
        gm.get_submodule(node.target).register_parameter("weight", _lift(tensor, lifted))
        with gm.graph.inserting_before(node):
            read = gm.graph.get_attr(f"{node.target}.weight")
        node.op, node.target, node.args = "call_function", torch.matmul, (node.args[0], read)
    gm.graph.eliminate_dead_code()
    _drop_unread(gm, sources)
    gm.graph.lint()
    gm.recompile()
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.matmul)


def _lift(tensor: torch.Tensor, lifted: dict[tuple, list[nn.Parameter]]) -> nn.Parameter:
    """``tensor`` as a parameter; one equal to a weight lifted before is that parameter.

    onnx2torch gives every reader of an initializer a buffer of its own, so a
    weight the file stores once (the legacy exporter stores equal parameters
    once) would come back as several: equality ties them again, losslessly."""
    key = (tuple(tensor.shape), tensor.dtype)
    for known in lifted.get(key, []):
        if torch.equal(known.data, tensor):
            return known
    param = tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor.detach().clone())
    lifted.setdefault(key, []).append(param)
    return param


def _attr(gm: nn.Module, path: str) -> object:
    owner_path, _, attr = path.rpartition(".")
    return getattr(gm.get_submodule(owner_path) if owner_path else gm, attr)


def _drop_unread(gm: fx.GraphModule, sources: set[str]) -> None:
    """Remove the buffers the lifted weights came from (``sources``) once no node reads them.
    Only those: a module's own buffers (BatchNorm's running statistics) are read by the module,
    not by a graph node, and stay."""
    delete_unread(gm, sources, "_buffers")
