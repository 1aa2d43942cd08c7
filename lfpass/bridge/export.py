"""Export a (fused) PyTorch model to ONNX with every tie kept, checked in onnxruntime.

``lfpass.export(model, example_inputs, path)`` exports with torch's
``dynamo=True`` exporter (the legacy TorchScript exporter, opset 17, when it
fails), post-processes the graph in onnx-ir, writes it atomically
(:mod:`lfpass.onnx.save`) and runs it in onnxruntime against PyTorch. (The
module is not named ``export``: importing ``lfpass.export`` would then bind
the package attribute to the module instead of the function.)

Ties. A fused model has several modules holding one ``nn.Parameter``; the file
must store that tensor once. Measured here on the demo CNN fused at ratio 2 (3
shared conv weights, BatchNorm statistics set per layer as after training;
28,778 unique parameters, 512 float buffers) and a tiny GPT-2 fused at 1.3
(22,304; tied ``wte``/``lm_head`` plus 4 fused tensors), as float elements
stored and shared tensors found stored once:

| route                                   | CNN stored | CNN ties | BN nodes | GPT-2 stored | GPT-2 ties |
|-----------------------------------------|-----------:|---------:|---------:|-------------:|-----------:|
| legacy, defaults                        |     65,386 |      0/3 |        0 |            - |          - |
| legacy, ``TrainingMode.PRESERVE``       |     29,290 |      3/3 |        8 |            - |          - |
| legacy, ``do_constant_folding=False``   |     29,290 |      3/3 |        8 |            - |          - |
| dynamo, defaults (``optimize=True``)    |     29,194 |      3/3 |        7 |       24,870 |        4/5 |
| dynamo, ``optimize=False``              |     29,291 |      3/3 |        8 |       22,316 |        5/5 |
| ``lfpass.export`` (either exporter)     |     29,194 |      3/3 |        7 |       21,670 |        5/5 |

(The legacy exporter cannot export this GPT-2: no ``aten::diff`` at opset 17.)

- BatchNorm: the legacy exporter's eval peephole folds each BN into its conv
  whenever ``do_constant_folding`` is on, scaling each layer's copy of a
  shared weight differently (no shared tensor survives). The dynamo exporter
  folds nothing; its optimizer (onnxscript's ``FuseBatchNormIntoConv``)
  refuses a conv weight another node reads and folds only the unshared stem.
  ``PRESERVE`` (the demo's old workaround) kept every BN, legacy only.
- Constant folding an op on a tensor other nodes also read stores a derived
  copy beside it: onnxscript folds GPT-2's ``Transpose(wte)`` for the LM head
  into a second, transposed embedding (``wte`` stored twice).

So lfpass turns the exporters' own optimisation off (``optimize=False``,
``do_constant_folding=False``) and runs it itself: deduplicate bit-identical
initializers of any size (onnx-ir's pass stops at 1,024 elements by default,
as does the dynamo exporter's merge), so a tie an exporter wrote twice is one
tensor before anything folds; onnxscript's optimizer (``optimize_ir`` and
``onnx_fusions``, what ``optimize=True`` runs) with a ``should_fold`` guard
that never constant-folds a node reading a float tensor other nodes read
too; deduplicate again. BatchNorm is folded exactly where no tie is at stake
(an unshared conv) and stays a ``BatchNormalization`` node after a shared
conv, whichever exporter ran, and no derived copy of a shared tensor is made.
(Folding BN into a per-layer scale after the shared conv would store 2
vectors a layer instead of 4, for two nodes instead of one: not worth it.)

Then every tensor shared in PyTorch (one storage reached under two or more
names: fused layers, tied embeddings) is looked up in the file by its bytes,
in its own layout or transposed: it must be stored exactly once (a constant
one, like a zero bias, may be optimised away). The counts reported beside it
are the unique parameters of the model (:func:`lfpass.unique_parameters`),
its unique float buffers (BatchNorm running statistics are buffers, not
parameters) and the float elements the file stores (initializers and
``Constant`` nodes). The file may store fewer than parameters + buffers (a
folded BatchNorm's four vectors become one conv bias; equal tensors are
merged; a static-shape export keeps only the rows of a position table it
reads) or a few more (masks and scalars the exporter makes), so the ties are
checked tensor by tensor, not through the count.

Check. The model runs in eval mode (each module's mode is restored after),
and onnxruntime (graph optimisations off) runs the written file on the same
inputs. An output passes when ``max |onnx - torch| <= atol_scale *
max(1, max |torch|)``. A failed check, or a broken tie, raises
:class:`ValidationFailed` and leaves no new file (an older file at ``path``
stays whole); ``check=False`` skips both verdicts (a broken tie is logged)
and keeps the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import logging
import math
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import onnx_ir as ir
import torch
from onnx_ir.passes.common import DeduplicateHashedInitializersPass
from torch import nn
from torch.utils import _pytree as pytree

from lfpass.core.errors import InputError, TraceError, ValidationFailed, first_line
from lfpass.core.fileio import check_paths
from lfpass.fx.batches import eval_mode
from lfpass.fx.sites import unique_parameters
from lfpass.onnx.load import count_params, disk_bytes, read_model, stored_tensors
from lfpass.onnx.save import needs_external, staged, write

log = logging.getLogger(__name__)

LEGACY_OPSET = 17


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export` wrote and measured.

    ``params_torch``: unique parameters of the model; ``buffers_torch``: its
    unique float buffers; ``params_onnx``: float elements the file stores;
    ``shared``: tensors shared in PyTorch; ``ties_kept``: those stored once; ``max_abs``
    and ``scale``: the worst output's error against PyTorch and its scale
    (``None`` when ``check=False``); ``passed``: the check's verdict (``None``
    when not checked)."""

    path: Path
    exporter: str
    opset: int
    params_torch: int
    buffers_torch: int
    params_onnx: int
    shared: int
    ties_kept: int
    bytes: int
    max_abs: float | None
    scale: float | None
    passed: bool | None
    fallback_reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        return data


# --- post-processing: ties kept -------------------------------------------------------------


class DeduplicateTensorsPass(DeduplicateHashedInitializersPass):
    """onnx-ir's hashed initializer deduplication (same dtype, shape and bytes, in each graph),
    with what it lacks for exported models, which is why :meth:`call` is overridden:

    - any memory layout: onnx-ir 1.1 hashes the array's buffer, which raises ``ValueError``
      for the non-contiguous array a folded ``Transpose`` leaves; here the bytes are hashed;
    - equality confirmed byte for byte, not trusted to the hash;
    - tensors of any size (its default skips those over 4 Gi elements).
    """

    def __init__(self) -> None:
        super().__init__(size_limit=sys.maxsize)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for graph in model.graphs():
            kept: dict[tuple, ir.Value] = {}
            for value in tuple(graph.initializers.values()):
                if value.is_graph_input() or value.is_graph_output() or value.const_value is None:
                    continue
                tensor = value.const_value
                data = tensor.tobytes()
                key = (tensor.dtype, tuple(tensor.shape), hashlib.sha256(data).digest())
                first = kept.setdefault(key, value)
                if first is value or first.const_value.tobytes() != data:
                    continue
                value.replace_all_uses_with(first)
                graph.initializers.pop(value.name)
                log.debug("initializer %r is a copy of %r: merged", value.name, first.name)
                modified = True
        return ir.passes.PassResult(model, modified)


def _folds_a_copy(node: ir.Node) -> bool | None:
    """onnxscript's ``should_fold``: ``False`` for a node reading a float tensor (more than a
    scalar) that other nodes read too, since folding it would store a derived copy beside
    the tensor; ``None`` (onnxscript's own rules) otherwise."""
    for value in node.inputs:
        tensor = value.const_value if value is not None else None
        if tensor is None or not tensor.dtype.is_floating_point() or tensor.size <= 1:
            continue
        readers = {use.node for use in value.uses()}
        if len(readers) > 1:
            log.debug("not folding %s %r: %r is read by %d nodes", node.op_type, node.name, value.name, len(readers))
            return False
    return None


def keep_ties(model: ir.Model) -> None:
    """Optimise an exported model (constant folding, BatchNorm folding, fusions) without
    storing any tensor twice, and drop the tools' debugging notes; in place."""
    import onnxscript.optimizer
    import onnxscript.rewriter.onnx_fusions

    DeduplicateTensorsPass()(model)
    onnxscript.optimizer.optimize_ir(model, should_fold=_folds_a_copy)
    onnxscript.rewriter.onnx_fusions.fuse(model)
    DeduplicateTensorsPass()(model)
    _drop_debug_notes(model)


def _drop_debug_notes(model: ir.Model) -> None:
    """Remove the notes the exporter and the optimizer leave (on nodes: module paths, stack
    traces, FX node text, rewrite rule names; on the graph, under ``pkg.``: the exported
    program's signature): debugging aids that carry the exporting machine's file paths and,
    on the demo CNN, a fifth of the file."""
    for graph in model.graphs():
        for key in [k for k in graph.metadata_props if k.startswith("pkg.")]:
            del graph.metadata_props[key]
        for node in graph:
            node.metadata_props.clear()


# --- exporters ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportOptions:
    """What :func:`export` passes on to the exporters (``opset`` ``None``: the exporter's own
    default, :data:`LEGACY_OPSET` for the legacy one)."""

    opset: int | None = None
    dynamic_shapes: Any = None
    input_names: Sequence[str] | None = None
    output_names: Sequence[str] | None = None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters print progress and dump graphs on failure; keep a library call silent
    (what they said goes to the debug log)."""
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        if sink.getvalue():
            log.debug("exporter output:\n%s", sink.getvalue())


def _reason(exc: BaseException) -> str:
    """One line for why an exporter failed: the innermost cause, which names the real problem."""
    root = exc
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    return f"{type(root).__name__}: {first_line(root)}"


def _dynamo(model: nn.Module, args: tuple, options: ExportOptions) -> ir.Model:
    """The dynamo exporter's graph, in memory (its tensors the model's own), unoptimised."""
    with _quiet():
        program = torch.onnx.export(
            model, args, dynamo=True, optimize=False, verbose=False, opset_version=options.opset,
            dynamic_shapes=options.dynamic_shapes, input_names=options.input_names,
            output_names=options.output_names,
        )
    return program.model


def _legacy(model: nn.Module, args: tuple, options: ExportOptions, folder: Path) -> ir.Model:
    """The legacy exporter's graph, unfolded. It writes a file: into a scratch folder in
    ``folder``, read back whole (external data too) before the folder goes."""
    names = options.input_names or _argument_names(model, args)
    wanted = list(options.output_names or ())
    # the legacy exporter refuses a name that is a bare number (its own value names, which it
    # also writes as output names): such outputs are exported as output_N and renamed after
    given = [f"output_{i}" if name.isdigit() else name for i, name in enumerate(wanted)] or None
    axes = _dynamic_axes(options.dynamic_shapes, names)
    with tempfile.TemporaryDirectory(prefix=".lfpass-export.", dir=folder) as scratch:
        target = Path(scratch) / "legacy.onnx"
        with _quiet():
            torch.onnx.export(
                model, args, str(target), dynamo=False, do_constant_folding=False,
                opset_version=options.opset or LEGACY_OPSET, input_names=names,
                output_names=given, dynamic_axes=axes,
            )
        exported = read_model(target)[0]
        ir.external_data.load_to_model(exported)
    for value, name in zip(exported.graph.outputs, wanted):
        value.name = name
    return exported


def _argument_names(model: nn.Module, args: tuple) -> list[str] | None:
    """The names of ``forward``'s first ``len(args)`` parameters (the dynamo exporter's input
    names), when every argument is a tensor."""
    if not all(isinstance(a, torch.Tensor) for a in args):
        return None
    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return [p.name for p in params[:len(args)]] if len(params) >= len(args) else None


def _dynamic_axes(dynamic_shapes: Any, names: Sequence[str] | None) -> dict[str, dict[int, str]] | None:
    """``dynamic_shapes`` (per positional input: ``{dim: name or Dim}``, or by argument name)
    as the legacy exporter's ``dynamic_axes``."""
    if dynamic_shapes is None or names is None:
        return None
    specs = dynamic_shapes.items() if isinstance(dynamic_shapes, dict) else zip(names, dynamic_shapes)
    axes = {}
    for name, spec in specs:
        if isinstance(spec, dict):
            axes[name] = {int(d): _dim_name(v, name, int(d)) for d, v in spec.items() if v is not None}
    return axes or None


def _dim_name(dim: Any, name: str, index: int) -> str:
    if isinstance(dim, str):
        return dim
    return getattr(dim, "__name__", None) or f"{name}_dim_{index}"


def _export_ir(model: nn.Module, args: tuple, options: ExportOptions, folder: Path,
               dynamo: bool) -> tuple[ir.Model, str, str]:
    """The exported graph, the exporter that made it and, after a fallback, why dynamo failed."""
    if not dynamo:
        try:
            return _legacy(model, args, options, folder), "legacy", ""
        except Exception as exc:  # noqa: BLE001 - the exporters raise many types
            raise TraceError(f"cannot export to ONNX: the legacy exporter failed ({_reason(exc)})") from None
    try:
        return _dynamo(model, args, options), "dynamo", ""
    except Exception as exc:  # noqa: BLE001
        why = _reason(exc)
    log.warning("the dynamo exporter failed (%s); falling back to the legacy exporter (opset %d)",
                why, options.opset or LEGACY_OPSET)
    try:
        return _legacy(model, args, options, folder), "legacy", why
    except Exception as exc:  # noqa: BLE001
        raise TraceError(f"cannot export to ONNX: the dynamo exporter failed ({why}); "
                         f"the legacy exporter failed too ({_reason(exc)})") from None


# --- what PyTorch holds and what the file stores --------------------------------------------


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.device)


def shared_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Tensors (parameters and float buffers) the model reaches under two or more names,
    by their first name."""
    names: dict[tuple, list[str]] = {}
    tensors: dict[tuple, torch.Tensor] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if t is None or not t.is_floating_point() or t.numel() == 0:
            continue  # an empty tensor (onnx2torch's Resize roi) holds nothing to store twice: every one is at 0
        key = _storage_key(t)
        names.setdefault(key, []).append(name)
        tensors.setdefault(key, t)
    return {found[0]: tensors[key] for key, found in names.items() if len(found) > 1}


def float_buffers(model: nn.Module) -> int:
    """Elements of the model's float buffers (BatchNorm running statistics), each storage once."""
    seen = {_storage_key(b): b.numel() for b in model.buffers() if b.is_floating_point()}
    return sum(seen.values())


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _torch_digests(t: torch.Tensor) -> set[bytes]:
    """Digests of ``t``'s bytes, in its own layout and, for a matrix, transposed."""
    t = t.detach().cpu()
    layouts = [t] + ([t.t()] if t.dim() == 2 else [])
    return {_digest(x.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()) for x in layouts}


def copies_stored(model: ir.Model, tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """How many tensors of ``model`` hold each of ``tensors``' values (bit for bit, in its
    own layout or transposed). 1 is a tie kept; 2 or more, copies; 0, either folded
    into per-layer copies or, for a constant tensor (a zero bias), optimised away."""
    wanted = {(t.element_size(), t.numel()) for t in tensors.values()}
    stored: dict[bytes, int] = {}
    for tensor in stored_tensors(model):
        if tensor.dtype.is_floating_point() and (tensor.dtype.itemsize, tensor.size) in wanted:
            key = _digest(tensor.tobytes())
            stored[key] = stored.get(key, 0) + 1
    return {name: sum(stored.get(d, 0) for d in _torch_digests(t)) for name, t in tensors.items()}


# --- the check ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Agreement:
    """The output furthest from passing: its max abs error against PyTorch, its scale
    ``max(1, max |torch|)`` and, when it failed, which output and why."""

    passed: bool
    max_abs: float
    scale: float
    reason: str = ""


def _arrays(tensors: Sequence[Any], what: str) -> list[np.ndarray]:
    try:
        return [t.detach().cpu().numpy() for t in tensors]
    except (TypeError, RuntimeError) as exc:
        raise InputError(f"cannot check the export: {what} has a tensor numpy cannot hold ({first_line(exc)}); "
                         "pass check=False") from None


def _flat_tensors(tree: Any) -> list[torch.Tensor]:
    return [leaf for leaf in pytree.tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


def agreement(expected: Sequence[np.ndarray], got: Sequence[np.ndarray], names: Sequence[str],
              atol_scale: float) -> Agreement:
    """onnxruntime's outputs ``got`` against PyTorch's ``expected``, in order: an output
    passes when ``max |got - expected| <= atol_scale * max(1, max |expected|)``."""
    if len(expected) != len(got):
        return Agreement(False, math.inf, 1.0, f"PyTorch gives {len(expected)} outputs, the file {len(got)}")
    each = [_one_output(name, np.asarray(b), np.asarray(a), atol_scale) for name, b, a in zip(names, expected, got)]
    failed = [x for x in each if not x.passed]
    return failed[0] if failed else max(each, key=lambda x: x.max_abs / x.scale, default=Agreement(True, 0.0, 1.0))


def _one_output(name: str, b: np.ndarray, a: np.ndarray, atol_scale: float) -> Agreement:
    if a.shape != b.shape:
        return Agreement(False, math.inf, 1.0, f"output {name}: shape {a.shape}, PyTorch's {b.shape}")
    if a.dtype.kind != "f" or b.dtype.kind != "f":
        same = np.array_equal(a, b)
        return Agreement(same, 0.0 if same else math.inf, 1.0, "" if same else f"output {name}: values differ")
    x, y = a.astype(np.float64), b.astype(np.float64)
    finite = np.isfinite(y)
    if not np.array_equal(np.isfinite(x), finite) or not np.array_equal(x[~finite], y[~finite], equal_nan=True):
        return Agreement(False, math.inf, 1.0, f"output {name}: NaN or Inf where PyTorch's differs")
    err = float(np.abs(x - y)[finite].max(initial=0.0))
    scale = max(1.0, float(np.abs(y[finite]).max(initial=0.0)))
    passed = err <= atol_scale * scale
    return Agreement(passed, err, scale, "" if passed else f"output {name}")


# --- the call -------------------------------------------------------------------------------


def export(model: nn.Module, example_inputs: Any, path: str | Path, *, dynamo: bool = True,
           opset: int | None = None, dynamic_shapes: Any = None, input_names: Sequence[str] | None = None,
           output_names: Sequence[str] | None = None, check: bool = True, atol_scale: float = 1e-4,
           external_data: bool | None = None) -> ExportResult:
    """Export ``model`` (in eval mode) on ``example_inputs`` (a tensor or a tuple of
    arguments) to the ONNX file ``path``, every tensor shared in PyTorch stored once, and
    check it in onnxruntime on the same inputs (module docstring).

    ``dynamo=False`` uses the legacy exporter alone; ``opset`` defaults to the dynamo
    exporter's own (17 for the legacy one); ``dynamic_shapes`` takes the dynamo exporter's
    form (per input ``{dim: "name"}``). ``external_data``: ``None`` puts tensors in a data
    file beside ``path`` only when the model would not fit protobuf's 2 GB. Raises
    :class:`TraceError` when no exporter can export the model and :class:`ValidationFailed`
    when the check fails (nothing written then)."""
    path = Path(path)
    check_paths({}, {"path": path})
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    options = ExportOptions(opset, dynamic_shapes, input_names, output_names)
    with eval_mode(model):
        expected = _reference(model, args) if check else []
        onnx_model, exporter, fallback = _export_ir(model, args, options, path.parent, dynamo)
        keep_ties(onnx_model)
        shared = shared_tensors(model)
        broken = broken_ties(copies_stored(onnx_model, shared), shared)
        _judge_ties(path, broken, check)
        external = needs_external(onnx_model) if external_data is None else external_data
        with staged(path, external) as where:
            write(onnx_model, where, frozenset())
            verdict = _check(where.model, onnx_model, args, expected, atol_scale) if check else None
            if verdict is not None and not verdict.passed:
                raise ValidationFailed(_disagreement(path, verdict, atol_scale), verdict)
    result = ExportResult(
        path=path, exporter=exporter, opset=onnx_model.opset_imports.get("", 0),
        params_torch=unique_parameters(model), buffers_torch=float_buffers(model),
        params_onnx=count_params(onnx_model), shared=len(shared), ties_kept=len(shared) - len(broken),
        bytes=disk_bytes(path, [where.data] if where.data else None),
        max_abs=verdict.max_abs if verdict else None, scale=verdict.scale if verdict else None,
        passed=verdict.passed if verdict else None, fallback_reason=fallback,
    )
    log.info("%s: exported with the %s exporter (opset %d): %s unique parameters, %s float elements stored, "
             "%d of %d shared tensors stored once", path, exporter, result.opset, f"{result.params_torch:,}",
             f"{result.params_onnx:,}", result.ties_kept, result.shared)
    return result


def _reference(model: nn.Module, args: tuple) -> list[np.ndarray]:
    with torch.no_grad():
        return _arrays(_flat_tensors(model(*args)), "the model's output")


def _check(where: Path, model: ir.Model, args: tuple, expected: list[np.ndarray], atol_scale: float) -> Agreement:
    """Run the file at ``where`` in onnxruntime on ``args`` and compare with ``expected``."""
    from lfpass.onnx.validate import run

    inputs = _arrays(_flat_tensors(args), "example_inputs")
    names = [v.name for v in model.graph.inputs]
    if len(names) != len(inputs):
        raise InputError(f"cannot check the export: the file takes {len(names)} inputs ({', '.join(names)}), "
                         f"example_inputs hold {len(inputs)} tensors; pass check=False")
    outputs = run(where, [dict(zip(names, inputs))], label="the exported model")[0]
    return agreement(expected, list(outputs.values()), list(outputs), atol_scale)


def _disagreement(path: Path, verdict: Agreement, atol_scale: float) -> str:
    figures = (f"max abs error {verdict.max_abs:.3g} > {atol_scale:g} x output scale {verdict.scale:.3g}"
               if math.isfinite(verdict.max_abs) else "")
    detail = "; ".join(x for x in (verdict.reason, figures) if x)
    return f"{path}: onnxruntime disagrees with PyTorch ({detail}); nothing written (check=False keeps the file)"


def broken_ties(copies: dict[str, int], tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """The shared tensors not stored exactly once, but for a constant one (all elements
    equal: a zero bias, a unit scale) the optimizer removed, which nothing needs to store."""
    return {name: n for name, n in copies.items() if n > 1 or (n == 0 and not _constant(tensors[name]))}


def _constant(t: torch.Tensor) -> bool:
    flat = t.detach().reshape(-1)
    return bool(flat.numel() == 0 or torch.equal(flat, flat[:1].expand_as(flat)))


def _judge_ties(path: Path, broken: dict[str, int], check: bool) -> None:
    """Raise :class:`ValidationFailed` (warn, without ``check``) for ties not kept."""
    if not broken:
        return
    name, n = next(iter(broken.items()))
    how = "not stored as itself (folded into per-layer copies)" if n == 0 else f"stored {n} times"
    more = f" (and {len(broken) - 1} more)" if len(broken) > 1 else ""
    message = f"{path}: the export broke a tie: {name}, shared in PyTorch, is {how}{more}"
    if check:
        raise ValidationFailed(message + "; nothing written (check=False keeps the file)", broken)
    log.warning("%s", message)


__all__ = ["Agreement", "DeduplicateTensorsPass", "ExportOptions", "ExportResult", "export", "keep_ties"]
