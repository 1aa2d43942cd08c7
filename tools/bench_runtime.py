"""onnxruntime latency and resident memory of a fused model against its original.

Two models: GPT-2 small (random-init ``GPT2Config()``, exported as
tools/bench_optimize.py does, fused by ``lfpass optimize`` at ratio 2 over the
model) and the demo's CNN (``lfpass.demo.cnn.build_cnn``, exported with
``lfpass.export``, fused at ratio 2 over the model, or as near as its groups
allow). Each measurement runs in a fresh process: create an
``InferenceSession`` (CPU, ``--threads`` intra-op threads), record the time that
took and the resident memory it added (``VmRSS`` growth over the process before
the session; ``RssFile``, the pages of mapped files, apart), then the median
latency of ``--runs`` runs (after ``--warmup``) at batch 1 and at ``--batch``,
and the resident memory again after them (a memory-mapped weight is resident
only once a run has read it). Original and fused alternate, and
each variant is measured ``--repeat`` times, keeping the fastest median and
the lowest resident memory.

Variants, because where the saving shows depends on them:

- ``default``: onnxruntime's defaults (all graph optimisations, weight pre-packing);
- ``no prepack``: ``session.disable_prepacking = 1`` (kernels read the initializers
  as stored instead of keeping a packed copy of each weight);
- ``no graph opt``: ``ORT_DISABLE_ALL`` (no constant folding, no Conv+BN fusion);
- ``external data`` (GPT-2): the same model with its tensors in a data file;
- ``external data, no prepack`` (GPT-2): both.

    python tools/bench_runtime.py                 # GPT-2 small and a width-256 CNN, ~8 minutes
    python tools/bench_runtime.py --small         # tiny models, seconds: what the tests run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchlib import load_average, machine, measure

VARIANTS = {
    "default": {},
    "no prepack": {"prepack": False},
    "no graph opt": {"opt": "disable"},
    "external data": {"external": True},
    "external data, no prepack": {"external": True, "prepack": False},
}


def _rss_mb(key: str = "VmRSS") -> float:
    """Resident MB (``RssAnon``: private memory; ``RssFile``: pages of mapped files, the model's
    data file among them when onnxruntime maps it)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(spec: dict) -> dict:
    """Runs in its own process: create a session on ``spec['model']``, time it and its runs."""
    import numpy as np
    import onnxruntime as ort

    before, before_file = _rss_mb(), _rss_mb("RssFile")
    options = ort.SessionOptions()
    options.intra_op_num_threads = spec["threads"]
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if spec.get("opt") == "disable":
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if spec.get("prepack") is False:
        options.add_session_config_entry("session.disable_prepacking", "1")
    start = time.perf_counter()
    session = ort.InferenceSession(spec["model"], options, providers=["CPUExecutionProvider"])
    created = time.perf_counter() - start
    after, after_file = _rss_mb(), _rss_mb("RssFile")
    rng = np.random.default_rng(0)
    latency = {}
    for batch in spec["batches"]:
        feed = {}
        for value in session.get_inputs():
            shape = [batch if i == 0 else (d if isinstance(d, int) else spec["seq"]) for i, d in enumerate(value.shape)]
            if "int" in value.type:
                feed[value.name] = (rng.integers(0, spec["vocab"], shape) if "ids" in value.name
                                    else np.ones(shape)).astype(np.int64)
            else:
                feed[value.name] = rng.standard_normal(shape).astype(np.float32)
        for _ in range(spec["warmup"]):
            session.run(None, feed)
        times = []
        for _ in range(spec["runs"]):
            t = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - t)
        latency[str(batch)] = statistics.median(times)
    return {"create_s": created, "rss_mb": after, "rss_growth_mb": after - before,
            "file_growth_mb": after_file - before_file, "latency_s": latency,
            "end_growth_mb": _rss_mb() - before, "end_file_growth_mb": _rss_mb("RssFile") - before_file}


def export_cnn(path: Path, width: int, depth: int) -> int:
    import torch

    from lfpass.demo.cnn import build_cnn
    from lfpass.demo.onnx_path import export

    model = build_cnn(0, depth=depth, width=width).eval()
    export(model, torch.randn(4, 1, 28, 28), path)
    return sum(p.numel() for p in model.parameters())


def to_external(src: Path, dst: Path) -> Path:
    import onnx_ir as ir

    ir.save(ir.load(str(src)), str(dst), external_data=dst.name + ".data")
    return dst


def prepare(args: argparse.Namespace) -> dict[str, dict]:
    """Export and fuse the models; returns, per model, its files and figures."""
    import lfpass
    from bench_optimize import export_gpt2

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    models = {}
    gpt2 = out / "gpt2.onnx"
    sizes = (2, 64, 256, 64) if args.small else (12, 768, 50257, 1024)
    params = export_gpt2(gpt2, *sizes)
    cnn = out / "cnn.onnx"
    cnn_params = export_cnn(cnn, 16 if args.small else args.cnn_width, 7)
    for name, path, n, vocab in (("GPT-2", gpt2, params, sizes[2]), ("CNN", cnn, cnn_params, 0)):
        fused = out / f"{path.stem}.fused.onnx"
        result = lfpass.optimize(path, fused, {"target_ratio": args.ratio}, check=False)
        entry = {"original": path, "fused": fused, "params": n, "ratio": result.ratio,
                 "bytes_ratio": result.bytes_ratio, "groups": len(result.plan.groups), "vocab": vocab,
                 "bytes": {"original": path.stat().st_size, "fused": fused.stat().st_size}}
        if name == "GPT-2":
            entry["original_external"] = to_external(path, out / f"{path.stem}.ext.onnx")
            entry["fused_external"] = to_external(fused, out / f"{path.stem}.fused.ext.onnx")
        models[name] = entry
    return models


def run(args: argparse.Namespace) -> dict:
    models = prepare(args)
    batches = [1, args.batch]
    results: dict = {}
    for name, m in models.items():
        seq = 8 if args.small else args.seq
        for variant, opts in VARIANTS.items():
            if opts.get("external") and "original_external" not in m:
                continue
            for _ in range(args.repeat):
                for which in ("original", "fused"):
                    path = m[f"{which}_external"] if opts.get("external") else m[which]
                    spec = {"model": str(path), "threads": args.threads, "batches": batches, "seq": seq,
                            "vocab": max(m["vocab"], 1), "runs": args.runs, "warmup": args.warmup,
                            **{k: v for k, v in opts.items() if k != "external"}}
                    got = measure([sys.executable, __file__, "--child", json.dumps(spec)]).payload()
                    slot = results.setdefault(name, {}).setdefault(variant, {}).setdefault(which, [])
                    slot.append(got)
    summary = {name: {variant: {which: _best(runs) for which, runs in by.items()} for variant, by in v.items()}
               for name, v in results.items()}
    return {"command": "python tools/bench_runtime.py " + " ".join(args.argv), "machine": machine(),
            "load_average": load_average(), "threads": args.threads, "runs": args.runs, "repeat": args.repeat,
            "batches": batches, "seq": 8 if args.small else args.seq,
            "models": {k: {kk: (str(vv) if isinstance(vv, Path) else vv) for kk, vv in m.items()}
                       for k, m in models.items()},
            "results": summary}


def _best(runs: list[dict]) -> dict:
    """Fastest median per batch, lowest memory, fastest creation, over the repeats."""
    return {"create_s": min(r["create_s"] for r in runs), "rss_mb": min(r["rss_mb"] for r in runs),
            "rss_growth_mb": min(r["rss_growth_mb"] for r in runs),
            "file_growth_mb": min(r["file_growth_mb"] for r in runs),
            "end_growth_mb": min(r["end_growth_mb"] for r in runs),
            "end_file_growth_mb": min(r["end_file_growth_mb"] for r in runs),
            "latency_s": {b: min(r["latency_s"][b] for r in runs) for b in runs[0]["latency_s"]}}


def render(r: dict) -> str:
    b1, bn = (str(b) for b in r["batches"])
    lines = [f"`{r['command']}`; {r['machine']}; load average {r['load_average']} at the start; "
             f"{r['threads']} intra-op thread(s); median of {r['runs']} runs, best of {r['repeat']} processes; "
             f"token models at {r['seq']} tokens.", ""]
    for name, m in r["models"].items():
        lines += [f"**{name}**: {m['params'] / 1e6:.2f} M parameters; fused: {m['groups']} groups, unique-parameter "
                  f"ratio {m['ratio']:.3f}, file {m['bytes']['original'] / 2**20:.1f} MB -> "
                  f"{m['bytes']['fused'] / 2**20:.1f} MB ({m['bytes_ratio']:.2f}x).", "",
                  f"| variant | create s (orig / fused) | MB after create (orig / fused) | MB after the runs "
                  f"(orig / fused) | of which mapped file pages | after the runs, fused / orig | latency b{b1} ms "
                  f"(orig / fused) | fused / orig | latency b{bn} ms (orig / fused) | fused / orig |",
                  "|---|---|---|---|---|---:|---|---:|---|---:|"]
        for variant, by in r["results"][name].items():
            o, f = by["original"], by["fused"]
            lo, lf = o["latency_s"], f["latency_s"]
            lines.append(
                f"| {variant} | {o['create_s']:.2f} / {f['create_s']:.2f} | "
                f"{o['rss_growth_mb']:.0f} / {f['rss_growth_mb']:.0f} | "
                f"{o['end_growth_mb']:.0f} / {f['end_growth_mb']:.0f} | "
                f"{o['end_file_growth_mb']:.0f} / {f['end_file_growth_mb']:.0f} | "
                f"{f['end_growth_mb'] / max(o['end_growth_mb'], 1e-9):.2f} | "
                f"{1e3 * lo[b1]:.2f} / {1e3 * lf[b1]:.2f} | {lf[b1] / lo[b1]:.3f} | "
                f"{1e3 * lo[bn]:.2f} / {1e3 * lf[bn]:.2f} | {lf[bn] / lo[bn]:.3f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        print(json.dumps(child(json.loads(argv[1]))))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="tiny models (what the tests run)")
    p.add_argument("--ratio", type=float, default=2.0, help="lfpass's target ratio over the model")
    p.add_argument("--cnn-width", type=int, default=256, help="channels of the CNN's blocks")
    p.add_argument("--seq", type=int, default=32, help="tokens per sequence for GPT-2")
    p.add_argument("--batch", type=int, default=8, help="the larger batch")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=2, help="processes per variant and model")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "lfpass-runtime")
    p.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = p.parse_args(argv)
    args.argv = argv
    result = run(args)
    print(render(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
