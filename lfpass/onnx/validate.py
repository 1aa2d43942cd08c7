"""Does a rewritten model compute what the original does? Run both in onnxruntime and compare.

onnxruntime runs with its graph optimisations off (``ORT_DISABLE_ALL``), as
onnx-simplifier's model checker does, so constant folding or fusions cannot
hide or create a difference. Each model runs alone (one session at a time) to
keep peak memory at one model's worth.

Per output, over every sample, lfpass reports the maximum absolute error
``|a - b|`` (``a`` the candidate, ``b`` the original), the maximum relative
error, the cosine of the flattened outputs and, for outputs that look like
class scores (floating point, at least 2-D, last axis of 2 or more, made by a
``Gemm``/``MatMul``/``Softmax`` or named like logits), how often the top-1
class agrees.

The verdict is polygraphy's elementwise rule: an element fails only when it is
outside *both* tolerances, i.e. it passes when
``|a - b| <= max(atol, rtol * |b|)``; and an output passes only when, besides,
its cosine with the original's is at least ``1 - rtol`` (0.99 at the defaults):
outputs whose values all sit near zero, within ``atol``, pass no longer while
pointing elsewhere (class scores of 1e-4 with cosine 0.22 did). The relative error is defined to match:

    rel = |a - b| / max(|b|, atol / rtol)

so an output passes exactly when its max rel is at most ``rtol``, and a
reference near zero (a sigmoid map's 1e-15) is measured against the floor
``atol / rtol`` (0.1 at the defaults) instead of exploding to 1e15. With
``rtol`` 0 the verdict is absolute and the floor is ``atol``.

Validation never passes on nothing. It fails, with its reason, on: no
samples; an empty input or output (nothing compared); NaN in the original's
outputs (the original produces NaN on these inputs, so they cannot judge the
rewrite); NaN or Inf in the candidate where the original is finite; shapes or
output names that differ. The cosine of such an output is NaN, never 1. When
onnxruntime cannot run the *original* on the inputs, the inputs are blamed:
the ``.npz`` they came from, or the generated shapes (with the
``--input-shape`` to give instead).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from lfpass.core.errors import InputError, first_line
from lfpass.onnx.inputs import Feeds, Samples

log = logging.getLogger(__name__)

_SCORE_OPS = ("Gemm", "MatMul", "Softmax", "LogSoftmax")
_SCORE_NAMES = ("logit", "score", "prob", "class")
_NUMERIC = "biuf"


@dataclass
class OutputStats:
    """Errors of one output over every sample (worst case, except top-1: the mean).

    ``reason`` says why the output failed other than by tolerance (nothing
    compared, NaN, shapes differ); empty when the numbers tell the story."""

    name: str
    max_abs: float = 0.0
    max_rel: float = 0.0
    cosine: float = 1.0
    top1: float | None = None
    passed: bool = True
    reason: str = ""


@dataclass
class Validation:
    passed: bool
    atol: float
    rtol: float
    samples: int
    outputs: list[OutputStats] = field(default_factory=list)
    seconds: float = 0.0
    error: str = ""

    def to_dict(self) -> dict:
        data = asdict(self)
        data["outputs"] = {o["name"]: {k: _json(v) for k, v in o.items() if k != "name"} for o in data["outputs"]}
        return data

    def summary(self) -> str:
        if self.error:
            return f"FAILED: {self.error}"
        verdict = "passed" if self.passed else "FAILED"
        text = f"{verdict} (atol {self.atol:g}, rtol {self.rtol:g}, {self.samples} samples)"
        failed = [o for o in self.outputs if o.reason]
        if failed:
            more = f" (and {len(failed) - 1} more outputs)" if len(failed) > 1 else ""
            return f"{text}: {failed[0].name}: {failed[0].reason}{more}"
        worst = max(self.outputs, key=lambda o: o.max_abs, default=None)
        if worst is not None:
            cosine = min(o.cosine for o in self.outputs)
            text += f": max abs {worst.max_abs:.3g}, max rel {worst.max_rel:.3g}, cosine {cosine:.6f}"
            top = [o.top1 for o in self.outputs if o.top1 is not None]
            if top:
                text += f", top-1 {100 * min(top):.1f}%"
        return text


@dataclass(frozen=True)
class _Diff:
    """One output compared on one sample."""

    max_abs: float
    max_rel: float
    cosine: float
    passed: bool
    reason: str = ""


def _json(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def score_outputs(model: ir.Model) -> set[str]:
    """Names of outputs that look like class scores."""
    names = set()
    for out in model.graph.outputs:
        producer = out.producer()
        by_op = producer is not None and producer.op_type in _SCORE_OPS
        by_name = any(k in (out.name or "").lower() for k in _SCORE_NAMES)
        if by_op or by_name:
            names.add(out.name)
    return names


def run(path: Path, feeds: Sequence[Feeds], bar: tqdm | None = None, label: str = "") -> list[dict[str, np.ndarray]]:
    """``path``'s outputs for each feed, onnxruntime on CPU with graph optimisations off."""
    where = label or path
    return _run(path, feeds, bar, label, lambda detail: InputError(f"{where}: onnxruntime cannot run it ({detail})"))


def _run(path: Path, feeds: Sequence[Feeds], bar: tqdm | None, label: str,
         failure: Callable[[str], Exception]) -> list[dict[str, np.ndarray]]:
    """``run``, raising ``failure(detail)`` when a feed does not run (the caller knows whom to blame)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
        raise InputError(f"{label or path}: onnxruntime cannot load it ({first_line(exc)})") from None
    names = [o.name for o in session.get_outputs()]
    results = []
    for feed in feeds:
        try:
            values = session.run(names, feed)
        except Exception as exc:  # noqa: BLE001
            raise failure(first_line(exc)) from None
        results.append(dict(zip(names, values)))
        if bar is not None:
            bar.update()
    return results


def compare(reference: Sequence[dict[str, np.ndarray]], candidate: Sequence[dict[str, np.ndarray]], atol: float,
            rtol: float, scores: set[str] = frozenset()) -> Validation:
    """Compare two runs output by output (both over the same feeds)."""
    result = Validation(True, atol, rtol, len(reference))
    problem = _mismatch(reference, candidate)
    if problem:
        result.passed, result.error = False, problem
        return result
    stats = {name: OutputStats(name) for name in reference[0]}
    tops: dict[str, list[float]] = {}
    for i, (ref, cand) in enumerate(zip(reference, candidate)):
        for name, s in stats.items():
            a, b = np.asarray(cand[name]), np.asarray(ref[name])
            diff = _diff(a, b, atol, rtol)
            _merge(s, diff, f"sample {i + 1} of {len(reference)}: " if len(reference) > 1 else "")
            if name in scores and not diff.reason and a.dtype.kind == "f" and a.ndim >= 2 and a.shape[-1] >= 2:
                tops.setdefault(name, []).append(float(np.mean(a.argmax(-1) == b.argmax(-1))))
    for name, values in tops.items():
        stats[name].top1 = float(np.mean(values))
    floor = min_cosine(rtol)
    for s in stats.values():
        if s.passed and not s.cosine >= floor:
            s.passed = False
            s.reason = (f"cosine {s.cosine:.4f} is below {floor:g}: every value is within the tolerances, but "
                        "the output points elsewhere (values near zero against atol)")
    result.outputs = list(stats.values())
    result.passed = all(s.passed for s in result.outputs)
    return result


def min_cosine(rtol: float) -> float:
    """The cosine with the original's output a pass also needs: ``1 - rtol`` (0.99 at the
    default), at least 1e-6 below 1."""
    return 1.0 - max(rtol, 1e-6)


def _mismatch(reference: Sequence[dict[str, np.ndarray]], candidate: Sequence[dict[str, np.ndarray]]) -> str:
    """Why the two runs cannot be compared output by output; empty when they can."""
    if not reference:
        return "no samples: nothing was compared"
    if len(reference) != len(candidate):
        return f"the runs cover different samples: {len(reference)} vs {len(candidate)}"
    for ref, cand in zip(reference, candidate):
        if set(ref) != set(cand):
            return f"outputs differ: {sorted(ref)} vs {sorted(cand)}"
    if not reference[0]:
        return "the models have no outputs: nothing was compared"
    return ""


def _merge(stats: OutputStats, diff: _Diff, where: str) -> None:
    """Fold one sample's comparison into an output's worst case."""
    stats.max_abs = max(stats.max_abs, diff.max_abs)
    stats.max_rel = max(stats.max_rel, diff.max_rel)
    stats.cosine = math.nan if math.isnan(stats.cosine) or math.isnan(diff.cosine) else min(stats.cosine, diff.cosine)
    stats.passed &= diff.passed
    if diff.reason and not stats.reason:
        stats.reason = where + diff.reason


def _failed(reason: str) -> _Diff:
    return _Diff(math.inf, math.inf, math.nan, False, reason)


def _diff(a: np.ndarray, b: np.ndarray, atol: float, rtol: float) -> _Diff:
    """Candidate ``a`` against original ``b`` (the module docstring defines the numbers)."""
    if a.shape != b.shape:
        return _failed(f"shapes differ: {a.shape} vs the original's {b.shape}")
    if b.size == 0:
        return _failed(f"nothing compared: the output is empty (shape {b.shape})")
    if a.dtype.kind not in _NUMERIC or b.dtype.kind not in _NUMERIC:
        same = bool(np.array_equal(a, b))
        return _Diff(0.0, 0.0, 1.0, True) if same else _failed("values differ")
    x, y = a.astype(np.float64), b.astype(np.float64)
    problem = _nonfinite(x, y)
    if problem:
        return _failed(problem)
    finite = np.isfinite(y)  # where the original is infinite, the candidate matched it exactly
    x, y = x[finite], y[finite]
    if y.size == 0:
        return _Diff(0.0, 0.0, 1.0, True)
    absdiff, scale = np.abs(x - y), np.abs(y)
    rel = absdiff / np.maximum(scale, _rel_floor(atol, rtol))
    passed = bool(np.all(absdiff <= np.maximum(atol, rtol * scale)))
    return _Diff(float(absdiff.max()), float(rel.max()), _cosine(x, y), passed)


def _nonfinite(x: np.ndarray, y: np.ndarray) -> str:
    """Why NaN/Inf make candidate ``x`` and original ``y`` incomparable; empty when they do not."""
    ref_nan = np.isnan(y)
    if ref_nan.any():
        return (f"the original model produces NaN on these inputs ({int(ref_nan.sum()):,} of {y.size:,} values), "
                f"so they cannot judge the rewrite")
    ref_inf = np.isinf(y)
    bad = ~np.isfinite(x) & ~ref_inf
    if bad.any():
        return f"NaN or Inf where the original is finite ({int(bad.sum()):,} of {y.size:,} values)"
    off = ref_inf & (x != y)
    if off.any():
        return f"differs where the original is infinite ({int(off.sum()):,} of {y.size:,} values)"
    return ""


def _rel_floor(atol: float, rtol: float) -> float:
    """The smallest ``|b|`` a relative error divides by (module docstring)."""
    floor = atol / rtol if rtol > 0 else atol
    return floor if floor > 0 else np.finfo(np.float64).tiny


def _cosine(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x.ravel(), y.ravel()
    nx, ny = np.linalg.norm(x), np.linalg.norm(y)
    if nx == 0 or ny == 0:
        return 1.0 if nx == ny else 0.0
    return float(np.clip(x @ y / (nx * ny), -1.0, 1.0))


def _empty_feeds(feeds: Sequence[Feeds]) -> str:
    """Why ``feeds`` give nothing to compare; empty when they give something."""
    if not feeds:
        return "no samples: nothing to compare"
    for i, feed in enumerate(feeds):
        for name, array in feed.items():
            if np.asarray(array).size == 0:
                where = f" in sample {i + 1}" if len(feeds) > 1 else ""
                return f"input {name} has shape {np.shape(array)}{where}: an empty input gives nothing to compare"
    return ""


def _blame_inputs(feeds: Sequence[Feeds], detail: str) -> InputError:
    """The error when onnxruntime cannot run the original on ``feeds``: the inputs are wrong, not the model."""
    shapes = ", ".join(f"{k}:{'x'.join(map(str, np.shape(v))) or 'scalar'}" for k, v in feeds[0].items())
    origin = feeds.origin if isinstance(feeds, Samples) else ""
    if origin:
        return InputError(f"{origin}: the original model does not run on these inputs ({shapes}): {detail}")
    if isinstance(feeds, Samples):  # generated
        return InputError(f"the generated inputs ({shapes}) do not fit the model: pass --input-shape NAME:DIMxDIM "
                          f"with sizes it accepts (onnxruntime: {detail})")
    return InputError(f"the original model does not run on the given inputs ({shapes}): {detail}")


def validate(original: Path, fused: Path, feeds: Sequence[Feeds], atol: float, rtol: float,
             scores: set[str] = frozenset(), progress: bool = False, fused_label: str = "") -> Validation:
    """Run ``original`` and ``fused`` on ``feeds`` and compare every output.

    Raises :class:`InputError` when the original cannot run on ``feeds``
    (the inputs are at fault); a fused model that cannot run, or nothing to
    compare, is a failed validation."""
    start = time.perf_counter()
    problem = _empty_feeds(feeds)
    if problem:
        return Validation(False, atol, rtol, len(feeds), error=problem)
    with tqdm(total=2 * len(feeds), desc="validation", unit="run", disable=not progress, leave=False, delay=1.0) as bar:
        reference = _run(original, feeds, bar, "", lambda detail: _blame_inputs(feeds, detail))
        try:
            candidate = run(fused, feeds, bar, label=fused_label)
        except InputError as exc:  # the rewrite broke the model: a failed validation, not bad input
            return Validation(False, atol, rtol, len(feeds), error=str(exc), seconds=time.perf_counter() - start)
    result = compare(reference, candidate, atol, rtol, scores)
    result.seconds = time.perf_counter() - start
    log.info("validation %s in %.1fs", "passed" if result.passed else "failed", result.seconds)
    return result
