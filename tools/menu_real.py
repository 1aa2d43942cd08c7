"""The plan menu against its parts on a real pretrained CNN, at equal unique parameters.

PP-OCRv4's text detector (the ``rapidocr_onnxruntime`` wheel; loaded by
``tools/budget_real.py``), with Shakespeare lines rendered as text images. For each
action set (``--methods``) and each ``--ratios`` R, ``lfpass optimize MODEL --inputs
calib.npz --scope layers --ratio R [--actions ...]`` is run by absolute path from an
empty folder, and the written file's output error is measured on ``--fresh`` images
that neither the planner nor lfpass's own verification saw (lfpass's ``cosine`` error:
1 - the mean over samples of the cosine between the original's and the file's
probability maps). No retraining there: the figures say what each plan keeps.

Then, at ``--retrain-ratio``, the same action sets are retrained the same way
(``--distill calib.npz --stages 1 --steps S --lr L``; one seed) and measured again on
the fresh images, once per ``--bn`` mode, passed as ``--norm-stats``: ``update``
(the detector's three BatchNorms re-estimate their statistics on 32-image batches, what
lfpass did before ``--norm-stats``) and ``frozen`` (kept in eval mode, the original's
statistics: lfpass's default when distilling). Rows of earlier runs marked ``as-is``
are ``update``. One lfpass behaviour stood in the way and is worked around only where
said (the rows' ``shims``):

- ``empty-digest``: the export's tie check cannot hash a zero-element tensor of stride 0
  (the converted Resize nodes' empty ``roi`` buffers: storage address 0, so the check
  takes them for one tensor shared under several names): ``--distill`` stops with
  "internal error (RuntimeError: self.stride(-1) must be 1 to view Float as Byte ...)".
  Applied only while this lfpass still fails on such buffers (lfpass now leaves empty
  tensors out of the tie check, so no longer).

Exit code 1 from ``optimize`` means validation outside tolerance (expected: the fusion
is lossy); the file is written and measured all the same.

    python tools/menu_real.py --out docs/MENU_REAL.md --json docs/menu_real.json   # ~1 CPU-hour
    python tools/menu_real.py --small                                               # seconds: what the test runs
    python tools/menu_real.py --render docs/menu_real.json --out docs/MENU_REAL.md  # the table again, no runs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
METHODS = {  # name: optimize flags
    "tie": ["--actions", "tie"],  # ties land where a pair falls: past the target, as before
    "tie-below": ["--actions", "tie", "--max-overshoot", "0"],  # ... or the nearest plan at or below it
    "lowrank": ["--actions", "lowrank"],
    "basis": ["--actions", "basis"],
    "basis+lowrank": ["--actions", "basis,lowrank"],
    "menu": [],
}
BASELINE = "lowrank"
BN_MODES = ("update", "frozen")
_BN_NAMES = {"as-is": "update"}  # what earlier runs called lfpass's re-estimating default
BEGIN, END = "<!-- menu-real:begin -->", "<!-- menu-real:end -->"
SHIM = "--as-lfpass"  # this script as lfpass's CLI, with the named workarounds


def budget_real():
    """``tools/budget_real.py`` as a module: the detector, the images, onnxruntime, the error."""
    sys.path.insert(0, str(HERE))
    import budget_real as br

    return br


# -- the small model (what the test runs) --------------------------------------

def small_model(work: Path, n: int, seed: int) -> tuple[Path, dict[str, np.ndarray], Callable]:
    """A random conv net with same-shaped layers to share (a stem, four 3x3 blocks, two 1x1
    bottlenecks, a sigmoid map), exported to ONNX; ``n`` random images ``[n, 3, 16, 16]``."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1)
            self.blocks = nn.ModuleList(nn.Conv2d(16, 16, 3, padding=1) for _ in range(4))
            self.up = nn.ModuleList(nn.Conv2d(16, 32, 1) for _ in range(2))
            self.down = nn.ModuleList(nn.Conv2d(32, 16, 1) for _ in range(2))
            self.head = nn.Conv2d(16, 1, 1)

        def forward(self, x):
            x = torch.relu(self.stem(x))
            for block in self.blocks:
                x = x + torch.relu(block(x))
            for up, down in zip(self.up, self.down):
                x = x + down(torch.relu(up(x)))
            return torch.sigmoid(self.head(x))

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    feed = {"x": rng.standard_normal((n, 3, 16, 16)).astype(np.float32)}
    path = work / "small.onnx"
    if not path.exists():
        with torch.no_grad():
            torch.onnx.export(Net().eval(), (torch.from_numpy(feed["x"][:2]),), str(path), dynamo=False,
                              input_names=["x"], output_names=["map"], dynamic_axes={"x": {0: "n"}, "map": {0: "n"}})
    return path, feed, lambda out, feeds: out


# -- lfpass with the named workarounds (run as ``menu_real.py --as-lfpass SHIMS -- ARGS``) ---------

def empty_digest_fails() -> bool:
    """Whether this lfpass's export tie check fails on a module holding two empty buffers of
    stride 0, as onnx2torch leaves the Resize nodes' ``roi`` (fixed in lfpass by leaving empty
    tensors out of the tie check)."""
    import torch
    from lfpass.bridge import export

    module = torch.nn.Module()
    for name in ("a", "b"):
        module.register_buffer(name, torch.empty_strided((0,), (0,)))
    try:
        for tensor in export.shared_tensors(module).values():
            export._torch_digests(tensor)
    except RuntimeError:
        return True
    return False


def as_lfpass(argv: list[str]) -> int:
    split = argv.index("--")
    shims, rest = argv[:split], argv[split + 1:]
    if "empty-digest" in shims:
        from lfpass.bridge import export

        digests = export._torch_digests
        export._torch_digests = lambda t: set() if t.numel() == 0 else digests(t)  # nothing stored to find
    from lfpass.cli import main as lfpass_main

    return lfpass_main(rest)


# -- running ------------------------------------------------------------------

def optimize(model: Path, calib: Path, out: Path, flags: list[str], timeout: float,
             shims: list[str] | None = None) -> dict[str, Any]:
    """One ``lfpass optimize`` by absolute path from an empty folder: exit, seconds, report, last line."""
    report = out.with_suffix(".json")
    report.unlink(missing_ok=True)
    prefix = [sys.executable, "-m", "lfpass.cli"] if shims is None else [sys.executable, str(Path(__file__).resolve()),
                                                                          SHIM, *shims, "--"]
    cmd = [*prefix, "optimize", str(model), "-o", str(out), "--inputs", str(calib), "--report", str(report), *flags]
    code, text, seconds = budget_real().run_elsewhere(cmd, timeout)
    data = json.loads(report.read_text()) if report.exists() else {}
    lines = text.splitlines() or [""]
    return {"exit": code, "seconds": round(seconds, 1), "written": out.exists(), "last": lines[-1][:240],
            "report": data, "stderr": text}


def _layers(groups: list[dict], factors: list[dict]) -> dict[str, int]:
    """How many layers each action took (a factor of one member is per-layer low rank)."""
    counts = {"basis": 0, "lowrank": 0, "tie": 0, "residual": 0}
    for f in factors:
        counts["lowrank" if len(f["members"]) == 1 else "basis"] += len(f["members"])
    for g in groups:
        counts["residual" if g.get("rank") else "tie"] += len(g["members"])
    counts["bases"] = sum(1 for f in factors if len(f["members"]) > 1)
    return counts


def figures(data: dict[str, Any], distilled: bool) -> dict[str, Any]:
    """The unique-parameter figures and the plan's choices from a ``--report``."""
    if not data:
        return {}
    if distilled:
        plan = data["retrain"]["plans"][0] if data["retrain"]["plans"] else {}
        last = data["retrain"]["history"][-1] if data["retrain"]["history"] else {}
        return {"ratio_model": data["ratio"], "ratio_layers": plan.get("ratio"),
                "params_before": data["retrain"]["params_original"], "params_after": data["retrain"]["unique_params"],
                "layer_params_before": plan.get("layer_params_before"),
                "layer_params_after": plan.get("layer_params_after"),
                "layers": _layers(plan.get("groups", []), plan.get("factors", [])),
                "quality_fused": last.get("quality_fused"), "quality": last.get("quality"),
                "quality_retrained": last.get("metrics", {}).get("quality_retrained", last.get("quality")),
                "kept_fused": bool(data["retrain"].get("stopped")) or "quality_retrained" in last.get("metrics", {}),
                "stopped": data["retrain"].get("stopped"), "train_seconds": last.get("seconds"),
                "reported": data.get("error"), "plan_message": plan.get("message", "")[:400]}
    return {"ratio_model": data["params_before"] / max(data["params_after"], 1), "ratio_layers": data["layer_ratio"],
            "params_before": data["params_before"], "params_after": data["params_after"],
            "layers": _layers(data["plan_groups"], data["plan_factors"]), "reported": data.get("error"),
            "choices": data["choices"], "defaults": data.get("defaults"), "plan_message": data["message"][:400]}


def measure_file(out: Path, fresh: dict[str, np.ndarray], reference: np.ndarray, readout: Callable, br) -> float:
    fused = br.run_onnx(out, fresh)
    value = br.error(readout(reference, fresh), readout(fused, fresh))
    out.unlink()
    for data in out.parent.glob(f"{out.name}.data"):
        data.unlink()
    return value


def run_all(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    br = budget_real()
    n = args.calib + args.fresh
    if args.small:
        path, feed, readout = small_model(work, n, args.seed)
    else:
        path, feed, readout = br.ocr_det(work, args.cache, n, args.seed)
    calib = {k: v[:args.calib] for k, v in feed.items()}
    fresh = {k: v[args.calib:] for k, v in feed.items()}
    calib_path = work / f"{path.stem}.calib.npz"
    np.savez(calib_path, **calib)
    reference = br.run_onnx(path, fresh)
    rows, retrained = [], []
    for ratio in args.ratios:
        for method in args.methods:
            out = work / f"{path.stem}.{method}.{ratio:g}.onnx"
            ran = optimize(path, calib_path, out, ["--scope", "layers", "--ratio", f"{ratio:g}", *METHODS[method]],
                           args.timeout)
            row = {"method": method, "flags": " ".join(METHODS[method]) or "(defaults)", "target": ratio,
                   **{k: v for k, v in ran.items() if k not in ("report", "stderr")}, **figures(ran["report"], False)}
            row["fresh"] = measure_file(out, fresh, reference, readout, br) if ran["written"] else None
            print(json.dumps({k: v for k, v in row.items() if k != "choices"}), flush=True)
            rows.append(row)
    shims_needed = ["empty-digest"] if args.retrain and empty_digest_fails() else []
    for bn in args.bn if args.retrain else []:
        shims = shims_needed
        for method in args.retrain_methods:
            out = work / f"{path.stem}.{method}.retrained-{bn}.onnx"
            flags = ["--scope", "layers", "--ratio", f"{args.retrain_ratio:g}", *METHODS[method], "--distill",
                     str(calib_path), "--stages", "1", "--steps", str(args.steps), "--lr", f"{args.lr:g}",
                     "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--norm-stats", bn]
            ran = optimize(path, calib_path, out, flags, args.timeout, shims if shims else None)
            row = {"method": method, "flags": " ".join(METHODS[method]) or "(defaults)", "target": args.retrain_ratio,
                   "bn": bn, "shims": shims, **{k: v for k, v in ran.items() if k not in ("report", "stderr")},
                   **figures(ran["report"], True)}
            row["fresh"] = measure_file(out, fresh, reference, readout, br) if ran["written"] else None
            print(json.dumps(row), flush=True)
            retrained.append(row)
    return {"model": path.name, "calib": args.calib, "fresh": args.fresh, "rows": rows, "retrained": retrained,
            "shims_needed": shims_needed}


# -- the report ---------------------------------------------------------------

def _f(v: float | None, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def _against(rows: list[dict[str, Any]], row: dict[str, Any], key: str = "target") -> float | None:
    """``row``'s fresh error over the per-layer low-rank baseline's at the same ratio (and BN mode)."""
    base = [r for r in rows if r["method"] == BASELINE and r[key] == row[key] and r.get("bn") == row.get("bn")]
    if not base or base[0]["fresh"] is None or row["fresh"] is None or base[0]["fresh"] <= 0:
        return None
    return row["fresh"] / base[0]["fresh"]


def _layers_cell(r: dict[str, Any]) -> str:
    c = r.get("layers")
    if not c:
        return "-"
    return f"{c['basis']} ({c['bases']}) / {c['lowrank']} / {c['tie']} / {c['residual']}"


def verdicts(rows: list[dict[str, Any]], by: str = "target") -> list[str]:
    """Per ratio (or BN mode): which method kept the function best on the fresh inputs."""
    lines = []
    for key in dict.fromkeys(r[by] for r in rows):
        here = [r for r in rows if r[by] == key and r["fresh"] is not None]
        if not here:
            continue
        least = min(r["fresh"] for r in here)
        best = [r["method"] for r in here if r["fresh"] <= least * (1 + 1e-9)]  # equal plans tie
        rel = ", ".join(f"{r['method']} {_f(_against(rows, r, 'target'), '.2f')}" for r in here
                        if r["method"] != BASELINE)
        label = f"ratio {key:g}" if by == "target" else f"BN {_BN_NAMES.get(key, key)}"
        lines.append(f"- {label}: least fresh error {', '.join(f'**{b}**' for b in best)} ({least:.4f}); "
                     f"error / {BASELINE} error: {rel}.")
    return lines


def render(report: dict[str, Any]) -> str:
    m = report["result"]
    lines = [f"`{report['command']}` ({report['machine']}; {report['seconds']:.0f} s in all). Model: "
             f"`{m['model']}`; calibration {m['calib']} samples given to lfpass (it splits them: statistics, "
             f"verification); fresh: {m['fresh']} other samples neither saw, on which `fresh error` is measured "
             f"(1 - mean per-sample cosine of the output map). Every run: `lfpass optimize MODEL --inputs calib.npz "
             f"--scope layers --ratio R` plus the flags shown; no retraining.", "",
             "Layers: how many layers each action took: in shared bases (number of bases) / per-layer low rank / "
             "tied / tie + residual. `vs lowrank`: fresh error over the per-layer low-rank run's at the same target.",
             "", "| target | flags | exit | ratio (layers) | ratio (model) | layers b (n) / l / t / r | s "
             "| error reported | fresh error | vs lowrank |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in m["rows"]:
        lines.append(f"| {r['target']:g} | {r['flags']} | {r['exit']} | {_f(r.get('ratio_layers'), '.3f')} "
                     f"| {_f(r.get('ratio_model'), '.3f')} | {_layers_cell(r)} | {r['seconds']:.0f} "
                     f"| {_f(r.get('reported'))} | {_f(r['fresh'])} | {_f(_against(m['rows'], r), '.2f')} |")
    lines += ["", *verdicts(m["rows"])]
    if m["retrained"]:
        t = report["retrain"]
        lines += ["", f"After equal retraining: target {t['ratio']:g}, `--distill calib.npz --stages 1 --steps "
                      f"{t['steps']} --lr {t['lr']:g} --batch-size {t['batch_size']} --seed {t['seed']}` for "
                      "every method retrained. `quality` is lfpass's held-out cosine (on its own share of the "
                      "calibration samples) after the fuse and after retraining; where retraining lowered it "
                      "lfpass keeps the fused weights (`kept fused`). BN (`--norm-stats`): `update`, BatchNorm in "
                      "train mode re-estimating its statistics; `frozen`, kept in eval mode with the original's "
                      "(lfpass's default when distilling). Every retraining run also had: "
                      + (", ".join(f"`{s}`" for s in m["shims_needed"]) or "no other workaround")
                      + " (the module docstring says why). `fresh before retraining`: the same flags' row above.", "",
                  "| BN | flags | exit | ratio (layers) | ratio (model) | layers b (n) / l / t / r | s | quality fused "
                  "| quality retrained | kept fused | fresh error | vs lowrank | fresh before retraining |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in m["retrained"]:
            before = [x["fresh"] for x in m["rows"] if x["method"] == r["method"] and x["target"] == r["target"]]
            lines.append(f"| {_BN_NAMES.get(r['bn'], r['bn'])} | {r['flags']} | {r['exit']} | {_f(r.get('ratio_layers'), '.3f')} "
                         f"| {_f(r.get('ratio_model'), '.3f')} | {_layers_cell(r)} | {r['seconds']:.0f} "
                         f"| {_f(r.get('quality_fused'))} | {_f(r.get('quality_retrained'))} "
                         f"| {'yes' if r.get('kept_fused') else 'no'} | {_f(r['fresh'])} "
                         f"| {_f(_against(m['retrained'], r), '.2f')} | {_f(before[0] if before else None)} |")
        lines += ["", *verdicts(m["retrained"], by="bn")]
    return "\n".join(lines)


def write_markdown(path: Path, body: str) -> None:
    text = path.read_text() if path.exists() else f"# The plan menu on a real CNN\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    path.write_text(f"{head}{BEGIN}\n{body}\n{END}{rest.split(END, 1)[1]}")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="a random 8-conv net and random images: checks the tool, "
                                                        "not quality (seconds)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated: " + ", ".join(METHODS))
    p.add_argument("--ratios", help="comma-separated --ratio targets, over the layers (default 1.25,1.5,2.0, or "
                                    "1.5,2.0 with --small)")
    p.add_argument("--retrain-ratio", type=float, default=1.5, help="the target retrained at")
    p.add_argument("--retrain-methods", help="the methods retrained (default: --methods, or lowrank,menu with "
                                             "--small)")
    p.add_argument("--steps", type=int, help="retraining steps (default 80, or 3 with --small)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--bn", help="BatchNorm while retraining (lfpass's --norm-stats), comma-separated from update, "
                                "frozen (default both, or frozen with --small)")
    p.add_argument("--no-retrain", dest="retrain", action="store_false")
    p.add_argument("--calib", type=int, help="calibration samples given to lfpass (default 256, or 48 with --small)")
    p.add_argument("--fresh", type=int, help="samples the error is measured on afterwards (default 256, or 32)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per optimize run")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for lfpass (0: leave it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "lfpass")
    p.add_argument("--work", type=Path, help="keep the models and inputs here (default: a temporary folder)")
    p.add_argument("--json", type=Path)
    p.add_argument("--out", type=Path, help="rewrite the part between the markers of this Markdown file")
    p.add_argument("--render", type=Path, metavar="JSON", help="run nothing: render this earlier --json to --out")
    args = p.parse_args(argv)
    args.methods = args.methods.split(",")
    args.ratios = [float(r) for r in (args.ratios or ("1.5,2.0" if args.small else "1.25,1.5,2.0")).split(",")]
    args.retrain_methods = (args.retrain_methods or (f"{BASELINE},menu" if args.small else ",".join(args.methods))
                            ).split(",")
    args.bn = (args.bn or ("frozen" if args.small else ",".join(BN_MODES))).split(",")
    args.steps = args.steps if args.steps is not None else (3 if args.small else 80)
    args.calib = args.calib if args.calib is not None else (48 if args.small else 256)
    args.fresh = args.fresh if args.fresh is not None else (32 if args.small else 256)
    unknown = ([m for m in args.methods if m not in METHODS] + [b for b in args.bn if b not in BN_MODES]
               + [m for m in args.retrain_methods if m not in args.methods])
    if unknown:
        p.error(f"unknown {unknown}")
    if BASELINE not in args.methods or BASELINE not in args.retrain_methods:
        p.error(f"--methods and --retrain-methods need the baseline {BASELINE}: every error is given against it")
    if any(r < 1 for r in args.ratios):
        p.error("--ratios: each at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == SHIM:
        return as_lfpass(argv[1:])
    args = parse(argv)
    if args.render:
        text = render(json.loads(args.render.read_text()))
        print(text)
        if args.out:
            write_markdown(args.out, text)
        return 0
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    clock = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lfpass-menu-real-") as tmp:
        work = (args.work or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        result = run_all(args, work)
    report = {"command": "python tools/menu_real.py " + " ".join(argv),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
                         + (f", OMP_NUM_THREADS={args.threads}" if args.threads else ""),
              "seconds": time.perf_counter() - clock, "small": args.small, "ratios": args.ratios,
              "methods": {m: METHODS[m] for m in args.methods}, "baseline": BASELINE, "seed": args.seed,
              "retrain": {"ratio": args.retrain_ratio, "steps": args.steps, "lr": args.lr,
                          "batch_size": args.batch_size, "seed": args.seed, "bn": args.bn,
                          "methods": args.retrain_methods} if args.retrain else None,
              "result": result}
    text = render(report)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.out:
        write_markdown(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
