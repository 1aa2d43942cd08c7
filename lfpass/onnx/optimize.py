"""``analyze_onnx`` and ``optimize``: the ONNX frontend end to end, callable from a toolchain.

``optimize`` loads a model (external data left on disk), finds its sites,
plans with the shared planner (or takes a plan), rewrites the graph so each
group reads one merged initializer, writes the result atomically, and checks
it against the original in onnxruntime. The input file is only ever read.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from lfpass.config import FusionConfig
from lfpass.errors import OutputError, ValidationFailed
from lfpass.onnx import inputs as onnx_inputs
from lfpass.onnx.load import check_input_file, count_params, disk_bytes, external_files, read_model
from lfpass.onnx.rewrite import apply_plan
from lfpass.onnx.save import check_output, needs_external, staged, write
from lfpass.onnx.sites import OnnxSites, find_sites
from lfpass.onnx.validate import Validation, score_outputs, validate
from lfpass.plan import FusionPlan, check_plan
from lfpass.planner import plan_fusion

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
            "message": self.message,
            "skipped": self.skipped,
            "seconds": self.seconds,
            "plan_groups": [
                {"members": list(g.members), "rule": g.rule, "score": g.score, "numel": g.numel}
                for g in self.plan.groups
            ],
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


def _plan(found: OnnxSites, config: FusionConfig, params: int, plan: FusionPlan | None, progress: bool) -> FusionPlan:
    if plan is not None:
        check_plan(plan, found.by_name())
        return plan
    return plan_fusion(found.sites, found.load, config, params, progress=progress)


def analyze_onnx(path: Path, config: FusionConfig, progress: bool = False) -> FusionPlan:
    """Plan layer fusion for the ONNX model at ``path``; reads the file, writes nothing.

    Layers skipped because their weight is not constant (a graph input, say)
    are named in the plan's ``message``."""
    model = read_model(path)[0]
    found = find_sites(model)
    plan = plan_fusion(found.sites, found.load, config, count_params(model), progress=progress)
    return _with_note(plan, _skip_note(found.skipped))


def _nothing(plan: FusionPlan, found: OnnxSites) -> str:
    if not plan.classes:
        return f"nothing to fuse: no two of the {len(found.sites)} layers share a role and signature"
    if plan.threshold is not None:
        return f"nothing to fuse: no pair of layers is at least {plan.threshold:g} similar ({plan.metric})"
    return "nothing to fuse: the plan has no groups"


def _predicted_bytes(found: OnnxSites, plan: FusionPlan) -> int:
    sites = found.by_name()
    return sum(found.tensor(t).nbytes for g in plan.groups for m in g.members[1:] for t in sites[m].tensors)


def optimize(
    path: str | Path,
    output: str | Path | None = None,
    config: FusionConfig | None = None,
    plan: FusionPlan | None = None,
    *,
    dry_run: bool = False,
    check: bool = True,
    strict: bool = False,
    inputs: str | Path | None = None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    samples: int = 2,
    external_data: bool | None = None,
    progress: bool = False,
) -> OptimizeResult:
    """Fuse the model at ``path`` into ``output`` (default ``NAME.fused.onnx``).

    ``plan`` (e.g. from ``analyze --plan-out``) replaces planning with
    ``config``; ``config``'s atol/rtol still judge validation. With
    ``check``, both models run in onnxruntime on ``inputs`` (an ``.npz``) or
    on ``samples`` generated feeds; a failure is marked in the result, or
    raises :class:`ValidationFailed` (and nothing is written) when ``strict``.
    ``external_data`` forces (or forbids) an external data file; by default
    the output keeps the input's form, and goes external past 2 GB.
    Nothing is written when nothing can be fused, or under ``dry_run``.
    """
    config = config or FusionConfig()
    path = Path(path)
    output = Path(output) if output is not None else default_output(path)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    check_input_file(path)
    if not dry_run:
        check_output(output, [path])
    model, value_info = read_model(path)
    data_files = list(external_files(model).values())
    if not dry_run:
        check_output(output, [path, *data_files])
    found = find_sites(model)
    params_before = count_params(model)
    bytes_before = disk_bytes(path, data_files)
    seconds["load"] = time.perf_counter() - clock

    clock = time.perf_counter()
    plan = _plan(found, config, params_before, plan, progress)
    message = plan.message if plan.groups else _nothing(plan, found)
    plan = _with_note(plan, _skip_note(found.skipped))
    seconds["plan"] = time.perf_counter() - clock
    result = OptimizeResult(path, None, plan, params_before, plan.params_after, bytes_before,
                            bytes_before - _predicted_bytes(found, plan), skipped=list(found.skipped),
                            dry_run=dry_run, message=message, seconds=seconds)
    if not plan.groups:
        return result
    if dry_run:
        return result

    feeds = []
    if check:
        feeds = (onnx_inputs.load_npz(inputs, model) if inputs is not None
                 else onnx_inputs.generate(model, input_shapes, samples=samples, seed=config.seed))
    scores = score_outputs(model)
    clock = time.perf_counter()
    apply_plan(model, found, plan)
    result.params_after = count_params(model)
    seconds["rewrite"] = time.perf_counter() - clock
    external = external_data if external_data is not None else bool(data_files) or needs_external(model)
    if not external and needs_external(model):
        raise OutputError(f"{output}: the tensors exceed protobuf's 2 GB limit; write them as external data")
    clock = time.perf_counter()
    with staged(output, external) as where:
        write(model, where, value_info)
        del model, found  # onnxruntime loads the files; free the graph before it does
        seconds["write"] = time.perf_counter() - clock
        result.bytes_after = disk_bytes(where.model, [where.data] if where.data else [])
        if check:
            _check(result, where.model, output, feeds, scores, config, strict, progress)
    result.output = output
    log.info("wrote %s: %d -> %d params, %d -> %d bytes", output, params_before, result.params_after,
             bytes_before, result.bytes_after)
    return result


def _check(result: OptimizeResult, staged_model: Path, output: Path, feeds, scores: set[str], config: FusionConfig,
           strict: bool, progress: bool) -> None:
    """Compare the written model with the input in onnxruntime; under ``strict`` a
    failure raises, so the staged files are dropped and nothing is written."""
    result.validation = validate(result.input, staged_model, feeds, config.atol, config.rtol, scores,
                                 progress=progress, fused_label=str(output))
    result.seconds["validate"] = result.validation.seconds
    if strict and not result.validation.passed:
        raise ValidationFailed(f"{output}: validation failed, nothing written ({result.validation.summary()})", result)
