"""Retraining on several processes with torch.distributed and DistributedDataParallel.

Under ``torchrun --nproc_per_node N`` every process runs the same retraining;
:func:`setup` joins the process group torchrun describes (gloo on the CPU,
nccl on GPUs) unless the caller already did. The ties survive because every
rank applies the *same* plan (rank 0 plans, the others receive it) to the same
weights, and DistributedDataParallel is built anew after each stage's fusion
(fusion replaces parameter objects; a wrapper holds the old ones). DDP finds a
parameter shared by several submodules once, broadcasts rank 0's values when
it is built, and all-reduces its summed gradient like any other. Only rank 0
writes files and draws progress bars.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger(__name__)


@dataclass
class Env:
    """This process's place in the run: its rank, the number of processes, its device."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    find_unused_parameters: bool = False
    owns_group: bool = False  # this module joined the process group, so it leaves it

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` in a fresh DistributedDataParallel (itself when running alone)."""
        if not self.distributed:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=self.find_unused_parameters)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (pickled by torch.distributed)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def mean(self, value: torch.Tensor) -> float:
        """The mean of a scalar over the ranks (each rank's share of the global batch is equal,
        so the mean of the ranks' mean losses is the global batch's mean loss)."""
        if not self.distributed:
            return float(value)
        t = value.detach().float().reshape(1).to(self.device)
        dist.all_reduce(t)
        return float(t) / self.world

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group this module joined, once every rank is done with it (a rank
        that leaves while another still talks in it can abort gloo's threads at exit)."""
        if self.owns_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def setup(device: str | torch.device | None = None, find_unused_parameters: bool = False) -> Env:
    """This process's :class:`Env`: the process group already joined, or the one torchrun's
    environment (``WORLD_SIZE`` > 1) describes, else a run of one. ``device`` defaults to
    ``cuda:LOCAL_RANK`` where CUDA is available, else the CPU."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    owns = False
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device if device.index is not None else local)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        owns = True
    joined = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if joined else (0, 1)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if world > 1:
        log.info("rank %d of %d on %s", rank, world, device)
    return Env(rank, world, device, find_unused_parameters, owns)
