"""Fusion and quantization at equal bytes on disk, on real pretrained files, verified on fresh inputs.

Does lfpass's fusion compound with quantization, or does quantizing alone already take
what fusion would? Per model (``--models``; loaded by ``tools/budget_real.py``:
all-MiniLM-L6-v2 exported by torch's dynamo exporter, on Shakespeare sentences; the GPT-2-style
character model ``tools/reproduce.py gpt`` trains on the plays (same sizes and seed), exported
the same way, on held-out 64-character windows; and
PP-OCRv4's text detector from the ``rapidocr_onnxruntime`` wheel, on rendered text
lines), each row is a written ONNX file:

- ``fp32``: the original;
- ``int8 alone``: onnxruntime's ``quantize_dynamic(model, out, per_channel=True,
  weight_type=QuantType.QInt8)`` on the original, what a deployment engineer runs;
- ``int4 alone``: onnxruntime's ``MatMulNBitsQuantizer(model, bits=4, block_size=32,
  is_symmetric=True)`` on the original (skipped, with the reason, for a model with no
  ``MatMul``);
- for each ``--budgets`` E: ``lfpass optimize MODEL --inputs calib.npz --max-error E
  --scope model`` (fusion alone), and the same with ``--quantize int8``, ``int8-weights``
  and ``int4`` (the budget then holds for the fused and quantized model); MiniLM
  with ``--pooling mean``, as ``budget_real.py`` runs it. lfpass runs by absolute path
  from an empty folder, ``OMP_NUM_THREADS=--threads``, its defaults otherwise;
- ``lfpass E=..., then int8 alone``: the fusion-alone file quantized by the ``int8 alone``
  call: fusion and quantization composed by hand, beside lfpass's own ``--quantize``;
- ``lfpass +Q, quantized alone``: ``--ratio 1 --quantize Q`` (lfpass's quantization, nothing
  fused); ``lfpass E=int8's +Q``: the budget set to ``int8 alone``'s own fresh error (the
  same quality, to compare bytes); ``lfpass +int4, distilled``: ``--ratio 1 --distill
  calib.npz --quantize int4``, the weights retrained onto the 4-bit grid first.

Where onnxruntime's quantizer fails on a file whose weights are ``Constant`` nodes (as
PP-OCRv4's converter wrote them: "Expected ... to be an initializer"), it is run again
with those nodes lifted to initializers, nothing else changed, and the table says so.

Every file is measured the same way: its bytes on disk (model and external data), the
ratio to the fp32 file's, and lfpass's cosine error (1 - the mean per-sample cosine) of
its readout (MiniLM: the mean-pooled sentence embedding; the detector: its map) against
the original's on ``--fresh`` samples that neither lfpass's planner nor its verification
saw. Per model, a verdict against ``int8 alone`` at equal bytes, and for MiniLM whether
a file 6x smaller than fp32 keeps embedding cosine >= 0.99. Exit code 1 from
``optimize`` means outside its tolerance or budget; the file is written and measured all
the same.

    python tools/quantize_real.py --out docs/QUANTIZE_REAL.md --json docs/quantize_real.json  # ~1-2 CPU-hours
    python tools/quantize_real.py --models ocr-det --budgets 0.01,0.05                         # the detector
    python tools/quantize_real.py --small        # a random residual MLP, under a minute: what the test runs
    python tools/quantize_real.py --render docs/quantize_real.json --out docs/QUANTIZE_REAL.md  # no runs
    python tools/quantize_real.py --models gpt --only distilled --json new.json --merge docs/quantize_real.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
MODELS = ("minilm", "gpt", "ocr-det")
QUANTIZE = ("int8", "int8-weights", "int4")
# quantization-aware retraining of the distilled row. It distils every position's hidden state (no --pooling):
# on MiniLM's 230 training sentences that generalised better (fresh error 0.016 after 150 steps) than distilling
# the pooled embedding the error is read on (0.019 after 300 steps), and 400 steps at 2e-4 did worse than 150 at 1e-4
DISTILL_STEPS, DISTILL_LR, DISTILL_BATCH = 150, 1e-4, 16
BASELINE = "int8 alone"
TARGET_RATIO, TARGET_COSINE = 6.0, 0.99  # MiniLM's aim: 6x smaller than fp32 at embedding cosine >= 0.99
WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Conv": 1, "ConvTranspose": 1, "Gather": 0}  # op -> its weight (table)
BEGIN, END = "<!-- quantize-real:begin -->", "<!-- quantize-real:end -->"
SECTION = "## Fusion and quantization at equal bytes"


def sibling(name: str):
    """A module beside this script (``budget_real``: loaders, onnxruntime, the error; ``benchlib``)."""
    sys.path.insert(0, str(HERE))
    return __import__(name)


# -- the small model (what the test runs) ------------------------------------------------------

def small_model(work: Path, cache: Path, n: int, seed: int) -> tuple[Path, dict[str, np.ndarray], Callable]:
    """A random 6-block residual MLP of width 64 on 16 positions (``x + down(relu(up(x)))``, then
    a head), its blocks' weights one random tensor plus a tenth of their own, so fusion has
    something to share; exported by the TorchScript exporter with a dynamic batch (every
    ``Linear`` a ``MatMul`` on an initializer). ``n`` random inputs ``[n, 16, 64]``."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = nn.ModuleList(nn.Linear(64, 128) for _ in range(6))
            self.down = nn.ModuleList(nn.Linear(128, 64) for _ in range(6))
            self.head = nn.Linear(64, 64)

        def forward(self, x):
            for up, down in zip(self.up, self.down):
                x = x + down(torch.relu(up(x)))
            return self.head(x)

    torch.manual_seed(seed)
    net = Net().eval()
    with torch.no_grad():
        for layers in (net.up, net.down):
            common = layers[0].weight.clone()
            for layer in layers:
                layer.weight.copy_(common + 0.1 * torch.randn_like(common) * common.std())
    feed = {"x": np.random.default_rng(seed).standard_normal((n, 16, 64)).astype(np.float32)}
    path = work / "small.onnx"
    if not path.exists():
        with torch.no_grad():
            torch.onnx.export(net, (torch.from_numpy(feed["x"][:2]),), str(path), dynamo=False,
                              input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    return path, feed, lambda out, feeds: out


def gpt(work: Path, cache: Path, n: int, seed: int) -> tuple[Path, dict[str, np.ndarray], Callable]:
    """The GPT-2-style character model ``tools/reproduce.py gpt`` trains on the plays (same
    sizes, steps and seed), exported by torch's dynamo exporter; ``n`` windows of 64 characters
    from the held-out text; readout: the next-character probabilities per position."""
    import torch

    rp = sibling("reproduce")
    args = rp.parse(["gpt", "--cache", str(cache / "shakespeare"), "--seed", str(seed)])
    subject = rp.gpt_subject(args)
    model, ids = subject.model.eval(), subject.task.valid_ids
    seq = subject.model.config.n_positions
    starts = np.random.default_rng(seed).integers(0, ids.numel() - seq, n)
    windows = np.stack([ids[s:s + seq].numpy() for s in starts]).astype(np.int64)

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gpt = model

        def forward(self, input_ids):
            return torch.softmax(self.gpt(input_ids=input_ids).logits, dim=-1)

    path = work / "gpt.onnx"
    if not path.exists():
        with torch.no_grad():
            torch.onnx.export(Logits().eval(), (torch.from_numpy(windows[:2]),), str(path), dynamo=True,
                              input_names=["input_ids"], output_names=["probs"],
                              dynamic_shapes=({0: torch.export.Dim("batch")},))
    return path, {"input_ids": windows}, lambda out, feeds: out


def loader(name: str) -> Callable:
    br = sibling("budget_real")
    return {"minilm": br.minilm, "ocr-det": br.ocr_det, "gpt": gpt, "small": small_model}[name]


# -- files ---------------------------------------------------------------------------------------

def data_files(path: Path) -> list[Path]:
    """The external data files ``path`` reads."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    places = {entry.value for t in _tensors(model.graph) if t.data_location == onnx.TensorProto.EXTERNAL
              for entry in t.external_data if entry.key == "location"}
    return [path.parent / p for p in sorted(places)]


def _tensors(graph):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            for sub in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                yield from _tensors(sub)


def disk_bytes(path: Path) -> int:
    """The model file and its external data, as stored."""
    return path.stat().st_size + sum(p.stat().st_size for p in data_files(path))


def remove(path: Path) -> None:
    for p in [*data_files(path), path]:
        p.unlink(missing_ok=True)


def float_weights(path: Path) -> int:
    """Weight tensors left in float: floating-point initializers of two or more dimensions that a
    ``MatMul``/``Gemm``/``Conv``/``ConvTranspose`` reads as its weight, directly or through a
    ``Transpose``, or a ``Gather`` as its table (each counted once however many read it)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
    stored = [*model.graph.initializer, *(t for _, t in constants(model.graph))]
    init = {t.name for t in stored if t.data_type in floats and len(t.dims) >= 2}
    transposed = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in init}
    found = set()
    for node in model.graph.node:
        at = WEIGHT_INPUT.get(node.op_type)
        if at is not None and len(node.input) > at:
            name = transposed.get(node.input[at], node.input[at])
            if name in init:
                found.add(name)
    return len(found)


def constants(graph) -> list[tuple[object, object]]:
    """The main graph's ``Constant`` nodes that hold a tensor, each with that tensor named as its output."""
    found = []
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value":
                    attr.t.name = node.output[0]
                    found.append((node, attr.t))
    return found


def lift_constants(source: Path, out: Path) -> int:
    """``source`` written to ``out`` with every tensor-holding ``Constant`` node made an initializer of
    the same name (onnxruntime's quantizers quantize initializers only); how many were lifted."""
    import onnx

    model = onnx.load(str(source))
    lifted = constants(model.graph)
    for node, tensor in lifted:
        model.graph.initializer.append(tensor)
        model.graph.node.remove(node)
    onnx.save(model, str(out))
    return len(lifted)


def has_matmul(path: Path) -> bool:
    import onnx

    return any(n.op_type == "MatMul" for n in onnx.load(str(path), load_external_data=False).graph.node)


# -- the rows ------------------------------------------------------------------------------------

def int8_alone(source: Path, out: Path) -> dict[str, Any]:
    """onnxruntime's dynamic int8 quantization, per channel, on the original."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    clock = time.perf_counter()
    quantize_dynamic(str(source), str(out), per_channel=True, weight_type=QuantType.QInt8)
    return {"exit": 0, "seconds": round(time.perf_counter() - clock, 1), "written": out.exists(),
            "method": "quantize_dynamic(per_channel=True, weight_type=QInt8)"}


def int4_alone(source: Path, out: Path) -> dict[str, Any]:
    """onnxruntime's 4-bit block-wise MatMul quantization on the original (a reason when it has no MatMul)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    method = "MatMulNBitsQuantizer(bits=4, block_size=32, is_symmetric=True)"
    if not has_matmul(source):
        return {"exit": None, "seconds": None, "written": False, "method": method,
                "skipped": "the model has no MatMul: MatMulNBitsQuantizer has nothing to quantize"}
    clock = time.perf_counter()
    quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), bits=4, block_size=32, is_symmetric=True)
    quantizer.process()
    quantizer.model.save_model_to_file(str(out))
    return {"exit": 0, "seconds": round(time.perf_counter() - clock, 1), "written": out.exists(), "method": method}


def alone(mode: str, source: Path, out: Path) -> dict[str, Any]:
    """onnxruntime's quantizer for ``mode`` on ``source`` as given; where that fails on a file whose
    weights are ``Constant`` nodes, again with them lifted to initializers (nothing else changed,
    and said); a failure is a row with its reason."""
    run = int8_alone if mode == "int8" else int4_alone
    try:
        return run(source, out)
    except Exception as e:  # noqa: BLE001 - the baseline failing is a finding, said in the table
        direct = _first_line(e)
    lifted = out.with_name(f"{out.stem}.lifted.onnx")
    try:
        count = lift_constants(source, lifted) if constants(_graph(source)) else 0
        if not count:
            raise RuntimeError("no Constant nodes to lift")
        row = run(lifted, out)
    except Exception as e:  # noqa: BLE001
        return {"exit": None, "seconds": None, "written": False, "method": f"onnxruntime {mode}",
                "skipped": f"onnxruntime failed: {direct}" + (f"; lifted: {_first_line(e)}" if lifted.exists() else "")}
    finally:
        lifted.unlink(missing_ok=True)
    return {**row, "method": f"{row['method']} after {count} Constant nodes lifted to initializers",
            "direct_error": direct}


def _graph(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=False).graph


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"


def lfpass_row(model: Path, calib: Path, out: Path, flags: list[str], timeout: float) -> dict[str, Any]:
    """One ``lfpass optimize`` by absolute path from an empty folder: exit, seconds, its report's figures."""
    report = out.with_suffix(".json")
    report.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "lfpass.cli", "optimize", str(model), "-o", str(out), "--inputs", str(calib),
           "--report", str(report), *flags]
    code, text, seconds = sibling("budget_real").run_elsewhere(cmd, timeout)
    data = json.loads(report.read_text()) if report.exists() else {}
    quantized = data.get("quantized") or {}
    row = {"exit": code, "seconds": round(seconds, 1), "written": out.exists() and code in (0, 1),
           "params_ratio": data.get("ratio"), "reported": data.get("error"), "bytes_reported": data.get("bytes_after"),
           "quantized": quantized or None, "method": quantized.get("method"),
           "last": (text.splitlines() or [""])[-1][:300]}
    if quantized:
        row["lfpass_float_left"] = len(quantized.get("float_left") or {})
    return row


def plan_rows(budgets: list[float], distill_steps: int = DISTILL_STEPS) -> list[dict[str, Any]]:
    """Every row of a model, in table order: what it is and the flags that make it. ``budget``
    ``"int8"``: int8 alone's fresh error, measured before the row runs (the same quality)."""
    rows = [{"row": "fp32", "kind": "fp32", "budget": None, "quantize": None},
            {"row": BASELINE, "kind": "alone", "budget": None, "quantize": "int8"},
            {"row": "int4 alone", "kind": "alone", "budget": None, "quantize": "int4"}]
    rows += [{"row": f"lfpass +{q}, quantized alone", "kind": "lfpass", "budget": None, "quantize": q}
             for q in QUANTIZE]
    rows.append({"row": "lfpass +int4, distilled", "kind": "lfpass", "budget": None, "quantize": "int4",
                 "distill": distill_steps})
    rows += [{"row": f"lfpass E=int8's +{q}", "kind": "lfpass", "budget": "int8", "quantize": q} for q in QUANTIZE]
    for budget in budgets:
        rows.append({"row": f"lfpass E={budget:g}", "kind": "lfpass", "budget": budget, "quantize": None})
        rows.append({"row": f"lfpass E={budget:g}, then int8 alone", "kind": "then", "budget": budget,
                     "quantize": "int8"})
        rows += [{"row": f"lfpass E={budget:g} +{q}", "kind": "lfpass", "budget": budget, "quantize": q}
                 for q in QUANTIZE]
    return rows


def flags_of(row: dict[str, Any], extra: list[str], calib: Path) -> list[str]:
    """``--ratio 1`` where the row fuses nothing (quantized alone, or distilled: retrained onto the grid)."""
    goal = ["--ratio", "1"] if row["budget"] is None else ["--max-error", f"{row['budget']:.4g}"]
    if row.get("distill") and "--pooling" in extra:  # distilled on every position's state (see DISTILL_STEPS)
        at = extra.index("--pooling")
        extra = extra[:at] + extra[at + 2:]
    flags = [*goal, "--scope", "model", *extra]
    if row.get("distill"):
        flags += ["--distill", str(calib), "--steps", str(row["distill"]), "--lr", f"{DISTILL_LR:g}",
                  "--batch-size", str(DISTILL_BATCH)]
    return flags + (["--quantize", row["quantize"]] if row["quantize"] else [])


def make(row: dict[str, Any], path: Path, calib: Path, out: Path, fused: dict[float, Path], extra: list[str],
         timeout: float) -> Path:
    """Write ``row``'s file (its figures into ``row``); the file to measure."""
    if row["kind"] == "fp32":
        row.update(exit=None, seconds=None, written=True, flags="(the original)")
        return path
    if row["kind"] == "alone":
        row.update(alone(row["quantize"], path, out), flags=None)
    elif row["kind"] == "then":  # onnxruntime's int8 alone on the fusion-alone file of the same budget
        source = fused.pop(row["budget"], None)
        if source is None:
            row.update(exit=None, seconds=None, written=False, method=None, flags=None,
                       skipped=f"lfpass E={row['budget']:g} wrote no file to quantize")
        else:
            row.update(alone("int8", source, out), flags=None)
            remove(source)
    else:
        flags = flags_of(row, extra, calib)
        row.update(lfpass_row(path, calib, out, flags, timeout), flags=" ".join(flags))
        if row["written"] and row["quantize"] is None:
            fused[row["budget"]] = out  # kept for the row that quantizes it
    row["flags"] = row["flags"] or row["method"]
    return out


def measure_model(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    br = sibling("budget_real")
    path, feed, readout = loader(name)(work, args.cache, args.calib + args.fresh, args.seed)
    calib = {k: v[:args.calib] for k, v in feed.items()}
    fresh = {k: v[args.calib:] for k, v in feed.items()}
    calib_path = work / f"{name}.calib.npz"
    np.savez(calib_path, **calib)
    reference = readout(br.run_onnx(path, fresh), fresh)
    extra = ["--pooling", "mean"] if name == "minilm" else []
    fp32_bytes, fused, rows = disk_bytes(path), {}, []
    for row in plan_rows(args.budgets, args.distill_steps):
        if args.only and row["kind"] not in ("fp32", "alone") and not any(o in row["row"] for o in args.only):
            continue
        if row["budget"] == "int8":  # the same quality as int8 alone, as measured on these fresh samples
            base = next((r for r in rows if r["row"] == BASELINE and r.get("fresh") is not None), None)
            if base is None or base["fresh"] <= 0:
                continue
            row["budget"] = float(f"{base['fresh']:.4g}")
        slug = row["row"].replace(", ", ".").replace(" ", "-").replace("=", "").replace("+", "").replace("'", "")
        target = make(row, path, calib_path, work / f"{name}.{slug}.onnx", fused, extra, args.timeout)
        if row["written"]:
            row["bytes"] = disk_bytes(target)
            row["bytes_ratio"] = fp32_bytes / row["bytes"]
            row["float_left"] = float_weights(target)
            try:
                row["fresh"] = br.error(reference, readout(br.run_onnx(target, fresh), fresh))
            except Exception as e:  # noqa: BLE001 - a file onnxruntime cannot run is a finding, said in the table
                row["run_error"] = _first_line(e)
            if target != path and target not in fused.values():
                remove(target)
        print(json.dumps(row), flush=True)
        rows.append(row)
    for left in fused.values():
        remove(left)
    return {"model": name, "file": path.name, "bytes": fp32_bytes, "calib": args.calib, "fresh": args.fresh,
            "readout": {"minilm": "mean-pooled sentence embedding", "ocr-det": "probability map",
                        "gpt": "next-character probabilities", "small": "output"}[name], "rows": rows}


# -- the verdicts --------------------------------------------------------------------------------

def _f(v: float | None, spec: str = ".4f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def measured(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("fresh") is not None and math.isfinite(r["fresh"])]


def against_int8(model: dict[str, Any], kind: str = "lfpass") -> str:
    """At the bytes of int8 alone, are the int8 rows of ``kind`` smaller for the same quality or
    better for the same size? ``lfpass``: aim (a), lfpass's ``--quantize int8``; ``then``:
    onnxruntime's int8 alone on lfpass's fusion-alone file."""
    label = ("(a) lfpass+quantization (`--quantize int8`, `int8-weights`, `int4`)" if kind == "lfpass"
             else "fusion, then int8 alone (onnxruntime's call on lfpass's fused file; not `--quantize`)")
    base = next((r for r in measured(model["rows"]) if r["row"] == BASELINE), None)
    if base is None:
        return f"- {label}: **not measured**: `{BASELINE}` wrote no file (see above)."
    ours = [r for r in measured(model["rows"]) if r["kind"] == kind and r["quantize"] in QUANTIZE]
    if not ours:
        return f"- {label}: **not measured**: none of these rows wrote a file (see above)."
    smaller = [r for r in ours if r["bytes"] < base["bytes"]]
    within = [r for r in smaller if r["fresh"] <= base["fresh"] + (r["budget"] or 0.0)]
    dominating = [r for r in ours if r["bytes"] <= base["bytes"] and r["fresh"] <= base["fresh"]
                  and (r["bytes"] < base["bytes"] or r["fresh"] < base["fresh"])]
    listed = ", ".join(f"`{r['row']}` ({r['bytes']:,} bytes, {base['bytes'] / r['bytes']:.2f}x smaller, fresh "
                       f"{r['fresh']:.4f})" for r in within) or "none"
    head = (f"- {label}, against `{BASELINE}` ({base['bytes']:,} bytes, fresh error {base['fresh']:.4f}): rows "
            f"smaller with fresh error within int8 alone's + their budget: {listed}. ")
    if dominating:
        how = lambda r: (f"fused {r['params_ratio']:.2f}x" if (r.get("params_ratio") or 1.0) > 1.0005  # noqa: E731
                         else "nothing fused")
        return head + ("**Holds**: " + ", ".join(f"`{r['row']}` ({how(r)})" for r in dominating)
                       + " at no more bytes and no more fresh error than int8 alone.")
    if within:
        return head + ("**Holds only within the budget**: every smaller row has a higher fresh error than int8 "
                       "alone; none is smaller at the same quality or better at the same size.")
    larger = ", ".join(f"`{r['row']}`" for r in ours if r["bytes"] >= base["bytes"])
    why = f" ({larger} no smaller than int8 alone)" if larger else ""
    return head + f"**Does not hold**: no row is smaller for the same quality or better at the same size{why}."


def against_int4(model: dict[str, Any]) -> str | None:
    """The same question for lfpass+int4 against int4 alone, where both wrote files."""
    base = next((r for r in measured(model["rows"]) if r["row"] == "int4 alone"), None)
    ours = [r for r in measured(model["rows"]) if r["kind"] == "lfpass" and r["quantize"] == "int4"]
    if base is None or not ours:
        return None
    cells = ", ".join(f"`{r['row']}` {base['bytes'] / r['bytes']:.2f} (fresh {r['fresh']:.4f})" for r in ours)
    return (f"- against `int4 alone` ({base['bytes']:,} bytes, fresh error {base['fresh']:.4f}), its bytes over each "
            f"lfpass+int4 row's (above 1: the row is smaller): {cells}.")


def minilm_aim(model: dict[str, Any]) -> str:
    """Aim (b), MiniLM: at 6x smaller than fp32, embedding cosine >= 0.99."""
    rows = measured(model["rows"])
    far = [r for r in rows if r["bytes_ratio"] >= TARGET_RATIO]
    if not far:
        top = max(rows, key=lambda r: r["bytes_ratio"])
        return (f"- (b) at {TARGET_RATIO:g}x smaller than fp32, embedding cosine >= {TARGET_COSINE}: **not reached**: "
                f"no row is {TARGET_RATIO:g}x smaller (the smallest file: `{top['row']}`, {top['bytes_ratio']:.2f}x).")
    best = min(far, key=lambda r: r["fresh"])
    cosine = 1 - best["fresh"]
    verdict = "**holds**" if cosine >= TARGET_COSINE else "**does not hold**"
    return (f"- (b) at {TARGET_RATIO:g}x smaller than fp32, embedding cosine >= {TARGET_COSINE}: {verdict}: the best "
            f"fresh cosine among the {len(far)} rows at >= {TARGET_RATIO:g}x is {cosine:.4f} (`{best['row']}`, "
            f"{best['bytes_ratio']:.2f}x).")


def verdicts(model: dict[str, Any]) -> list[str]:
    lines = [against_int8(model)]
    if model["model"] == "minilm":
        lines.append(minilm_aim(model))
    int4 = against_int4(model)
    return [*lines, against_int8(model, "then"), *([int4] if int4 else [])]


# -- the report ----------------------------------------------------------------------------------

_COLUMN_LINES = [
    "- `bytes`: the written model file and its external data on disk; `x fp32`: the fp32 file's bytes over the row's;",
    "- `params x`: unique parameters before / after fusion, from lfpass's report (before quantizing);",
    ("- `error reported`: lfpass's own error of the written (fused, and quantized) file on its held-out share of the "
     "calibration samples, the one its budget is judged on;"),
    ("- `fresh error`: 1 - the mean per-sample cosine between the original's readout and the row's, on the fresh "
     "samples;"),
    "- `s`: seconds (lfpass: the whole command; onnxruntime: the quantizer call alone);",
    ("- `exit`: lfpass's exit code (1: written, outside its tolerance or budget; 2: refused or failed, nothing "
     "written);"),
    ("- `float left`: weight tensors still in float in the file (floating-point tensors of 2+ dimensions, initializers "
     "or Constant nodes, read as a MatMul/Gemm/Conv weight directly or through a Transpose, or as a Gather's table; "
     "for `fp32`, every such weight)."),
    "",
    ("Rows: `int8 alone` and `int4 alone` quantize the original with onnxruntime's tools; `lfpass E=...` is `lfpass "
     "optimize --max-error E` (fusion alone), `+int8`/`+int8-weights`/`+int4` the same with `--quantize` (lfpass's "
     "quantize path, the budget for fused and quantized together, each weight at its own width), and `lfpass E=..., then int8 alone` the fusion-alone file quantized "
     "by the `int8 alone` call (fusion and quantization composed by hand, outside lfpass)."),
]
COLUMNS = "\n".join(_COLUMN_LINES)


SMALL = ("**`--small`: a random residual MLP and random inputs. These figures check the tool (every row written "
         "and measured), not quality: they say nothing about real models.**")
VERDICTS = ("Verdicts, per model: (a) at the bytes of `int8 alone`, is lfpass+quantization smaller for the same quality or "
            "better for the same size? It holds when an lfpass+quantization row has no more bytes and no more fresh error "
            "than int8 alone; rows smaller with fresh error within int8 alone's plus their budget are listed. (b) "
            f"MiniLM only: at {TARGET_RATIO:g}x fewer bytes than fp32, is the embedding cosine (1 - fresh error) at "
            f"least {TARGET_COSINE}?")


def render_model(model: dict[str, Any]) -> list[str]:
    about = (f"`{model['file']}`, {model['bytes']:,} bytes; calibration {model['calib']} samples given to lfpass "
             f"(it splits them: statistics, choosing, verifying); fresh error on {model['fresh']} other samples, "
             f"readout: the {model['readout']}.")
    lines = [f"### {model['model']}", "", about, "",
             "| row | flags | exit | bytes | x fp32 | params x | error reported | fresh error | s | float left |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in model["rows"]:
        size = f"{r['bytes']:,}" if r.get("bytes") else "-"
        lines.append(f"| {r['row']} | `{r['flags']}` | {_f(r['exit'], 'd')} | {size} "
                     f"| {_f(r.get('bytes_ratio'), '.2f')} | {_f(r.get('params_ratio'), '.3f')} "
                     f"| {_f(r.get('reported'))} | {_f(r.get('fresh'))} "
                     f"| {_f(r.get('seconds'), '.1f')} | {_f(r.get('float_left'), 'd')} |")
    notes = [f"- `{r['row']}`: nothing written: {r.get('skipped') or r.get('last') or 'no reason given'}"
             for r in model["rows"] if not r["written"]]
    notes += [f"- `{r['row']}`: written, but onnxruntime could not run it: {r['run_error']}"
              for r in model["rows"] if r.get("run_error")]
    notes += [f"- `{r['row']}`: onnxruntime's quantizer on the file as given failed ({r['direct_error']}); run "
              "again with the file's `Constant` nodes lifted to initializers, nothing else changed"
              for r in model["rows"] if r.get("direct_error")]
    methods = dict.fromkeys(r["method"] for r in model["rows"] if r["kind"] == "lfpass" and r.get("method"))
    notes += [f"- lfpass quantized by: {m}" for m in methods]
    return lines + ([""] + notes if notes else []) + ["", *verdicts(model)]


def render(report: dict[str, Any]) -> str:
    budgets = ", ".join(f"{b:g}" for b in report["budgets"])
    head = (f"`{report['command']}` ({report['machine']}; load average {report['load']} at the start; "
            f"{report['seconds']:.0f} s in all). Budgets `--max-error` {budgets} (lfpass's cosine error: 1 - mean "
            "per-sample cosine of the readout).")
    lines = [head, ""]
    if report["small"]:
        lines += [SMALL, ""]
    lines += ["Columns:", COLUMNS, "", VERDICTS, ""]
    for model in report["models"]:
        lines += render_model(model) + [""]
    return "\n".join(lines).rstrip()


def write_markdown(path: Path, body: str) -> None:
    """``body`` between the markers of ``path``; the section and its markers appended where missing."""
    text = path.read_text() if path.exists() else ""
    if BEGIN not in text or END not in text:
        text = f"{text.rstrip()}\n\n{SECTION}\n\n{BEGIN}\n{END}\n".lstrip()
    head, rest = text.split(BEGIN, 1)
    path.write_text(f"{head}{BEGIN}\n{body}\n{END}{rest.split(END, 1)[1]}")


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="a random residual MLP and random inputs: checks the tool, "
                                                        "not quality (under a minute)")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    p.add_argument("--budgets", help="comma-separated --max-error values (default 0.01,0.02,0.05, or 0.02,0.05 "
                                     "with --small)")
    p.add_argument("--calib", type=int, help="calibration samples given to lfpass (default 256, or 64 with --small)")
    p.add_argument("--fresh", type=int, help="samples the error is measured on afterwards (default 256, or 32)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per optimize run")
    p.add_argument("--distill-steps", type=int, default=DISTILL_STEPS,
                   help=f"quantization-aware retraining steps of the distilled row (default {DISTILL_STEPS})")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for lfpass (0: leave it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "lfpass")
    p.add_argument("--work", type=Path, help="keep the models and inputs here (default: a temporary folder)")
    p.add_argument("--only", help="comma-separated: run only the lfpass rows whose name holds one of these "
                                  "(fp32 and the onnxruntime rows always run)")
    p.add_argument("--merge", type=Path, metavar="JSON", help="with --json: start from this earlier report, its rows "
                                                               "of the same name replaced by this run's")
    p.add_argument("--json", type=Path)
    p.add_argument("--out", type=Path, help="rewrite the part between the markers of this Markdown file")
    p.add_argument("--render", type=Path, metavar="JSON", help="run nothing: render this earlier --json to --out")
    args = p.parse_args(argv)
    args.models = ["small"] if args.small else args.models.split(",")
    args.only = [o for o in (args.only or "").split(",") if o]
    args.budgets = [float(b) for b in (args.budgets or ("0.02,0.05" if args.small else "0.01,0.02,0.05")).split(",")]
    args.calib = args.calib if args.calib is not None else (64 if args.small else 256)
    args.fresh = args.fresh if args.fresh is not None else (32 if args.small else 256)
    unknown = [m for m in args.models if m not in (*MODELS, "small")]
    if unknown:
        p.error(f"unknown models {unknown}: choose from {', '.join(MODELS)}")
    if any(not 0 < b < 2 for b in args.budgets):
        p.error("--budgets: each between 0 and 2 (a cosine error)")
    return args


def merged(earlier: dict[str, Any], now: dict[str, Any]) -> dict[str, Any]:
    """``earlier`` with ``now``'s models and rows in: a row of the same model and name replaced,
    new rows placed in table order; the commands and seconds of both kept."""
    budgets = sorted(set(earlier["budgets"]) | set(now["budgets"]))
    rank = {r["row"]: i for i, r in enumerate(plan_rows(budgets))}
    models = {m["model"]: m for m in earlier["models"]}
    for model in now["models"]:
        old = models.setdefault(model["model"], model)
        if old is not model:
            rows = {r["row"]: r for r in old["rows"]} | {r["row"]: r for r in model["rows"]}
            old["rows"] = sorted(rows.values(), key=lambda r: rank.get(r["row"], len(rank)))
    return {**earlier, "models": list(models.values()), "command": f"{earlier['command']}; then {now['command']}",
            "seconds": earlier["seconds"] + now["seconds"], "budgets": budgets}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.render:
        text = render(json.loads(args.render.read_text()))
    else:
        if args.threads:
            os.environ["OMP_NUM_THREADS"] = str(args.threads)
        bench, clock = sibling("benchlib"), time.perf_counter()
        load = bench.load_average()
        with tempfile.TemporaryDirectory(prefix="lfpass-quantize-real-") as tmp:
            work = (args.work or Path(tmp)).resolve()
            work.mkdir(parents=True, exist_ok=True)
            models = [measure_model(m, args, work) for m in args.models]
        report = {"command": "python tools/quantize_real.py " + " ".join(argv),
                  "machine": bench.machine() + (f", OMP_NUM_THREADS={args.threads}" if args.threads else ""),
                  "load": load, "seconds": time.perf_counter() - clock, "small": args.small,
                  "budgets": args.budgets, "seed": args.seed, "models": models}
        if args.merge:
            report = merged(json.loads(args.merge.read_text()), report)
        text = render(report)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(text)
    if args.out:
        write_markdown(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
