"""Speed and memory of ``lfpass optimize`` on a GPT-2-sized ONNX model, against the floor
(``onnx.load`` + ``onnx.save`` of the same file) and against onnxslim.

Each tool runs in a fresh subprocess, measured by a small parent process
(wall time, and peak resident memory from ``getrusage(RUSAGE_CHILDREN)``);
the fastest of ``--repeat`` runs is kept. ``lfpass optimize`` runs with
``--no-validate``; the validation (``lfpass validate`` of the two files) is
measured on its own line. The model is a random-init ``GPT2Config()``
(124M parameters) exported by torch's dynamo exporter into one inline file.

    python tools/bench_optimize.py                          # GPT-2 small, ~2 minutes
    python tools/bench_optimize.py --layers 2 --width 128   # a few seconds
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path

_MEASURE = textwrap.dedent(
    """
    import resource, subprocess, sys, time
    start = time.perf_counter()
    done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(f"{done.returncode} {seconds:.4f} {peak_kb}")
    sys.stderr.write(done.stderr[-2000:] if done.returncode else "")
    """
)


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


def measure(cmd: list[str], repeat: int) -> tuple[float, float]:
    """(seconds, peak MB) of ``cmd`` in a fresh process, fastest of ``repeat`` runs."""
    best: tuple[float, float] | None = None
    for _ in range(repeat):
        out = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True, check=True)
        code, seconds, peak_kb = out.stdout.split()
        if int(code) not in (0, 1):  # lfpass exits 1 when validation is outside tolerance: still a run
            raise RuntimeError(f"{' '.join(cmd)} failed ({code}):\n{out.stderr}")
        run = (float(seconds), int(peak_kb) / 1024)
        best = run if best is None or run[0] < best[0] else best
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--positions", type=int, default=1024)
    p.add_argument("--repeat", type=int, default=1, help="keep the fastest of this many runs per tool")
    p.add_argument("--out", type=Path, default=Path("/tmp/lfpass-bench"), help="folder for the model files")
    p.add_argument("--no-onnxslim", action="store_true", help="skip the onnxslim comparison")
    p.add_argument("--json", type=Path, help="also write the numbers as JSON")
    args = p.parse_args(argv)

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
    rows = {name: measure(cmd, args.repeat) for name, cmd in tools.items()}
    if not fused.exists():
        raise SystemExit(f"lfpass wrote nothing for {model.name} (nothing to fuse?): use 2 or more layers")
    rows["lfpass validate (separate)"] = measure([py, "-m", "lfpass.cli", "validate", str(model), str(fused)], args.repeat)
    sizes = {"onnx.load + onnx.save (floor)": floor_out, "lfpass optimize": fused, "onnxslim": slim_out}
    print(table(rows, sizes, model, params, json.loads(report.read_text())))
    if args.json:
        args.json.write_text(json.dumps({"params": params, "rows": rows,
                                         "bytes": {k: v.stat().st_size for k, v in sizes.items() if v.exists()}}, indent=2))
    return 0


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
