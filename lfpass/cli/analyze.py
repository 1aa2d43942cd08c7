"""``lfpass analyze``: score layer similarity and plan a fusion of a PyTorch factory
or an ONNX file; prints the most similar pairs and the plan's figures, writes a
heatmap and, with ``--plan-out``, the plan for review and ``optimize --plan``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from lfpass.cli.options import EXIT_OK, add_config_options, config_from_args
from lfpass.core.config import AUTO, FusionConfig
from lfpass.core.errors import ConfigError, TraceError
from lfpass.core.fileio import check_paths, write_text
from lfpass.core.plan import FusionPlan

log = logging.getLogger("lfpass")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``analyze`` to the ``lfpass`` parser."""
    p = sub.add_parser("analyze", help="score layer similarity and plan a fusion (writes nothing but a heatmap)")
    p.add_argument("target", help="MODULE:FACTORY returning an nn.Module (or (model, example_inputs)), or a .onnx file")
    add_config_options(p, keep_title="keeping the function (refused here: analyze plans by weight similarity "
                                     "alone; use `lfpass optimize --inputs CALIB.npz --dry-run`)")
    p.add_argument("--top", type=int, default=5, help="pairs to show per class")
    p.add_argument("--heatmap", type=Path, help="heatmap PNG path (default: NAME.similarity.png)")
    p.add_argument("--plan-out", type=Path, help="save the plan as JSON for review and `optimize --plan`")
    p.add_argument("--explain", action="store_true", help="say why each candidate pair was or was not fused")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lfpass import report

    config = config_from_args(args)
    if config.keeps_function or config.measuring or (config.actions != AUTO and config.uses_menu(True)):
        raise ConfigError("analyze plans by weight similarity alone; for a plan by measured output error, "
                          "alignment, corrections or the plan menu (--actions), run "
                          "`lfpass optimize MODEL.onnx --inputs CALIB.npz --dry-run`")
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
    from lfpass.factory import load_factory
    from lfpass.fx.api import analyze
    from lfpass.fx.trace import trace

    model, example = load_factory(spec)
    try:
        graph = trace(model, example)
    except TraceError as exc:  # the module tree still names every nn.Linear / nn.Conv*
        log.warning("%s; planning over the module tree instead", exc)
        graph = model
    return analyze(graph, config, progress=sys.stderr.isatty())
