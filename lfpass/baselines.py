"""The compression baselines layer fusion is compared against, each to a parameter count.

Each takes a PyTorch model and returns a compressed copy (the input is never
mutated) and a short dict of what it did; ``info["params"]`` is the count the
comparison is made at:

- :func:`random_fusion`: a plan's group sizes in the same compatibility
  classes, members drawn at random (seeded), merged by the mean: what fusion
  gains by choosing *which* layers share;
- :func:`magnitude_prune`: global magnitude pruning of the layers' weights to a
  non-zero count. Its ``params`` counts zeros as removed; its real dense size
  (``dense_params``) does not change: the saving needs sparse storage (and
  sparse kernels) to be real, which layer fusion does not;
- :func:`drop_layers`: repeated residual blocks replaced by identities, the
  least influential first (ShortGPT's block influence: 1 - cosine between a
  block's input and output hidden states on calibration batches);
- :func:`low_rank`: every chosen layer factored at one fraction of full rank
  (:func:`lfpass.fx.lowrank.factorize_to_params`), activation-aware (ASVD) with
  calibration, plain SVD without.

Each lands at or below its target and within one step of it (a weight, a
block, a rank step on every factored layer); a target below what the method
can reach is a :class:`PlanError` that says the floor.
"""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import replace
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from lfpass.core.calibration import Calibration
from lfpass.core.errors import ConfigError, PlanError
from lfpass.core.plan import FusionPlan
from lfpass.fx.collapse import SkipBlock
from lfpass.fx.api import apply
from lfpass.fx.batches import call
from lfpass.fx.sites import find_sites, unique_parameters

log = logging.getLogger(__name__)

Info = dict[str, Any]


# -- random fusion -------------------------------------------------------------------------------

def random_fusion(model: nn.Module, plan: FusionPlan, seed: int = 0) -> tuple[nn.Module, Info]:
    """``plan``'s group sizes in the same classes, members drawn at random within each class
    (seeded), merged by the mean (:func:`random_plan`, applied). Saves exactly what ``plan``
    saves before any per-member corrections of its own."""
    drawn = random_plan(plan, seed)
    fused = apply(model, drawn)
    log.info("random fusion: %d groups drawn with seed %d", len(drawn.groups), seed)
    info = {"method": "random_fusion", "params": unique_parameters(fused), "seed": seed,
            "groups": [list(g.members) for g in drawn.groups]}
    return fused, info


def random_plan(plan: FusionPlan, seed: int = 0) -> FusionPlan:
    """A plan with ``plan``'s group sizes in the same classes, members drawn at random within
    each class (seeded), merged by the mean, with no alignment or corrections: a plan too, so it
    applies to an ONNX model or a retraining run as well."""
    rng = np.random.default_rng(seed)
    members = dict(plan.classes)
    pools: dict[Any, list[str]] = {}
    groups = []
    for g in plan.groups:
        if g.cls not in members:
            raise PlanError(f"plan group {', '.join(g.members)}: its class is not among the plan's classes")
        pool = pools.setdefault(g.cls, [str(n) for n in rng.permutation(members[g.cls])])
        if len(pool) < len(g.members):
            raise PlanError(f"plan's groups of class {g.cls} hold more layers than the class has")
        drawn, pools[g.cls] = tuple(pool[: len(g.members)]), pool[len(g.members):]
        groups.append(replace(g, members=drawn, rule="mean", score=_mean_score(plan, g.cls, drawn),
                              extra=0, damage=None))
    saved = sum(g.saved for g in groups)
    return replace(plan, groups=tuple(groups), align="none", residual_rank=0, error=None, error_metric=None,
                   max_error=None, curve=(), decisions=(), params_after=plan.params_before - saved,
                   layer_params_after=plan.layer_params_before - saved,
                   message=f"random fusion (seed {seed}) at the group sizes of a {plan.metric} plan")


def _mean_score(plan: FusionPlan, cls: Any, drawn: Sequence[str]) -> float:
    """The mean pairwise similarity of ``drawn`` where the plan kept those pairs (NaN if none)."""
    names, sim = plan.similarity(cls)
    idx = [names.index(n) for n in drawn]
    sub = sim[np.ix_(idx, idx)][~np.eye(len(idx), dtype=bool)]
    sub = sub[np.isfinite(sub)]
    return float(sub.mean()) if sub.size else float("nan")


# -- magnitude pruning ---------------------------------------------------------------------------

def magnitude_prune(model: nn.Module, target_params: int, kinds: Sequence[str] = ("linear", "conv"),
                    layers: Sequence[str] | None = None) -> tuple[nn.Module, Info]:
    """Zero the smallest-magnitude weights of the chosen layers, over all of them at once, until
    the model's unique parameters less its zeroed weights are ``target_params`` (exactly, where
    already-zero weights do not take it below). Biases and other parameters are kept.

    ``info["params"]`` counts zeros as removed; ``info["dense_params"]`` is the model's real
    dense size, unchanged: the saving needs sparse storage to exist at all."""
    pruned = copy.deepcopy(model)
    weights = _prunable(pruned, kinds, layers)
    total = unique_parameters(pruned)
    prunable = sum(w.numel() for w in weights)
    floor = total - prunable
    if target_params < floor:
        raise PlanError(f"cannot prune to {target_params:,} parameters: the chosen layers' weights are "
                        f"{prunable:,} of {total:,}, so pruning all of them leaves {floor:,}")
    k = max(total - target_params, 0)
    threshold = _zero_smallest(weights, k)
    zeros = sum(int((w == 0).sum()) for w in weights)
    log.info("magnitude pruning: %d of %d weights zero (cut %.3g)", zeros, prunable, threshold)
    info = {"method": "magnitude_prune", "params": total - zeros, "dense_params": unique_parameters(pruned),
            "pruned": k, "sparsity": zeros / max(prunable, 1), "threshold": threshold, "layers": len(weights)}
    return pruned, info


def _prunable(module: nn.Module, kinds: Sequence[str], layers: Sequence[str] | None) -> list[torch.Tensor]:
    """The weight tensors of the chosen layer sites, each once."""
    found = find_sites(module)
    chosen = [s for s in found.sites if s.kind in kinds and (layers is None or s.name in layers)]
    if layers is not None and set(layers) - {s.name for s in chosen}:
        raise ConfigError(f"no such layer to prune: {sorted(set(layers) - {s.name for s in chosen})[0]!r}")
    if not chosen:
        raise ConfigError(f"no layers of kinds {tuple(kinds)} to prune")
    return [found.params[s.weight] for s in chosen]


def _zero_smallest(weights: Sequence[torch.Tensor], k: int) -> float:
    """Zero the ``k`` entries of smallest magnitude over all ``weights`` (in place; ties broken
    by position, so exactly ``k``). Returns the magnitude at the cut."""
    if k == 0:
        return 0.0
    mags = torch.cat([w.detach().abs().flatten().to("cpu", torch.float32) for w in weights])
    cut = float(torch.kthvalue(mags, k).values)
    drop = mags < cut
    ties = torch.nonzero(mags == cut).flatten()[: k - int(drop.sum())]
    drop[ties] = True
    with torch.no_grad():
        start = 0
        for w in weights:
            part = drop[start:start + w.numel()].view(w.shape).to(w.device)
            w.masked_fill_(part, 0)
            start += w.numel()
    return cut


# -- layer dropping ------------------------------------------------------------------------------

def drop_layers(model: nn.Module, target_params: int, blocks: nn.ModuleList | str,
                influence_batches: Iterable[Any] | None = None) -> tuple[nn.Module, Info]:
    """Replace the least influential of ``blocks`` (a ``ModuleList`` of residual blocks
    ``x -> x + f(x)`` in ``model``, or its attribute path) by :class:`SkipBlock` until the
    unique parameter count is at most ``target_params``.

    Influence (ShortGPT): ``1 - cos(input, output)`` per token, averaged over
    ``influence_batches`` (tensors, tuples of positional inputs or dicts of keyword inputs).
    Without batches, blocks go deepest first with the final block last, since the deeper
    blocks are the least influential in trained transformers, and the final one is not."""
    path = blocks if isinstance(blocks, str) else _path_of(model, blocks)
    influence, as_tuple = (_influence(model, path, influence_batches) if influence_batches is not None
                           else _depth_order(model.get_submodule(path)))
    order = sorted(range(len(influence)), key=lambda i: (influence[i], i))
    dropped = copy.deepcopy(model)
    stack = dropped.get_submodule(path)
    removed: list[int] = []
    for i in order:
        if unique_parameters(dropped) <= target_params:
            break
        stack[i] = SkipBlock(as_tuple[i])
        removed.append(i)
    params = unique_parameters(dropped)
    if params > target_params:
        raise PlanError(f"cannot drop to {target_params:,} parameters: without all {len(stack)} blocks of "
                        f"{path!r} the model still has {params:,}")
    log.info("layer dropping: blocks %s of %r replaced by identities", sorted(removed), path)
    info = {"method": "drop_layers", "params": params, "dropped": sorted(removed),
            "influence": [float(v) for v in influence], "blocks": path}
    return dropped, info


def _path_of(model: nn.Module, blocks: nn.Module) -> str:
    for name, mod in model.named_modules():
        if mod is blocks and name:
            return name
    raise ConfigError("blocks: not a submodule of the model (pass the ModuleList itself, or its path)")


def _depth_order(stack: nn.Module) -> tuple[list[float], list[bool]]:
    """A stand-in influence without data: deepest first, the final block last."""
    n = len(stack)
    rank = [float(n - 1 - i) for i in range(n)]
    if n > 1:
        rank[-1] = float(n)
    return rank, [_returns_tuple(b) for b in stack]


def _returns_tuple(block: nn.Module) -> bool:
    """Whether a block's ``forward`` is annotated to return a tuple (older transformers layers)."""
    note = inspect.signature(block.forward).return_annotation
    return "tuple" in str(note).lower()


def _influence(model: nn.Module, path: str, batches: Iterable[Any]) -> tuple[list[float], list[bool]]:
    """Each block's mean ``1 - cos`` between its input and output hidden states, and whether it
    returned a tuple."""
    stack = model.get_submodule(path)
    sums, counts, tuples = [0.0] * len(stack), [0] * len(stack), [False] * len(stack)

    def hook(i: int):
        def record(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, tuple) else out
            tuples[i] = isinstance(out, tuple)
            cos = torch.nn.functional.cosine_similarity(x.reshape(-1, x.shape[-1]).double(),
                                                        y.reshape(-1, y.shape[-1]).double(), dim=-1)
            sums[i] += float((1 - cos).sum())
            counts[i] += cos.numel()
        return record

    handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(stack)]
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                call(model, batch)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    if not all(counts):
        raise ConfigError(f"influence: some blocks of {path!r} never ran on the batches given")
    return [s / c for s, c in zip(sums, counts)], tuples


# -- low rank ------------------------------------------------------------------------------------

def low_rank(model: nn.Module, target_params: int, calibration: Calibration | Sequence[Any] | None = None,
             kinds: Sequence[str] = ("linear",)) -> tuple[nn.Module, Info]:
    """Every layer of ``kinds`` factored at one fraction of full rank, the largest at or below
    ``target_params``: activation-aware SVD with ``calibration`` (a :class:`Calibration`, or
    batches to gather one from), plain SVD without."""
    from lfpass.fx.calibrate import calibrate_fx
    from lfpass.fx.lowrank import LowRank, factorize_to_params

    if calibration is not None and not isinstance(calibration, Calibration):
        calibration = calibrate_fx(model, list(calibration))
    factored, fraction = factorize_to_params(model, target_params, calibration, kinds=kinds)
    ranks = {name: m.down.out_features if isinstance(m.down, nn.Linear) else m.down.out_channels
             for name, m in factored.named_modules() if isinstance(m, LowRank)}
    info = {"method": "low_rank", "params": unique_parameters(factored), "fraction": fraction,
            "activation_aware": calibration is not None, "ranks": ranks}
    return factored, info
