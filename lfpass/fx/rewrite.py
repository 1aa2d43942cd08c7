"""Apply a fusion plan to a torch.fx GraphModule (or any nn.Module).

Every member of a group ends up holding the *same* ``nn.Parameter`` object per
slot (weight, bias), so autograd sums the gradients of every use into it and
``module.parameters()`` yields it once. In graphs that read weights through
``get_attr`` (torch.export), the nodes of the members are re-pointed to the
anchor's name and attributes nothing reads any more are removed.
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Mapping

from torch import fx, nn

from lfpass.core.merge import merged_slots
from lfpass.core.plan import FusionPlan, check_plan
from lfpass.fx.sites import FxSites, find_sites, to_torch

if TYPE_CHECKING:
    from lfpass.core.calibration import Calibration

log = logging.getLogger(__name__)


def _split(path: str, root: nn.Module) -> tuple[nn.Module, str]:
    owner, _, attr = path.rpartition(".")
    return (root.get_submodule(owner) if owner else root), attr


def _set(root: nn.Module, path: str, value: nn.Parameter) -> None:
    owner, attr = _split(path, root)
    setattr(owner, attr, value)  # sites hold parameters only (fx/sites.py), so this re-registers one


def apply_plan(module: nn.Module, plan: FusionPlan, inplace: bool = False,
               counts: Mapping[str, int] | None = None, stats: Calibration | None = None,
               found: FxSites | None = None) -> nn.Module:
    """Return ``module`` with each group of ``plan`` sharing one merged tensor per slot
    (``counts``: the layers a member already stands for, see :func:`lfpass.core.merge.merged_slots`;
    ``stats``: the calibration a data-aware rule such as ``regmean`` merges by; ``found``: the
    module's sites when the caller has them, with ``inplace``)."""
    if not inplace:
        module, found = copy.deepcopy(module), None
    found = found if found is not None else find_sites(module)
    sites = found.by_name()
    check_plan(plan, sites)
    repoint: dict[str, str] = {}
    for merged in merged_slots(plan, sites, found.load_exact, counts, stats):
        anchor = merged.members[0].tensor
        old = found.params[anchor]
        shared = nn.Parameter(to_torch(merged.array, old), requires_grad=old.requires_grad)
        for slot in merged.members:
            for path in found.holders[slot.tensor]:
                _set(module, path, shared)
                repoint[path] = anchor
    if isinstance(module, fx.GraphModule):
        _repoint_get_attrs(module, repoint)
    log.info("applied %d groups", len(plan.groups))
    return module


def _repoint_get_attrs(gm: fx.GraphModule, repoint: dict[str, str]) -> None:
    """Make members' ``get_attr`` nodes read the anchor, then drop attributes nothing reads."""
    changed = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in repoint and repoint[node.target] != node.target:
            changed.add(node.target)
            node.target = repoint[node.target]
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for path in changed - read:
        owner_path = path.rpartition(".")[0]
        if any(c == owner_path or c.startswith(owner_path + ".") or owner_path.startswith(c + ".") for c in called if owner_path):
            continue
        owner, attr = _split(path, gm)
        delattr(owner, attr)
    gm.graph.lint()
    gm.recompile()


def delete_unread(gm: fx.GraphModule, paths: set[str], store: str = "_parameters") -> None:
    """Delete the tensors at ``paths`` (from the module's ``store``: ``_parameters`` or ``_buffers``)
    that no ``get_attr`` node reads any more; the rest stay (a called module reads its own)."""
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for path in paths - read:
        owner, attr = _split(path, gm)
        getattr(owner, store).pop(attr, None)
