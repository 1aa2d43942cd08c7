"""Depth collapse on a real model: does inference get faster in line with the depth removed?

``lfpass optimize MODEL --inputs calib.npz --actions collapse --ratio R`` removes the least
influential residual blocks (``lfpass/core/collapse.py``). On MiniLM's ONNX file
(``tools/budget_real.py`` exports it; 6 encoder blocks), for k = 1, 2, 3 blocks removed
this measures in one process, interleaved with the original:

- onnxruntime latency (median of ``--repeat`` runs of one batch of ``--batch`` sentences
  of 32 tokens, default session options, ``--threads`` intra-op threads), and its ratio
  to the original's, beside ``1 - k/6`` (the share of encoder blocks left: the aim is the
  latency ratio within 10% of it);
- quality: lfpass's cosine error of the mean-pooled sentence embedding on ``--fresh``
  sentences neither lfpass's planner nor its verification saw (no retraining).

    python tools/bench_collapse.py --out docs/BENCHMARKS.md --json /tmp/bench_collapse.json   # minutes
    python tools/bench_collapse.py --small                                                   # the test's

With ``--budget E`` it also plans MiniLM three ways within one budget (no target): the plan
menu alone, depth collapse alone, and collapse with the menu (blocks first, the menu on the
layers left): what each buys in size and in latency at the same error.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import budget_real as br  # noqa: E402
from benchlib import publish  # noqa: E402

BEGIN, END = "<!-- bench-collapse:begin -->", "<!-- bench-collapse:end -->"
BUDGET_PLANS = (("plan menu", "tie,residual,basis,lowrank"), ("collapse", "collapse"),
                ("collapse + menu", "collapse,tie,residual,basis,lowrank"))


def tiny(work: Path, n: int, seed: int) -> tuple[Path, dict[str, np.ndarray], Any]:
    """Six residual MLP blocks of width 128 by the legacy exporter: what the test runs."""
    import torch

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(128, 512), torch.nn.Linear(512, 128)

        def forward(self, x):
            return x + self.fc2(torch.relu(self.fc1(x)))

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = torch.nn.ModuleList(Block() for _ in range(6))

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    torch.manual_seed(seed)
    path = work / "tiny.onnx"
    with torch.no_grad():
        torch.onnx.export(Net().eval(), (torch.randn(2, 128),), str(path), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "n"}})
    return path, {"x": np.random.default_rng(seed).standard_normal((n, 128)).astype(np.float32)}, \
        lambda out, feeds: out


def latency(sessions: dict[str, Any], feed: dict[str, np.ndarray], repeat: int) -> dict[str, float]:
    """Median seconds per run of each session, the sessions interleaved run by run."""
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for sess in sessions.values():
        sess.run(None, feed)  # warm-up
    for _ in range(repeat):
        for key, sess in sessions.items():
            t = time.perf_counter()
            sess.run(None, feed)
            times[key].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import onnx_ir as ir
    import onnxruntime as ort

    import lfpass
    from lfpass.core.config import FusionConfig
    from lfpass.onnx.frontend import OnnxFrontend

    if args.small:
        path, feed, readout = tiny(work, args.calib + args.fresh, args.seed)
    else:
        path, feed, readout = br.minilm(work, args.cache, args.calib + args.fresh, args.seed)
    calib = {k: v[:args.calib] for k, v in feed.items()}
    fresh = {k: v[args.calib:] for k, v in feed.items()}
    np.savez(work / "calib.npz", **calib)
    front = OnnxFrontend(ir.load(path))
    blocks = front.blocks()
    total = front.count(front.model)
    size = statistics.median(b.params for b in blocks)
    reference = br.run_onnx(path, fresh)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.log_severity_level = 3
    batch = {k: v[:args.batch] for k, v in fresh.items()}
    rows = []
    for k in range(1, args.max_blocks + 1):
        out = work / f"collapsed{k}.onnx"
        config = FusionConfig(target_ratio=total / (total - (k - 0.5) * size), actions="collapse",
                              pooling="none" if args.small else "mean")
        done = lfpass.optimize(path, out, config, inputs=work / "calib.npz", check=False)
        sessions = {"original": ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]),
                    "collapsed": ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])}
        times = latency(sessions, batch, args.repeat)
        got = br.run_onnx(out, fresh)
        rows.append({"removed": len(done.plan.dropped), "of": len(blocks), "blocks": list(done.plan.dropped),
                     "ratio": done.ratio, "latency_original": times["original"], "latency": times["collapsed"],
                     "latency_ratio": times["collapsed"] / times["original"],
                     "depth_left": 1 - len(done.plan.dropped) / len(blocks),
                     "fresh": br.error(readout(reference, fresh), readout(got, fresh))})
        print(json.dumps(rows[-1]), flush=True)
    budget = []
    for name, actions in (() if args.budget is None else BUDGET_PLANS):
        out = work / f"budget.{name.replace(' ', '')}.onnx"
        config = FusionConfig(target_ratio=None, max_error=args.budget, actions=actions,
                              pooling="none" if args.small else "mean")
        clock = time.perf_counter()
        done = lfpass.optimize(path, out, config, inputs=work / "calib.npz", check=False)
        seconds = time.perf_counter() - clock
        sessions = {"original": ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]),
                    "planned": ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])}
        times = latency(sessions, batch, args.repeat)
        got = br.run_onnx(out, fresh)
        budget.append({"plan": name, "actions": actions, "removed": len(done.plan.dropped),
                       "factored": len(done.plan.factors), "tied": len(done.plan.groups), "ratio": done.ratio,
                       "latency_ratio": times["planned"] / times["original"], "error": done.plan.error,
                       "fresh": br.error(readout(reference, fresh), readout(got, fresh)), "seconds": seconds})
        print(json.dumps(budget[-1]), flush=True)
    return {"model": "tiny residual MLP (the test's)" if args.small else "all-MiniLM-L6-v2 (ONNX, dynamo exporter)",
            "blocks": len(blocks), "rows": rows, "budget": args.budget, "budget_rows": budget}


def render(report: dict[str, Any]) -> str:
    r = report["result"]
    lines = [BEGIN, "", f"`{report['command']}` ({report['machine']}; load {report['load']}). Model: {r['model']}, "
             f"{r['blocks']} residual blocks; latency: median of {report['repeat']} runs of {report['batch']} samples, "
             f"{report['threads']} intra-op thread(s), interleaved with the original's; fresh error: lfpass's cosine "
             "error on samples the planner never saw, no retraining.", "",
             "| blocks removed | ratio (params) | latency, original | latency, collapsed | latency ratio "
             "| depth left | fresh error |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        lines.append(f"| {row['removed']} of {row['of']} ({', '.join(row['blocks'])}) | {row['ratio']:.3f} "
                     f"| {row['latency_original'] * 1e3:.1f} ms | {row['latency'] * 1e3:.1f} ms "
                     f"| **{row['latency_ratio']:.3f}** | {row['depth_left']:.3f} | {row['fresh']:.4f} |")
    if r.get("budget_rows"):
        lines += ["", f"One budget, three plans (`--max-error {r['budget']:g}`, no target; the error on the planner's "
                      "held-out share, then on fresh samples; latency as above):", "",
                  "| plan | `--actions` | blocks removed | layers factored / ties | ratio (params) | latency ratio "
                  "| held-out error | fresh error | planning |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for row in r["budget_rows"]:
            lines.append(f"| {row['plan']} | `{row['actions']}` | {row['removed']} | {row['factored']} / "
                         f"{row['tied']} | {row['ratio']:.3f} | **{row['latency_ratio']:.3f}** | {row['error']:.4f} "
                         f"| {row['fresh']:.4f} | {row['seconds']:.0f} s |")
    return "\n".join([*lines, "", END])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="a tiny residual MLP instead of MiniLM: checks the tool")
    p.add_argument("--max-blocks", type=int, default=3)
    p.add_argument("--budget", type=float, help="also plan within this error: the menu, collapse, both")
    p.add_argument("--calib", type=int, default=128)
    p.add_argument("--fresh", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "lfpass")
    p.add_argument("--work", type=Path)
    p.add_argument("--json", type=Path)
    p.add_argument("--out", type=Path, help="rewrite the part between this tool's markers of this Markdown file")
    args = p.parse_args(argv)
    publish("bench_collapse.py", argv, args, measure, render, (BEGIN, END), "Depth collapse and latency", repeat=args.repeat, batch=args.batch, threads=args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
