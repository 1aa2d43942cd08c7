"""tools/budget_onnx.py --small: the budgeted ONNX path end to end on a briefly trained CNN.

A 5-second CNN says nothing about quality; this checks that every figure in the
report is measured (chosen within the budget, verified on inputs the planner never saw, the plain rows
are real files) and that the Markdown says what the JSON holds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_budget_tool_small(tmp_path):
    out, report = tmp_path / "BUDGET.md", tmp_path / "budget.json"
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "budget_onnx.py"), "--small", "--out", str(out),
                           "--json", str(report)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads(report.read_text())
    assert r["budgeted"] and r["plain"]
    for b in r["budgeted"]:
        assert b["chosen_error"] <= b["budget"] + 1e-12  # chosen within the budget ...
        assert b["within_budget"] == (b["error"] <= b["budget"] + 1e-12)  # ... and verified, honestly, on unseen
        assert b["ratio"] >= 1.0 and (b["groups"] > 0) == (b["ratio"] > 1.0)
        assert b["pairs_measured"] > 0
    ratios = [p["ratio"] for p in r["plain"]]
    assert ratios == sorted(ratios) and ratios[0] > 1.0
    text = out.read_text()
    assert f"{r['budgeted'][0]['ratio']:.3f}" in text and "python tools/budget_onnx.py --small" in text
