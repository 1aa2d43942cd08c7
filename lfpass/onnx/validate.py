"""Does a rewritten model compute what the original does? Run both in onnxruntime and compare.

onnxruntime runs with its graph optimisations off (``ORT_DISABLE_ALL``), as
onnx-simplifier's model checker does, so constant folding or fusions cannot
hide or create a difference. Each model runs alone (one session at a time) to
keep peak memory at one model's worth.

The comparison builds on polygraphy's ``SimpleCompareFunc``: per output, the
maximum absolute and relative error, and polygraphy's elementwise verdict (an
element fails only when it is outside *both* ``atol`` and ``rtol``). lfpass
adds the cosine of the flattened outputs and, for outputs that look like
class scores (floating point, at least 2-D, last axis of 2 or more, made by a
``Gemm``/``MatMul``/``Softmax`` or named like logits), how often the top-1
class agrees.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from lfpass.errors import InputError, first_line
from lfpass.onnx.inputs import Feeds

log = logging.getLogger(__name__)

_SCORE_OPS = ("Gemm", "MatMul", "Softmax", "LogSoftmax")
_SCORE_NAMES = ("logit", "score", "prob", "class")


@dataclass
class OutputStats:
    """Errors of one output over every sample (worst case, except top-1: the mean)."""

    name: str
    max_abs: float = 0.0
    max_rel: float = 0.0
    cosine: float = 1.0
    top1: float | None = None
    passed: bool = True


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
        worst = max(self.outputs, key=lambda o: o.max_abs, default=None)
        verdict = "passed" if self.passed else "FAILED"
        text = f"{verdict} (atol {self.atol:g}, rtol {self.rtol:g}, {self.samples} samples)"
        if worst is not None:
            cosine = min(o.cosine for o in self.outputs)
            text += f": max abs {worst.max_abs:.3g}, max rel {worst.max_rel:.3g}, cosine {cosine:.6f}"
            top = [o.top1 for o in self.outputs if o.top1 is not None]
            if top:
                text += f", top-1 {100 * min(top):.1f}%"
        return text


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


def _quiet_polygraphy():
    """Polygraphy logs every comparison to stdout; lfpass reports its own numbers."""
    from polygraphy.logger import G_LOGGER

    return G_LOGGER.verbosity(G_LOGGER.CRITICAL)


def run(path: Path, feeds: Sequence[Feeds], bar: tqdm | None = None, label: str = "") -> list[dict[str, np.ndarray]]:
    """``path``'s outputs for each feed, onnxruntime on CPU with graph optimisations off."""
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
            raise InputError(f"{label or path}: onnxruntime cannot run it ({first_line(exc)})") from None
        results.append(dict(zip(names, values)))
        if bar is not None:
            bar.update()
    return results


def compare(reference: Sequence[dict[str, np.ndarray]], candidate: Sequence[dict[str, np.ndarray]], atol: float,
            rtol: float, scores: set[str] = frozenset()) -> Validation:
    """Compare two runs output by output (both over the same feeds)."""
    from polygraphy.comparator.compare import SimpleCompareFunc
    from polygraphy.comparator.struct import IterationResult

    result = Validation(True, atol, rtol, len(reference))
    if reference and set(reference[0]) != set(candidate[0]):
        result.passed = False
        result.error = f"outputs differ: {sorted(reference[0])} vs {sorted(candidate[0])}"
        return result
    check = SimpleCompareFunc(atol=atol, rtol=rtol, check_shapes=True)
    stats = {name: OutputStats(name) for name in (reference[0] if reference else ())}
    tops: dict[str, list[float]] = {}
    with _quiet_polygraphy():
        for ref, cand in zip(reference, candidate):
            verdicts = check(IterationResult(cand, runner_name="fused"), IterationResult(ref, runner_name="original"))
            for name, s in stats.items():
                a, b = np.asarray(cand[name]), np.asarray(ref[name])
                verdict = verdicts.get(name)
                if a.shape != b.shape or verdict is None:
                    s.passed, s.max_abs, s.max_rel, s.cosine = False, math.inf, math.inf, -1.0
                    continue
                s.passed &= bool(verdict)
                s.max_abs = max(s.max_abs, _finite(verdict.max_absdiff))
                s.max_rel = max(s.max_rel, _finite(verdict.max_reldiff))
                s.cosine = min(s.cosine, _cosine(a, b))
                if name in scores and a.dtype.kind == "f" and a.ndim >= 2 and a.shape[-1] >= 2:
                    tops.setdefault(name, []).append(float(np.mean(a.argmax(-1) == b.argmax(-1))))
    for name, values in tops.items():
        stats[name].top1 = float(np.mean(values))
    result.outputs = list(stats.values())
    result.passed = all(s.passed for s in result.outputs)
    return result



def _finite(x) -> float:
    return float(x) if x is not None else math.inf


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    if a.dtype.kind not in "fiu" or b.dtype.kind not in "fiu":
        return 1.0 if np.array_equal(a, b) else 0.0
    x, y = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    nx, ny = np.linalg.norm(x), np.linalg.norm(y)
    if nx == 0 or ny == 0:
        return 1.0 if nx == ny else 0.0
    return float(np.clip(x @ y / (nx * ny), -1.0, 1.0))


def validate(original: Path, fused: Path, feeds: Sequence[Feeds], atol: float, rtol: float,
             scores: set[str] = frozenset(), progress: bool = False, fused_label: str = "") -> Validation:
    """Run ``original`` and ``fused`` on ``feeds`` and compare every output."""
    start = time.perf_counter()
    with tqdm(total=2 * len(feeds), desc="validation", unit="run", disable=not progress, leave=False, delay=1.0) as bar:
        reference = run(original, feeds, bar)
        try:
            candidate = run(fused, feeds, bar, label=fused_label)
        except InputError as exc:  # the rewrite broke the model: a failed validation, not bad input
            return Validation(False, atol, rtol, len(feeds), error=str(exc), seconds=time.perf_counter() - start)
    result = compare(reference, candidate, atol, rtol, scores)
    result.seconds = time.perf_counter() - start
    log.info("validation %s in %.1fs", "passed" if result.passed else "failed", result.seconds)
    return result
