"""``lfpass retrain --pipeline passes/NAME.toml``: fuse in stages and retrain with the ties
kept, as a recipe's ``[train]`` section says (:mod:`lfpass.recipe`); prints the run
stage by stage, exports the result to ONNX when asked, writes ``--report``.

Runs as it is under ``torchrun --nproc_per_node N -m lfpass.cli retrain ...``:
every rank trains its shard, rank 0 alone prints and writes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from lfpass.cli.options import EXIT_OK, add_config_options, add_schedule_options, config_from_args, schedule_overrides
from lfpass.cli.output import history_table
from lfpass.core.errors import ConfigError
from lfpass.core.fileio import check_paths, write_text


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("retrain", help="fuse in stages and retrain with the ties kept (a recipe's [train] section)")
    add_config_options(p)
    add_schedule_options(p)
    p.add_argument("-o", "--output", type=Path, help="export the result to this ONNX file (default: the recipe's)")
    p.add_argument("--report", type=Path, help="write the run (stages, plans, figures) as JSON")
    p.set_defaults(func=run_retrain)


def run_retrain(args: argparse.Namespace) -> int:
    from lfpass.recipe import load_recipe

    if args.pipeline is None:
        raise ConfigError("retrain needs --pipeline FILE.toml with a [train] section (see passes/retrain-mnist.toml)")
    _, recipe = load_recipe(args.pipeline)
    config = config_from_args(args)
    output = args.output or (Path(recipe.output) if recipe.output else None)
    checkpoints = args.checkpoint_dir or (Path(recipe.checkpoint_dir) if recipe.checkpoint_dir else None)
    check_paths({"--pipeline": args.pipeline, "train.data": Path(recipe.data) if recipe.data else None,
                 "train.weights": Path(recipe.weights) if recipe.weights else None},
                {"--output": output, "--report": args.report})
    schedule = recipe.make_schedule(**schedule_overrides(args))
    if recipe.model.endswith(".onnx"):
        return _distil_onnx(args, recipe, config, schedule, output, checkpoints)
    result, example = _retrain_factory(recipe, config, schedule, checkpoints, args.resume)
    if not _rank0():
        return EXIT_OK
    print(history_table(result))
    report: dict[str, Any] = {"retrain": result.to_dict()}
    if output is not None:
        from lfpass.bridge.export import export

        exported = export(result.model, example, output)
        print(f"{'export':<11}{exported.path} ({exported.exporter}; {exported.bytes:,} bytes; onnxruntime vs "
              f"PyTorch max abs {exported.max_abs:.3g})")
        report["export"] = exported.to_dict()
    if args.report:
        write_text(args.report, json.dumps(report, indent=2, default=str))
    return EXIT_OK


def _retrain_factory(recipe, config, schedule, checkpoints, resume):
    from lfpass.factory import load_factory
    from lfpass.recipe import build_task, load_weights
    from lfpass.train import retrain

    model, example = load_factory(recipe.model)
    if recipe.weights:
        load_weights(model, recipe.weights)
    task = build_task(recipe, model, seed=schedule.seed)
    result = retrain(model, task, config, schedule, checkpoint_dir=checkpoints, resume=resume,
                     progress=sys.stderr.isatty())
    return result, example if example is not None else _example(task)


def _example(task: Any) -> Any:
    """Inputs to export on when the factory gave none: a few of the task's own."""
    for name in ("x_test", "eval_inputs"):
        if hasattr(task, name):
            data = getattr(task, name)
            return tuple(t[:2] for t in data) if isinstance(data, tuple) else data[:2]
    if hasattr(task, "valid_ids"):
        return task.valid_ids[: task.seq_len].unsqueeze(0)
    raise ConfigError("the factory returned no example inputs to export on: return (model, example_inputs)")


def _distil_onnx(args, recipe, config, schedule, output, checkpoints) -> int:
    from lfpass.bridge.distill import distill_onnx
    from lfpass.onnx.optimize import default_output

    result = distill_onnx(recipe.model, output or default_output(Path(recipe.model)), recipe.data, config, schedule,
                          eval_fraction=recipe.eval_fraction, checkpoint_dir=checkpoints, resume=args.resume,
                          progress=sys.stderr.isatty(), writes={"--report": args.report})
    print(history_table(result.retrain))
    print(f"{'vs input':<11}{result.validation.summary()}")
    print(f"{'output':<11}{result.output}")
    if args.report:
        write_text(args.report, json.dumps(result.to_dict(), indent=2, default=str))
    return EXIT_OK


def _rank0() -> bool:
    """Rank 0 of a torchrun launch (or a plain run). Read from torchrun's environment:
    the training call has left its process group by the time results are written."""
    return int(os.environ.get("RANK", "0")) == 0
