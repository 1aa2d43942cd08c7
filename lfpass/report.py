"""Human-facing views of a plan: a per-class table of the most similar pairs, and a heatmap."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lfpass.fileio import atomic_path
from lfpass.plan import FusionPlan
from lfpass.sites import ClassKey


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


def write_heatmap(plan: FusionPlan, path: str | Path, max_classes: int = 12) -> Path:
    """One similarity heatmap per compatibility class (largest first), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    classes = sorted(plan.classes, key=lambda kv: -len(kv[1]))[:max_classes]
    n = max(len(classes), 1)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, (cls, _) in zip(axes.flat, classes):
        names, sim = plan.similarity(cls)
        np.fill_diagonal(sim, np.nan)  # self-similarity says nothing; keep the scale for the pairs
        off = sim[np.isfinite(sim)]
        lo, hi = (float(off.min()), float(off.max())) if off.size else (0.0, 1.0)
        ax.set_axis_on()
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.85")
        image = ax.imshow(np.ma.masked_invalid(sim), cmap=cmap, vmin=lo, vmax=max(hi, lo + 1e-9))
        if len(names) <= 10:
            for (i, j), v in np.ndenumerate(sim):
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=6, color="w" if v < (lo + hi) / 2 else "k")
        short = [_short(s) for s in names]
        ticks = list(range(len(names)) if len(names) <= 24 else range(0, len(names), max(len(names) // 12, 1)))
        ax.set_xticks(ticks, [short[i] for i in ticks], rotation=90, fontsize=6)
        ax.set_yticks(ticks, [short[i] for i in ticks], fontsize=6)
        ax.set_title(class_label(cls, 60), fontsize=8)
        fig.colorbar(image, ax=ax, shrink=0.8)
    if not classes:
        axes.flat[0].text(0.5, 0.5, "nothing fusable", ha="center", va="center")
    fig.suptitle(f"lfpass: {plan.metric} similarity per class (higher = more alike)")
    fig.tight_layout()
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return path


def class_label(cls: ClassKey, width: int = 100) -> str:
    """A readable name for a class: its role, kind and weight shape."""
    shape, layout = cls.field("shape"), cls.field("layout")
    label = f"{cls.role + '  ' if cls.role else ''}{cls.kind} {shape if shape is not None else ''}".rstrip()
    if layout and layout != "out_in":
        label += f" {layout}"
    return _short(label, width)


def _short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]
