"""Speed and memory of ``lfpass optimize`` on a GPT-2-sized ONNX model, against the floor
(``onnx.load`` + ``onnx.save`` of the same file), onnxslim and onnxsim; of the
budgeted ``optimize`` (calibration inputs, ``max_error``); and of the FX
frontend's ``analyze`` + ``apply`` against reading the state dict.

Each step runs in a fresh subprocess, measured by a small parent process
(wall time, and peak resident memory from ``getrusage(RUSAGE_CHILDREN)``);
the fastest of ``--repeat`` runs is kept. ``lfpass optimize`` runs with
``--no-validate``; the validation (``lfpass validate`` of the two files) is
measured on its own line. The model is a random-init ``GPT2Config()``
(124M parameters) exported by torch's dynamo exporter into one inline file.

The budgeted row runs ``lfpass.optimize(model, out, {"target_ratio": None,
"max_error": E}, inputs=calib.npz)`` on ``--calib`` random token sequences of
``--calib-len`` tokens; each candidate pair costs a fused copy of the model and
an onnxruntime session, so ``--budget-include`` (fnmatch over layer names)
limits the layers it may fuse; the row says how many pairs it measured and the
time per evaluation. The FX rows time, inside their own processes, building
nothing but the step itself: ``torch.load`` of the state dict (the reference),
and ``lfpass.analyze`` + ``lfpass.apply`` on the model (built untimed in the
same process, with the weights that state dict holds).

    python tools/bench_optimize.py                          # GPT-2 small, ~4 minutes
    python tools/bench_optimize.py --layers 2 --width 128   # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from benchlib import load_average, machine, measure as measure_run

_FX_READ = """
import json, sys, time, torch
start = time.perf_counter()
state = torch.load(sys.argv[1], weights_only=True)
print(json.dumps({"seconds": time.perf_counter() - start}))
"""

_FX_FUSE = """
import json, logging, sys, time, torch
from transformers import GPT2Config, GPT2LMHeadModel
import lfpass
logging.disable(logging.WARNING)
torch.manual_seed(0)  # the weights the reference's state dict holds, built untimed
model = GPT2LMHeadModel(GPT2Config(**json.loads(sys.argv[2]))).eval()
inplace = sys.argv[3] == "inplace"
start = time.perf_counter()
plan = lfpass.analyze(model)
planned = time.perf_counter()
fused = lfpass.apply(model, plan, inplace=inplace)
done = time.perf_counter()
print(json.dumps({"seconds": done - start, "analyze": planned - start, "apply": done - planned,
                  "ratio": plan.ratio, "groups": len(plan.groups), "params_after": lfpass.unique_parameters(fused)}))
"""

_BUDGET = """
import json, logging, sys, time
import lfpass
logging.disable(logging.WARNING)
model, out, calib, max_error, include = sys.argv[1:6]
config = {"target_ratio": None, "max_error": float(max_error), "actions": "tie"}  # the per-pair tie budget
if include:
    config["include"] = [include]
start = time.perf_counter()
r = lfpass.optimize(model, out, config, inputs=calib)
seconds = time.perf_counter() - start
decisions = r.plan.decisions
alone = sum(1 for *_, why in decisions if "damage alone" in why)
steps = sum(1 for *_, why in decisions if why.startswith(("fused: error", "rolled back")))
print(json.dumps({"seconds": seconds, "plan_s": r.seconds.get("plan"), "load_s": r.seconds.get("load"),
                  "pairs": alone, "evaluations": alone + steps, "ratio": r.ratio, "error": r.error,
                  "written": r.written, "message": r.plan.message}))
"""


def export_gpt2(path: Path, layers: int, width: int, vocab: int, positions: int) -> int:
    """Export a random-init GPT-2 (logits only, no cache) to one inline ONNX file; returns parameters."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    class Logits(torch.nn.Module):
        def __init__(self, model: torch.nn.Module):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    torch.manual_seed(0)
    config = GPT2Config(n_layer=layers, n_embd=width, n_head=max(width // 64, 1), vocab_size=vocab,
                        n_positions=positions, use_cache=False, bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    model = Logits(GPT2LMHeadModel(config)).eval()
    ids = torch.randint(0, vocab, (1, 8))
    mask = torch.ones(1, 8, dtype=torch.long)
    dims = ({0: "batch", 1: "seq"}, {0: "batch", 1: "seq"})
    with torch.no_grad():
        torch.onnx.export(model, (ids, mask), str(path), dynamo=True, external_data=False,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_shapes=dims, verbose=False)
    return sum(p.numel() for p in model.parameters())


ENV: dict | None = None  # the steps' environment (BLAS threads pinned under --blas-threads)


def measure(cmd: list[str], repeat: int) -> tuple[float, float]:
    """(seconds, peak MB) of ``cmd`` in a fresh process, fastest of ``repeat`` runs."""
    run = measure_run(cmd, repeat, ok=(0, 1), env=ENV)  # lfpass exits 1 when validation is outside tolerance: still a run
    return run.seconds, run.peak_mb


def fx_rows(args: argparse.Namespace) -> dict[str, dict]:
    """The FX frontend on the same GPT-2: ``analyze`` + ``apply`` against ``torch.load`` of its state dict."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    fields = dict(n_layer=args.layers, n_embd=args.width, n_head=max(args.width // 64, 1), vocab_size=args.vocab,
                  n_positions=args.positions, use_cache=False, bos_token_id=args.vocab - 1,
                  eos_token_id=args.vocab - 1)
    state = args.out / f"gpt2-{args.layers}x{args.width}.pt"
    torch.manual_seed(0)
    torch.save(GPT2LMHeadModel(GPT2Config(**fields)).state_dict(), state)
    py = sys.executable
    steps = {"read state dict (torch.load, reference)": [py, "-c", _FX_READ, str(state)],
             "FX analyze + apply (copy, the default)": [py, "-c", _FX_FUSE, str(state), json.dumps(fields), "copy"],
             "FX analyze + apply (inplace=True)": [py, "-c", _FX_FUSE, str(state), json.dumps(fields), "inplace"]}
    rows = {}
    for name, cmd in steps.items():
        runs = [measure_run(cmd, env=ENV) for _ in range(args.repeat)]
        best = min(runs, key=lambda r: r.payload()["seconds"])
        rows[name] = {**best.payload(), "peak_mb": min(r.peak_mb for r in runs), "bytes": state.stat().st_size}
    return rows


def budget_row(args: argparse.Namespace, model: Path) -> dict:
    """The budgeted ``optimize`` (calibration inputs, ``max_error``) on the same ONNX file."""
    rng = np.random.default_rng(0)
    calib = args.out / "calib.npz"
    shape = (args.calib, args.calib_len)
    np.savez(calib, input_ids=rng.integers(0, args.vocab, shape).astype(np.int64),
             attention_mask=np.ones(shape, np.int64))
    out = args.out / f"{model.stem}.budget.onnx"
    cmd = [sys.executable, "-c", _BUDGET, str(model), str(out), str(calib), str(args.max_error), args.budget_include]
    run = measure_run(cmd, env=ENV)
    return {**run.payload(), "peak_mb": run.peak_mb, "wall_s": run.seconds, "include": args.budget_include,
            "calib": list(shape), "max_error": args.max_error}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--positions", type=int, default=1024)
    p.add_argument("--repeat", type=int, default=1, help="keep the fastest of this many runs per tool")
    p.add_argument("--out", type=Path, default=Path("/tmp/lfpass-bench"), help="folder for the model files")
    p.add_argument("--no-onnxslim", action="store_true", help="skip the onnxslim comparison")
    p.add_argument("--no-onnxsim", action="store_true", help="skip the onnxsim comparison")
    p.add_argument("--no-fx", action="store_true", help="skip the FX analyze + apply rows")
    p.add_argument("--no-budget", action="store_true", help="skip the budgeted optimize row")
    p.add_argument("--max-error", type=float, default=0.01, help="the budgeted row's max_error (output cosine)")
    p.add_argument("--calib", type=int, default=32, help="calibration sequences for the budgeted row")
    p.add_argument("--calib-len", type=int, default=32, help="tokens per calibration sequence")
    p.add_argument("--budget-include", default="model.transformer.h.[0-5].mlp.c_fc",
                   help="fnmatch pattern of the layers the budgeted row may fuse ('' for all: hours on GPT-2)")
    p.add_argument("--blas-threads", type=int, help="OPENBLAS/OMP threads of every step (default: as set)")
    p.add_argument("--json", type=Path, help="also write the numbers as JSON")
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    global ENV
    if args.blas_threads is not None:
        n = str(args.blas_threads)
        ENV = {**os.environ, "OPENBLAS_NUM_THREADS": n, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}

    args.out.mkdir(parents=True, exist_ok=True)
    model = args.out / f"gpt2-{args.layers}x{args.width}.onnx"
    params = export_gpt2(model, args.layers, args.width, args.vocab, args.positions)
    py = sys.executable
    floor_out, fused, slim_out = (args.out / f"{model.stem}.{k}.onnx" for k in ("roundtrip", "fused", "slim"))
    report = args.out / f"{model.stem}.report.json"
    tools = {
        "onnx.load + onnx.save (floor)": [py, "-c", f"import onnx; onnx.save(onnx.load({str(model)!r}), {str(floor_out)!r})"],
        "lfpass optimize": [py, "-m", "lfpass.cli", "optimize", str(model), "-o", str(fused), "--no-validate",
                            "--report", str(report)],
        "lfpass (import only)": [py, "-c", "import lfpass.cli, lfpass.onnx"],
    }
    if not args.no_onnxslim:
        tools["onnxslim"] = [py, "-c", f"import onnxslim; onnxslim.slim({str(model)!r}, {str(slim_out)!r})"]
    sim_out = args.out / f"{model.stem}.sim.onnx"
    if not args.no_onnxsim and _installed("onnxsim"):
        tools["onnxsim"] = [py, "-c", f"import onnx, onnxsim; m, ok = onnxsim.simplify({str(model)!r}, certify=False); "
                                      f"onnx.save(m, {str(sim_out)!r})"]
    rows = {name: measure(cmd, args.repeat) for name, cmd in tools.items()}
    if not fused.exists():
        raise SystemExit(f"lfpass wrote nothing for {model.name} (nothing to fuse?): use 2 or more layers")
    rows["lfpass validate (separate)"] = measure([py, "-m", "lfpass.cli", "validate", str(model), str(fused)], args.repeat)
    sizes = {"onnx.load + onnx.save (floor)": floor_out, "lfpass optimize": fused, "onnxslim": slim_out,
             "onnxsim": sim_out}
    print(f"machine: {machine()}; load average {load_average()} at the end of the file rows; fastest of {args.repeat}")
    print(f"command: python tools/bench_optimize.py {' '.join(argv)}")
    print()
    print(table(rows, sizes, model, params, json.loads(report.read_text())))
    if not args.no_onnxsim and "onnxsim" not in rows:
        print("\nonnxsim: not installed here (pip install onnxsim), no row")
    data = {"params": params, "rows": rows, "bytes": {k: v.stat().st_size for k, v in sizes.items() if v.exists()},
            "machine": machine(), "repeat": args.repeat}
    if not args.no_budget:
        data["budget"] = budget_row(args, model)
        print()
        print(budget_table(data["budget"], rows["onnx.load + onnx.save (floor)"]))
    if not args.no_fx:
        data["fx"] = fx_rows(args)
        print()
        print(fx_table(data["fx"]))
    if args.json:
        args.json.write_text(json.dumps(data, indent=2))
    return 0


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def budget_table(b: dict, floor: tuple[float, float]) -> str:
    per = b["plan_s"] / max(b["evaluations"], 1)
    head = "| step | s | peak MB | time / floor | memory / floor | pairs measured | evaluations | s per evaluation | evaluation / floor | ratio | written |"
    return "\n".join([
        f"budgeted optimize: max_error {b['max_error']:g} (output cosine), {b['calib'][0]} random token sequences "
        f"of {b['calib'][1]} (a quarter held out), layers matching {b['include'] or 'all'!r}", "", head,
        "|---" * (head.count("|") - 1) + "|",
        f"| lfpass.optimize, budgeted | {b['wall_s']:.1f} | {b['peak_mb']:.0f} | {b['wall_s'] / floor[0]:.2f} | "
        f"{b['peak_mb'] / floor[1]:.2f} | {b['pairs']} | {b['evaluations']} | {per:.2f} | {per / floor[0]:.2f} | "
        f"{b['ratio']:.3f} | {'yes' if b['written'] else 'no'} |",
        "", f"lfpass: {b['message']}"])


def fx_table(fx: dict) -> str:
    ref = fx["read state dict (torch.load, reference)"]
    head = "| step (FX, in its own process) | s | peak MB | time / read | memory / read | ratio |"
    lines = [f"state dict {ref['bytes'] / 2**20:.0f} MB (torch.save, read from the page cache)", "", head,
             "|---" * (head.count("|") - 1) + "|"]
    for name, r in fx.items():
        lines.append(f"| {name} | {r['seconds']:.3f} | {r['peak_mb']:.0f} | {r['seconds'] / ref['seconds']:.2f} | "
                     f"{r['peak_mb'] / ref['peak_mb']:.2f} | " + (f"{r['ratio']:.3f} |" if "ratio" in r else "- |"))
    return "\n".join(lines)


def table(rows: dict[str, tuple[float, float]], sizes: dict[str, Path], model: Path, params: int, report: dict) -> str:
    floor_s, floor_mb = rows["onnx.load + onnx.save (floor)"]
    slim = rows.get("onnxslim")
    head = "| tool | s | peak MB | time / floor | memory / floor | time / onnxslim | memory / onnxslim | output MB | size ratio |"
    lines = [f"model: {model.name}, {params / 1e6:.1f}M parameters, {model.stat().st_size / 2**20:.0f} MB; "
             f"lfpass: {report['groups']} groups, unique-parameter ratio {report['ratio']:.3f}", "", head,
             "|---" * (head.count("|") - 1) + "|"]
    for name, (s, mb) in rows.items():
        out = sizes.get(name)
        size = out.stat().st_size if out is not None and out.exists() else None
        vs_slim = (f"{s / slim[0]:.2f}", f"{mb / slim[1]:.2f}") if slim else ("-", "-")
        lines.append(
            f"| {name} | {s:.2f} | {mb:.0f} | {s / floor_s:.2f} | {mb / floor_mb:.2f} | {vs_slim[0]} | {vs_slim[1]} | "
            + (f"{size / 2**20:.0f} | {model.stat().st_size / size:.2f} |" if size else "- | - |")
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
