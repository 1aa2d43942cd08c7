"""Depth collapse in PyTorch: a model's residual blocks, their influence, and their removal.

The blocks are the children of the containers the layer names index
(``bert.encoder.layer.3``, ``stages.1.blocks.2``: the module path up to the last
numeric component of a layer's name), in order. A block's influence is measured
with forward hooks on calibration batches; a removed block becomes a
:class:`SkipBlock` that returns its hidden-state input as the block returned its
output (a tensor, or a one-element tuple as older transformers layers do), so the
model stays an ``nn.Module`` that runs, exports and retrains. The planning is
:mod:`lfpass.core.collapse`'s.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from torch import fx, nn

from lfpass.core.collapse import Block, enclosing, influence_of
from lfpass.core.errors import PlanError
from lfpass.core.sites import Site
from lfpass.fx.batches import call, eval_mode


class SkipBlock(nn.Module):
    """A removed residual block: returns its hidden-state input (the first positional argument,
    or ``hidden_states``), alone or as ``(hidden_states,)`` as the block it replaces did."""

    def __init__(self, as_tuple: bool = False):
        super().__init__()
        self.as_tuple = as_tuple

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            x = args[0]
        elif "hidden_states" in kwargs:
            x = kwargs["hidden_states"]
        else:
            x = next(iter(kwargs.values()))
        return (x,) if self.as_tuple else x


def find_blocks(model: nn.Module, sites: Sequence[Site]) -> list[Block]:
    """The residual-block candidates of ``model``: each child of a container that the layer names
    index at their last numeric component, holding plannable layers, in module order."""
    if isinstance(model, fx.GraphModule) and not any(n.op == "call_module" for n in model.graph.nodes):
        raise PlanError("depth collapse needs the model as an nn.Module with its blocks (a torch.export graph "
                        "inlines them): pass the module itself")
    holders: dict[str, int] = {}
    layers: dict[str, list[str]] = {}
    for site in sites:
        name = next((b for b in enclosing(site.name)
                     if isinstance(_get(model, b.rpartition(".")[0]), (nn.ModuleList, nn.Sequential))), None)
        if name is not None:
            holders[name] = holders.get(name, 0) + (0 if site.parts else site.numel)
            layers.setdefault(name, []).append(site.name)
    owners: dict[int, set[str]] = {}
    for path, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), set()).add(path)
    numel = {id(p): p.numel() for p in model.parameters()}
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    blocks = []
    for name in sorted(holders, key=lambda n: order.get(n, len(order))):
        own = sum(numel[i] for i, paths in owners.items() if all(p.startswith(name + ".") for p in paths))
        blocks.append(Block(name, own, holders[name], tuple(layers[name])))
    return blocks


def _get(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def block_influence(model: nn.Module, blocks: Sequence[Block], batches: Iterable[Any]) -> tuple[dict[str, float],
                                                                                                dict[str, bool]]:
    """Each block's influence on ``batches`` (NaN for one whose output is not shaped like its
    input: not a residual block) and whether it returns a tuple."""
    inputs: dict[str, list] = {b.name: [] for b in blocks}
    outputs: dict[str, list] = {b.name: [] for b in blocks}
    tuples: dict[str, bool] = {}

    def hook(name: str):
        def record(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            x = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))
            y = out[0] if isinstance(out, tuple) else out
            tuples[name] = isinstance(out, tuple)
            if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
                inputs[name].append(x.detach().double().cpu().numpy())
                outputs[name].append(y.detach().double().cpu().numpy())
        return record

    handles = [model.get_submodule(b.name).register_forward_hook(hook(b.name), with_kwargs=True) for b in blocks]
    try:
        with eval_mode(model), torch.no_grad():
            for batch in batches:
                call(model, batch)
    finally:
        for h in handles:
            h.remove()
    influence = {}
    for b in blocks:
        if not inputs[b.name] or any(x.shape != y.shape for x, y in zip(inputs[b.name], outputs[b.name])):
            influence[b.name] = float("nan")  # never ran, or changes the stream's shape: not removable
        else:
            influence[b.name] = influence_of(inputs[b.name], outputs[b.name])
    return influence, tuples


def remove_blocks(model: nn.Module, names: Sequence[str], tuples: dict[str, bool]) -> None:
    """Replace each named block of ``model`` by a :class:`SkipBlock`, in place."""
    for name in names:
        container, _, index = name.rpartition(".")
        stack = model.get_submodule(container)
        if not isinstance(stack, (nn.ModuleList, nn.Sequential)):
            raise PlanError(f"block {name!r}: {container!r} is not a ModuleList or Sequential")
        stack[int(index)] = SkipBlock(tuples.get(name, False))
