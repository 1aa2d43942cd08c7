"""Depth collapse: residual blocks that barely change the stream are removed from the graph.

Sharing shrinks the file and the memory but not the work per inference. Removing
whole blocks does both: a stack of residual blocks ``x -> x + f(x)`` (transformer
layers, ResNet stages' blocks) in which some blocks barely turn the hidden state
can lose them, the stream flowing from the block before straight into the block
after, so inference runs fewer layers (ShortGPT, Men et al. 2024: remove the blocks
of least *block influence*, ``1 - cos(input, output)`` per position on calibration
data).

This module plans it, knowing no IR: the frontend names the blocks
(:meth:`lfpass.core.frontend.Frontend.blocks`: each with the parameters it alone
holds), measures each one's influence on calibration batches and removes the ones
a plan names. Blocks go least influential first; a ratio takes the fewest that
reach it; a budget is kept by bisection over how many go, each step measured end
to end (removing more never helps, so the count is monotone in practice). At least
one block of the stack is always kept. The plan lists the removed blocks
(``FusionPlan.dropped``); they retrain like any plan (what is left trains).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Mapping, Sequence

from lfpass.core.config import FusionConfig
from lfpass.core.errors import PlanError
from lfpass.core.plan import FusionPlan
from lfpass.core.quality import describe

Evaluate = Callable[[FusionPlan], float]
GREEDY = 12  # stacks up to this many blocks choose by measurement, block by block; larger ones by influence


@dataclass(frozen=True)
class Block:
    """One residual block of a stack: its name (the module path, ``encoder.layer.3``), the
    unique parameters that go with it, how many of them sit in plannable layers, and those layers."""

    name: str
    params: int
    layer_params: int = 0
    layers: tuple[str, ...] = ()  # the plannable layers inside it (what another action may not also take)


def enclosing(path: str) -> list[str]:
    """The indexed module paths that hold the dotted ``path``, deepest first (the candidates for
    its block): ``stages.1.blocks.2.conv1`` -> ``stages.1.blocks.2``, ``stages.1``."""
    parts = path.split(".")
    return [".".join(parts[:i + 1]) for i in range(len(parts) - 1, 0, -1) if parts[i].isdigit()]


def order(blocks: Sequence[Block], influence: Mapping[str, float]) -> list[Block]:
    """The blocks, least influential first (the deeper one first on equal influence)."""
    depth = {b.name: i for i, b in enumerate(blocks)}
    missing = [b.name for b in blocks if b.name not in influence]
    if missing:
        raise PlanError(f"collapse: no influence measured for block {missing[0]!r} (it never ran on the inputs)")
    return sorted(blocks, key=lambda b: (influence[b.name], -depth[b.name]))


def dropping(base: FusionPlan, removed: Sequence[Block]) -> FusionPlan:
    """``base`` (a plan that changes nothing) with ``removed`` taken out, its counts too."""
    params = sum(b.params for b in removed)
    layers = sum(b.layer_params for b in removed)
    return replace(base, dropped=tuple(b.name for b in removed), params_after=base.params_before - params,
                   layer_params_after=base.layer_params_before - layers)


def plan_collapse(base: FusionPlan, blocks: Sequence[Block], influence: Mapping[str, float], config: FusionConfig,
                  evaluate: Evaluate | None = None) -> FusionPlan:
    """The blocks to remove for ``config``'s ``target_ratio`` and/or ``max_error`` (``evaluate``:
    the measured error of the model a plan makes; a budget needs it)."""
    fixed = [b.name for b in blocks if not math.isfinite(influence.get(b.name, math.nan))]
    blocks = [b for b in blocks if b.name not in fixed]  # they change the stream's shape (or never ran)
    if len(blocks) < 2:
        raise PlanError("collapse: the model has no stack of two or more residual blocks to remove from")
    ranked = order(blocks, influence)[:len(blocks) - 1]  # the most influential block stays
    plans = [dropping(base, ranked[:k]) for k in range(len(ranked) + 1)]
    shown = ", ".join(f"{b.name} {influence[b.name]:.3g}" for b in order(blocks, influence))
    head = f"depth collapse: block influence (1 - cos(input, output), least first): {shown}"
    if fixed:
        head += f"; {len(fixed)} block(s) kept, their output not shaped like their input (e.g. {fixed[0]})"
    if evaluate is not None and len(blocks) <= GREEDY:
        return _greedy(base, blocks, config, evaluate, head)
    if config.max_error is None or evaluate is None:
        k = len(plans) - 1
        if config.target_ratio is not None:
            k = next((i for i, p in enumerate(plans) if p.ratio >= config.target_ratio - 1e-12), k)
        plan = plans[k]
        lines = [head, f"removed {k} of {len(blocks)} blocks: ratio {plan.ratio:.3f} ({plan.scope})"]
        if config.target_ratio is not None and plan.ratio + 1e-12 < config.target_ratio:
            lines.append(f"the target {config.target_ratio:g} is out of reach: keeping one block reaches "
                         f"{plan.ratio:.3f}")
        return replace(plan, message="; ".join(lines))
    top = len(plans) - 1
    if config.target_ratio is not None:
        top = next((i for i, p in enumerate(plans) if p.ratio >= config.target_ratio - 1e-12), top)
    lo, hi, curve, measured = 0, top + 1, [], {0: 0.0}
    while hi - lo > 1:  # the largest k whose error keeps the budget: k = 0 always does
        mid = (lo + hi) // 2
        measured[mid] = evaluate(plans[mid])
        curve.append((plans[mid].ratio, measured[mid]))
        if measured[mid] <= config.max_error:
            lo = mid
        else:
            hi = mid
    plan = plans[lo]
    budget = describe(config.error_metric, config.max_error)
    lines = [head, f"{top + 1} plans ordered by size, measured end to end at {len(measured) - 1}",
             f"removed {lo} of {len(blocks)} blocks within the budget (error <= {config.max_error:g}, {budget}): "
             f"ratio {plan.ratio:.3f} ({plan.scope})" + (f", at {describe(config.error_metric, measured[lo])}"
                                                          if lo else "")]
    if not lo:
        lines.append("removing even the least influential block breaks the budget: nothing removed")
    return replace(plan, error=measured[lo] if lo else 0.0, curve=tuple(sorted(curve)), message="; ".join(lines))


def _greedy(base: FusionPlan, blocks: Sequence[Block], config: FusionConfig, evaluate: Evaluate,
            head: str) -> FusionPlan:
    """Blocks removed one at a time, each time the one whose removal (beside those already gone)
    measures least end to end: influence ranks blocks one by one, and in small models blocks of
    near-equal influence differ in what removing them together costs. Until the target ratio, or
    while the error keeps the budget; at least one block stays. ``len(blocks)**2 / 2`` runs."""
    removed: list[Block] = []
    left, errors, runs, curve = list(blocks), [], 0, []
    while len(left) > 1:
        if config.target_ratio is not None and dropping(base, removed).ratio >= config.target_ratio - 1e-12:
            break
        tried = []
        for i, b in enumerate(left):
            tried.append((evaluate(dropping(base, [*removed, b])), i, b))
            runs += 1
        error, _, block = min(tried, key=lambda t: (t[0], t[1]))
        if config.max_error is not None and error > config.max_error:
            break
        removed.append(block)
        left.remove(block)
        errors.append(error)
        curve.append((dropping(base, removed).ratio, error))
    plan = dropping(base, removed)
    lines = [head, f"blocks removed one at a time, each the one whose removal measured least end to end "
                   f"({runs} runs)", f"removed {len(removed)} of {len(blocks)} blocks: ratio {plan.ratio:.3f} "
                                 f"({plan.scope})" + (f", at {describe(config.error_metric, errors[-1])}"
                                                      if errors else "")]
    if config.max_error is not None and not removed:
        lines.append("removing even the least harmful block breaks the budget: nothing removed")
    if config.target_ratio is not None and plan.ratio + 1e-12 < config.target_ratio:
        lines.append(f"the target {config.target_ratio:g} is out of reach" + (" within the budget"
                                                                             if config.max_error is not None else ""))
    return replace(plan, error=errors[-1] if errors else 0.0, curve=tuple(curve), message="; ".join(lines))


def influence_of(inputs: Sequence, outputs: Sequence) -> float:
    """``1 - cos`` between a block's input and output per position, averaged: how far the block
    turns the stream (0: it passes it through). A position is a row of the last axis (a token's
    features), or of axis 1 for 4-D ``NCHW`` feature maps (a pixel's channels)."""
    import numpy as np

    def rows(a) -> np.ndarray:
        a = np.asarray(a, dtype=np.float64)
        a = np.moveaxis(a, 1, -1) if a.ndim == 4 else a
        return a.reshape(-1, a.shape[-1])

    total, count = 0.0, 0
    for x, y in zip(inputs, outputs):
        x, y = rows(x), rows(y)
        if x.shape != y.shape:
            raise PlanError(f"collapse: a block maps {x.shape[1]} features to {y.shape[1]}: not a residual block")
        norms = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
        cos = np.einsum("ij,ij->i", x, y) / np.maximum(norms, 1e-30)
        total += float((1 - cos).sum())
        count += len(cos)
    return total / count if count else math.nan
