"""The demo's results as text tables (drawn by rich when it is installed)."""

from __future__ import annotations

import io
import sys
from typing import Any, Sequence


def format_table(rows: Sequence[dict[str, Any]], acc_before: float, title: str = "layer fusion") -> str:
    """The results table as text (drawn by rich when it is installed)."""
    head = (
        "ratio target -> planned", "unique params before / after", "after retrain",
        "acc before", "acc fused", "acc retrained",
    )
    cells = [
        (
            f"{r['target_ratio']:g} -> {r['planned_ratio']:.2f}",
            f"{r['params_before']:,} / {r['params_after']:,} = {r['measured_ratio']:.2f}",
            f"{r['params_after_retrain']:,}",
            f"{acc_before:.2%}",
            f"{r['acc_fused']:.2%}",
            f"{r['acc_retrained']:.2%}",
        )
        for r in rows
    ]
    return render_table(title, head, cells)


def render_table(title: str, head: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    """A table as text (drawn by rich when it is installed)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
        return "\n".join([title, *lines]) + "\n"
    table = Table(title=title)
    for h in head:
        table.add_column(h, justify="right")
    for row in cells:
        table.add_row(*row)
    buf = io.StringIO()
    Console(file=buf, width=140, force_terminal=sys.stdout.isatty()).print(table)
    return buf.getvalue()
