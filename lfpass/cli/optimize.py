"""``lfpass optimize`` and ``lfpass validate``: the ONNX subcommands.

Exit codes (as for every lfpass command): 0 done; 1 validation outside
tolerance (the output is still written and marked in the report, unless
``--strict``); 2 bad input or usage. Tables go to stdout; notes (a target out
of reach, nothing to fuse) and errors are one line each on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lfpass.cli.inputs import resolve_inputs
from lfpass.cli.options import (EXIT_OK, EXIT_USAGE, EXIT_VALIDATION, add_config_options, add_schedule_options,
                                add_validation_options, config_from_args, schedule_overrides, with_tolerances)
from lfpass.cli.output import MAX_OUTPUT_LINES, history_table, note, output_line, table, write_report
from lfpass.core.config import AUTO, FusionConfig
from lfpass.core.quality import describe
from lfpass.core.errors import ConfigError, InputError, ValidationFailed
from lfpass.core.fileio import check_paths, write_text


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``optimize`` and ``validate`` to the ``lfpass`` parser."""
    p = sub.add_parser("optimize", help="fuse an ONNX model's similar layers into shared initializers and check it")
    p.add_argument("model", type=Path, help="the .onnx file (never modified)")
    p.add_argument("-o", "--output", type=Path, help="output path (default NAME.fused.onnx)")
    add_config_options(p)
    p.add_argument("--quantize", choices=("int8", "int8-weights", "int4"),
                   help="quantize the fused model with onnxruntime's quantizers, each shared tensor once: int8 "
                        "weights and activations (per-channel, dynamic; static QDQ with --inputs; integer "
                        "kernels), int8-weights 8-bit MatMul weights and embedding tables computed in float "
                        "(far more accurate on transformers), int4 4-bit blocks for both; under --max-error the "
                        "budget holds for the fused and quantized model, each weight at its own width")
    p.add_argument("--hold-shared-once", action="store_true",
                   help="declare each shared tensor an overridable initializer, so onnxruntime holds it once "
                        "rather than pre-packing a copy for every node that reads it (less memory; those nodes "
                        "run unpacked, slower)")
    p.add_argument("--plan", type=Path, help="apply this plan (from `analyze --plan-out`) instead of planning")
    p.add_argument("--dry-run", action="store_true", help="plan and print the predicted figures; write nothing")
    p.add_argument("--report", type=Path, help="write the figures as JSON, or (a .html or .png path) a one-page "
                                               "summary: quality along the plan's curve, the heatmap, the decisions")
    p.add_argument("--explain", action="store_true", help="say why each candidate pair was or was not fused")
    p.add_argument("--strict", action="store_true", help="write nothing when validation fails")
    p.add_argument("--no-validate", dest="validate", action="store_false", help="skip the onnxruntime comparison")
    p.add_argument("--external-data", action="store_true", default=None,
                   help="store tensors in NAME.onnx.data (default: as the input does, or past 2 GB)")
    add_validation_options(p)
    p.add_argument("--distill", type=Path, metavar="INPUTS",
                   help="retrain: convert to PyTorch, fuse in stages distilling from the original on these "
                        "inputs (as --inputs takes them: an .npz, one .npy, a folder of images, or a text file "
                        "with --tokenizer), export; see the schedule options")
    add_schedule_options(p)
    p.set_defaults(func=run_optimize)

    p = sub.add_parser("validate", help="compare two ONNX models' outputs in onnxruntime (optimisations off)")
    p.add_argument("reference", type=Path, help="the original model")
    p.add_argument("candidate", type=Path, help="the model to check against it")
    p.add_argument("--report", type=Path, help="write the comparison as JSON")
    add_validation_options(p)
    p.set_defaults(func=run_validate)


def _check_samples(args: argparse.Namespace) -> None:
    if args.samples < 1:
        raise ConfigError(f"--samples must be at least 1, got {args.samples}")


def run_optimize(args: argparse.Namespace) -> int:
    from lfpass.onnx.inputs import parse_input_shapes
    from lfpass.onnx.optimize import optimize

    _check_samples(args)
    config = with_tolerances(config_from_args(args), args)
    if args.distill is not None:
        return run_distill(args, config)
    try:
        result = optimize(
            args.model, args.output, config, args.plan, dry_run=args.dry_run, check=args.validate,
            strict=args.strict, inputs=resolve_inputs(args, args.model), input_shapes=parse_input_shapes(args.input_shape),
            samples=args.samples, external_data=args.external_data, progress=sys.stderr.isatty(),
            reads={"--plan": args.plan, "--pipeline": args.pipeline}, writes={"--report": args.report},
            hold_shared_once=args.hold_shared_once,
        )
    except ValidationFailed as exc:
        if exc.result is not None:
            print(table(exc.result))
            if args.report:
                write_report(args.report, exc.result.to_dict(), exc.result.plan, f"lfpass optimize {args.model.name}")
        print(f"lfpass: error: {exc}", file=sys.stderr)
        return EXIT_VALIDATION
    print(table(result))
    if args.explain:
        print(result.plan.explain())
    if result.message:
        note(result.message)
    if args.report:
        write_report(args.report, result.to_dict(), result.plan, f"lfpass optimize {args.model.name}")
    if result.validation is not None and not result.validation.passed:
        print(f"lfpass: validation outside tolerance: {result.validation.summary()}", file=sys.stderr)
        return EXIT_VALIDATION
    if not result.within_budget:
        print(f"lfpass: held-out error {result.error:.4g} is over the budget {result.plan.max_error:g}",
              file=sys.stderr)
        return EXIT_VALIDATION
    return EXIT_OK


def run_distill(args: argparse.Namespace, config: FusionConfig) -> int:
    """``optimize --distill``: ONNX in, fuse and distil in PyTorch, ONNX out."""
    if args.hold_shared_once:
        print("lfpass: error: --hold-shared-once applies to optimize without --distill (run optimize on the "
              "distilled file: --ratio 1 --hold-shared-once)", file=sys.stderr)
        return EXIT_USAGE
    from lfpass.bridge.distill import distill_onnx
    from lfpass.onnx.optimize import default_output
    from lfpass.train import Schedule

    if args.plan or args.dry_run:
        raise ConfigError("--distill plans stage by stage: it takes neither --plan nor --dry-run")
    output = args.output or default_output(args.model)
    overrides = schedule_overrides(args)
    if (config.keeps_function or (config.actions != AUTO and config.uses_menu(True))) and "stages" not in overrides:
        overrides["stages"] = 1  # data-aware options and the plan menu fuse once, then distil
    schedule = Schedule(**overrides)
    inputs = resolve_inputs(args, args.model, given=args.distill)  # an .npz, or arrays from images or text
    result = distill_onnx(args.model, output, inputs, config, schedule, checkpoint_dir=args.checkpoint_dir,
                          resume=args.resume, progress=sys.stderr.isatty(),
                          reads={"--pipeline": args.pipeline}, writes={"--report": args.report})
    print(history_table(result.retrain))
    print(f"{'bytes':<11}{result.bytes_before:>16,} -> {result.bytes_after:,} "
          f"({result.bytes_before / max(result.bytes_after, 1):.3f}x)")
    print(f"{'export':<11}{result.export.exporter}, onnxruntime vs PyTorch max abs {result.export.max_abs:.3g}")
    print(f"{'vs input':<11}{result.validation.summary()}")
    if result.error is not None:
        state = "kept" if result.within_budget else "BROKEN"
        print(f"{'held out':<11}error {result.error:.4g}, {describe(result.error_metric, result.error)} "
              f"(budget {result.max_error:g}: {state})")
    print(f"{'output':<11}{result.output}")
    plan = result.retrain.plans[0] if result.retrain.plans else None
    if plan is not None and plan.message:
        note(plan.message)
    if result.qat is not None:
        note(result.qat.summary())
    if result.quantized is not None:
        note(f"quantized {result.quantized.summary()}")
    if args.report:
        write_report(args.report, result.to_dict(), plan, f"lfpass optimize --distill {args.model.name}")
    if not result.within_budget:
        print(f"lfpass: held-out error {result.error:.4g} is over the budget {result.max_error:g}", file=sys.stderr)
        return EXIT_VALIDATION
    if result.max_error is None and not result.validation.passed:
        print(f"lfpass: validation outside tolerance: {result.validation.summary()}", file=sys.stderr)
        return EXIT_VALIDATION
    return EXIT_OK


def run_validate(args: argparse.Namespace) -> int:
    from lfpass.onnx import inputs as onnx_inputs
    from lfpass.onnx.load import check_input_file, external_files, load_model
    from lfpass.onnx.validate import score_outputs, validate

    _check_samples(args)
    config = with_tolerances(FusionConfig(), args)
    check_input_file(args.reference)
    check_input_file(args.candidate)
    reads = {"the reference": args.reference, "the candidate": args.candidate, "--inputs": args.inputs}
    check_paths(reads, {"--report": args.report})
    reference, candidate = load_model(args.reference), load_model(args.candidate)
    data_files = [*external_files(reference).values(), *external_files(candidate).values()]
    check_paths({f"a data file {i}": d for i, d in enumerate(data_files)}, {"--report": args.report})
    names = [v.name for v in onnx_inputs.runtime_inputs(reference)]
    other = [v.name for v in onnx_inputs.runtime_inputs(candidate)]
    if sorted(names) != sorted(other):
        raise InputError(f"{args.candidate}: inputs {other} differ from {args.reference}'s {names}")
    given = resolve_inputs(args, args.reference)
    feeds = (onnx_inputs.load_npz(given, reference) if given is not None
             else onnx_inputs.generate(reference, onnx_inputs.parse_input_shapes(args.input_shape), args.samples))
    scores = score_outputs(reference)
    random_note = onnx_inputs.random_input_note(reference, args.inputs is None)
    del reference, candidate
    result = validate(args.reference, args.candidate, feeds, config.atol, config.rtol, scores,
                      progress=sys.stderr.isatty())
    print(f"{'validation':<11}{result.summary()}")
    lines = [f"  {output_line(o)}" for o in result.outputs]
    print("\n".join(lines[:MAX_OUTPUT_LINES * 4]))
    if random_note:
        note(random_note)
    if args.report:
        write_text(args.report, json.dumps(result.to_dict(), indent=2))
    return EXIT_OK if result.passed else EXIT_VALIDATION
