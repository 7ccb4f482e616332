"""Distributed data parallel (DDP) set-up for ``torchrun --nproc-per-node N brainage train ...``.

Under torchrun the environment holds RANK, WORLD_SIZE and LOCAL_RANK; outside it, training
runs as a single process with the same code path (world size 1). The backend is NCCL when
training on CUDA and gloo on CPU. Only rank 0 writes checkpoints, logs and progress bars;
every rank writes its own share of cache files (one file per subject, so they never collide).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def shard(self, items: list) -> list:
        """This rank's share of ``items`` (every world_size-th item)."""
        return items[self.rank::self.world_size]


def init_distributed(device: str = "cpu", timeout_minutes: float = 180.0) -> DistributedContext:
    """Join the torchrun job if there is one (else a world of one) and pick this rank's device.

    ``device`` "cuda" becomes ``cuda:LOCAL_RANK``; the process group uses NCCL for CUDA and gloo
    for CPU. The generous timeout covers rank 0 preparing volumes while others wait.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda") and world_size > 1:
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistributedContext(rank, world_size, local_rank, device)


def shutdown_distributed(context: Optional[DistributedContext] = None) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(value: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """Sum a tensor over ranks (identity in a single process)."""
    if context.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def broadcast_object(obj, context: DistributedContext):
    """Rank 0's value of ``obj`` on every rank."""
    if not context.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap_for_training(module: torch.nn.Module, context: DistributedContext, device: str) -> torch.nn.Module:
    """``module`` wrapped in DistributedDataParallel under torchrun; the module itself otherwise."""
    if not context.enabled:
        return module
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=[device] if device.startswith("cuda") else None)
