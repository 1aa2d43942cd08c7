"""tools/quantize_real.py --small: fusion and quantization at equal bytes, end to end on a random residual MLP.

A random MLP says nothing about whether fusion compounds with quantization; this checks
that every row is a written file measured the same way (bytes on disk, error on inputs
lfpass never saw), that quantizing shrinks the file as int8 and int4 should, and that the
Markdown says what the JSON holds."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def test_quantize_tool_small(tmp_path):
    out, report = tmp_path / "QUANTIZE.md", tmp_path / "quantize.json"
    out.write_text("# Results\n\nkept as it was\n")
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "quantize_real.py"), "--small", "--out", str(out),
                           "--json", str(report), "--work", str(tmp_path / "work")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads(report.read_text())
    assert r["small"] and len(r["models"]) == 1 and len(r["budgets"]) == 2
    model = r["models"][0]
    rows = {row["row"]: row for row in model["rows"]}
    budgets = [f"{b:g}" for b in r["budgets"]]
    suffixes = ("", ", then int8 alone", " +int8", " +int8-weights", " +int4")
    quantized = ("int8", "int8-weights", "int4")
    expected = {"fp32", "int8 alone", "int4 alone", *(f"lfpass E={b}{q}" for b in budgets for q in suffixes),
                *(f"lfpass +{q}, quantized alone" for q in quantized), "lfpass +int4, distilled",
                *(f"lfpass E=int8's +{q}" for q in quantized)}
    assert set(rows) == expected and len(model["rows"]) == len(expected)
    fp32 = rows["fp32"]
    assert fp32["bytes"] == model["bytes"] and fp32["fresh"] < 1e-9  # the original against itself
    for row in model["rows"]:
        assert row["written"], row
        assert isinstance(row["bytes"], int) and row["bytes"] > 0
        assert _number(row["fresh"]) and 0.0 <= row["fresh"] <= 2.0, row
        assert row["bytes_ratio"] == fp32["bytes"] / row["bytes"]
        if row["kind"] == "lfpass":
            assert row["exit"] in (0, 1), row["last"]  # 1: outside tolerance or budget, still written
            assert _number(row["seconds"]) and row["seconds"] > 0
            assert _number(row["params_ratio"]) and row["params_ratio"] >= 1.0
            assert _number(row["reported"]) or row["budget"] is None  # a budget's error, on its held-out share
            if row["budget"] is None:  # --ratio 1: quantized alone (or distilled onto the grid), nothing fused
                assert row["params_ratio"] == 1.0 and "--ratio 1" in row["flags"]
            if "distilled" in row["row"]:
                assert "--distill" in row["flags"] and row["quantized"]["mode"] == "int4"
            assert row["bytes_reported"] == row["bytes"]  # lfpass's figure and the file on disk agree
        if row["quantize"]:
            assert row["bytes"] < fp32["bytes"], row
        if row["kind"] == "lfpass" and row["quantize"]:
            assert row["quantized"]["mode"] == row["quantize"] and row["quantized"]["quantized"] > 0
            assert row["float_left"] == row["lfpass_float_left"]  # what lfpass says it kept, found in the file
        elif row["kind"] == "lfpass":
            assert row["quantized"] is None and row["float_left"] > 0
        if row["kind"] == "then":  # onnxruntime's int8 on the fusion-alone file: smaller than either
            fused = rows[row["row"].split(",")[0]]
            assert row["bytes"] < fused["bytes"] and row["bytes"] < rows["int8 alone"]["bytes"]
            assert row["float_left"] == 0
    # int8 stores a weight in a quarter of fp32's bytes; scales, biases and the graph take some back
    assert 2.5 < rows["int8 alone"]["bytes_ratio"] < 4.5 and rows["int8 alone"]["float_left"] == 0
    assert rows["int4 alone"]["bytes"] < rows["int8 alone"]["bytes"] and rows["int4 alone"]["float_left"] == 0
    assert fp32["float_left"] == 13  # 12 block layers and the head
    text = out.read_text()
    assert text.startswith("# Results\n\nkept as it was\n") and "## Fusion and quantization at equal bytes" in text
    assert text.count("<!-- quantize-real:begin -->") == 1 and text.count("<!-- quantize-real:end -->") == 1
    assert r["command"] in text and "python tools/quantize_real.py --small" in text
    assert "check the tool" in text
    table = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| row |")]
    assert len(table) == len(model["rows"])
    for row, line in zip(model["rows"], table):
        assert line.startswith(f"| {row['row']} |") and f"{row['bytes']:,}" in line and f"{row['fresh']:.4f}" in line
    verdicts = text.split("### small", 1)[1]
    assert "- (a) lfpass+quantization (`--quantize int8`, `int8-weights`, `int4`), against `int8 alone`" in verdicts
    assert "- fusion, then int8 alone" in verdicts and "(b)" not in verdicts  # (b): MiniLM only
    # the render of the JSON alone is the same text
    again = tmp_path / "AGAIN.md"
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "quantize_real.py"), "--render", str(report), "--out",
                           str(again)], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert again.read_text().split("<!-- quantize-real:begin -->")[1] == text.split("<!-- quantize-real:begin -->")[1]


def test_merge_replaces_rows_of_the_same_name_and_keeps_table_order():
    sys.path.insert(0, str(ROOT / "tools"))
    import quantize_real as qr

    def report(rows, budgets, command):
        return {"command": command, "seconds": 1.0, "budgets": budgets,
                "models": [{"model": "m", "rows": [{"row": r, "v": command} for r in rows]}]}

    earlier = report(["fp32", "int8 alone", "lfpass E=0.01", "lfpass E=0.01 +int8"], [0.01], "a")
    now = report(["fp32", "lfpass +int4, distilled", "lfpass E=0.01 +int8"], [0.05], "b")
    merged = qr.merged(earlier, now)
    rows = merged["models"][0]["rows"]
    assert [r["row"] for r in rows] == ["fp32", "int8 alone", "lfpass +int4, distilled", "lfpass E=0.01",
                                        "lfpass E=0.01 +int8"]
    assert {r["row"]: r["v"] for r in rows}["lfpass E=0.01 +int8"] == "b"  # re-measured: the newer run's
    assert {r["row"]: r["v"] for r in rows}["int8 alone"] == "a" and merged["budgets"] == [0.01, 0.05]
    assert merged["command"] == "a; then b" and merged["seconds"] == 2.0
