"""``lfpass optimize`` past 2 GB: a Llama-style ONNX with more than 4 GB of external data,
against the ``onnx.load`` + ``onnx.save`` round trip (external data) of the same file.

The model is built with ``onnx.helper`` (random float32 weights, written
straight into the external data file a chunk at a time, so building it needs
a few MB, not the model's size): token embeddings, ``--layers`` decoder blocks
(RMSNorm, q/k/v/o MatMuls with multi-head attention, RMSNorm, gate/up/down
MatMuls with SiLU gating, residual adds), a final RMSNorm and an untied
``lm_head``. Initializers are named as Hugging Face names Llama's parameters
(``model.layers.3.mlp.gate_proj.weight``), so each projection has one role.

Each step runs in a fresh process under a small parent that reports its wall
time and peak resident memory (``getrusage(RUSAGE_CHILDREN)``, which counts the
pages of memory-mapped files a process touched); fastest of ``--repeat``.
``lfpass optimize`` plans over the attention and MLP roles (``--ratio``, default
2 over the model; ``lm_head`` is left alone) with ``--no-validate``: onnxruntime
would hold the whole model (twice, original and fused). Under ``--small`` the
fused file is also validated in onnxruntime on a tiny input.

Every output is checked: ``onnx.checker.check_model`` on the model path, every
external tensor inside its data file, and each tensor stored once (no two
initializers point at the same bytes or hold the same data range twice).

    python tools/bench_large.py                      # 22 layers, width 2048: 4.6 GiB of weights, ~3 minutes
    python tools/bench_large.py --small              # tens of MB, seconds: what the tests run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from benchlib import Run, load_average, machine, measure

_ALIGN = 4096  # tensors start on page boundaries in the data file, as onnx aligns large ones
_CHUNK = 1 << 24  # elements generated and written at a time (64 MB of float32)
OPSET = 18
FULL = dict(layers=22, hidden=2048, inter=5504, vocab=32000, heads=16)
SMALL = dict(layers=6, hidden=384, inter=1024, vocab=4096, heads=6)


class _DataWriter:
    """Appends random tensors to one external data file; yields their TensorProtos (data external)."""

    def __init__(self, data: Path, seed: int):
        self.file = open(data, "wb")
        self.location = data.name
        self.rng = np.random.default_rng(seed)
        self.offset = 0
        self.protos: list[TensorProto] = []

    def random(self, name: str, shape: tuple[int, ...], scale: float) -> str:
        pad = (-self.offset) % _ALIGN
        self.file.write(b"\0" * pad)
        self.offset += pad
        count = int(np.prod(shape))
        done = 0
        while done < count:
            n = min(_CHUNK, count - done)
            chunk = self.rng.standard_normal(n, dtype=np.float32)
            chunk *= scale
            self.file.write(memoryview(chunk))
            done += n
        tensor = TensorProto(name=name, dims=list(shape), data_type=TensorProto.FLOAT)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(self.offset)), ("length", str(4 * count))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.offset += 4 * count
        self.protos.append(tensor)
        return name

    def ones(self, name: str, size: int) -> str:
        self.protos.append(helper.make_tensor(name, TensorProto.FLOAT, [size], np.ones(size, np.float32)))
        return name

    def close(self) -> None:
        self.file.close()


def build(path: Path, layers: int, hidden: int, inter: int, vocab: int, heads: int, seed: int = 0) -> dict:
    """Write the model to ``path`` and its weights to ``path.data``; returns its figures."""
    data = path.with_name(path.name + ".data")
    w = _DataWriter(data, seed)
    nodes: list[onnx.NodeProto] = []
    head_dim = hidden // heads
    consts = [
        helper.make_tensor("axes_last", TensorProto.INT64, [1], [-1]),
        helper.make_tensor("eps", TensorProto.FLOAT, [], [1e-5]),
        helper.make_tensor("heads_shape", TensorProto.INT64, [4], [0, 0, heads, head_dim]),
        helper.make_tensor("hidden_shape", TensorProto.INT64, [3], [0, 0, hidden]),
        helper.make_tensor("scale", TensorProto.FLOAT, [], [1.0 / float(np.sqrt(head_dim))]),
    ]

    def op(kind: str, inputs: list[str], out: str, **attrs) -> str:
        nodes.append(helper.make_node(kind, inputs, [out], name=f"/{out}/{kind}", **attrs))
        return out

    def rms_norm(x: str, gamma: str, at: str) -> str:
        mean = op("ReduceMean", [op("Mul", [x, x], f"{at}.sq"), "axes_last"], f"{at}.ms", keepdims=1)
        inv = op("Reciprocal", [op("Sqrt", [op("Add", [mean, "eps"], f"{at}.mse")], f"{at}.rms")], f"{at}.inv")
        return op("Mul", [op("Mul", [x, inv], f"{at}.normed"), gamma], f"{at}.out")

    scale = 0.02
    x = op("Gather", [w.random("model.embed_tokens.weight", (vocab, hidden), scale), "input_ids"], "embeds", axis=0)
    for i in range(layers):
        p = f"model.layers.{i}"
        h = rms_norm(x, w.ones(f"{p}.input_layernorm.weight", hidden), f"{p}.ln1")
        qkv = {}
        for name in ("q", "k", "v"):
            proj = op("MatMul", [h, w.random(f"{p}.self_attn.{name}_proj.weight", (hidden, hidden), scale)], f"{p}.{name}")
            qkv[name] = op("Reshape", [proj, "heads_shape"], f"{p}.{name}.heads")
        q = op("Transpose", [qkv["q"]], f"{p}.qT", perm=[0, 2, 1, 3])
        k = op("Transpose", [qkv["k"]], f"{p}.kT", perm=[0, 2, 3, 1])
        v = op("Transpose", [qkv["v"]], f"{p}.vT", perm=[0, 2, 1, 3])
        scores = op("Mul", [op("MatMul", [q, k], f"{p}.qk"), "scale"], f"{p}.scores")
        ctx = op("MatMul", [op("Softmax", [scores], f"{p}.probs", axis=-1), v], f"{p}.ctx")
        ctx = op("Reshape", [op("Transpose", [ctx], f"{p}.ctxT", perm=[0, 2, 1, 3]), "hidden_shape"], f"{p}.ctx2")
        attn = op("MatMul", [ctx, w.random(f"{p}.self_attn.o_proj.weight", (hidden, hidden), scale)], f"{p}.o")
        x = op("Add", [x, attn], f"{p}.res1")
        h = rms_norm(x, w.ones(f"{p}.post_attention_layernorm.weight", hidden), f"{p}.ln2")
        gate = op("MatMul", [h, w.random(f"{p}.mlp.gate_proj.weight", (hidden, inter), scale)], f"{p}.gate")
        up = op("MatMul", [h, w.random(f"{p}.mlp.up_proj.weight", (hidden, inter), scale)], f"{p}.up")
        act = op("Mul", [op("Mul", [gate, op("Sigmoid", [gate], f"{p}.sig")], f"{p}.silu"), up], f"{p}.act")
        down = op("MatMul", [act, w.random(f"{p}.mlp.down_proj.weight", (inter, hidden), scale)], f"{p}.down")
        x = op("Add", [x, down], f"{p}.res2")
    x = rms_norm(x, w.ones("model.norm.weight", hidden), "final")
    op("MatMul", [x, w.random("lm_head.weight", (hidden, vocab), scale)], "logits")
    w.close()
    graph = helper.make_graph(
        nodes, "llama_random",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab])],
        initializer=consts + w.protos,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="bench_large")
    model.ir_version = 10
    onnx.save(model, str(path))  # the tensors are already external: this writes the graph only
    params = sum(int(np.prod(t.dims)) for t in w.protos)
    return {"params": params, "bytes": path.stat().st_size + data.stat().st_size, "data_bytes": data.stat().st_size}


def check_output(path: Path) -> dict:
    """``onnx.checker`` on the model path; each external tensor inside its file; each stored once."""
    onnx.checker.check_model(str(path))
    proto = onnx.load(str(path), load_external_data=False)
    ranges: dict[tuple[str, int, int], str] = {}
    files: dict[str, int] = {}
    for tensor in proto.graph.initializer:
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location, offset, length = info["location"], int(info.get("offset", 0)), int(info["length"])
        key = (location, offset, length)
        if key in ranges:
            raise AssertionError(f"{tensor.name} and {ranges[key]} point at the same bytes")
        ranges[key] = tensor.name
        size = files.setdefault(location, (path.parent / location).stat().st_size)
        if offset + length > size:
            raise AssertionError(f"{tensor.name} ends past {location}")
    by_file: dict[str, list[tuple[int, int]]] = {}
    for location, offset, length in ranges:
        by_file.setdefault(location, []).append((offset, length))
    for location, spans in by_file.items():  # no two tensors share or overlap a byte range
        spans.sort()
        for (a, la), (b, _) in zip(spans, spans[1:]):
            if a + la > b:
                raise AssertionError(f"two tensors overlap in {location} at offset {b}")
    weights = [n.input[1] for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in
               {t.name for t in proto.graph.initializer}]
    return {"checker": "passed", "external_tensors": len(ranges), "data_files": len(files),
            "data_bytes": sum(files.values()), "matmul_weights": len(weights), "distinct_weights": len(set(weights))}


def _roundtrip_cmd(model: Path, out: Path) -> list[str]:
    code = (f"import onnx; m = onnx.load({str(model)!r}); "
            f"onnx.save(m, {str(out)!r}, save_as_external_data=True, all_tensors_to_one_file=True, "
            f"location={out.name + '.data'!r})")
    return [sys.executable, "-c", code]


def _ir_cmd(model: Path, out: Path) -> list[str]:
    code = (f"import onnx_ir as ir; ir.save(ir.load({str(model)!r}), {str(out)!r}, "
            f"external_data={out.name + '.data'!r})")
    return [sys.executable, "-c", code]


def _env(args: argparse.Namespace) -> dict | None:
    """The steps' environment: BLAS threads pinned when asked (OpenBLAS threads spin on a busy machine)."""
    if args.blas_threads is None:
        return None
    n = str(args.blas_threads)
    return {**os.environ, "OPENBLAS_NUM_THREADS": n, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}


def clean(*paths: Path) -> None:
    for p in paths:
        for f in (p, p.with_name(p.name + ".data")):
            if f.exists():
                f.unlink()


def run(args: argparse.Namespace) -> dict:
    sizes = SMALL if args.small else FULL
    sizes = {**sizes, **{k: getattr(args, k) for k in sizes if getattr(args, k) is not None}}
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.out / f"llama-{sizes['layers']}x{sizes['hidden']}.onnx"
    fused, floor_out, ir_out = (args.out / f"{model.stem}.{k}.onnx" for k in ("fused", "roundtrip", "ir"))
    report = args.out / f"{model.stem}.report.json"
    clean(model, fused, floor_out, ir_out)
    start = time.perf_counter()
    built = build(model, **sizes)
    built["build_seconds"] = time.perf_counter() - start
    py = sys.executable
    lfpass_cmd = [py, "-m", "lfpass.cli", "optimize", str(model), "-o", str(fused), "--no-validate",
                  "--ratio", str(args.ratio), "--report", str(report)]
    steps = {"onnx.load + onnx.save (reference)": (_roundtrip_cmd(model, floor_out), floor_out),
             "onnx-ir load + save": (_ir_cmd(model, ir_out), ir_out),
             "lfpass optimize": (lfpass_cmd, fused)}
    rows: dict[str, Run] = {}
    checks: dict[str, dict] = {}
    for name, (cmd, out) in steps.items():
        if name == "onnx-ir load + save" and args.no_ir:
            continue
        runs = []
        for _ in range(args.repeat):
            clean(out)  # onnx.save appends to an existing data file: each run starts from nothing
            runs.append(measure(cmd, env=_env(args)))
        rows[name] = min(runs, key=lambda r: r.seconds)
        checks[name] = check_output(out)
        if name != "lfpass optimize" and not args.keep:
            clean(out)  # free the disk before the next step
    lfpass_report = json.loads(report.read_text())
    validation = None
    if args.small:
        checked = args.out / f"{model.stem}.validate.json"  # exit 1: outside tolerance, as a lossy fusion is
        rows["lfpass validate (tiny input, separate)"] = measure(
            [py, "-m", "lfpass.cli", "validate", str(model), str(fused), "--input-shape", "input_ids:1x8",
             "--samples", "1", "--report", str(checked)], 1, ok=(0, 1), env=_env(args))
        validation = json.loads(checked.read_text())
    result = {
        "command": "python tools/bench_large.py " + " ".join(args.argv),
        "machine": machine(), "load_average": load_average(), "repeat": args.repeat, "sizes": sizes,
        "blas_threads": args.blas_threads,
        "model": {**built, "name": model.name},
        "rows": {k: {"seconds": r.seconds, "peak_mb": r.peak_mb} for k, r in rows.items()},
        "checks": checks, "validation": validation,
        "lfpass": {k: lfpass_report[k] for k in ("ratio", "bytes_ratio", "groups", "bytes_before", "bytes_after",
                                                 "seconds")},
    }
    ref = rows["onnx.load + onnx.save (reference)"]
    result["ratios"] = {k: {"time": r.seconds / ref.seconds, "memory": r.peak_mb / ref.peak_mb,
                            "memory_vs_model": r.peak_mb * 2**20 / built["bytes"]} for k, r in rows.items()}
    if not args.keep:
        clean(model, fused)
    return result


def render(r: dict) -> str:
    m = r["model"]
    lines = [
        f"`{r['command']}`; {r['machine']}; load average {r['load_average']} at the start; "
        f"fastest of {r['repeat']}"
        + (f"; BLAS threads {r['blas_threads']} in every step." if r.get("blas_threads") else "."), "",
        f"Model: {m['name']}: {r['sizes']['layers']} decoder blocks, width {r['sizes']['hidden']}, MLP "
        f"{r['sizes']['inter']}, vocabulary {r['sizes']['vocab']}; {m['params'] / 1e6:.0f} M float32 parameters, "
        f"{m['bytes'] / 2**30:.2f} GiB on disk (external data), built in {m['build_seconds']:.0f} s.", "",
        "| step | s | peak MB | time / reference | memory / reference | memory / model size | output MB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    names = {"onnx.load + onnx.save (reference)": "onnx.load + onnx.save (reference)",
             "onnx-ir load + save": "onnx-ir load + save", "lfpass optimize": "lfpass optimize"}
    for name, row in r["rows"].items():
        ratio = r["ratios"][name]
        out = r["checks"].get(names.get(name, ""), {}).get("data_bytes")
        lines.append(f"| {name} | {row['seconds']:.1f} | {row['peak_mb']:.0f} | {ratio['time']:.2f} | "
                     f"{ratio['memory']:.2f} | {ratio['memory_vs_model']:.2f} | "
                     + (f"{out / 2**20:.0f} |" if out else "- |"))
    lf = r["lfpass"]
    c = r["checks"]["lfpass optimize"]
    lines += ["", f"lfpass: {lf['groups']} groups, unique-parameter ratio {lf['ratio']:.3f}, bytes ratio "
                  f"{lf['bytes_ratio']:.3f}; {c['matmul_weights']} MatMuls read {c['distinct_weights']} weights; "
                  f"{c['external_tensors']} external tensors, each stored once; onnx.checker {c['checker']}. "
                  "lfpass's own phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in lf["seconds"].items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="tens of MB (what the tests run)")
    for key in FULL:
        p.add_argument(f"--{key}", type=int, help=f"default {FULL[key]} ({SMALL[key]} with --small)")
    p.add_argument("--ratio", type=float, default=2.0, help="lfpass's target ratio over the model")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("/tmp/lfpass-large"), help="folder for the model files")
    p.add_argument("--no-ir", action="store_true", help="skip the onnx-ir load + save row")
    p.add_argument("--blas-threads", type=int, help="OPENBLAS/OMP threads of every step (default: as set)")
    p.add_argument("--keep", action="store_true", help="keep the model files")
    p.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = p.parse_args(argv)
    args.argv = argv
    result = run(args)
    print(render(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
