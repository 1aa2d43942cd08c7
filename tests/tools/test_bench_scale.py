"""tools/bench_large.py and tools/bench_runtime.py run at a small size and report what they
measured (examples are tests): figures as ratios to a reference from the same run, every
written file checked. Structure only: never a wall time or a memory figure's size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _tool(script: str, tmp_path: Path, *args: str) -> tuple[str, dict]:
    out = tmp_path / "result.json"
    done = subprocess.run([sys.executable, str(ROOT / "tools" / script), *args, "--out", str(tmp_path / "files"),
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, json.loads(out.read_text())


def test_bench_large_small(tmp_path):
    stdout, r = _tool("bench_large.py", tmp_path, "--small")
    steps = ["onnx.load + onnx.save (reference)", "onnx-ir load + save", "lfpass optimize",
             "lfpass validate (tiny input, separate)"]
    assert list(r["rows"]) == steps
    for step in steps:
        assert f"| {step} |" in stdout
        ratio = r["ratios"][step]
        assert set(ratio) == {"time", "memory", "memory_vs_model"} and all(v > 0 for v in ratio.values())
    assert r["ratios"]["onnx.load + onnx.save (reference)"]["time"] == 1.0
    model = r["model"]
    assert model["data_bytes"] > 0.95 * model["bytes"]  # the weights are external data
    for step in ("onnx.load + onnx.save (reference)", "onnx-ir load + save", "lfpass optimize"):
        check = r["checks"][step]  # onnx.checker on the model path; tensors inside their file, none twice
        assert check["checker"] == "passed" and check["data_files"] == 1
    fused, ref = r["checks"]["lfpass optimize"], r["checks"]["onnx.load + onnx.save (reference)"]
    assert fused["distinct_weights"] < fused["matmul_weights"] == ref["matmul_weights"] == ref["distinct_weights"]
    assert r["lfpass"]["ratio"] > 1.5 and fused["data_bytes"] < 0.7 * ref["data_bytes"]
    assert r["validation"]["samples"] == 1 and "logits" in r["validation"]["outputs"]
    assert not list((tmp_path / "files").glob("*.onnx*"))  # the model files are removed unless --keep


def test_bench_runtime_small(tmp_path):
    pytest.importorskip("transformers")
    stdout, r = _tool("bench_runtime.py", tmp_path, "--small", "--runs", "3", "--warmup", "1", "--repeat", "1")
    assert set(r["models"]) == {"GPT-2", "CNN"}
    assert list(r["results"]["GPT-2"]) == ["default", "no prepack", "no graph opt", "external data",
                                         "external data, no prepack"]
    assert list(r["results"]["CNN"]) == ["default", "no prepack", "no graph opt"]
    for name, variants in r["results"].items():
        assert r["models"][name]["ratio"] > 1.0
        assert f"**{name}**" in stdout
        for variant, by in variants.items():
            assert f"| {variant} |" in stdout
            for which in ("original", "fused"):
                got = by[which]
                assert got["create_s"] > 0 and got["rss_mb"] > 0
                assert set(got["latency_s"]) == {"1", "8"} and all(v > 0 for v in got["latency_s"].values())
