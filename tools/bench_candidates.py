"""What one candidate plan costs to measure: the original model holding its values, against a build.

The budget and the plan menu's end-to-end checks measure many candidate plans on
held-out inputs. Each can be measured two ways, and this times both in one run on
real files (``tools/budget_real.py`` loads them), on the same plan and inputs:

- ``build`` (how every candidate was measured before): the factored layers' SVDs, a copy
  of the model rewritten as the plan says (shared initializers, basis and coefficient
  nodes), serialised into a new onnxruntime session, and run;
- ``held``: the original model run in one onnxruntime session whose layer weights are
  overridable initializers, fed the plan's dense values (:mod:`lfpass.core.dense`), the
  SVDs kept from earlier candidates (a budget's candidates factor the same layers at
  other ranks).

The plan is the menu's at ``--ratio`` over the layers (built once first, outside the
timing). The table gives each way's seconds per candidate (median of ``--repeat``), the
ratio build / held, and the largest difference between the two ways' outputs.

    python tools/bench_candidates.py --out docs/BENCHMARKS.md --json /tmp/bench_candidates.json
    python tools/bench_candidates.py --models ocr-det --repeat 2        # one model
    python tools/bench_candidates.py --models tiny --repeat 1           # seconds: what the test runs
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

BEGIN, END = "<!-- bench-candidates:begin -->", "<!-- bench-candidates:end -->"


def tiny(work: Path, cache: Path, n: int, seed: int) -> tuple[Path, dict[str, np.ndarray], None]:
    """A random 6-layer MLP of width 48 written with onnx.helper, and ``n`` random inputs: what
    the test runs (the timings mean nothing here; the outputs must agree)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    width, nodes, inits, h = 48, [], [], "x"
    for i in range(6):
        inits += [numpy_helper.from_array((rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32),
                                          f"blocks.{i}.weight"),
                  numpy_helper.from_array((0.1 * rng.standard_normal(width)).astype(np.float32), f"blocks.{i}.bias")]
        nodes += [helper.make_node("MatMul", [h, f"blocks.{i}.weight"], [f"m{i}"], name=f"/blocks.{i}/MatMul"),
                  helper.make_node("Add", [f"m{i}", f"blocks.{i}.bias"], [f"a{i}"], name=f"/blocks.{i}/Add"),
                  helper.make_node("Tanh", [f"a{i}"], [f"t{i}"], name=f"/blocks.{i}/Tanh")]
        h = f"t{i}"
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width])],
                              [helper.make_tensor_value_info(h, TensorProto.FLOAT, ["n", width])], inits)
    path = work / "tiny.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path, {"x": rng.standard_normal((n, width)).astype(np.float32)}, None


MODELS = {**br.MODELS, "tiny": tiny}


def bench(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import onnx_ir as ir

    from lfpass.core.config import FusionConfig
    from lfpass.core.keep import Fuser, fuse_keeping, split
    from lfpass.onnx.frontend import OnnxFrontend, split_feed

    path, feed, _ = MODELS[name](work, args.cache, args.samples, args.seed)
    model = ir.load(path)
    front = OnnxFrontend(model)
    feeds = split_feed(feed, model)
    started = time.perf_counter()
    kept = fuse_keeping(front, FusionConfig(target_ratio=args.ratio, ratio_scope="layers"), feeds)
    planned = time.perf_counter() - started
    calib, held = split(feeds, 0.25)
    stats = front.calibrate(calib, [])
    fuser = Fuser(front, stats)
    timings: dict[str, list[float]] = {"build": [], "held": []}
    outputs: dict[str, list[np.ndarray]] = {}
    ways = {"build": lambda: front.outputs(Fuser(front, stats).build(kept.plan), held),  # nothing kept between
            "held": lambda: fuser.outputs(kept.plan, held)}
    ways["held"]()  # the session and the layers' SVDs are made once per model, before any candidate
    for _ in range(args.repeat):
        for way, measure in ways.items():
            t = time.perf_counter()
            outputs[way] = measure()
            timings[way].append(time.perf_counter() - t)
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(outputs["build"], outputs["held"]))
    scale = max(float(np.max(np.abs(a))) for a in outputs["build"])
    row = {"model": name, "params": front.count(model), "ratio": kept.plan.ratio, "samples": sum(len(next(iter(
        f.values()))) for f in held), "plan_s": planned, **{f"{w}_s": statistics.median(v) for w, v in timings.items()},
        "max_abs_diff": diff, "output_scale": scale}
    row["speedup"] = row["build_s"] / row["held_s"]
    print(json.dumps(row), flush=True)
    return row


def render(report: dict[str, Any]) -> str:
    lines = [BEGIN, "", f"`{report['command']}` ({report['machine']}; load {report['load']}). Each row: the menu's "
             f"plan at {report['ratio']:g}x over the layers, measured on lfpass's held-out share of "
             f"{report['samples']} calibration samples; seconds per candidate, median of {report['repeat']}.", "",
             "| model | unique params | plan ratio | held-out samples | build s | held s | build / held "
             "| max abs diff (output scale) |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["result"]["rows"]:
        lines.append(f"| {r['model']} | {r['params']:,} | {r['ratio']:.3f} | {r['samples']} | {r['build_s']:.2f} "
                     f"| {r['held_s']:.2f} | **{r['speedup']:.1f}x** | {r['max_abs_diff']:.2g} "
                     f"({r['output_scale']:.3g}) |")
    return "\n".join([*lines, "", END])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(br.MODELS), help=f"of {', '.join(MODELS)} (default: the real ones)")
    p.add_argument("--ratio", type=float, default=1.5)
    p.add_argument("--samples", type=int, default=128, help="calibration samples (a quarter held out)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "lfpass")
    p.add_argument("--work", type=Path, help="keep the exported models here (default: a temporary folder)")
    p.add_argument("--json", type=Path)
    p.add_argument("--out", type=Path, help="rewrite the part between this tool's markers of this Markdown file")
    args = p.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        p.error(f"unknown model {unknown[0]!r} (known: {', '.join(MODELS)})")
    publish("bench_candidates.py", argv, args, lambda a, work: {"rows": [bench(m, a, work) for m in models]},
            render, (BEGIN, END), "Measuring a candidate plan", ratio=args.ratio, samples=args.samples,
            repeat=args.repeat)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
