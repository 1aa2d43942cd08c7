"""Resident memory of onnxruntime sessions: does a shared tensor stay shared once loaded?

A fused file stores each shared tensor once; what a deployment pays is the memory of
the session that runs it. onnxruntime pre-packs the constant weight of ``MatMul``/
``Gemm``/``Conv`` nodes for its kernels, per node: a tensor read by k nodes may then be
held k + 1 times. This measures, each in a fresh process (the resident set after creating
the session from the file and running it once, minus the resident set before), for
MiniLM's ONNX file (``tools/budget_real.py`` exports it):

- ``original``, ``fused`` (``lfpass optimize --actions tie --ratio R --merge mean``: ties
  only, so tensors are shared), ``fused + int8``, ``fused + int8-weights`` and ``fused +
  int4`` (the same with ``--quantize``) and ``int8 alone`` (onnxruntime's
  ``quantize_dynamic``);
- ``original, tie laid out``: with ``--model gpt2`` (a random-init GPT-2 of 124 M
  parameters, 476 MB, whose embedding table is its head: what lfpass writes for a float
  file, :func:`lfpass.onnx.tied.lay_out_tables`, nothing else changed);
- ``fused, held once`` and ``fused + int8, held once``: the same with ``--hold-shared-once``
  (:mod:`lfpass.onnx.prepack`: shared tensors not pre-packed per node);
- each with onnxruntime's defaults and with ``session.disable_prepacking = 1``. Every
  file is first written as one file, its external data inlined, and the session is made
  from that path: onnxruntime then reads every tensor (from external data it may map the
  file and page in only what a run touches, an embedding's unused rows say), and no copy
  of the model is held by Python.

Each row gives the file's bytes, the session's resident bytes (less those of a session on
a model with the same inputs and no weights: what any session costs), both as ratios to
the original's, and the resident bytes beyond the file's: what the session holds besides
the weights as stored (pre-packed copies, activations, kernels' buffers). Figures are a
median of ``--repeat`` processes.

    python tools/bench_ram.py --out docs/BENCHMARKS.md --json /tmp/bench_ram.json   # a few minutes
    python tools/bench_ram.py --model gpt2 --out docs/BENCHMARKS.md                # GPT-2 (124 M)
    python tools/bench_ram.py --small                                              # seconds: the test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import budget_real as br  # noqa: E402
from benchlib import publish  # noqa: E402

MARKERS = {"minilm": ("<!-- bench-ram:begin -->", "<!-- bench-ram:end -->"),
           "gpt2": ("<!-- bench-ram-gpt2:begin -->", "<!-- bench-ram-gpt2:end -->")}
MODES = {"defaults": {}, "no prepacking": {"session.disable_prepacking": "1"}}
QUANTIZE = ("int8", "int8-weights", "int4")

PROBE = r"""
import gc, json, os, sys
import numpy as np
import onnxruntime as ort
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
path, config, feed = sys.argv[1], json.loads(sys.argv[2]), dict(np.load(sys.argv[3]))
options = ort.SessionOptions()
options.log_severity_level = 3
for k, v in config.items():
    options.add_session_config_entry(k, v)
before = rss()
session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
gc.collect()
session.run(None, feed)
print(json.dumps({"rss": rss() - before}))
"""


def inlined(path: Path, work: Path) -> Path:
    """``path`` as one file in ``work``, its external data inlined (the model is under 2 GB)."""
    import onnx

    if not any(f.name != path.name for f in _data_files(path)):
        return path
    target = work / f"{path.stem}.inline.onnx"
    onnx.save(onnx.load(str(path)), str(target))
    return target


def _data_files(path: Path) -> list[Path]:
    from lfpass.onnx.load import external_files, load_model

    return [path, *external_files(load_model(path)).values()]


def resident(path: Path, config: dict[str, str], feed: Path, repeat: int) -> int:
    """Median over ``repeat`` fresh processes of the resident bytes a session on ``path`` adds."""
    values = []
    for _ in range(repeat):
        done = subprocess.run([sys.executable, "-c", PROBE, str(path), json.dumps(config), str(feed)],
                              capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        values.append(json.loads(done.stdout.strip().splitlines()[-1])["rss"])
    return int(statistics.median(values))


def file_bytes(path: Path) -> int:
    """The model file and its external data files."""
    from lfpass.onnx.load import disk_bytes

    return disk_bytes(path, _data_files(path)[1:])


def tiny(work: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A 6-block residual MLP of width 256 by the legacy exporter (Gemm nodes): what the test runs."""
    import torch

    class Blocks(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = torch.nn.ModuleList(torch.nn.Linear(256, 256) for _ in range(6))

        def forward(self, x):
            for block in self.blocks:
                x = x + torch.relu(block(x))
            return x

    torch.manual_seed(0)
    path = work / "tiny.onnx"
    with torch.no_grad():
        torch.onnx.export(Blocks().eval(), (torch.randn(2, 256),), str(path), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "n"}})
    return path, {"x": np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)}


def _empty_model(path: Path, feed: dict[str, np.ndarray]) -> None:
    """A model of the same inputs whose outputs are its inputs (Identity): a session's own cost."""
    import onnx
    from onnx import helper

    names = list(feed)
    types = {np.dtype(np.float32): onnx.TensorProto.FLOAT, np.dtype(np.int64): onnx.TensorProto.INT64}
    inputs = [helper.make_tensor_value_info(n, types[feed[n].dtype], list(feed[n].shape)) for n in names]
    outputs = [helper.make_tensor_value_info(f"{n}.out", types[feed[n].dtype], list(feed[n].shape)) for n in names]
    nodes = [helper.make_node("Identity", [n], [f"{n}.out"]) for n in names]
    onnx.save(helper.make_model(helper.make_graph(nodes, "empty", inputs, outputs),
                                opset_imports=[helper.make_opsetid("", 17)]), path)


def lfpass(model: Path, out: Path, ratio: float, extra: list[str]) -> None:
    cmd = [sys.executable, "-m", "lfpass.cli", "optimize", str(model), "-o", str(out), "--actions", "tie",
           "--merge", "mean", "--ratio", f"{ratio:g}", "--no-validate", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=out.parent)
    if done.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(cmd)}: exit {done.returncode}: {done.stderr[-500:]}")


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    laid_out = None
    if args.small:
        model, feed = tiny(work)
    elif args.model == "gpt2":
        model, feed = gpt2(work)
        laid_out = work / "laid_out.onnx"
    else:
        model, feed, _ = br.minilm(work, args.cache, 8, args.seed)
        feed = {k: v[:4] for k, v in feed.items()}
    feed_path = work / "feed.npz"
    np.savez(feed_path, **feed)
    files = {"original": model, **({"original, tie laid out": laid_out} if laid_out else {}),
             "fused": work / "fused.onnx", "fused, held once": work / "fused.held.onnx",
             **{f"fused + {q}": work / f"fused.{q}.onnx" for q in QUANTIZE},
             "fused + int8, held once": work / "fused.int8.held.onnx", "int8 alone": work / "int8.onnx"}
    if laid_out is not None:
        import onnx_ir as ir

        from lfpass.onnx.tied import lay_out_tables

        original = ir.load(model)
        if not lay_out_tables(original):
            raise RuntimeError(f"{model}: no tied table to lay out")
        ir.save(original, laid_out)
    lfpass(model, files["fused"], args.ratio, [])
    lfpass(model, files["fused, held once"], args.ratio, ["--hold-shared-once"])
    for q in QUANTIZE:
        lfpass(model, files[f"fused + {q}"], args.ratio, ["--quantize", q])
    lfpass(model, files["fused + int8, held once"], args.ratio, ["--quantize", "int8", "--hold-shared-once"])
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(model, files["int8 alone"], per_channel=True, weight_type=QuantType.QInt8)
    empty = work / "empty.onnx"  # what any session costs: subtracted, so the rest is the model's
    _empty_model(empty, feed)
    overhead = {mode: resident(empty, config, feed_path, args.repeat) for mode, config in MODES.items()}
    rows = []
    for name, path in files.items():
        for mode, config in MODES.items():
            rows.append({"model": name, "session": mode, "bytes": file_bytes(path),
                         "rss": resident(inlined(path, work), config, feed_path, args.repeat) - overhead[mode]})
            print(json.dumps(rows[-1]), flush=True)
    for row in rows:
        base = next(r for r in rows if r["model"] == "original" and r["session"] == row["session"])
        row["bytes_ratio"] = base["bytes"] / row["bytes"]
        row["rss_ratio"] = base["rss"] / max(row["rss"], 1)
        row["beyond"] = row["rss"] - row["bytes"]
    name = ("tiny residual MLP (the test's)" if args.small else
            "GPT-2 (random init, 124 M parameters, embedding tied to the head; ONNX, dynamo exporter; sessions run "
            "4 sequences of 16 tokens)" if args.model == "gpt2" else "all-MiniLM-L6-v2 (ONNX, dynamo exporter)")
    return {"model": name, "ratio": args.ratio, "rows": rows}


def gpt2(work: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """GPT-2's own shape (12 x 768, vocabulary 50257), random weights: memory does not depend on
    their values. Exported once into ``work``."""
    from bench_optimize import export_gpt2

    path = work / "gpt2.onnx"
    if not path.exists():
        export_gpt2(path, 12, 768, 50257, 1024)
    ids = np.random.default_rng(0).integers(0, 50257, (4, 16)).astype(np.int64)
    return path, {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def render(report: dict[str, Any]) -> str:
    begin, end = report["markers"]
    lines = [begin, "", f"`{report['command']}` ({report['machine']}; load {report['load']}). Model: "
             f"{report['result']['model']}; fused: `--actions tie --merge mean --ratio {report['result']['ratio']:g}` "
             f"(ties, so tensors are shared). Resident: what one session adds to its process after one run, less what "
             f"a session of a model with the same inputs and no weights adds, median of {report['repeat']} processes.", "",
             "| file | session | bytes on disk | resident | bytes ratio | resident ratio | resident beyond the file |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in report["result"]["rows"]:
        lines.append(f"| {r['model']} | {r['session']} | {r['bytes'] / 2**20:.1f} MiB | {r['rss'] / 2**20:.1f} MiB "
                     f"| {r['bytes_ratio']:.2f}x | {r['rss_ratio']:.2f}x | {r['beyond'] / 2**20:.1f} MiB |")
    return "\n".join([*lines, "", end])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="a tiny MLP instead of MiniLM: checks the tool")
    p.add_argument("--model", choices=sorted(MARKERS), default="minilm")
    p.add_argument("--ratio", type=float, default=1.5)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "lfpass")
    p.add_argument("--work", type=Path)
    p.add_argument("--json", type=Path)
    p.add_argument("--out", type=Path, help="rewrite the part between this tool's markers of this Markdown file")
    args = p.parse_args(argv)
    markers = MARKERS[args.model]
    publish("bench_ram.py", argv, args, measure, lambda r: render({**r, "markers": markers}), markers,
            "Sessions in memory", repeat=args.repeat)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
