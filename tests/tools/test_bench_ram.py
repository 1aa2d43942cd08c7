"""tools/bench_ram.py --small: every file is written and measured in a fresh process, and the
figures are consistent (the fused file smaller than the original, int8 smaller still, holding
shared tensors once adds no bytes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_ram_small(tmp_path):
    out, report = tmp_path / "RAM.md", tmp_path / "ram.json"
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_ram.py"), "--small", "--repeat", "1",
                           "--work", str(tmp_path / "w"), "--out", str(out), "--json", str(report)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(report.read_text())["result"]["rows"]
    by = {(r["model"], r["session"]): r for r in rows}
    assert len(rows) == 16 and all(r["rss"] > 0 and r["beyond"] == r["rss"] - r["bytes"] for r in rows)
    for session in ("defaults", "no prepacking"):
        assert by[("fused", session)]["bytes_ratio"] > 1.3
        assert by[("fused + int8", session)]["bytes"] < by[("int8 alone", session)]["bytes"]
        assert by[("fused + int4", session)]["bytes"] < by[("fused + int8-weights", session)]["bytes"]
        assert by[("fused, held once", session)]["bytes"] <= by[("fused", session)]["bytes"] + 4096  # inputs named
    assert out.read_text().count("| fused + int8 |") == 2
