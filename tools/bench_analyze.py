"""Time ``lfpass.analyze`` on a GPT-2-small-sized model against reading its weights once.

The floor is what any tool that looks at every weight must pay: reading the
state dict from a file (``torch.load`` of a ``torch.save`` written just before,
so from the page cache). ``analyze`` with the default metric (cosine) should
cost no more than three such reads. Each figure is the best of ``--runs``.

    python tools/bench_analyze.py                          # GPT-2 small: 12 layers, width 768
    python tools/bench_analyze.py --layers 2 --width 64 --runs 1   # a quick check

The model is ``GPT2LMHeadModel(GPT2Config())`` with random weights (no download).
Tracing with ``torch.export`` is timed on its own row, once; it is not part of
``analyze``, which is timed on the plain module and on the exported graph.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import lfpass
from lfpass import FusionConfig
from lfpass.core.metrics import METRICS

AIM = 3.0


def best_of(runs: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def build(layers: int, width: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    heads = next(h for h in (12, 8, 4, 2, 1) if width % h == 0)
    config = GPT2Config(n_layer=layers, n_embd=width, n_head=heads, use_cache=False)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval()


def time_read(model: torch.nn.Module, runs: int) -> tuple[float, int]:
    """Best time to ``torch.load`` the model's state dict from a file; and the file's size."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state.pt"
        torch.save(model.state_dict(), path)
        size = path.stat().st_size
        seconds = best_of(runs, lambda: torch.load(path, weights_only=True))
    return seconds, size


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"numpy {np.__version__}, Python {platform.python_version()}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12, help="transformer blocks (GPT-2 small: 12)")
    parser.add_argument("--width", type=int, default=768, help="hidden width (GPT-2 small: 768)")
    parser.add_argument("--runs", type=int, default=3, help="best of this many runs per row")
    weight_metrics = [m for m, f in METRICS.items() if not getattr(f, "needs_stats", False)]  # no calibration here
    parser.add_argument("--metrics", default=",".join(weight_metrics), help="comma-separated metrics to time")
    parser.add_argument("--no-export", action="store_true", help="skip torch.export and analyze on its graph")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    metrics = [m for m in args.metrics.split(",") if m]
    if "cosine" not in metrics:
        metrics.insert(0, "cosine")

    model = build(args.layers, args.width)
    params = lfpass.unique_parameters(model)
    read, size = time_read(model, args.runs)
    rows: list[tuple[str, float, str]] = [("read state dict (torch.load)", read, "1.00")]

    lfpass.analyze(model, FusionConfig())  # warm-up, untimed: first-touch allocations, BLAS threads
    plans = {}
    for metric in metrics:
        config = FusionConfig(metric=metric)
        seconds = best_of(args.runs, lambda: plans.__setitem__(metric, lfpass.analyze(model, config)))
        rows.append((f"analyze, metric {metric}" + (" (default)" if metric == "cosine" else ""), seconds, f"{seconds / read:.2f}"))
    cosine = rows[1][1]

    if not args.no_export:
        ids = torch.zeros((1, 8), dtype=torch.long)
        start = time.perf_counter()
        graph = lfpass.trace(model, {"input_ids": ids})
        traced = time.perf_counter() - start
        rows.append(("trace (torch.export, 1 run; not part of analyze)", traced, f"{traced / read:.2f}"))
        config = FusionConfig()
        seconds = best_of(args.runs, lambda: lfpass.analyze(graph, config))
        rows.append(("analyze the exported graph, metric cosine", seconds, f"{seconds / read:.2f}"))

    plan = plans["cosine"]
    print(f"machine: {machine()}")
    print(
        f"model: GPT2LMHeadModel, {args.layers} layers, width {args.width}, {params / 1e6:.1f} M parameters, "
        f"state dict {size / 1e6:.0f} MB; analyze: FusionConfig() (target ratio {plan.target_ratio:g}, "
        f"{len(plan.groups)} groups, ratio {plan.ratio:.3f}); best of {args.runs}"
    )
    print()
    print("| step | seconds | x read |")
    print("|---|---:|---:|")
    for name, seconds, ratio in rows:
        print(f"| {name} | {seconds:.3f} | {ratio} |")
    print()
    verdict = "within" if cosine <= AIM * read else "OVER"
    print(f"ratio analyze/read: {cosine / read:.2f} ({verdict} the aim of {AIM:g})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
