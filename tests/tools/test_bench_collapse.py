"""tools/bench_collapse.py --small: each collapsed file removes the blocks its plan names, runs,
and is timed beside the original in one process; within one budget, the menu removes no block,
collapse does, and collapse with the menu keeps at least collapse's ratio (figures, not timings,
are checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_collapse_small(tmp_path):
    out, report = tmp_path / "C.md", tmp_path / "c.json"
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_collapse.py"), "--small", "--repeat", "3",
                           "--calib", "64", "--fresh", "32", "--max-blocks", "2", "--budget", "0.05", "--work", str(tmp_path / "w"),
                           "--out", str(out), "--json", str(report)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(report.read_text())["result"]["rows"]
    assert [r["removed"] for r in rows] == [1, 2] and all(r["of"] == 6 for r in rows)
    assert all(r["latency"] > 0 and r["latency_original"] > 0 and 0 <= r["fresh"] < 1 for r in rows)
    assert rows[1]["ratio"] > rows[0]["ratio"] > 1
    assert out.read_text().count("| 1 of 6") == 1
    plans = {r["plan"]: r for r in json.loads(report.read_text())["result"]["budget_rows"]}
    assert set(plans) == {"plan menu", "collapse", "collapse + menu"}
    assert plans["plan menu"]["removed"] == 0 and plans["collapse"]["removed"] >= 1
    assert plans["collapse + menu"]["removed"] >= 1 and plans["collapse + menu"]["ratio"] >= plans["collapse"]["ratio"]
