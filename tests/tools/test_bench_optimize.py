"""tools/bench_optimize.py runs, at a small size, and prints its table (examples are tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
TOOL = Path(__file__).parents[2] / "tools" / "bench_optimize.py"


def test_bench_optimize_small(tmp_path):
    args = [sys.executable, str(TOOL), "--layers", "2", "--width", "64", "--vocab", "128", "--positions", "32",
            "--out", str(tmp_path), "--json", str(tmp_path / "bench.json")]
    try:
        import onnxslim  # noqa: F401
    except ImportError:
        args.append("--no-onnxslim")
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for row in ("onnx.load + onnx.save (floor)", "lfpass optimize", "lfpass validate (separate)",
                "lfpass.optimize, budgeted", "read state dict (torch.load, reference)",
                "FX analyze + apply (copy, the default)", "FX analyze + apply (inplace=True)"):
        assert f"| {row} |" in done.stdout
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["bytes"]["lfpass optimize"] < data["bytes"]["onnx.load + onnx.save (floor)"]
    assert all(seconds > 0 and mb > 0 for seconds, mb in data["rows"].values())
    budget = data["budget"]  # 2 layers: one pair of mlp.c_fc layers may fuse
    assert budget["pairs"] == 1 and budget["evaluations"] >= 1 and budget["ratio"] >= 1.0
    fx = data["fx"]
    assert fx["FX analyze + apply (copy, the default)"]["ratio"] > 1.0
    assert all(r["seconds"] > 0 and r["peak_mb"] > 0 for r in fx.values())
