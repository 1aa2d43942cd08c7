"""What the ONNX subcommands print: the ``optimize`` summary table, one line per
compared output, and notes (one ``lfpass:`` line each on stderr)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lfpass.core.quality import describe

if TYPE_CHECKING:
    from lfpass.onnx.optimize import OptimizeResult
    from lfpass.onnx.validate import OutputStats

MAX_OUTPUT_LINES = 8


def note(text: str) -> None:
    """Each non-blank line of ``text`` on stderr, prefixed ``lfpass:``."""
    for line in text.splitlines():
        if line.strip():
            print(f"lfpass: {line}", file=sys.stderr)


def table(result: OptimizeResult) -> str:
    """The short summary ``optimize`` prints."""
    after = "after (predicted)" if result.dry_run or not result.written else "after"
    lines = [
        f"{'':<11}{'before':>16}{after:>20}{'ratio':>9}",
        f"{'params':<11}{result.params_before:>16,}{result.params_after:>20,}{result.ratio:>9.3f}",
        f"{'bytes':<11}{result.bytes_before:>16,}{result.bytes_after:>20,}{result.bytes_ratio:>9.3f}",
        f"{'groups':<11}{len(result.plan.groups):>16}   predicted {result.plan.model_ratio:.3f} over the model, "
        f"{result.plan.layer_ratio:.3f} over the layers "
        f"(ceiling {result.plan.max_ratio:.3f} over the {result.plan.scope})",
    ]
    if result.plan.factors:
        lines.append(f"{'factored':<11}{sum(len(f.members) for f in result.plan.factors):>16}   layers: "
                     + ", ".join(f"{n} {a}" for a, n in _actions(result.plan.factors).items()))
    if result.error is not None:
        budget = (f" (budget {result.plan.max_error:g}: {'kept' if result.within_budget else 'BROKEN'})"
                  if result.plan.max_error is not None else "")
        lines.append(f"{'held out':<11}error {result.error:.4g}, "
                     f"{describe(result.plan.error_metric or 'cosine', result.error)}{budget}")
    if result.validation is not None:
        lines.append(f"{'validation':<11}{result.validation.summary()}")
        if len(result.validation.outputs) <= MAX_OUTPUT_LINES:
            lines += [f"  {output_line(o)}" for o in result.validation.outputs]
    elif result.written and result.error is None:
        lines.append(f"{'validation':<11}skipped")
    lines.append(f"{'output':<11}{result.output if result.written else 'nothing written'}")
    return "\n".join(lines)


def _actions(factors: Any) -> dict[str, int]:
    """How many shared bases and per-layer factorisations a plan writes."""
    counts: dict[str, int] = {}
    for f in factors:
        name = "shared bases" if f.action == "basis" else "per-layer low rank"
        counts[name] = counts.get(name, 0) + 1
    return counts


def output_line(o: OutputStats) -> str:
    """One compared output: its errors, or why it could not be compared."""
    if o.reason:
        return f"{o.name}: {o.reason}  [outside tolerance]"
    text = f"{o.name}: max abs {o.max_abs:.3g}, max rel {o.max_rel:.3g}, cosine {o.cosine:.6f}"
    if o.top1 is not None:
        text += f", top-1 {100 * o.top1:.1f}%"
    return text + ("" if o.passed else "  [outside tolerance]")


def history_table(result: Any) -> str:
    """A retraining run, stage by stage (an ``lfpass.train.RetrainResult``)."""
    original = result.quality_original
    lines = [f"{'stage':<7}{'target':>8}{'ratio':>8}{'layers':>8}{'unique params':>15}"
             f"{'fused':>10}{'retrained':>11}{'loss':>10}",
             f"{'orig':<7}{'':>8}{1:>8.3f}{1:>8.3f}{result.params_original:>15,}"
             f"{_q(original):>10}{_q(original):>11}{'':>10}"]
    for row in result.history:
        mark = "  (rolled back)" if row.rolled_back else ""
        lines.append(f"{row.stage:<7}{row.target_ratio:>8.3f}{row.model_ratio:>8.3f}{row.layer_ratio:>8.3f}"
                     f"{row.unique_params:>15,}{_q(row.quality_fused):>10}{_q(row.quality):>11}"
                     f"{row.train_loss:>10.4g}{mark}")
    if result.stopped:
        lines.append(f"stopped: {result.stopped}")
    return "\n".join(lines)


def _q(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def write_report(path: Path, data: dict, plan: Any = None, title: str = "lfpass") -> None:
    """``--report``: the figures as JSON, or (``.html``/``.png``) the one-page summary of ``plan``
    (:func:`lfpass.report.write_summary`: quality along its curve, the heatmap, the decisions)."""
    from lfpass.core.fileio import write_text
    from lfpass.report import SUMMARY_SUFFIXES, write_summary

    if Path(path).suffix.lower() in SUMMARY_SUFFIXES and plan is not None:
        write_summary(plan, path, title)
    else:
        write_text(path, json.dumps(data, indent=2, default=str))
