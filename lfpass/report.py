"""Human-facing views of a plan: a per-class table of the most similar pairs, and a heatmap."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np

from lfpass.core.fileio import atomic_path
from lfpass.core.plan import FusionPlan
from lfpass.core.sites import ClassKey


def pairs_table(plan: FusionPlan, top: int = 5) -> str:
    """The ``top`` most similar pairs of each compatibility class, best first."""
    where = plan.group_of()
    members = dict(plan.classes)
    lines = []
    for cls, names in sorted(plan.classes, key=lambda kv: -len(kv[1])):
        inside = set(names)
        pairs = sorted((c for c in plan.candidates if c.a in inside and c.b in inside), key=lambda c: -c.score)
        lines.append(f"{class_label(cls)}  ({len(members[cls])} layers)")
        for c in pairs[:top]:
            fused = where.get(c.a) is not None and where.get(c.a) == where.get(c.b)
            lines.append(f"  {c.score:+.4f}  {c.a}  ~  {c.b}{'  [fused]' if fused else ''}")
    if not lines:
        lines.append("no two layers share a signature: nothing can be fused")
    return "\n".join(lines)


def summary(plan: FusionPlan) -> str:
    """The plan's figures, one a line (the target and any visible overshoot among them), then its message."""
    lines = [
        f"groups            {len(plan.groups)}",
        f"params before     {plan.params_before:,}",
        f"params after      {plan.params_after:,}",
        f"ratio (model)     {plan.model_ratio:.3f}",
        f"ratio (layers)    {plan.layer_ratio:.3f}",
        f"{'ceiling (' + plan.scope + ')':<18}{plan.max_ratio:.3f}",
    ]
    if plan.target_ratio is not None:
        bound = f" (max_overshoot {plan.max_overshoot:g})" if plan.max_overshoot is not None else ""
        lines.append(f"{'target (' + plan.scope + ')':<18}{plan.target_ratio:g}{bound}")
        if plan.overshoot >= 5e-4:  # shows at three decimals
            lines.append(f"{'overshoot':<18}{plan.overshoot:.3f}")
    if plan.left_out:
        lines.append(f"{'left out':<18}{len(plan.left_out)} layers")
    if plan.message:
        lines.append(plan.message)
    return "\n".join(lines)


# -- the heatmap ---------------------------------------------------------------------------------

_BOUNDED = {"cosine": (-1.0, 1.0), "euclidean": (-1.0, 1.0), "cov": (-1.0, 1.0), "kl": (0.0, 1.0)}
_CELL_IN = 0.3  # inches per layer of a panel, within the limits below
_PANEL_IN = (2.4, 7.5)
_MIN_TICK_PT = 9.0  # a tick label per layer while a cell is at least this tall (else every k-th)


def write_heatmap(plan: FusionPlan, path: str | Path, max_classes: int = 12) -> Path:
    """One layer-by-layer similarity matrix per compatibility class (largest first), on one
    shared colour scale, pairs fused in the plan outlined; written atomically."""
    path = Path(path)
    fig = heatmap_figure(plan, max_classes)  # selects the Agg backend before pyplot loads
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return path


def heatmap_figure(plan: FusionPlan, max_classes: int = 12):
    """The heatmap as a matplotlib figure (the caller closes it): a panel per class, sized by
    its layer count within limits, ticks labelled by what varies in the layer names (the
    layer index), one colour bar for all panels at a range fixed by the metric where it is
    bounded, else common to every panel shown; pairs fused in the plan outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    classes = sorted(plan.classes, key=lambda kv: -len(kv[1]))[:max_classes]
    panels = [(cls, *plan.similarity(cls)) for cls, _ in classes]
    for _, _, sim in panels:
        np.fill_diagonal(sim, np.nan)  # self-similarity says nothing
    lo, hi = _value_range(plan.metric, [sim for _, _, sim in panels])
    diverging = lo < 0 < hi and np.isclose(-lo, hi)
    cmap = matplotlib.colormaps["RdBu_r" if diverging else "viridis"].with_extremes(bad="0.8")
    norm = Normalize(lo, hi)
    sides = [_panel_side(len(names)) for _, names, _ in panels]
    chars = max((len(x) for _, names, _ in panels for x in layer_labels(names)), default=2)
    layout = _Layout(sides, chars)
    fig = plt.figure(figsize=layout.size)
    where = plan.group_of()
    for k, (cls, names, sim) in enumerate(panels):
        ax = fig.add_axes(layout.panel(k))
        ax.imshow(np.ma.masked_invalid(sim), cmap=cmap, norm=norm, interpolation="nearest")
        _label_panel(ax, cls, names, sides[k])
        _outline_fused(ax, names, where)
        _annotate(ax, sim, norm, sides[k], diverging)
    if panels:
        ticks = [t for t in MaxNLocator(8).tick_values(lo, hi) if lo - 1e-12 <= t <= hi + 1e-12]
        bar = fig.colorbar(matplotlib.cm.ScalarMappable(norm, cmap), cax=fig.add_axes(layout.colorbar()),
                           ticks=ticks, format=FuncFormatter(_fixed(_decimals(ticks))))
        bar.set_label(f"{plan.metric} similarity (higher = more alike)")
        keys = [Patch(facecolor="none", edgecolor="k", linewidth=1.5, label="fused in the plan"),
                Patch(facecolor="0.8", label="same layer, or pair not kept")]
        fig.legend(handles=keys, loc="lower right", fontsize=7, frameon=False, ncols=2,
                   bbox_to_anchor=(1.0, 0.0), borderaxespad=0.3)
    else:
        fig.text(0.5, 0.5, "nothing fusable: no two layers share a signature", ha="center", va="center")
    title = f"lfpass: {plan.metric} similarity between layers that may share a tensor"
    if len(plan.classes) > len(classes):
        title += f" ({len(classes)} largest of {len(plan.classes)} classes)"
    fig.suptitle(textwrap.fill(title, int(layout.size[0] * 11)), fontsize=10, y=1 - 0.08 / layout.size[1],
                 va="top")
    return fig


class _Layout:
    """Where the panels go, in inches: rows of at most ``cols`` panels, each row as tall and
    each column as wide as its largest panel, room for ticks and titles round each, the
    colour bar on the right."""

    TITLE, TOP, BAR, LEGEND, GAP = 0.42, 0.4, 1.15, 0.3, 0.2

    def __init__(self, sides: Sequence[float], chars: int) -> None:
        self.sides = list(sides) or [_PANEL_IN[0]]
        n, first = len(self.sides), self.sides[0]
        self.cols = min(n, 4 if first <= 3.5 else 3 if first <= 5 else 2)
        rows = -(-n // self.cols)
        grid = np.zeros((rows, self.cols))
        for k, side in enumerate(self.sides):
            grid[k // self.cols, k % self.cols] = side
        self.widths, self.heights = grid.max(axis=0), grid.max(axis=1)
        label = 0.07 * chars + 0.15  # a tick label's length in inches, at about 7 points
        self.left = label + 0.05
        self.below = (label if chars > 3 else 0.2) + 0.3  # ticks (rotated when long) and the x label
        width = float((self.left + self.widths + self.GAP).sum()) + self.BAR
        height = self.TOP + float((self.TITLE + self.heights + self.below).sum()) + self.LEGEND
        self.size = (max(width, 4.8), height)

    def panel(self, k: int) -> list[float]:
        """The ``k``-th panel's box as figure fractions ``[left, bottom, width, height]``."""
        r, c = divmod(k, self.cols)
        x = float((self.left + self.widths[:c] + self.GAP).sum()) + self.left
        top = self.TOP + float((self.TITLE + self.heights[:r] + self.below).sum()) + self.TITLE
        side = self.sides[k]
        x += (self.widths[c] - side) / 2
        y = self.size[1] - top - (self.heights[r] + side) / 2
        return [x / self.size[0], y / self.size[1], side / self.size[0], side / self.size[1]]

    def colorbar(self) -> list[float]:
        x = float((self.left + self.widths + self.GAP).sum()) + 0.1
        span = min(float(self.heights.sum() + (len(self.heights) - 1) * (self.TITLE + self.below)), 6.0)
        top = self.TOP + self.TITLE
        return [x / self.size[0], (self.size[1] - top - span) / self.size[1], 0.18 / self.size[0],
                span / self.size[1]]


def _value_range(metric: str, sims: Sequence[np.ndarray]) -> tuple[float, float]:
    """The colour range: fixed where the metric is bounded, else common to every panel."""
    if metric in _BOUNDED:
        return _BOUNDED[metric]
    values = np.concatenate([s[np.isfinite(s)] for s in sims]) if sims else np.empty(0)
    if not values.size:
        return 0.0, 1.0
    lo, hi = float(values.min()), float(values.max())
    return (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)


def _decimals(values: Sequence[float]) -> int:
    """The fewest decimals that write every value exactly (at most 6)."""
    for d in range(7):
        if all(abs(round(v, d) - v) <= 1e-9 * max(1.0, abs(v)) for v in values):
            return d
    return 6


def _fixed(decimals: int):
    """Plain numbers at ``decimals`` (no offset or exponent text, no ``-0.0``)."""

    def fmt(v: float, _pos: object = None) -> str:
        return f"{v:.3g}" if abs(v) >= 1e5 else f"{round(v, decimals) + 0.0:.{decimals}f}"

    return fmt


def _panel_side(n: int) -> float:
    return float(np.clip(_CELL_IN * n + 1.0, *_PANEL_IN))


def layer_labels(names: Sequence[str]) -> list[str]:
    """What varies among ``names`` (the layer index where only that does): the tokens
    between their common leading and trailing parts. ``encoder.layer.3.attention.self.query``
    among its peers is ``3``; ``layer2.1.conv2`` among ResNet's is ``layer2.1``."""
    split = [re.split(r"([./#])", n) for n in names]
    if len(split) < 2:
        return [_short(n, 12) for n in names]
    head = 0
    while all(len(t) > head for t in split) and len({tuple(t[: head + 1]) for t in split}) == 1:
        head += 1
    tail = 0
    while all(len(t) - head > tail for t in split) and len({tuple(t[len(t) - tail - 1:]) for t in split}) == 1:
        tail += 1
    middles = ["".join(t[head: len(t) - tail]).strip("./") for t in split]
    return [_short(m or n, 12) for m, n in zip(middles, names)]


def _label_panel(ax, cls: ClassKey, names: Sequence[str], side: float) -> None:
    labels = layer_labels(names)
    n = len(names)
    cell_pt = side / n * 72
    step = max(1, int(np.ceil(_MIN_TICK_PT / cell_pt)))
    ticks = list(range(0, n, step))
    size = float(np.clip(cell_pt * step * 0.6, 5, 8))
    long = max(len(labels[i]) for i in ticks) > 3
    ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90 if long else 0, fontsize=size)
    ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=size)
    ax.tick_params(length=2, pad=1)
    if all(re.fullmatch(r"[\d.]+", x) for x in labels):
        ax.set_xlabel("layer", fontsize=8)
    width = max(int(side * 17), 24)
    shape = cls.field("shape")
    kind = f"{cls.kind} {tuple(shape) if shape is not None else ''}".rstrip()
    ax.set_title(f"{_short(cls.role, width) if cls.role else 'any role'}\n{kind}", fontsize=8)


def _outline_fused(ax, names: Sequence[str], where: dict[str, int]) -> None:
    """A box (black inside white, seen on any colour) round each cell of a pair fused in the plan."""
    from matplotlib.patches import Rectangle

    groups = [where.get(n) for n in names]
    for i, gi in enumerate(groups):
        for j, gj in enumerate(groups):
            if i != j and gi is not None and gi == gj:
                for colour, width in (("w", 2.2), ("k", 1.1)):
                    ax.add_patch(Rectangle((j - 0.42, i - 0.42), 0.84, 0.84, fill=False, edgecolor=colour,
                                           linewidth=width))


def _annotate(ax, sim: np.ndarray, norm, side: float, diverging: bool) -> None:
    """Each pair's value in its cell, where there are few enough cells to read them."""
    n = len(sim)
    cell_pt = side / n * 72
    if n > 12 or cell_pt < 24:
        return
    span = norm.vmax - norm.vmin
    fmt = _fixed(int(np.clip(np.ceil(-np.log10(span / 100)), 0, 6)))  # a hundredth of the range
    for (i, j), v in np.ndenumerate(sim):
        if np.isfinite(v):
            dark = abs(norm(v) - 0.5) > 0.3 if diverging else norm(v) < 0.55
            ax.text(j, i, fmt(v), ha="center", va="center", fontsize=min(7.0, cell_pt / 4.5),
                    color="w" if dark else "k")


def class_label(cls: ClassKey, width: int = 100) -> str:
    """A readable name for a class: its role, kind and weight shape."""
    shape, layout = cls.field("shape"), cls.field("layout")
    label = f"{cls.role + '  ' if cls.role else ''}{cls.kind} {shape if shape is not None else ''}".rstrip()
    if layout and layout != "out_in":
        label += f" {layout}"
    return _short(label, width)


def _short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]


# -- the one-page summary ----------------------------------------------------------------------

SUMMARY_SUFFIXES = (".html", ".png")


def decisions(plan: FusionPlan) -> list[tuple[str, int, str]]:
    """Per compatibility class (largest first): its label, its layer count, and what the plan
    does with it, in words (tied groups, factored layers, layers kept as they were)."""
    where = plan.group_of()
    factored = {m: f for f in plan.factors for m in f.members}
    choices = dict(plan.choices)
    rows = []
    for cls, names in sorted(plan.classes, key=lambda kv: -len(kv[1])):
        tied = {where[n] for n in names if n in where}
        in_groups = sum(1 for n in names if n in where)
        bases = {id(factored[n]) for n in names if n in factored and len(factored[n].members) > 1}
        lowrank = sum(1 for n in names if n in factored and len(factored[n].members) == 1)
        said = []
        if tied:
            said.append(f"{in_groups} layers tied into {len(tied)} shared tensor{'s' if len(tied) > 1 else ''}")
        if bases:
            said.append(f"{sum(1 for n in names if n in factored and len(factored[n].members) > 1)} layers on "
                        f"{len(bases)} shared basis{'es' if len(bases) > 1 else ''}")
        if lowrank:
            said.append(f"{lowrank} per-layer low rank")
        left = len(names) - in_groups - sum(1 for n in names if n in factored)
        if left:
            said.append(f"{left} kept as they were")
        why = choices.get(cls.role or str(cls))  # the menu names a class by its role
        rows.append((class_label(cls), len(names), "; ".join(said) + (f" ({why})" if why else "")))
    return rows


def summary_figure(plan: FusionPlan, title: str = "lfpass plan"):
    """The summary as one matplotlib figure (the caller closes it): quality against ratio along
    the plan's curve, the similarity heatmap, and the per-class decisions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heat = heatmap_figure(plan, max_classes=4) if plan.classes else None
    image = None
    if heat is not None:
        heat.canvas.draw()
        image = np.asarray(heat.canvas.buffer_rgba())
        plt.close(heat)
    rows = decisions(plan)
    fig = plt.figure(figsize=(13, 9.5 + 0.22 * len(rows)))
    fig.subplots_adjust(left=0.07, right=0.98, top=0.93, bottom=0.02, hspace=0.25, wspace=0.25)
    grid = fig.add_gridspec(2, 2, height_ratios=[1, 1.4 + 0.05 * len(rows)], width_ratios=[1, 1.5])
    ax = fig.add_subplot(grid[0, 0])
    _curve_panel(ax, plan)
    text = fig.add_subplot(grid[0, 1])
    text.axis("off")
    text.text(0, 1, _figures_text(plan), va="top", family="monospace", fontsize=9.5)
    bottom = fig.add_subplot(grid[1, :])
    bottom.axis("off")
    if image is not None:
        inset = bottom.inset_axes([0, 0.32, 1, 0.68])
        inset.imshow(image)
        inset.axis("off")
    lines = [f"{label[:56]:<56} {n:>4}  {what if len(what) <= 80 else what[:77] + '...'}" for label, n, what in
             rows[:14]]
    bottom.text(0, 0.3, "per class (layers): what the plan does\n" + "\n".join(lines), va="top", family="monospace",
                fontsize=8)
    fig.suptitle(title)
    return fig


def _figures_text(plan: FusionPlan) -> str:
    lines = [f"unique parameters  {plan.params_before:,} -> {plan.params_after:,}  ({plan.model_ratio:.3f}x model, "
             f"{plan.layer_ratio:.3f}x layers)",
             f"groups {len(plan.groups)}, factored layers {sum(len(f.members) for f in plan.factors)}, "
             f"blocks removed {len(plan.dropped)}"]
    if plan.max_error is not None:
        lines.append(f"budget  error <= {plan.max_error:g} ({plan.error_metric or 'cosine'})")
    if plan.error is not None:
        lines.append(f"held-out error  {plan.error:.4g}")
    lines += ["", *textwrap.wrap(plan.message, 70)[:14]]
    return "\n".join(lines)


def _curve_panel(ax, plan: FusionPlan) -> None:
    """Error against ratio along the plan's curve (the budget as a line), or a note without one."""
    if not plan.curve:
        ax.text(0.5, 0.5, "no measured curve\n(a plan by weight similarity:\ngive calibration inputs and a budget)",
                ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    ratios, errors = zip(*sorted(plan.curve))
    ax.scatter(ratios, errors, s=14, label="plans measured end to end")  # several rivals' curves: points, no line
    if plan.error is not None:
        ax.scatter([plan.ratio], [plan.error], marker="*", s=160, color="C2", zorder=3,
                   label=f"written: {plan.ratio:.2f}x, held-out {plan.error:.3g}")
    if plan.max_error is not None:
        ax.axhline(plan.max_error, color="C3", ls="--", lw=1, label=f"budget {plan.max_error:g}")
    ax.set_xlabel("ratio (unique parameters before / after)")
    ax.set_ylabel(f"measured error ({plan.error_metric or 'cosine'})")
    ax.set_title("quality along the plan's curve")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)


def write_summary(plan: FusionPlan, path: str | Path, title: str = "lfpass plan") -> Path:
    """The one-page summary (:func:`summary_figure`) as a PNG, or as an HTML page holding that
    picture, the figures and the per-class decisions as text; written atomically."""
    import base64
    import html
    import io

    path = Path(path)
    if path.suffix.lower() not in SUMMARY_SUFFIXES:
        raise ValueError(f"{path}: a summary is .html or .png")
    fig = summary_figure(plan, title)
    import matplotlib.pyplot as plt

    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
    finally:
        plt.close(fig)
    png = buf.getvalue()
    with atomic_path(path, suffix=path.suffix) as tmp:
        if path.suffix.lower() == ".png":
            Path(tmp).write_bytes(png)
        else:
            rows = "".join(f"<tr><td>{html.escape(label)}</td><td>{n}</td><td>{html.escape(what)}</td></tr>"
                           for label, n, what in decisions(plan))
            Path(tmp).write_text(
                "<!doctype html><html><head><meta charset='utf-8'>"
                f"<title>{html.escape(title)}</title><style>body{{font-family:sans-serif;margin:2em}}"
                "td,th{padding:2px 8px;text-align:left;border-bottom:1px solid #ddd}img{max-width:100%}</style>"
                f"</head><body><h1>{html.escape(title)}</h1><pre>{html.escape(_figures_text(plan))}</pre>"
                f"<img alt='quality along the curve, the similarity heatmap, the decisions' "
                f"src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
                f"<h2>Per class</h2><table><tr><th>class</th><th>layers</th><th>what the plan does</th></tr>{rows}"
                "</table></body></html>\n", encoding="utf-8")
    return path
