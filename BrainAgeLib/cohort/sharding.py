"""Sharding a cohort over processes, GPUs or machines (``torchrun``).

Launched with ``torchrun --nproc-per-node N brainage batch ...`` (or any launcher that sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``), each rank takes
every N-th subject of the cohort (rank r: subjects r, r + N, r + 2N, ... in cohort order) and
appends its rows to its own part file, ``predictions.part-r-of-N.csv``. When all ranks are done
(a barrier over a gloo process group: it only synchronises, so it works beside CUDA too),
rank 0 merges the parts into ``predictions.csv`` in cohort order. The merged file is the same
as a single-process run's.

The cohort is split by position before finished subjects are skipped, so every rank agrees on
who does what whatever the others have written; a resumed run with another number of ranks
still covers every subject exactly once. Ranks can also be given by hand (``rank``,
``world_size``) without a process group, e.g. as the tasks of a cluster job array on a shared
file system: each leaves its part, and a final plain run merges them (skipping everyone).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

from ..errors import BrainAgeError

#: How long a rank that finished early waits at the barrier for the slowest one.
BARRIER_TIMEOUT = datetime.timedelta(days=7)


@dataclass
class ShardContext:
    """This process's place in a sharded run (rank 0 of 1 when not sharded)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    synchronised: bool = False   # a torch.distributed process group gives barriers
    owns_group: bool = False     # we created the process group (and destroy it)

    @classmethod
    def from_environment(cls, rank: Optional[int] = None, world_size: Optional[int] = None) -> "ShardContext":
        """From explicit values, else from torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``.

        Under torchrun a gloo process group is started if none exists (for the barrier).
        """
        env_world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        env_rank = int(os.environ.get("RANK", "0") or 0)
        world = int(world_size) if world_size is not None else env_world
        if rank is not None:
            this = int(rank)
        else:
            this = env_rank if world == env_world else 0
        if world < 1 or not 0 <= this < world:
            raise BrainAgeError(f"rank {this} is not in a run of {world} processes")
        local = int(os.environ.get("LOCAL_RANK", "0") or 0) if world > 1 else 0
        context = cls(rank=this, world_size=world, local_rank=local)
        if world > 1 and "MASTER_ADDR" in os.environ and (world, this) == (env_world, env_rank):
            context._join_process_group()
        return context

    def _join_process_group(self) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            if dist.get_world_size() != self.world_size:
                raise BrainAgeError(
                    f"the process group has {dist.get_world_size()} ranks, not {self.world_size}")
            self.synchronised = True
            return
        dist.init_process_group(backend="gloo", timeout=BARRIER_TIMEOUT)
        self.synchronised = True
        self.owns_group = True

    def shard(self, subjects: Sequence[Any]) -> List[Tuple[int, Any]]:
        """(cohort index, subject) of every ``world_size``-th subject, starting at ``rank``."""
        return [(index, subjects[index]) for index in range(self.rank, len(subjects), self.world_size)]

    def device_for(self, device: Any) -> Any:
        """``"auto"`` on a multi-GPU node becomes this rank's GPU (``cuda:LOCAL_RANK``)."""
        if self.world_size > 1 and (device is None or str(device).lower() == "auto"):
            import torch

            if torch.cuda.is_available() and torch.cuda.device_count() > 1:
                return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return device

    def barrier(self) -> None:
        """Wait for every rank (no-op without a process group)."""
        if self.synchronised:
            import torch.distributed as dist

            dist.barrier()

    def sum(self, values: Sequence[float]) -> List[float]:
        """``values`` summed element-wise over every rank (each rank gets the sums; every rank
        must call it). Without a process group, this rank's own values."""
        if not self.synchronised:
            return [float(v) for v in values]
        import torch
        import torch.distributed as dist

        # a process group the caller made may be NCCL's, which reduces only CUDA tensors
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        totals = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        return totals.cpu().tolist()

    def close(self) -> None:
        """Leave the process group if this context started it."""
        if self.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.owns_group = False
            self.synchronised = False

    def __enter__(self) -> "ShardContext":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
