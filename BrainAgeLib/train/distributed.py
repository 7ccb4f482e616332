"""Distributed data parallel (DDP) set-up for ``torchrun --nproc-per-node N brainage train ...``.

Under torchrun the environment holds RANK, WORLD_SIZE and LOCAL_RANK; outside it, training
runs as a single process with the same code path (world size 1). The rank and world are a
:class:`BrainAgeLib.parallel.RankContext`, as for a sharded batch run. The backend is NCCL when
training on CUDA and gloo on CPU. Only rank 0 writes checkpoints, logs and progress bars;
every rank writes its own share of cache files (one file per subject, so they never collide).
"""
from __future__ import annotations

import datetime
from typing import Optional

import torch
import torch.distributed as dist

from ..parallel import RankContext


def init_distributed(device: str = "cpu", timeout_minutes: float = 180.0) -> RankContext:
    """Join the torchrun job if there is one (else a world of one) and pick this rank's device.

    ``device`` "cuda" becomes ``cuda:LOCAL_RANK``; the process group uses NCCL for CUDA and gloo
    for CPU. The generous timeout covers rank 0 preparing volumes while others wait.
    """
    context = RankContext.from_environment(backend=None)
    if device.startswith("cuda") and context.world_size > 1:
        device = f"cuda:{context.local_rank}"
        torch.cuda.set_device(context.local_rank)
    context.device = device
    if context.world_size > 1:
        context.join_process_group("nccl" if device.startswith("cuda") else "gloo",
                                   datetime.timedelta(minutes=timeout_minutes))
    return context


def shutdown_distributed(context: Optional[RankContext] = None) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(value: torch.Tensor, context: RankContext) -> torch.Tensor:
    """Sum a tensor over ranks (identity in a single process)."""
    if context.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def broadcast_object(obj, context: RankContext):
    """Rank 0's value of ``obj`` on every rank."""
    if not context.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap_for_training(module: torch.nn.Module, context: RankContext, device: str) -> torch.nn.Module:
    """``module`` wrapped in DistributedDataParallel under torchrun; the module itself otherwise."""
    if not context.enabled:
        return module
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=[device] if device.startswith("cuda") else None)
