"""The tools/ scripts run, at a small size (examples are tests)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_tool(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(  # the tool imports lfpass as installed (pip install -e .)
        [sys.executable, str(ROOT / "tools" / script), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )


def test_bench_analyze_prints_a_ratio():
    pytest.importorskip("transformers")
    result = run_tool("bench_analyze.py", "--layers", "2", "--width", "64", "--runs", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    match = re.search(r"^ratio analyze/read: (\d+\.\d+) \((within|OVER) the aim of 3\)$", result.stdout, re.M)
    assert match, result.stdout
    assert float(match.group(1)) > 0
    rows = re.findall(r"^\| analyze, metric (\w+)", result.stdout, re.M)
    assert rows == ["cosine", "cov", "euclidean", "wasserstein", "kl"]
    assert "| read state dict (torch.load) |" in result.stdout
    assert "| trace (torch.export" in result.stdout
