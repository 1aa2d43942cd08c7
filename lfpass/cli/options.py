"""What every ``lfpass`` subcommand shares: exit codes, the options that build a
:class:`~lfpass.core.config.FusionConfig`, and the validation options.

Options live in one config object: the flags here only override the fields of
a ``passes/*.toml`` pipeline (or the defaults), so the CLI, the Python API and
the pipelines cannot drift apart.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lfpass.cli.inputs import add_input_options
from lfpass.core.config import FusionConfig, from_mapping, load_pipeline

EXIT_OK, EXIT_VALIDATION, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143  # 128 + SIGINT, 128 + SIGTERM


def add_config_options(p: argparse.ArgumentParser,
                       keep_title: str = "keeping the function (calibration inputs: --inputs)") -> None:
    """The options that build a FusionConfig; shared by every subcommand that plans (``keep_title``
    heads the keep-function group: a subcommand without ``--inputs`` says where they apply)."""
    p.add_argument("--pipeline", type=Path, help="a passes/*.toml pipeline (flags given here override it)")
    goal = p.add_mutually_exclusive_group()
    goal.add_argument("--ratio", type=float, help="target compression ratio (unique params before / after)")
    goal.add_argument("--threshold", type=float, help="fuse every pair at least this similar instead")
    p.add_argument("--metric", help="cosine | cov | euclidean | wasserstein | kl | output (needs --inputs)")
    p.add_argument("--merge", help="auto | mean | weighted | keep | mix | regmean (needs --inputs); auto (default): "
                                   "with calibration inputs regmean (under --max-error, regmean or mean per group by "
                                   "measured error), else mean")
    p.add_argument("--scope", choices=("model", "layers"), help="what the ratio is measured over")
    p.add_argument("--cross-role", action="store_true", default=None, help="let same-shaped layers of any role share")
    p.add_argument("--max-group-size", type=int, help="at most this many layers share one tensor")
    p.add_argument("--max-overshoot", type=float, help="the ratio may land at most this far past --ratio")
    p.add_argument("--granularity", choices=("tensor", "block"),
                   help="tensor: each projection by role; block: whole attention / MLP units")
    p.add_argument("--heads", action="store_true", default=None, help="let output heads (lm_head, classifier) fuse")
    p.add_argument("--seed", type=int)
    keep = p.add_argument_group(keep_title)
    keep.add_argument("--max-error", type=float,
                      help="largest held-out output error allowed (e.g. 0.01: output cosine >= 0.99); "
                           "without --ratio, fuse as far as the budget allows")
    keep.add_argument("--error-metric", choices=("cosine", "top1", "accuracy"),
                      help="what --max-error measures (accuracy needs 'labels' with the inputs)")
    keep.add_argument("--holdout", type=float, help="share of the calibration inputs held out to measure the error")
    keep.add_argument("--margin", type=float,
                      help="keep the error this many standard errors (over the samples planning measures on) "
                           "below --max-error (default 1.645: one-sided 95%%)")
    keep.add_argument("--error-output", metavar="NAME", help="measure the error on this output only (default: all)")
    keep.add_argument("--pooling", choices=("none", "mean", "cls"),
                      help="pool the measured output over positions first, as its users do: mean (over the "
                           "attention_mask input where there is one), cls (the first position), none (default)")
    keep.add_argument("--align", choices=("auto", "none", "weights", "activations"),
                      help="move members into their anchor's coordinates first (function-preserving); auto "
                           "(default): with calibration inputs weights (under --max-error, weights or none by measured "
                           "error), else none")
    keep.add_argument("--residual-rank", type=int, help="give every member its own correction of this rank")
    keep.add_argument("--actions", metavar="LIST",
                      help="the plan menu, comma-separated from tie, residual (tie + per-member low-rank part), "
                           "basis (a shared basis with per-member coefficients), lowrank (per-layer SVD); the "
                           "planner spends --ratio or --max-error on the least damage per parameter saved. auto "
                           "(default): every action with calibration inputs, else tie")


def config_from_args(args: argparse.Namespace) -> FusionConfig:
    """The pipeline's config (or the defaults) with every flag given on the command line applied."""
    base = load_pipeline(args.pipeline) if args.pipeline else FusionConfig()
    data = base.to_dict()
    if args.threshold is not None:
        data.update(threshold=args.threshold, target_ratio=None)
    if args.ratio is not None:
        data.update(target_ratio=args.ratio)
    elif getattr(args, "max_error", None) is not None and args.threshold is None:
        data.update(target_ratio=None)  # a budget alone: as far as it allows
    for key, value in (
        ("metric", args.metric), ("merge", args.merge), ("ratio_scope", args.scope),
        ("cross_role", args.cross_role), ("max_group_size", args.max_group_size), ("seed", args.seed),
        ("max_overshoot", args.max_overshoot), ("granularity", args.granularity), ("heads", args.heads),
        ("max_error", getattr(args, "max_error", None)), ("error_metric", getattr(args, "error_metric", None)),
        ("holdout", getattr(args, "holdout", None)), ("align", getattr(args, "align", None)),
        ("margin", getattr(args, "margin", None)), ("error_output", getattr(args, "error_output", None)),
        ("pooling", getattr(args, "pooling", None)),
        ("residual_rank", getattr(args, "residual_rank", None)), ("actions", getattr(args, "actions", None)),
        ("quantize", getattr(args, "quantize", None)),
    ):
        if value is not None:
            data[key] = value
    return from_mapping(data, source="options")


def add_validation_options(p: argparse.ArgumentParser) -> None:
    """The options of the onnxruntime comparison; shared by ``optimize`` and ``validate``."""
    p.add_argument("--atol", type=float, help="absolute tolerance (default 1e-3, or the pipeline's)")
    p.add_argument("--rtol", type=float, help="relative tolerance (default 1e-2, or the pipeline's)")
    p.add_argument("--inputs", type=Path, help="calibration and validation inputs: an .npz of arrays named after "
                                               "the model's inputs, one .npy array (a one-input model), a folder "
                                               "of images, or a text file of one sample per line with --tokenizer")
    p.add_argument("--input-shape", action="append", metavar="NAME:DIMxDIM",
                   help="shape of an input with dynamic dimensions, e.g. input:1x3x224x224 (repeatable)")
    p.add_argument("--samples", type=int, default=2, help="generated input batches to compare (default 2)")
    add_input_options(p)


def with_tolerances(config: FusionConfig, args: argparse.Namespace) -> FusionConfig:
    """``config`` with ``--atol`` / ``--rtol`` applied where given."""
    given = {k: v for k, v in (("atol", args.atol), ("rtol", args.rtol)) if v is not None}
    return config.replace(**given)


def add_schedule_options(p: argparse.ArgumentParser) -> None:
    """The retraining schedule's options (they override a recipe's ``[train]`` values)."""
    p.add_argument("--stages", type=int, help="reach the target in this many fuse + retrain stages")
    p.add_argument("--steps", type=int, dest="steps_per_stage", help="training steps after each stage's fuse")
    p.add_argument("--lr", type=float, help="learning rate")
    p.add_argument("--batch-size", type=int, help="global batch size (split over torchrun ranks)")
    p.add_argument("--freeze-steps", type=int, help="steps each stage's fused tensors stay frozen")
    p.add_argument("--max-drop", type=float, help="roll back a stage whose quality falls this far below the original")
    p.add_argument("--norm-stats", choices=("auto", "update", "frozen"),
                   help="BatchNorm running statistics while retraining: re-estimated (update) or kept the "
                        "original's (frozen); auto (default): frozen when distilling on calibration inputs")
    p.add_argument("--checkpoint-dir", type=Path, help="write a checkpoint after every stage here")
    p.add_argument("--resume", action="store_true", help="continue the run found in --checkpoint-dir")


SCHEDULE_FLAGS = ("stages", "steps_per_stage", "lr", "batch_size", "freeze_steps", "max_drop", "norm_stats")


def schedule_overrides(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in SCHEDULE_FLAGS if getattr(args, k, None) is not None}
