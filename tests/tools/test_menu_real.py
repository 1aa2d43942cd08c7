"""tools/menu_real.py --small: the plan menu against its parts, end to end on a small random conv net.

A random net says nothing about which action wins; this checks that every figure in the
report is measured (real ratios from the written files' reports, errors measured on
inputs lfpass never saw, the retrained files too) and that the Markdown says what the
JSON holds."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def test_menu_tool_small(tmp_path):
    out, report = tmp_path / "MENU.md", tmp_path / "menu.json"
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "menu_real.py"), "--small", "--out", str(out),
                           "--json", str(report)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads(report.read_text())
    m = r["result"]
    assert r["small"] and m["rows"] and m["retrained"]
    assert {row["method"] for row in m["rows"]} == set(r["methods"])
    assert {row["target"] for row in m["rows"]} == set(r["ratios"])
    text = out.read_text()
    assert "python tools/menu_real.py --small" in text
    for row in m["rows"] + m["retrained"]:
        assert row["exit"] in (0, 1), row["last"]  # 1: validation outside tolerance, still written
        assert row["written"]
        assert row["ratio_model"] >= 1.0 and row["ratio_layers"] >= 1.0
        assert row["params_after"] < row["params_before"]
        assert _number(row["fresh"]) and 0.0 <= row["fresh"] <= 2.0
        assert _number(row["seconds"]) and row["seconds"] > 0
        layers = row["layers"]
        assert sum(layers[k] for k in ("basis", "lowrank", "tie", "residual")) > 0
        assert f"{row['ratio_layers']:.3f}" in text and f"{row['fresh']:.4f}" in text
    for row in m["rows"]:
        assert _number(row["reported"])  # lfpass's own held-out error
        layers = row["layers"]
        if row["method"] in ("tie", "tie-below"):
            assert layers["basis"] == layers["lowrank"] == 0 and layers["tie"] > 0
        if row["method"] == "lowrank":
            assert layers["lowrank"] > 0 and layers["basis"] == layers["tie"] == layers["residual"] == 0
        if row["method"] == "basis":
            assert layers["basis"] > 0 and layers["lowrank"] == layers["tie"] == 0
        if row["method"] == "tie-below":  # the nearest tie plan at or below the target
            assert row["ratio_layers"] <= row["target"] + 1e-9
        elif row["method"] != "tie":  # ties land where a pair falls; every other action on the target
            assert abs(row["ratio_layers"] - row["target"]) <= 0.05 * row["target"]
    for row in m["retrained"]:
        assert row["target"] == r["retrain"]["ratio"] and row["bn"] in r["retrain"]["bn"]
        assert _number(row["quality_fused"]) and _number(row["quality_retrained"])
    baseline = [row for row in m["rows"] if row["method"] == r["baseline"]]
    assert len(baseline) == len(r["ratios"])
    for row in baseline:
        assert f"| {row['target']:g} | --actions lowrank |" in text
