"""tools/bench_candidates.py on a tiny random MLP: both ways of measuring a candidate are
timed, agree on the outputs, and the report says what the JSON holds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_candidates_tiny(tmp_path):
    out, report = tmp_path / "BENCH.md", tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_candidates.py"), "--models", "tiny",
                           "--repeat", "1", "--samples", "256", "--work", str(tmp_path), "--out", str(out),
                           "--json", str(report)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = json.loads(report.read_text())["result"]["rows"]
    assert row["model"] == "tiny" and row["ratio"] >= 1.5
    assert row["build_s"] > 0 and row["held_s"] > 0 and row["speedup"] == row["build_s"] / row["held_s"]
    assert row["max_abs_diff"] <= 1e-4 * row["output_scale"]  # the same outputs either way
    text = out.read_text()
    assert "bench-candidates:begin" in text and f"{row['speedup']:.1f}x" in text
