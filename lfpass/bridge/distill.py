"""ONNX in, retrain, ONNX out: the deployment path for users who have inputs but no
labels and no training code.

``distill_onnx`` converts the file to PyTorch (:mod:`lfpass.bridge.to_torch`),
checks that the conversion computes what the file does on the given inputs,
fuses it in stages while distilling every stage from the unfused model (a
frozen copy of the conversion: the teacher is the original's function) or,
with data-aware options or a budget, fuses once by the keep-function pipeline
calibrated on the inputs and then distils,
exports the result with every shared tensor stored once, the input's opset and
open dimensions kept (:func:`lfpass.export`, checked in onnxruntime against
PyTorch), and then
measures in onnxruntime how close the written file is to the original file on
the held-out inputs (cosine and max error per output).
"""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from lfpass.core.config import AUTO, FusionConfig
from lfpass.core.errors import ConfigError, InputError, TraceError
from lfpass.core.fileio import check_paths
from lfpass.core.keep import DATA_OPTIONS
from lfpass.core.quality import MASK_INPUT, Readout, output_error
from lfpass.fx.frontend import readout_fn
from lfpass.onnx.frontend import outputs as onnx_outputs
from lfpass.onnx import inputs as onnx_inputs
from lfpass.onnx.load import check_input_file, disk_bytes, external_files, read_model
from lfpass.onnx.quantize import WEIGHT_ONLY
from lfpass.onnx.validate import Validation, compare, run, score_outputs
from lfpass.train.qat import retrain_quantized

log = logging.getLogger(__name__)

_DYNAMO_MIN_OPSET = 18  # below it, the legacy exporter writes the input's own opset
_BATCHES = 8  # the training share of the inputs, cut into this many calibration batches
_CONVERSION_ATOL = 1e-4  # of the output scale: onnx2torch must compute what the file does
_FLOATS = frozenset({"FLOAT", "FLOAT16", "BFLOAT16", "DOUBLE"})


@dataclass
class DistillResult:
    """What ``distill_onnx`` did: the retraining history, the export, and the written
    file against the original in onnxruntime on the held-out inputs."""

    input: Path
    output: Path
    retrain: Any  # lfpass.train.RetrainResult
    export: Any  # lfpass.bridge.export.ExportResult
    validation: Validation
    bytes_before: int
    bytes_after: int
    error: float | None = None  # the written file's error on the held-out inputs, under a budget
    max_error: float | None = None
    error_metric: str = "cosine"
    quantized: Any = None  # lfpass.onnx.quantize.QuantReport: what --quantize did to the export
    qat: Any = None  # lfpass.train.qat.QatResult: the quantization-aware retraining before it

    @property
    def within_budget(self) -> bool:
        return self.max_error is None or self.error is None or self.error <= self.max_error

    @property
    def ratio(self) -> float:
        return self.retrain.ratio

    def to_dict(self) -> dict[str, Any]:
        return {"input": str(self.input), "output": str(self.output), "ratio": self.ratio,
                "bytes_before": self.bytes_before, "bytes_after": self.bytes_after,
                "bytes_ratio": self.bytes_before / max(self.bytes_after, 1),
                "retrain": self.retrain.to_dict(), "export": self.export.to_dict(),
                "against_original": self.validation.to_dict(), "error": self.error, "max_error": self.max_error,
                "error_metric": self.error_metric, "quantized": self.quantized.to_dict() if self.quantized else None,
                "qat": {"quality_rounded": self.qat.quality_rounded, "quality": self.qat.quality,
                        "steps": self.qat.stats.steps, "kept": self.qat.kept} if self.qat else None}


def _samples(feed: Mapping[str, np.ndarray], names: list[str], path: Path | str) -> tuple[torch.Tensor, ...]:
    tensors = tuple(torch.from_numpy(np.ascontiguousarray(feed[n])) for n in names)
    counts = {t.shape[0] if t.dim() else 0 for t in tensors}
    if len(counts) != 1 or counts.pop() < 2:
        raise InputError(f"{path}: distillation needs two or more samples along the first axis of every input")
    return tensors


def _check_conversion(module: torch.nn.Module, path: Path, names: list[str], samples: tuple[torch.Tensor, ...]) -> None:
    """The converted module computes what the file does (on the first few samples)."""
    head = tuple(t[:4] for t in samples)
    expected = run(path, [dict(zip(names, (t.numpy() for t in head)))])[0]
    with torch.no_grad():
        got = module(*head)
    got = [got] if torch.is_tensor(got) else list(got)
    for (name, want), have in zip(expected.items(), got):
        error = float(np.max(np.abs(have.numpy() - want))) if want.size else 0.0
        if error > _CONVERSION_ATOL * max(1.0, float(np.max(np.abs(want))) if want.size else 1.0):
            raise InputError(f"{path}: its PyTorch conversion differs from the file on output {name!r} "
                             f"(max abs {error:.3g}); it cannot be retrained here")


def _dynamic_axes(model) -> tuple[dict[int, str], ...] | None:
    """The input's open dimensions, per input ``{axis: name}`` (the export keeps them: a
    distilled file takes any batch the original took), or None when every size is fixed."""
    axes = []
    for i, v in enumerate(onnx_inputs.runtime_inputs(model)):
        dims = list(v.shape.dims) if v.shape is not None else []
        axes.append({a: (str(getattr(d, "value", "") or "") or f"{v.name}_{a}")
                     for a, d in enumerate(dims) if not isinstance(d, int)})
    return tuple(axes) if any(axes) else None


def distill_onnx(path: str | Path, output: str | Path, inputs: Any, config: FusionConfig, schedule: Any, *,
                 eval_fraction: float = 0.1, checkpoint_dir: str | Path | None = None, resume: bool = False,
                 progress: bool = False, reads: Mapping[str, Path | None] | None = None,
                 writes: Mapping[str, Path | None] | None = None) -> DistillResult:
    """Fuse the ONNX model at ``path`` to ``config.target_ratio`` with ``schedule``
    (a :class:`lfpass.train.Schedule`), distilling from the original on the samples
    of the ``.npz`` ``inputs`` (first axis; ``eval_fraction`` held out), and write
    the result to ``output``. The input file is only read."""
    from lfpass.bridge.to_torch import to_torch
    from lfpass.fx.sites import unique_parameters
    from lfpass.train import Distillation, RetrainResult, retrain
    from lfpass.train.distil import masked_mean

    path, output = Path(path), Path(output)
    inputs = Path(inputs) if onnx_inputs.source_path(inputs) is not None else inputs  # or arrays made already
    given, config = config, config.resolved(schedule.stages == 1)  # auto: data-aware where the run fuses once
    once = config.keeps_function or (given.actions != AUTO and given.uses_menu(True))  # fuses once, calibrated
    if once and schedule.stages != 1:
        raise ConfigError(f"data-aware options ({DATA_OPTIONS}, align, residual_rank, actions) fuse once, "
                          f"calibrated on the inputs, then distil: pass --stages 1, or drop them for the "
                          f"{schedule.stages}-stage schedule by weight similarity")
    if once and (checkpoint_dir is not None or resume):
        raise ConfigError("--checkpoint-dir and --resume checkpoint the stages of the staged schedule; a "
                          "data-aware run fuses once and retrains once: drop them")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("distilling an ONNX file runs in one process; under torchrun, retrain a PyTorch model")
    check_input_file(path)
    check_paths({"the input model": path, "--distill": onnx_inputs.source_path(inputs), **(reads or {})},
                {"the output": output, **(writes or {})})
    model = read_model(path)[0]
    data_files = list(external_files(model).values())
    check_paths({f"the input's data file {i}": d for i, d in enumerate(data_files)}, {"the output": output})
    names = [v.name for v in onnx_inputs.runtime_inputs(model)]
    outputs = [v.name for v in model.graph.outputs]
    opset, dynamic = model.opset_imports.get("", None), _dynamic_axes(model)
    samples = _samples(onnx_inputs.load_npz(inputs, model)[0], names, getattr(inputs, "origin", inputs))
    scores = score_outputs(model)
    del model
    module = to_torch(path)
    _check_conversion(module, path, names, samples)
    pool = masked_mean(names.index(MASK_INPUT)) if config.pooling == "mean" and MASK_INPUT in names else None
    task = Distillation.from_model(module, samples, eval_fraction=eval_fraction, seed=schedule.seed, pool=pool)
    if config.target_ratio == 1.0 and config.max_error is None and config.threshold is None:  # nothing to fuse
        result = RetrainResult(module, [], [], task.evaluate(module), unique_parameters(module))
    elif once:
        result = _fuse_then_retrain(module, task, given, schedule, progress)  # "auto" chosen by measurement
    else:
        result = retrain(module, task, config, schedule, checkpoint_dir=checkpoint_dir, resume=resume,
                         progress=progress)
    qat, before = None, None
    if config.quantize in WEIGHT_ONLY:  # the weights retrained onto the grid the quantizer writes
        before = {n: p.detach().clone() for n, p in result.model.named_parameters()}
        qat = retrain_quantized(result.model, weight_grids(result.model, config.quantize), task, schedule,
                                progress=progress)
        log.info("%s", qat.summary())
    held_out = task.eval_inputs
    legacy = opset is not None and opset < _DYNAMO_MIN_OPSET
    target = output if config.quantize == "none" else output.with_name(f".{output.name}.float.onnx")
    try:
        exported = None
        if before is not None and not result.plans:  # nothing fused: the input's own graph takes the weights
            exported = _written_back(path, target, result.model, before, tuple(held_out), names)
        if exported is None:
            exported = _exported(result.model, held_out, target, names, outputs, opset, dynamic, legacy)
        quantized = None if target == output else _quantize_export(target, output, config.quantize)
    finally:
        if target != output:
            for leftover in (target, *target.parent.glob(f"{glob.escape(target.name)}*.data")):
                leftover.unlink(missing_ok=True)
    if quantized is not None:  # what was checked against PyTorch is the float export; the file is this
        exported = replace(exported, path=output,
                           bytes=disk_bytes(output, list(external_files(read_model(output)[0]).values())))
    feeds = [dict(zip(names, (t.numpy() for t in held_out)))]
    validation = compare(run(path, feeds), run(output, feeds), config.atol, config.rtol, scores)
    error = None
    if config.max_error is not None:  # the budget, judged on the written file
        readout = Readout.of(config)
        error = output_error(onnx_outputs(path, feeds, readout), onnx_outputs(output, feeds, readout),
                             config.error_metric)
    log.info("distilled %s -> %s: ratio %.3f", path, output, result.ratio)
    return DistillResult(path, output, result, exported, validation, disk_bytes(path, data_files),
                         exported.bytes, error, config.max_error, config.error_metric, quantized, qat)


def _exported(model: torch.nn.Module, held_out: Any, target: Path, names: list[str], outputs: list[str],
              opset: int | None, dynamic: Any, legacy: bool) -> Any:
    """``model`` exported to ``target`` (the legacy exporter below opset 18, falling back to dynamo)."""
    from lfpass.bridge.export import export

    try:
        return export(model, tuple(held_out), target, input_names=names, output_names=outputs, opset=opset,
                      dynamic_shapes=dynamic, dynamo=not legacy)
    except TraceError as exc:
        if not legacy:
            raise
        log.warning("the legacy exporter cannot keep opset %d (%s); exporting with the dynamo exporter", opset, exc)
        return export(model, tuple(held_out), target, input_names=names, output_names=outputs, dynamic_shapes=dynamic)


def _written_back(path: Path, target: Path, module: torch.nn.Module, before: Mapping[str, torch.Tensor],
                  held_out: tuple[torch.Tensor, ...], names: list[str]) -> Any:
    """The input file with ``module``'s retrained parameters (weights, biases, norms) written into the
    initializers they came from (found by their values before retraining, a matrix in either
    orientation), saved to ``target``: its
    graph, open dimensions and metadata stay the input's. Checked in onnxruntime against
    ``module`` on ``held_out``; an :class:`lfpass.bridge.export.ExportResult`, or None when a
    retrained tensor is no initializer of the file (a constant the conversion folded)."""
    import onnx_ir as ir

    from lfpass.bridge.export import ExportResult
    from lfpass.onnx.load import read_array
    from lfpass.onnx.rewrite import FreshNames, add_initializer
    from lfpass.onnx.save import needs_external, staged, write

    model = read_model(path)[0]
    ir.external_data.load_to_model(model)
    params = dict(module.named_parameters())
    by_shape: dict[tuple, list[str]] = {}
    for name, value in before.items():
        by_shape.setdefault(tuple(value.shape), []).append(name)
    written, found, names_ = 0, set(), FreshNames(model)
    for init in list(model.graph.initializers.values()):
        if init.const_value is None or init.const_value.dtype.name not in _FLOATS:
            continue
        if init.uses() and all(u.node.op_type == "Gather" and u.idx == 0 for u in init.uses()):
            continue  # an embedding table: a buffer of the conversion, never retrained (a head's copy may be)
        array = read_array(init.const_value)
        for flip in (False, True) if array.ndim == 2 else (False,):
            candidate = torch.from_numpy(np.array(array.T if flip else array, copy=True))
            match = next((n for n in by_shape.get(tuple(candidate.shape), ()) if torch.equal(before[n], candidate)),
                         None)
            if match is not None:
                found.add(match)
                value = params[match].detach().cpu().numpy()
                tensor = ir.tensor(np.ascontiguousarray(value.T if flip else value).astype(array.dtype))
                tables = [u for u in init.uses() if u.node.op_type == "Gather" and u.idx == 0]
                if tables and len(tables) < len(init.uses()):  # a table tied to a head: the head alone trained
                    trained = add_initializer(model.graph, names_.fresh(f"{init.name}.retrained"), tensor)
                    for use in [u for u in init.uses() if u not in tables]:
                        use.node.replace_input_with(use.idx, trained)
                else:
                    tensor.name = init.name
                    init.const_value = tensor
                written += 1
                break
    missing = sorted(set(params) - found)
    if missing:  # a tensor the conversion made (a folded constant): the export writes it instead
        log.info("%d retrained tensors are not initializers of %s (%s, ...): exporting instead", len(missing),
                 path.name, missing[0])
        return None
    with staged(target, needs_external(model)) as where:
        write(model, where, frozenset())
    with torch.no_grad():
        expected = module.eval()(*held_out)
    expected = [expected] if torch.is_tensor(expected) else list(expected)
    got = run(target, [dict(zip(names, (t.numpy() for t in held_out)))])[0]
    max_abs = max(float(np.abs(g - e.detach().numpy()).max()) for g, e in zip(got.values(), expected))
    scale = max(float(np.abs(e.detach().numpy()).max()) for e in expected)
    log.info("wrote %d retrained tensors back into %s's graph", written, path.name)
    if max_abs > 1e-4 * max(scale, 1.0):  # an initializer taken for another one of equal value, say
        log.info("the retrained weights written back into %s's graph compute outputs %.3g away from PyTorch's "
                 "(scale %.3g): exporting instead", path.name, max_abs, scale)
        return None
    return ExportResult(target, f"retrained weights written back into the input's graph ({written} tensors)",
                        model.opset_imports.get("", 0), sum(p.numel() for p in params.values()), 0, 0, 0, 0,
                        disk_bytes(target, list(external_files(read_model(target)[0]).values())), max_abs, scale,
                        max_abs <= 1e-4 * max(scale, 1.0))


def weight_grids(module: torch.nn.Module, mode: str) -> dict[str, Any]:
    """The grids onnxruntime's weight-only quantizer will put ``module``'s weights on once exported:
    each ``torch.matmul`` on a 2-D parameter (a converted ``MatMul``: blocks along its first axis)
    and each ``nn.Linear`` or ``linear`` weight (a ``Gemm``: along its second), 4-bit blocks for
    ``int4`` and 8-bit ones for ``int8-weights``, of the sizes :mod:`lfpass.onnx.quantize` picks
    for these depths; under ``int4`` embedding tables too, on the 4-bit quantizer's ``Gather``
    grid (the same blocks along each row). Other weights (convolutions, 8-bit tables) are
    rounded after export without retraining."""
    from torch import fx

    from lfpass.onnx.quantize import BLOCK, BLOCK8, block_size_for
    from lfpass.train.qat import Grid

    params = dict(module.named_parameters(remove_duplicate=False))
    axes: dict[str, int] = {}
    nodes = module.graph.nodes if isinstance(module, fx.GraphModule) else []
    for node in nodes:
        if node.op == "call_function" and node.target in (torch.matmul, torch.nn.functional.linear):
            weight = node.args[1] if len(node.args) > 1 else None
            if isinstance(weight, fx.Node) and weight.op == "get_attr" and weight.target in params:
                axes[weight.target] = 0 if node.target is torch.matmul else 1
    for name, sub in module.named_modules(remove_duplicate=False):
        if isinstance(sub, torch.nn.Linear):
            axes[f"{name}.weight" if name else "weight"] = 1
    axes = {n: a for n, a in axes.items() if params[n].dim() == 2 and params[n].is_floating_point()}
    depths = [params[n].shape[a] for n, a in axes.items()]
    bits, block = (4, block_size_for(BLOCK, depths)) if mode == "int4" else (8, block_size_for(BLOCK8, depths))
    grids = {n: Grid(bits, block, a) for n, a in axes.items()}
    if mode == "int4":  # 4-bit tables: blocks of the same size along each row (int8-weights: per row, not blocks)
        grids.update({name: Grid(4, block, 1) for name in _tables(module) if name not in grids})
    return grids


def _tables(module: torch.nn.Module) -> list[str]:
    """The embedding tables of ``module`` (2-D floating-point tensors a lookup reads rows of): an
    ``nn.Embedding``'s weight, or the constant an ONNX ``Gather`` on axis 0 reads (onnx2torch keeps
    it as a buffer: not trained, but rounded while the rest retrains, so the rest learns around it)."""
    from torch import fx

    names = [f"{name}.weight" for name, sub in module.named_modules() if isinstance(sub, torch.nn.Embedding)]
    nodes = module.graph.nodes if isinstance(module, fx.GraphModule) else []
    held = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    for node in nodes:
        if node.op != "call_module" or type(module.get_submodule(node.target)).__name__ != "OnnxGather":
            continue
        table = node.args[0] if node.args else None
        if getattr(module.get_submodule(node.target), "_axis", 0) != 0 or not isinstance(table, fx.Node) \
                or table.op != "get_attr":
            continue
        tensor = held.get(table.target)
        if tensor is not None and tensor.dim() == 2 and tensor.is_floating_point():
            names.append(table.target)
    return names


def _quantize_export(source: Path, output: Path, mode: str) -> Any:
    """The exported float file at ``source`` quantized to ``mode`` (every weight the tools take),
    written to ``output``; the report."""
    import onnx_ir as ir

    from lfpass.onnx.quantize import quantize
    from lfpass.onnx.save import needs_external, staged, write

    model = ir.load(source)
    quantized, report = quantize(model, mode)
    with staged(output, needs_external(quantized)) as where:
        write(quantized, where, frozenset())
    return report


def _fuse_then_retrain(module: torch.nn.Module, task: Any, config: FusionConfig, schedule: Any, progress: bool):
    """The keep-function pipeline on the conversion, calibrated on the training share of the
    inputs (what ``optimize --inputs`` would fuse: the plan menu, the budget), then retrained
    with the ties kept, distilling from the original."""
    from lfpass.train import retrain

    inputs = task.train_inputs
    n = inputs[0].shape[0]
    batches = [tuple(t[idx] for t in inputs) for idx in np.array_split(np.arange(n), min(_BATCHES, n))]
    return retrain(module, task, config, schedule, calibration=batches, output_fn=readout_fn(Readout.of(config)),
                   progress=progress)
