"""The ``lfpass`` command line. Errors become one line on stderr and a non-zero exit:
0 done, 1 validation outside tolerance, 2 bad input or usage."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from lfpass.config import FusionConfig, from_mapping, load_pipeline
from lfpass.errors import LfpassError, TraceError, first_line
from lfpass.fileio import Terminated, check_paths, cleanup_on_sigterm, write_text
from lfpass.plan import FusionPlan

log = logging.getLogger("lfpass")

EXIT_OK, EXIT_VALIDATION, EXIT_USAGE = 0, 1, 2


def add_config_options(p: argparse.ArgumentParser) -> None:
    """The options that build a FusionConfig; shared by every subcommand that plans."""
    p.add_argument("--pipeline", type=Path, help="a passes/*.toml pipeline (flags given here override it)")
    goal = p.add_mutually_exclusive_group()
    goal.add_argument("--ratio", type=float, help="target compression ratio (unique params before / after)")
    goal.add_argument("--threshold", type=float, help="fuse every pair at least this similar instead")
    p.add_argument("--metric", help="cosine | cov | euclidean | wasserstein | kl")
    p.add_argument("--merge", help="mean | weighted | keep | mix")
    p.add_argument("--scope", choices=("model", "layers"), help="what the ratio is measured over")
    p.add_argument("--cross-role", action="store_true", default=None, help="let same-shaped layers of any role share")
    p.add_argument("--max-group-size", type=int, help="at most this many layers share one tensor")
    p.add_argument("--max-overshoot", type=float, help="the ratio may land at most this far past --ratio")
    p.add_argument("--seed", type=int)


def config_from_args(args: argparse.Namespace) -> FusionConfig:
    base = load_pipeline(args.pipeline) if args.pipeline else FusionConfig()
    data = base.to_dict()
    if args.threshold is not None:
        data.update(threshold=args.threshold, target_ratio=None)
    if args.ratio is not None:
        data.update(target_ratio=args.ratio)
    for key, value in (
        ("metric", args.metric), ("merge", args.merge), ("ratio_scope", args.scope),
        ("cross_role", args.cross_role), ("max_group_size", args.max_group_size), ("seed", args.seed),
        ("max_overshoot", args.max_overshoot),
    ):
        if value is not None:
            data[key] = value
    return from_mapping(data, source="options")


def _cmd_analyze(args: argparse.Namespace) -> int:
    from lfpass import report

    config = config_from_args(args)
    target = args.target
    onnx_file = target.endswith(".onnx")
    stem = Path(target).with_suffix("").name if onnx_file else target.rpartition(":")[2]
    heatmap = Path(args.heatmap or f"{stem}.similarity.png")
    writes = {"--heatmap": heatmap, "--plan-out": args.plan_out}
    source = Path(target if onnx_file else target.rpartition(":")[0])
    check_paths({"the model": source if source.suffix in (".onnx", ".py") else None, "--pipeline": args.pipeline},
                writes)
    if onnx_file:
        from lfpass.onnx import analyze_onnx

        plan = analyze_onnx(Path(target), config, progress=sys.stderr.isatty(), writes=writes)
    else:
        plan = _analyze_factory(target, config)
    print(report.pairs_table(plan, top=args.top))
    print()
    print(report.summary(plan))
    if args.explain:
        print(plan.explain())
    report.write_heatmap(plan, heatmap)
    print(f"heatmap           {heatmap}")
    if args.plan_out:
        write_text(args.plan_out, plan.to_json())
        print(f"plan              {args.plan_out}")
    return EXIT_OK


def _analyze_factory(spec: str, config: FusionConfig) -> FusionPlan:
    from lfpass.api import analyze
    from lfpass.factory import load_factory
    from lfpass.fx.trace import trace

    model, example = load_factory(spec)
    try:
        graph = trace(model, example)
    except TraceError as exc:  # the module tree still names every nn.Linear / nn.Conv*
        log.warning("%s; planning over the module tree instead", exc)
        graph = model
    return analyze(graph, config, progress=sys.stderr.isatty())


def _cmd_demo(args: argparse.Namespace) -> int:
    from lfpass.demo import run_demo

    result = run_demo(quick=args.quick, seconds=args.seconds, out_dir=Path(args.out))
    print(result["report"], end="")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lfpass", description="Compress neural networks by layer fusion.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each step does")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("analyze", help="score layer similarity and plan a fusion (writes nothing but a heatmap)")
    p.add_argument("target", help="MODULE:FACTORY returning an nn.Module (or (model, example_inputs)), or a .onnx file")
    add_config_options(p)
    p.add_argument("--top", type=int, default=5, help="pairs to show per class")
    p.add_argument("--heatmap", type=Path, help="heatmap PNG path (default: NAME.similarity.png)")
    p.add_argument("--plan-out", type=Path, help="save the plan as JSON for review and `optimize --plan`")
    p.add_argument("--explain", action="store_true", help="say why each candidate pair was or was not fused")
    p.set_defaults(func=_cmd_analyze)

    p = sub.add_parser("demo", help="train a small CNN on real digits, fuse it, retrain, and compare")
    p.add_argument("--quick", action="store_true", help="a few seconds of training instead of a minute")
    p.add_argument("--seconds", type=float, help="training budget before fusing (default 60, or 5 with --quick)")
    p.add_argument("--out", default="lfpass-demo", help="folder for the demo's files")
    p.set_defaults(func=_cmd_demo)
    from lfpass.onnx.commands import register
    register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="lfpass: %(message)s")
    try:
        with cleanup_on_sigterm():
            return args.func(args)
    except LfpassError as exc:
        print(f"lfpass: error: {first_line(exc, width=400)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("lfpass: interrupted; nothing was left half-written", file=sys.stderr)
        return 130
    except Terminated:
        print("lfpass: terminated; nothing was left half-written", file=sys.stderr)
        return 143
    except MemoryError:
        print("lfpass: error: out of memory", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 - a bug in lfpass: still one line, the traceback under -v
        if args.verbose:
            raise
        print(f"lfpass: error: internal error ({type(exc).__name__}: {first_line(exc)}); "
              "rerun with -v for the traceback and report it", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
