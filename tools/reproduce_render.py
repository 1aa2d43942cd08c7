"""Tables, verdicts and plots of tools/reproduce.py's reports (plain data in, markdown and PNG out).

The verdicts are computed, not written by hand: whether each lfpass method
meets the paper's headline at its ratio, the last ratio each method keeps
within that tolerance (where its curve bends), and where a baseline beats
every lfpass method.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TITLE = "# Results: the paper's experiments beside the baselines"
FUSION_KEYS = ("lfpass", "paper", "keep", "basis", "menu", "collapse")  # lfpass's own methods (random fusion is a baseline)


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _labels(r: dict[str, Any]) -> dict[str, str]:
    return {m["key"]: m["label"] for m in r["methods"]}


def _cells(r: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in r["cells"] if "missing" not in c]


def _targets(r: dict[str, Any]) -> list[float]:
    return sorted({c["target"] for c in r["cells"]})


def _find(r: dict[str, Any], key: str, target: float) -> dict[str, Any] | None:
    return next((c for c in r["cells"] if c["method"] == key and c["target"] == target), None)


def drop(r: dict[str, Any], quality: float) -> float:
    """How far ``quality`` is below the original, in the metric's own direction (> 0 is worse)."""
    o = r["original"]["quality"]
    return o - quality if r["quality"]["higher_is_better"] else quality - o


def better(r: dict[str, Any], a: float, b: float) -> bool:
    return a > b if r["quality"]["higher_is_better"] else a < b


# -- tables ------------------------------------------------------------------------------------------------


def quality_table(r: dict[str, Any]) -> str:
    """Methods by target ratio: quality after retraining, with no retraining in brackets."""
    spec, targets, labels = r["quality"]["format"], _targets(r), _labels(r)
    q = r["original"]["quality"]
    lines = ["| method | " + " | ".join(f"{t:g}x" for t in targets) + " |", "|---|" + "---:|" * len(targets),
             "| **original** (1x) | " + " | ".join(format(q, spec) for _ in targets) + " |"]
    if r.get("control"):
        lines.append("| original + the same retraining, no compression | "
                     + " | ".join(format(r["control"]["quality"], spec) for _ in targets) + " |")
    for m in r["methods"]:
        row = []
        for t in targets:
            c = _find(r, m["key"], t)
            if c is None:
                row.append("")
            elif "missing" in c:
                row.append("n/a")
            else:
                after = c["after"]["quality"] if c["after"] else None
                row.append((f"**{after:{spec}}** " if after is not None else "") + f"({c['before']['quality']:{spec}})")
        lines.append(f"| {labels[m['key']]} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def detail_table(r: dict[str, Any]) -> str:
    """Every cell: the measured ratio and parameter counts, the qualities and what it cost."""
    spec, labels = r["quality"]["format"], _labels(r)
    lines = [f"| target | method | ratio ({r['scope']}) | unique params | dense params | {r['quality']['name']}, "
             "no retraining | retrained | compress CPU s | retrain CPU s |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in _cells(r):
        b, a = c["before"], c["after"]
        ratio = (a or b)["ratio"]
        lines.append(f"| {c['target']:g} | {labels[c['method']]} | {ratio:.3f} | {(a or b)['unique_params']:,} | "
                     f"{(a or b)['dense_params']:,} | {b['quality']:{spec}} | {_fmt(a and a['quality'], spec)} | "
                     f"{c['compress_cpu_s']:.1f} | {c['train_cpu_s']:.1f} |")
    return "\n".join(lines)


# -- verdicts ------------------------------------------------------------------------------------------------


def knee(r: dict[str, Any], key: str, phase: str, tolerance: float) -> float | None:
    """The largest target at which ``key`` stays within ``tolerance`` of the original, every smaller
    target staying within it too (the last point before the curve leaves the band)."""
    last = None
    for t in _targets(r):
        c = _find(r, key, t)
        if c is None or "missing" in c or c[phase] is None:
            continue
        if drop(r, c[phase]["quality"]) > tolerance:
            break
        last = t
    return last


def claim_lines(r: dict[str, Any]) -> list[str]:
    """Whether each lfpass method meets the paper's headline (and the issue's aim) at its ratio."""
    qd, labels, spec = r["quality"], _labels(r), r["quality"]["format"]
    if qd.get("claim") is None:
        return []
    ratio = qd["claim_ratio"]
    target = next((t for t in _targets(r) if abs(t - ratio) < 1e-6), None)
    if target is None:
        why = next((s["why"] for s in r["skipped"] if abs(s["ratio"] - ratio) < 1e-6), "not run")
        return [f"- The paper's headline ({qd['claim_text']}) cannot be tested on this model: {why}."]
    out = [f"Against the paper's headline, {qd['claim_text']}; the issue's aim: {qd['aim_text']}:", ""]
    for key in FUSION_KEYS:
        c = _find(r, key, target)
        if c is None or "missing" in c or c["after"] is None:
            continue
        d = drop(r, c["after"]["quality"])
        out.append(f"- {labels[key]} at {c['after']['ratio']:.3f}x: {c['after']['quality']:{spec}} "
                   f"({_gap(r, d)}): **{'meets' if d <= qd['claim'] else 'misses'}** the paper's claim, "
                   f"**{'meets' if d <= qd['aim'] else 'misses'}** the aim.")
    return out


def _amount(r: dict[str, Any], d: float) -> str:
    """``d`` in the metric's units: accuracy in points, the rest as they are."""
    if r["quality"]["name"] == "accuracy":
        return f"{abs(d) * 100:.2f} points"
    return f"{abs(d):.3f}"


def _gap(r: dict[str, Any], d: float) -> str:
    """How far from the original, in the metric's units (perplexity also relative to the original)."""
    text = f"{_amount(r, d)} {'worse than' if d > 0 else 'better than'} the original"
    if r["quality"]["name"] == "perplexity":
        text += f", {d / r['original']['quality']:+.0%}"
    return text


def knee_lines(r: dict[str, Any]) -> list[str]:
    qd, labels = r["quality"], _labels(r)
    tol = qd.get("claim")
    if tol is None:
        return []
    show = (lambda t: "none" if t is None else f"{t:g}x")
    out = [f"Where each curve leaves the paper's tolerance (within {_amount(r, tol)} of the original): the largest "
           "target ratio still inside it, every smaller one inside too, retrained / no retraining (\"none\": "
           "already outside at the first target):", ""]
    for m in r["methods"]:
        out.append(f"- {labels[m['key']]}: {show(knee(r, m['key'], 'after', tol))} / "
                   f"{show(knee(r, m['key'], 'before', tol))}")
    return out


def beaten_lines(r: dict[str, Any]) -> list[str]:
    """Each baseline's targets where it beats every lfpass method (retrained, and with no retraining)."""
    labels, out = _labels(r), []
    for m in r["methods"]:
        if m["key"] in FUSION_KEYS:
            continue
        wins = {"after": [], "before": []}
        for t in _targets(r):
            c = _find(r, m["key"], t)
            if c is None or "missing" in c:
                continue
            for phase in wins:
                ours = [_find(r, k, t) for k in FUSION_KEYS]
                ours = [o[phase]["quality"] for o in ours if o and "missing" not in o and o[phase] is not None]
                if c[phase] is not None and ours and all(better(r, c[phase]["quality"], q) for q in ours):
                    wins[phase].append(f"{t:g}x")
        out.append(f"- {labels[m['key']]}: retrained {', '.join(wins['after']) or 'nowhere'}; "
                   f"no retraining {', '.join(wins['before']) or 'nowhere'}")
    return ["Where a baseline beats every lfpass method (default, paper recipe, keep-function) at the same "
            "target:", ""] + out if out else []


def missing_lines(r: dict[str, Any]) -> list[str]:
    why: dict[str, set[str]] = {}
    for c in r["cells"]:
        if "missing" in c:
            why.setdefault(c["method"], set()).add(c["missing"])
    labels = _labels(r)
    return [f"- {labels[k]}: not run ({'; '.join(sorted(v))})" for k, v in why.items()]


# -- the section ---------------------------------------------------------------------------------------------


def section(r: dict[str, Any], plot: str | None) -> str:
    a, t, qd = r["about"], r["train"], r["quality"]
    pre = a.get("pretrain")
    c = r["ceilings"]
    ceil = "; ".join(f"over the {scope}, {c[f'{scope}, by role']:.3f} by role and {c[f'{scope}, cross-role']:.3f} "
                     "across roles" for scope in ("model", "layers"))
    base = ", ".join(f"`{k} = {v}`" for k, v in r["base"].items()) or "none"
    skipped = "; ".join(f"{s['ratio']:g}x ({s['why']})" for s in r["skipped"])
    unretrained = [x for x in _targets(r) if not any(abs(x - y) < 1e-9 for y in r["retrain_ratios"])]
    parts = [
        f"## {r['title']} (ratio over the {r['scope']})\n",
        "Commands: " + "; then ".join(f"`{c}`" for c in r["commands"]) + "\n" if r.get("commands")
        else f"Command: `{r['command']}`\n",
        f"Model: {a['model']}; {r['params']:,} parameters, {r['layer_params']:,} of them in fusable layers. "
        f"Data: {a['data']}."
        + (f" Pretrained here: {pre['steps']} AdamW steps (batch {a['pretrain_batch']}, lr {a['pretrain_lr']:g}, "
           f"cosine; final train loss {pre['loss']:.3f}, {pre['cpu_s']:.0f} CPU s)." if pre else "") + "\n",
        f"Quality: {qd['name']} ({'higher' if qd['higher_is_better'] else 'lower'} is better). Ratio: unique "
        f"parameters of the original over the compressed model's, over the {r['scope']}"
        + (" (the fusable layers only; the rest counted as untouched)" if r["scope"] == "layers" else "")
        + "; pruning counts its zeros as removed (its dense size is in the detail table: it does not shrink "
          "without sparse storage). Every method is held to the unique parameter count of lfpass's default plan "
          "at each target. Sharing's ceiling here: " + ceil + f". Fields every lfpass method shares: {base}.\n",
        f"Retraining, the same for every method: {t['steps']} AdamW steps, lr {t['lr']:g}, batch {t['batch']}, "
        f"warm-up then cosine, seed {t['seed']}, ties kept (pruning's mask kept); the paper's recipe spends the "
        f"same steps as {t['paper_stages']} fuse-then-retrain stages (`lfpass.train.retrain`). Calibration "
        f"(keep-function, ASVD, layer influence): {r['calibration']['batches']} batches of "
        f"{a['calibration_batch']} training samples.\n",
        f"Machine: {r['machine']}. The sweep (after pretraining): {r.get('wall_s', 0):.0f} s wall, "
        f"{r.get('cpu_s', 0):.0f} s CPU.\n",
    ]
    if not r["done"]:
        done = ", ".join(f"{x:g}x" for x in _targets(r))
        parts.append(f"**Partial:** the run stopped before every ratio was done ({done} done).\n")
    parts += [n + "\n" for n in r["notes"]]
    if skipped:
        parts.append(f"Not run: {skipped}.\n")
    if unretrained:
        parts.append(f"No retraining was run at {', '.join(f'{x:g}x' for x in unretrained)} (CPU budget): those "
                     "columns hold the no-retraining figure only.\n")
    miss = missing_lines(r)
    if miss:
        parts.append("Methods that could not run:\n\n" + "\n".join(miss) + "\n")
    parts.append(f"{qd['name'].capitalize()} by target ratio: **retrained** (no retraining):\n\n"
                 + quality_table(r) + "\n")
    if plot:
        parts.append(f"![{qd['name']} against ratio]({plot})\n")
    for block in (claim_lines(r), knee_lines(r), beaten_lines(r)):
        if block:
            parts.append("\n".join(block) + "\n")
    parts.append("Every cell:\n\n" + detail_table(r) + "\n")
    return "\n".join(parts)


# -- the plot --------------------------------------------------------------------------------------------------


def plot(r: dict[str, Any], path: Path) -> None:
    """Quality against measured ratio, per method: retrained (left) and with no retraining (right)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    qd, labels = r["quality"], _labels(r)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))  # own y ranges: retrained curves sit close together
    o = r["original"]["quality"]
    for ax, phase, title in ((axes[0], "after", "retrained (same budget)"), (axes[1], "before", "no retraining")):
        for i, m in enumerate(r["methods"]):
            pts = sorted((c[phase]["ratio"], c[phase]["quality"]) for c in _cells(r)
                         if c["method"] == m["key"] and c[phase] is not None)
            if not pts:
                continue
            style = "-" if m["key"] in FUSION_KEYS else "--"
            ax.plot([1.0] + [p[0] for p in pts], [o] + [p[1] for p in pts], style, marker="o", ms=4,
                    label=labels[m["key"]], color=f"C{i}")
        ax.axhline(o, color="black", lw=0.8, ls=":", label="original")
        if qd.get("claim") is not None:
            band = o - qd["claim"] if qd["higher_is_better"] else o + qd["claim"]
            ax.axhline(band, color="grey", lw=0.8, ls="-.", label="paper's tolerance")
            ax.axvline(qd["claim_ratio"], color="grey", lw=0.8, ls=":", label="paper's headline ratio")
        if not qd["higher_is_better"] and phase == "before":  # perplexity with no retraining can be far off
            ax.set_yscale("log")
            plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
            ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_xlabel(f"compression ratio (unique parameters, {r['scope']})")
        ax.set_ylabel(qd["name"])
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(r["title"], fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


# -- the summary -----------------------------------------------------------------------------------------------


def summary(reports: dict[str, dict[str, Any]], command: str) -> str:
    """One line per experiment at its headline ratio: the best lfpass method and the best baseline."""
    lines = ["| experiment | scope | ratio | original | best lfpass method | best baseline | paper's claim met | "
             "issue's aim met |", "|---|---|---:|---:|---|---|---|---|"]
    for r in reports.values():
        qd, labels, spec = r["quality"], _labels(r), r["quality"]["format"]
        ratio = qd.get("claim_ratio") or max(r["retrain_ratios"], default=None)
        target = next((t for t in _targets(r) if ratio is not None and abs(t - ratio) < 1e-6), None)
        if target is None:
            lines.append(f"| {r['title']} | {r['scope']} | {_fmt(ratio, 'g')} | {r['original']['quality']:{spec}} | "
                         "not reachable or not run | - | - | - |")
            continue

        def best(keys: tuple[str, ...] | list[str]) -> tuple[str, float] | None:
            found = [(labels[c["method"]], c["after"]["quality"]) for k in keys
                     for c in [_find(r, k, target)] if c and "missing" not in c and c["after"]]
            if not found:
                return None
            return max(found, key=lambda x: x[1]) if qd["higher_is_better"] else min(found, key=lambda x: x[1])

        ours = best(FUSION_KEYS)
        theirs = best([m["key"] for m in r["methods"] if m["key"] not in FUSION_KEYS])
        lines.append(f"| {r['title']} | {r['scope']} | {target:g} | {r['original']['quality']:{spec}} | "
                     f"{_shown(ours, spec)} | {_shown(theirs, spec)} | {_met(r, ours, qd.get('claim'))} | "
                     f"{_met(r, ours, qd.get('aim'))} |")
    return (f"## Summary at each experiment's headline ratio\n\nCommand: `{command}` (from the JSON reports "
            "beside this file).\n\nQuality after the same retraining for every method.\n\n" + "\n".join(lines) + "\n")


def _met(r: dict[str, Any], ours: tuple[str, float] | None, tolerance: float | None) -> str:
    if tolerance is None or ours is None:
        return "-"
    return "yes" if drop(r, ours[1]) <= tolerance else "**no**"


def _shown(best: tuple[str, float] | None, spec: str) -> str:
    return "-" if best is None else f"{best[0]}: {best[1]:{spec}}"
