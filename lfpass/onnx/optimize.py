"""``analyze_onnx`` and ``optimize``: the ONNX frontend end to end, callable from a toolchain.

``optimize`` loads a model (external data left on disk), finds its sites,
plans with the shared planner (or takes a plan), rewrites the graph so each
group reads one merged initializer, writes the result atomically, and checks
it against the original in onnxruntime. The input file is only ever read.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from lfpass.core.config import FusionConfig, from_mapping, load_pipeline
from lfpass.core.errors import ConfigError, InputError, OutputError, PlanError, ValidationFailed, first_line
from lfpass.core.fileio import check_paths
from lfpass.core.plan import FusionPlan
from lfpass.onnx import inputs as onnx_inputs
from lfpass.onnx.fusion_pass import LayerFusionPass
from lfpass.onnx.load import check_input_file, count_params, disk_bytes, external_files, read_model
from lfpass.onnx.quantize import QuantizeError, QuantReport, quantize_within, refusal
from lfpass.onnx.quantize import quantize as quantize_model
from lfpass.onnx.prepack import hold_shared_once
from lfpass.onnx.tied import lay_out_tables
from lfpass.onnx.save import DataFile, needs_external, staged, write
from lfpass.onnx.sites import OnnxSites, find_sites
from lfpass.onnx.validate import Validation, score_outputs, validate

if TYPE_CHECKING:
    from lfpass.core.keep import Kept

log = logging.getLogger(__name__)

_SHOWN_SKIPS = 5


@dataclass
class OptimizeResult:
    """What ``optimize`` did: figures measured on the files (predicted under ``dry_run``)."""

    input: Path
    output: Path | None
    plan: FusionPlan
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    validation: Validation | None = None
    skipped: list[str] = field(default_factory=list)
    dry_run: bool = False
    message: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    error: float | None = None  # output error of the written model on held-out calibration inputs
    defaults: dict[str, str] = field(default_factory=dict)  # options left to "auto", and what they became
    quantized: QuantReport | None = None  # what --quantize did

    @property
    def merge(self) -> str | None:
        """The merge rule the groups used (None without groups)."""
        rules = sorted({g.rule for g in self.plan.groups})
        return ", ".join(rules) if rules else None

    @property
    def within_budget(self) -> bool:
        """No budget, or the written model's held-out error keeps it."""
        return self.plan.max_error is None or self.error is None or self.error <= self.plan.max_error

    @property
    def ratio(self) -> float:
        return self.params_before / max(self.params_after, 1)

    @property
    def bytes_ratio(self) -> float:
        return self.bytes_before / max(self.bytes_after, 1)

    @property
    def written(self) -> bool:
        return self.output is not None

    def to_dict(self) -> dict:
        return {
            "input": str(self.input),
            "output": str(self.output) if self.output else None,
            "written": self.written,
            "dry_run": self.dry_run,
            "ratio": self.ratio,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "bytes_ratio": self.bytes_ratio,
            "groups": len(self.plan.groups),
            "predicted_ratio": self.plan.model_ratio,
            "layer_ratio": self.plan.layer_ratio,
            "max_ratio": self.plan.max_ratio,
            "scope": self.plan.scope,
            "target_ratio": self.plan.target_ratio,
            "threshold": self.plan.threshold,
            "metric": self.plan.metric,
            "validation": self.validation.to_dict() if self.validation else None,
            "error": self.error,
            "error_metric": self.plan.error_metric,
            "max_error": self.plan.max_error,
            "merge": self.merge,
            "align": self.plan.align,
            "residual_rank": self.plan.residual_rank,
            "defaults": self.defaults,
            "error_curve": [list(p) for p in self.plan.curve],
            "message": self.message,
            "skipped": self.skipped,
            "seconds": self.seconds,
            "plan_groups": [
                {"members": list(g.members), "rule": g.rule, "score": g.score, "numel": g.numel,
                 "extra": g.extra, "damage": g.damage, "rank": g.rank}
                for g in self.plan.groups
            ],
            "plan_factors": [
                {"action": f.action, "members": list(f.members), "rank": f.rank, "saved": f.saved,
                 "damage": f.damage}
                for f in self.plan.factors
            ],
            "choices": [list(c) for c in self.plan.choices],
            "quantized": self.quantized.to_dict() if self.quantized else None,
        }


def default_output(path: Path) -> Path:
    """``model.onnx`` -> ``model.fused.onnx``."""
    stem = path.name[: -len(".onnx")] if path.name.endswith(".onnx") else path.name
    return path.with_name(f"{stem}.fused.onnx")


def _skip_note(skipped: Sequence[str]) -> str:
    if not skipped:
        return ""
    shown = "; ".join(skipped[:_SHOWN_SKIPS])
    if len(skipped) > _SHOWN_SKIPS:
        shown += f"; and {len(skipped) - _SHOWN_SKIPS} more"
    return f"skipped {len(skipped)} layer(s) whose weight is not a constant lfpass may share: {shown}"


def _with_note(plan: FusionPlan, note: str) -> FusionPlan:
    return replace(plan, message="\n".join(m for m in (plan.message, note) if m)) if note else plan


def analyze_onnx(path: str | Path, config: FusionConfig | Mapping[str, Any] | str | Path | None = None,
                 progress: bool = False, writes: Mapping[str, Path | None] | None = None) -> FusionPlan:
    """Plan layer fusion for the ONNX model at ``path``; reads the file, writes nothing.

    Layers skipped because their weight is not constant (a graph input, say)
    are named in the plan's ``message``. ``writes`` (files the caller will
    write) are checked against the model and its data files first."""
    config, path = as_config(config), Path(path)
    check_input_file(path)
    check_paths({"the input model": path}, writes or {})
    model = read_model(path)[0]
    data_files = external_files(model).values()
    check_paths({f"the input's data file {i}": d for i, d in enumerate(data_files)}, writes or {})
    fusion = LayerFusionPass(config, progress=progress)
    plan = fusion.plan_for(model)
    return _with_note(plan, _skip_note(fusion.sites.skipped))


def _nothing(plan: FusionPlan, found: OnnxSites) -> str:
    if not plan.classes:
        return f"nothing to fuse: no two of the {len(found.sites)} layers share a role and signature"
    if plan.threshold is not None:
        return f"nothing to fuse: no pair of layers is at least {plan.threshold:g} similar ({plan.metric})"
    return "nothing to fuse: the plan has no groups"


def _predicted_bytes(found: OnnxSites, plan: FusionPlan) -> int:
    sites = found.by_name()
    return sum(found.tensor(t).nbytes for g in plan.groups for m in g.members[1:] for t in sites[m].tensors)


def as_config(config: FusionConfig | Mapping[str, Any] | str | Path | None) -> FusionConfig:
    """A config given as an object, a mapping of its fields, or a ``passes/*.toml`` path."""
    if config is None:
        return FusionConfig()
    if isinstance(config, FusionConfig):
        return config
    if isinstance(config, Mapping):
        return from_mapping(config)
    if isinstance(config, (str, Path)):
        return load_pipeline(config)
    raise ConfigError(f"config: expected a FusionConfig, a mapping or a pipeline path, got {type(config).__name__}")


def as_plan(plan: FusionPlan | str | Path | None) -> FusionPlan | None:
    """A plan given as an object or as the path of its JSON (``analyze --plan-out``)."""
    if plan is None or isinstance(plan, FusionPlan):
        return plan
    if isinstance(plan, (str, Path)):
        return read_plan(Path(plan))
    raise PlanError(f"plan: expected a FusionPlan or the path of a plan file, got {type(plan).__name__}")


def read_plan(path: Path) -> FusionPlan:
    try:
        return FusionPlan.from_json(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such plan file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, not a plan file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the plan ({first_line(exc)})") from None


def optimize(
    path: str | Path,
    output: str | Path | None = None,
    config: FusionConfig | Mapping[str, Any] | str | Path | None = None,
    plan: FusionPlan | str | Path | None = None,
    *,
    dry_run: bool = False,
    check: bool = True,
    strict: bool = False,
    inputs: str | Path | Mapping[str, Any] | Iterable[Any] | None = None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    samples: int = 2,
    external_data: bool | None = None,
    progress: bool = False,
    reads: Mapping[str, Path | None] | None = None,
    writes: Mapping[str, Path | None] | None = None,
    hold_shared_once: bool = False,
) -> OptimizeResult:
    """Fuse the model at ``path`` into ``output`` (default ``NAME.fused.onnx``).

    ``config`` is a :class:`FusionConfig`, a mapping of its fields or a
    pipeline path; ``plan`` (a plan or its JSON path, from ``analyze
    --plan-out``) replaces planning; ``config``'s atol/rtol still judge
    validation. With ``check``, both models run in onnxruntime on ``inputs``
    (an ``.npz``; arrays by input name; or batches from Python, a ``DataLoader``'s too) or on
    ``samples`` generated feeds; a failure is marked in the
    result, or raises :class:`ValidationFailed` (and nothing is written) when
    ``strict``. ``external_data`` forces (or forbids) an external data file; by
    default the output keeps the input's form, and goes external past 2 GB.
    ``reads``/``writes`` name other files the caller reads or will write (a
    report, say): before any work, no write may land on a read or on another
    write. Nothing is written when nothing can be fused, or under ``dry_run``.
    """
    given, plan = _given(config, plan)  # "auto" left for the calibrated path to choose by measurement
    config = given.resolved(inputs is not None and plan is None)  # with data: the data-aware merge and alignment
    if inputs is None and config.measuring:
        verb = "says" if len(config.measuring) == 1 else "say"
        raise ConfigError(f"{', '.join(config.measuring)} {verb} how the error on calibration inputs is "
                          "measured: give --inputs CALIB.npz")
    path, output = Path(path), Path(output) if output is not None else default_output(Path(path))
    read_paths = {"the input model": path, "--inputs": onnx_inputs.source_path(inputs), **(reads or {})}
    clock = time.perf_counter()
    model, value_info, data_files = _read(path, read_paths, {"the output": None if dry_run else output,
                                                             **(writes or {})})
    loaded, clock = time.perf_counter() - clock, time.perf_counter()
    if inputs is not None and onnx_inputs.source_path(inputs) is None and not isinstance(inputs, Mapping):
        inputs = onnx_inputs.from_batches(inputs, model)  # read once: batches from a DataLoader are consumed
    if config.quantize != "none" and refusal(model, config.quantize):
        raise QuantizeError(f"{path}: {refusal(model, config.quantize)}")
    result, kept, fusion, static = _plan(path, model, given, config, plan, inputs, data_files, dry_run, progress)
    result.seconds.update(load=loaded, plan=time.perf_counter() - clock)
    _defaults(result, given, inputs is not None and plan is None)
    if (result.plan.empty and config.quantize == "none" and not hold_shared_once) or dry_run:
        return result
    check = check and (kept is None or kept.plan.max_error is None)  # a budget judges by its held-out error
    feeds = _feeds(model, config, check, inputs, input_shapes, samples)
    note = onnx_inputs.random_input_note(model, inputs is None) if check else None
    if note:
        result.message = "\n".join(m for m in (result.message, note) if m)
    scores = score_outputs(model)
    keep = [p for p in (*read_paths.values(), *data_files) if p is not None]
    calibration = _calibration(model, config, inputs) if static is not False else None  # dynamic measured better
    with contextlib.ExitStack() as stack:
        where = _rewrite(result, model, value_info, kept, fusion, output, keep, external_data, data_files, stack,
                         config.quantize, calibration, hold_shared_once)
        del model, fusion  # onnxruntime loads the files: free the graph before it does
        if check:
            _check(result, where.model, output, feeds, scores, config, strict, progress)
        if kept is not None:
            _check_error(result, kept, where.model, output, strict)
    result.output = output
    log.info("wrote %s: %d -> %d params, %d -> %d bytes", output, result.params_before, result.params_after,
             result.bytes_before, result.bytes_after)
    return result


_PLANNING = ("metric", "merge", "target_ratio", "threshold", "ratio_scope", "cross_role", "max_group_size",
             "max_overshoot", "granularity", "heads", "max_error", "align", "residual_rank", "kinds", "include",
             "exclude", "min_params", "margin", "actions")



def _given(config: Any, plan: Any) -> tuple[FusionConfig, FusionPlan | None]:
    """The config and plan as given; a plan replaces planning, so options that would have
    changed it are refused, never dropped."""
    config, plan = as_config(config), as_plan(plan)
    if plan is not None:
        default = FusionConfig()
        changed = [f for f in _PLANNING if getattr(config, f) != getattr(default, f)]
        if changed:
            raise ConfigError(f"--plan replaces planning, so {', '.join(changed)} would be ignored: drop them, or "
                              "make a new plan with them (lfpass analyze --plan-out)")
    return config, plan


_OFF = {"merge": "--merge mean", "align": "--align none", "actions": "--actions tie"}  # what turns each auto off


def _defaults(result: OptimizeResult, given: FusionConfig, has_data: bool) -> None:
    """Say which options were left to "auto" and what the plan made of them."""
    plan = result.plan
    became = {"merge": result.merge or given.resolved(has_data).merge_rule, "align": plan.align,
              "actions": ",".join(given.menu(has_data))}
    result.defaults = {k: became[k] for k in given.auto_fields}
    if result.defaults and (plan.keeps_function or given.uses_menu(has_data)) and not given.collapses:
        chosen = ", ".join(f"{k} {v}" for k, v in result.defaults.items())
        off = " ".join(_OFF[k] for k in result.defaults)
        verb = "turns it off" if len(result.defaults) == 1 else "turn them off"
        result.message = "\n".join(m for m in (result.message, f"with calibration inputs, by default: {chosen} "
                                                f"({off} {verb})") if m)


def _read(path: Path, read_paths: Mapping[str, Path | None],
          write_paths: Mapping[str, Path | None]) -> tuple[ir.Model, Any, list[Path]]:
    """The model, its value infos and its data files, once no write lands on a read."""
    check_input_file(path)
    check_paths(read_paths, write_paths)
    model, value_info = read_model(path)
    data_files = list(external_files(model).values())
    check_paths({f"the input's data file {i}": d for i, d in enumerate(data_files)}, write_paths)
    return model, value_info, data_files


def _plan(path: Path, model: ir.Model, given: FusionConfig, config: FusionConfig, plan: FusionPlan | None,
          inputs: Any, data_files: list[Path], dry_run: bool,
          progress: bool) -> tuple[OptimizeResult, Kept | None, LayerFusionPass | None, bool | None]:
    """The plan and its predicted figures: built already when it keeps the function (lossy by
    design, measured on held-out calibration inputs; ``given``, "auto" fields and all, goes to
    the calibrated path, which chooses them by measurement), else the fusion pass that will
    apply it (``config``: "auto" resolved). The fourth value: with int8 quantization and
    calibration inputs, whether static quantization measured better than dynamic (None: not chosen)."""
    static = None
    if config.keeps_function or (plan is not None and plan.keeps_function):
        from lfpass.onnx.frontend import fuse_keeping_onnx  # the calibrated path, imported when taken

        feed = onnx_inputs.load_npz(inputs, model, allow=(onnx_inputs.LABELS,))[0] if inputs is not None else None
        found = find_sites(model)
        reserve = None
        if config.quantize != "none" and config.max_error is not None and feed is not None and plan is None:
            reserve, static, how = _quantization_error(model, given, feed)  # what fusion leaves to quantization
            given = given.replace(max_error=max(config.max_error - reserve, 0.0))
        elif config.quantize == "int8" and feed is not None and not dry_run:  # no budget: still the better int8
            _, static, how = _quantization_error(model, given, feed)
        kept = fuse_keeping_onnx(model, given, feed, plan, progress)
        if static is not None and reserve is None:
            kept.plan = replace(kept.plan, message=f"{kept.plan.message}; int8 measured on the inputs the planner "
                                f"chooses on{how}")
        if reserve is not None:
            kept.plan = replace(kept.plan, max_error=config.max_error, message=f"{kept.plan.message}; fusion planned "
                                f"within {given.max_error:.4g}: the original quantized to {config.quantize} alone "
                                f"measured {reserve:.4g} on the inputs the planner chooses on{how}")
        return _planned(path, found, data_files, kept.plan, dry_run), kept, None, static
    fusion = LayerFusionPass(config, plan, progress=progress)
    plan = fusion.plan_for(model)
    return _planned(path, fusion.sites, data_files, plan, dry_run), None, fusion, static


def _quantization_error(model: ir.Model, config: FusionConfig, feed: onnx_inputs.Feeds) -> tuple[float, bool, str]:
    """The error (with the budget's margin) of the original model quantized to ``config.quantize``
    alone, on the share of ``feed`` the planner will choose on; for int8, static (calibrated on
    the statistics' share) and dynamic are both measured and the better kept. Returns the error,
    whether static, and what was chosen, in words."""
    from lfpass.core.keep import split_three
    from lfpass.core.quality import Readout, sample_errors, upper_bound
    from lfpass.onnx.frontend import OnnxFrontend, copy_model, split_feed

    feed = dict(feed)
    labels = feed.pop(onnx_inputs.LABELS, None)
    batches = split_feed(feed, model)
    calib, choose, _ = split_three(batches, config.holdout)
    start = sum(len(next(iter(b.values()))) for b in calib)
    cut = [labels[start:start + sum(len(next(iter(b.values()))) for b in choose)]] if labels is not None else None
    frontend = OnnxFrontend(model, Readout.of(config))
    reference = [np.concatenate(frontend.outputs(model, choose))]
    measured = {}
    for static in ((True, False) if config.quantize == "int8" else (False,)):
        quantized, _ = quantize_model(copy_model(model), config.quantize, calib if static else None)
        errors = sample_errors(reference, [np.concatenate(frontend.outputs(quantized, choose))], config.error_metric,
                               cut)
        measured[static] = upper_bound(errors, config.margin)
    static = min(measured, key=lambda k: (measured[k], not k))
    how = "" if len(measured) == 1 else (f" ({'static' if static else 'dynamic'} int8 kept: static "
                                         f"{measured[True]:.4g}, dynamic {measured[False]:.4g})")
    return measured[static], static, how


def _calibration(model: ir.Model, config: FusionConfig, inputs: Any) -> list[onnx_inputs.Feeds] | None:
    """What a static int8 quantization calibrates on: the ``--inputs`` samples in batches (None
    without); under a budget only the statistics' share, so the shares that judge it stay unseen."""
    if config.quantize != "int8" or inputs is None:
        return None
    from lfpass.core.keep import split_three
    from lfpass.onnx.frontend import split_feed

    feed = onnx_inputs.load_npz(inputs, model, allow=(onnx_inputs.LABELS,))[0]
    feed.pop(onnx_inputs.LABELS, None)
    batches = split_feed(feed, model)
    return split_three(batches, config.holdout)[0] if config.max_error is not None else batches


def _rewrite(result: OptimizeResult, model: ir.Model, value_info: Any, kept: Kept | None,
             fusion: LayerFusionPass | None, output: Path, keep: list[Path], external_data: bool | None,
             data_files: list[Path], stack: contextlib.ExitStack, quantize: str = "none",
             calibration: list[onnx_inputs.Feeds] | None = None, hold_shared: bool = False) -> Any:
    """Apply the plan (or take the kept build), quantize it if asked, and write it to a staged
    output; the staged files."""
    # an output that will be external for sure is staged first, and each merged tensor goes
    # into its data file as it is made: one group's tensors in memory at a time
    streamed = kept is None and quantize == "none" and (external_data if external_data is not None
                                                        else bool(data_files))
    where = stack.enter_context(staged(output, True, keep)) if streamed else None
    clock = time.perf_counter()
    if kept is not None:
        model = kept.model
    else:
        assert fusion is not None
        if where is not None:
            fusion.store = DataFile(where)
        fusion(model)
    if quantize == "none":  # quantizing stores a tied table once its own way (lfpass.onnx.tied)
        counted = count_params(model)
        laid_out = lay_out_tables(model)
        if laid_out:
            fewer = counted - count_params(model)
            result.message = "\n".join(m for m in (result.message, f"{len(laid_out)} embedding table(s) stored once, "
                                                    "in their tied head's orientation (onnxruntime held a transposed "
                                                    "copy)" + (f": {fewer} parameters the input stored twice"
                                                               if fewer else "")) if m)
    result.params_after = count_params(model)
    result.seconds["rewrite"] = time.perf_counter() - clock
    if quantize != "none":
        clock = time.perf_counter()
        if kept is not None and kept.chosen_on is not None:  # a budget: it holds for fused and quantized
            model, result.quantized, _ = quantize_within(model, quantize, kept.plan.max_error, kept.chosen_error,
                                                         kept.choose, kept.frontend.readout, calibration)
        else:
            model, result.quantized = quantize_model(model, quantize, calibration)
        result.seconds["quantize"] = time.perf_counter() - clock
        result.message = "\n".join(m for m in (result.message, f"quantized {result.quantized.summary()}") if m)
    if hold_shared:
        marked = hold_shared_once(model)
        result.message = "\n".join(m for m in (result.message, f"{len(marked)} shared tensor(s) declared overridable: "
                                                "onnxruntime holds each once, unpacked") if m)
    if where is None:
        external = external_data if external_data is not None else bool(data_files) or needs_external(model)
        if not external and needs_external(model):
            raise OutputError(f"{output}: the tensors exceed protobuf's 2 GB limit; write them as external data")
        where = stack.enter_context(staged(output, external, keep))
    clock = time.perf_counter()
    write(model, where, value_info)
    result.seconds["write"] = time.perf_counter() - clock
    result.bytes_after = disk_bytes(where.model, [where.data] if where.data else [])
    return where


def _planned(path: Path, found: OnnxSites, data_files: list[Path], plan: FusionPlan, dry_run: bool) -> OptimizeResult:
    """The figures ``plan`` predicts, before anything is rewritten."""
    bytes_before = disk_bytes(path, data_files)
    message = plan.message if not plan.empty else _nothing(plan, found)
    plan = _with_note(plan, _skip_note(found.skipped))
    return OptimizeResult(path, None, plan, plan.params_before, plan.params_after, bytes_before,
                          bytes_before - _predicted_bytes(found, plan), skipped=list(found.skipped),
                          dry_run=dry_run, message=message)


def _feeds(model: ir.Model, config: FusionConfig, check: bool, inputs: Any,
           input_shapes: dict[str, tuple[int, ...]] | None, samples: int) -> list[onnx_inputs.Feeds]:
    """The inputs validation runs on: the ``.npz`` given, else generated (read before the rewrite)."""
    if not check:
        return []
    if inputs is not None:  # calibration inputs may carry labels: not an input of the model
        samples = onnx_inputs.load_npz(inputs, model, allow=(onnx_inputs.LABELS,))
        samples[0].pop(onnx_inputs.LABELS, None)
        return samples
    return onnx_inputs.generate(model, input_shapes, samples=samples, seed=config.seed)


def _check_error(result: OptimizeResult, kept: Kept, staged_model: Path, output: Path, strict: bool) -> None:
    """The written model's error on the held-out calibration inputs, against the budget."""
    result.error = kept.error_of(staged_model)
    if strict and not result.within_budget:
        raise ValidationFailed(f"{output}: held-out error {result.error:.4g} is over the budget "
                               f"{result.plan.max_error:g}, nothing written", result)


def _check(result: OptimizeResult, staged_model: Path, output: Path, feeds, scores: set[str], config: FusionConfig,
           strict: bool, progress: bool) -> None:
    """Compare the written model with the input in onnxruntime; under ``strict`` a
    failure raises, so the staged files are dropped and nothing is written."""
    result.validation = validate(result.input, staged_model, feeds, config.atol, config.rtol, scores,
                                 progress=progress, fused_label=str(output))
    result.seconds["validate"] = result.validation.seconds
    if strict and not result.validation.passed:
        raise ValidationFailed(f"{output}: validation failed, nothing written ({result.validation.summary()})", result)
