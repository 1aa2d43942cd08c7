"""Every option of ``lfpass optimize`` on every model of the zoo (``tools/zoo.py``): files lfpass
did not make, from both torch exporters (inline and external data) and a converter-style file
with ``Constant`` weights, run by absolute path from another folder, each written file checked
(onnx.checker, onnxruntime, every external tensor next to it).

    python tools/real_files.py --out docs/REAL_FILES.md --json docs/real_files.json   # ~10 CPU-minutes
    python tools/real_files.py --models converter-cnn --options plain,budget           # seconds

The table gives, per model and option set, the exit code (0 done, 1 written but outside the
tolerance or the budget, 2 refused with one line), the unique-parameter ratio, the written
file's held-out error where calibration inputs were given, and the last line lfpass printed.
Random-init weights: these figures check that every option works on every file, not quality.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import zoo  # beside this script

from lfpass.core.fileio import write_text


def checked(path: Path) -> str:
    """Why the written file is not valid ("" when it is)."""
    import onnx
    import onnxruntime as ort

    try:
        onnx.checker.check_model(str(path))
        proto = onnx.load(str(path), load_external_data=False)
        places = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
        if not all((path.parent / p).exists() for p in places) or not places <= {f"{path.name}.data"}:
            return f"external data not next to it: {sorted(places)}"
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - any failure is the finding
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return ""


def run_cell(model: Path, calib: Path, flags: list[str], work: Path, timeout: float) -> dict[str, Any]:
    out, report = work / "out" / "small.onnx", work / "report.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in (*out.parent.iterdir(), report):
        stale.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "lfpass.cli", "optimize", str(model), "-o", str(out), "--report", str(report),
           *[f.format(calib=calib) for f in flags]]
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"exit": "timeout", "seconds": timeout, "said": f"over {timeout:.0f} s"}
    row: dict[str, Any] = {"exit": done.returncode, "seconds": time.perf_counter() - started}
    said = [ln for ln in done.stderr.splitlines() if ln.startswith("lfpass:")]
    row["said"] = said[-1][len("lfpass: "):] if said else ""
    row["internal_error"] = "internal error" in done.stderr or "Traceback" in done.stderr
    if report.exists():
        r = json.loads(report.read_text())
        row.update(ratio=r.get("ratio"), error=r.get("error"), written=r.get("written"))
    if out.exists():
        row["file"] = checked(out) or "valid"
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=lambda t: t.split(","), default=list(zoo.ZOO))
    p.add_argument("--options", type=lambda t: t.split(","), default=list(zoo.OPTIONS))
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per run")
    p.add_argument("--out", type=Path, help="write the Markdown table here")
    p.add_argument("--json", type=Path, help="write the rows here")
    args = p.parse_args(argv)
    started, rows = time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="lfpass-zoo-") as scratch:
        root = Path(scratch)
        for name in args.models:
            build, arrays, _ = zoo.ZOO[name]
            model = root / "models" / name / "model.onnx"
            model.parent.mkdir(parents=True)
            build(model)
            calib = root / "calibration" / f"{name}.npz"
            calib.parent.mkdir(exist_ok=True)
            np.savez(calib, **arrays(np.random.default_rng(1)))
            for option in args.options:
                row = {"model": name, "option": option, **run_cell(model, calib, zoo.OPTIONS[option],
                                                                    root / "work", args.timeout)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    report = {"command": "python tools/real_files.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "seconds": time.perf_counter() - started, "rows": rows}
    if args.json:
        write_text(args.json, json.dumps(report, indent=1))
    if args.out:
        write_text(args.out, render(report))
    bad = [r for r in rows if r.get("internal_error") or r["exit"] == "timeout" or r.get("file", "valid") != "valid"]
    return 1 if bad else 0


def render(report: dict[str, Any]) -> str:
    lines = ["# Every option on files lfpass did not make", "",
             f"`{report['command']}` ({report['seconds'] / 60:.0f} min). " + __doc__.split("\n\n")[2].replace("\n", " "),
             "", "Option sets: " + "; ".join(f"**{k}** `{' '.join(v)}`" for k, v in zoo.OPTIONS.items()), "",
             "| model | option | exit | ratio | held-out error | written file | s | last line |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        ratio = f"{r['ratio']:.3f}" if r.get("ratio") else "-"
        error = f"{r['error']:.4g}" if r.get("error") is not None else "-"
        said = (r.get("said") or "").replace("|", "/")[:110]
        lines.append(f"| {r['model']} | {r['option']} | {r['exit']} | {ratio} | {error} | {r.get('file', '-')} | "
                     f"{r['seconds']:.0f} | {said} |")
    internal = sum(1 for r in report["rows"] if r.get("internal_error"))
    slow = [f"{r['model']}/{r['option']}" for r in report["rows"] if r["exit"] == "timeout"]
    lines += ["", f"{len(report['rows'])} runs: {internal} internal errors; over the time limit: "
                  f"{', '.join(slow) or 'none'}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
