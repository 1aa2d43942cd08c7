"""The demo's ONNX half: the deployment path, checked in onnxruntime on real digits.

Two routes to a smaller ONNX file:

- ``lfpass optimize`` on the exported original with calibration digits and a
  budget, as a deployment runs it (no training code needed): the plan goes as
  far as the budget allows, and the file's error is verified on digits the
  planner never saw;
- export of the model fused and retrained in PyTorch (:func:`lfpass.export`):
  the ties survive export, so the file shrinks as much as the unique
  parameters did, at the retrained accuracy.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lfpass.bridge.export import export as export_onnx
from lfpass.core.config import FusionConfig
from lfpass.core.fileio import atomic_path
from lfpass.data import Split
from lfpass.demo.tables import render_table

log = logging.getLogger(__name__)

INPUT, OUTPUT = "x", "logits"
VALIDATION_DIGITS = 200  # the calibration digits given to lfpass optimize (it splits them three ways)
BUDGET = 0.02  # --max-error: 1 - the mean output cosine against the original, on digits never chosen on
EXAMPLE_DIGITS = 32  # the batch lfpass.export traces and checks in onnxruntime


def export(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """Export ``model`` to ONNX (dynamic batch), each shared tensor stored once, checked in onnxruntime."""
    export_onnx(model, example, path, dynamic_shapes=({0: "batch"},), input_names=[INPUT], output_names=[OUTPUT])
    return path


def run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    """The logits onnxruntime computes (graph optimisations off, as validation runs it)."""
    from lfpass.onnx.validate import run

    return run(path, [{INPUT: x}])[0][OUTPUT]


def onnx_rows(model: nn.Module, fused: nn.Module, ratio: float, data: Split, out_dir: Path) -> list[dict[str, Any]]:
    """Export the original and the fused-and-retrained (at ``ratio``) CNN, run ``lfpass
    optimize --inputs digits.npz --max-error BUDGET`` on the original, and check all three
    in onnxruntime; one row per ONNX file."""
    from lfpass.onnx import optimize

    x = data.x_test.numpy()
    y = data.y_test.numpy()
    with torch.no_grad():
        torch_fused = fused.eval()(data.x_test).numpy()
    original = export(model, data.x_test[:EXAMPLE_DIGITS], out_dir / "cnn.onnx")
    digits = out_dir / "digits.npz"
    with atomic_path(digits) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **{INPUT: x[:VALIDATION_DIGITS]})
    optimized = optimize(original, out_dir / "cnn.fused.onnx", FusionConfig(target_ratio=None, max_error=BUDGET),
                         inputs=digits)
    retrained = export(fused, data.x_test[:EXAMPLE_DIGITS], out_dir / f"cnn.retrained_r{ratio:g}.onnx")

    base_logits = run_onnx(original, x)
    rows = []
    for label, path in (
        ("exported original", original),
        (f"lfpass optimize --max-error {BUDGET:g} (no retraining)", optimized.output),
        (f"fused x{ratio:g} + retrained, exported", retrained),
    ):
        logits = run_onnx(path, x)
        rows.append({
            "model": label,
            "path": str(path),
            "bytes": path.stat().st_size,
            "accuracy": float((logits.argmax(1) == y).mean()),
            "agree_original": float((logits.argmax(1) == base_logits.argmax(1)).mean()),
            "max_abs_vs_original": float(np.abs(logits - base_logits).max()),
        })
    rows[0]["vs_pytorch"] = float(np.abs(base_logits - _torch_logits(model, data)).max())
    rows[2]["vs_pytorch"] = float(np.abs(run_onnx(retrained, x) - torch_fused).max())
    rows[1].update(ratio=optimized.ratio, error=optimized.error, budget=BUDGET, kept=optimized.within_budget)
    return rows


def _torch_logits(model: nn.Module, data: Split) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(data.x_test).numpy()


def format_onnx_table(rows: list[dict[str, Any]]) -> str:
    """The ONNX rows as a table, and what its numbers mean, in words."""
    head = ("ONNX file (onnxruntime, all test digits)", "KB", "size ratio", "accuracy",
            "top-1 = original", "max |logit diff| vs PyTorch")
    base = rows[0]["bytes"]
    cells = [
        (
            r["model"], f"{r['bytes'] / 1024:.1f}", f"{base / r['bytes']:.2f}x", f"{r['accuracy']:.2%}",
            f"{r['agree_original']:.2%}", f"{r['vs_pytorch']:.1e}" if "vs_pytorch" in r else "-",
        )
        for r in rows
    ]
    return render_table("the deployment path: ONNX files checked in onnxruntime", head, cells) + explain(rows)


def explain(rows: list[dict[str, Any]]) -> str:
    """What the deployment table says, in words."""
    budgeted, retrained = rows[1], rows[2]
    if budgeted["error"] is None:
        kept = "nothing could be fused within the budget, so the file is the original's"
    else:
        state = "within" if budgeted["kept"] else "over"
        kept = (f"it fused {budgeted['ratio']:.2f}x fewer unique parameters; on digits it never chose on, its "
                f"outputs keep a mean cosine of {1 - budgeted['error']:.3f} with the original's ({state} the budget "
                f"of {1 - budgeted['budget']:.2f})")
    return "\n".join([
        "What the numbers mean:",
        "- size ratio: the exported original's bytes over the file's; accuracy: test digits classified right;",
        "  top-1 = original: test digits on which the file picks the original's class;",
        "  max |logit diff| vs PyTorch: how far onnxruntime's logits are from the PyTorch model's (export checked).",
        f"- lfpass optimize took the exported file, {VALIDATION_DIGITS} digits and a budget, no training code: {kept}.",
        f"- the retrained row ({rows[0]['bytes'] / retrained['bytes']:.2f}x smaller, {retrained['accuracy']:.1%} "
        "accuracy) needed what a deployment often lacks: the PyTorch model and its training data (fused, "
        "retrained with the ties kept, then exported).",
        "",
    ])
