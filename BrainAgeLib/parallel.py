"""How work is spread over processes and ranks: one rank/world context, one worker pool.

- :class:`RankContext`: this process's place in a multi-process run (``torchrun`` or ranks
  given by hand): rank, world size, local rank, the process group's barrier and sums, and which
  share of a list is this rank's. ``brainage batch`` shards a cohort with it (see
  :mod:`BrainAgeLib.cohort.batch`); ``brainage train`` runs DDP with it
  (:func:`BrainAgeLib.train.distributed.init_distributed` makes it). Outside a launcher it is
  rank 0 of 1.
- :func:`worker_pool`: a pool of worker processes started with "spawn" (no fork of a process
  whose torch/OpenMP threads are running), each limited to a number of CPU threads by
  :func:`limit_threads`, so that workers side by side do not fight over the cores. Batch
  preprocessing, the training slice cache and phantom generation use it.
"""
from __future__ import annotations

import datetime
import multiprocessing
import os
import signal
import sys
import threading
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

from .errors import BrainAgeError

#: How long a rank that finished early waits at a barrier for the slowest one (batch runs).
BARRIER_TIMEOUT = datetime.timedelta(days=7)

#: The environment variables that bound the threads of OpenMP, BLAS and ITK in a process.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")


# --------------------------------------------------------------------------------------------
# Ranks
# --------------------------------------------------------------------------------------------

@dataclass
class RankContext:
    """Where this process sits in a multi-process run (rank 0 of 1 when there is none).

    ``device``: the device this rank trains on (set by ``init_distributed``; batch runs pick
    theirs with :meth:`device_for`). ``synchronised``: a ``torch.distributed`` process group
    gives barriers and sums; ``owns_group``: this context started that group (and
    :meth:`close` ends it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    synchronised: bool = False
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes run files, logs and progress bars."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """More than one rank."""
        return self.world_size > 1

    @classmethod
    def from_environment(cls, rank: Optional[int] = None, world_size: Optional[int] = None, *,
                         backend: Optional[str] = "gloo",
                         timeout: datetime.timedelta = BARRIER_TIMEOUT) -> "RankContext":
        """From explicit values, else from torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``.

        A rank given without a world size is taken in the environment's world when that world
        is the one given, else in a world of ``world_size``. Under torchrun (the environment's
        ranks, ``MASTER_ADDR`` set) the process group is joined, and started with ``backend``
        if none exists; ``backend=None`` joins nothing (the caller does).
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
        if (backend is not None and world > 1 and "MASTER_ADDR" in os.environ
                and (world, this) == (env_world, env_rank)):
            context.join_process_group(backend, timeout)
        return context

    def join_process_group(self, backend: str = "gloo", timeout: datetime.timedelta = BARRIER_TIMEOUT) -> None:
        """Use the process group there is (it must have ``world_size`` ranks), or start one with
        ``backend`` (gloo only synchronises, so it works beside CUDA too; NCCL for DDP on GPUs)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            if dist.get_world_size() != self.world_size:
                raise BrainAgeError(
                    f"the process group has {dist.get_world_size()} ranks, not {self.world_size}")
            self.synchronised = True
            return
        dist.init_process_group(backend=backend, timeout=timeout)
        self.synchronised = True
        self.owns_group = True

    def shard(self, items: Sequence[Any]) -> List[Any]:
        """This rank's share of ``items``: every ``world_size``-th item, starting at ``rank``."""
        return list(items[self.rank::self.world_size])

    def shard_with_indices(self, items: Sequence[Any]) -> List[Tuple[int, Any]]:
        """(index in ``items``, item) of this rank's share (:meth:`shard`)."""
        return [(index, items[index]) for index in range(self.rank, len(items), self.world_size)]

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

    def __enter__(self) -> "RankContext":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# Worker processes
# --------------------------------------------------------------------------------------------

def available_cores() -> int:
    """The CPU cores this process is given: its affinity mask (``taskset``, a batch scheduler's
    cpuset) bounded by a cgroup v2 CPU quota (``/sys/fs/cgroup/cpu.max``, containers), else
    ``os.cpu_count()``; at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="ascii") as handle:
            quota, period = handle.read().split()[:2]
        if quota != "max" and float(period) > 0:
            cores = min(cores, max(1, int(float(quota) / float(period))))
    except (OSError, ValueError):
        pass
    return max(1, int(cores))


def available_memory_bytes() -> Optional[int]:
    """Memory available to new processes now (psutil's ``available``), None when unknown."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # pragma: no cover - psutil is a dependency
        return None


def limit_threads(threads: int) -> None:
    """Bound this process to ``threads`` CPU threads: OpenMP, OpenBLAS and MKL (environment,
    for libraries loaded from now on), torch (if already imported; one imported later reads
    ``OMP_NUM_THREADS``) and SimpleITK's filters."""
    threads = max(1, int(threads))
    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)
    try:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    except (ImportError, AttributeError):  # pragma: no cover - SimpleITK is a dependency
        pass


def worker_pool(workers: int, threads: int = 1, *, ignore_interrupt: bool = False, exit_with_parent: bool = False,
                initializer: Optional[Callable[..., None]] = None, initargs: Tuple[Any, ...] = ()) -> ProcessPoolExecutor:
    """A pool of ``workers`` processes started with "spawn", each limited to ``threads`` CPU
    threads (:func:`limit_threads`).

    ``ignore_interrupt``: workers ignore Ctrl-C (SIGINT), so the main process decides what
    happens. ``exit_with_parent``: a worker exits as soon as the main process is gone (one
    killed with SIGKILL cannot tell it). ``initializer(*initargs)`` runs after both, in each
    worker. Scripts that use it need the ``if __name__ == "__main__":`` guard ("spawn"
    re-imports the main module).
    """
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_worker,
                               initargs=(threads, ignore_interrupt, exit_with_parent, initializer, initargs))


def _start_worker(threads: int, ignore_interrupt: bool, exit_with_parent: bool,
                  initializer: Optional[Callable[..., None]], initargs: Tuple[Any, ...]) -> None:
    if ignore_interrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = multiprocessing.parent_process() if exit_with_parent else None
    if parent is not None:
        threading.Thread(target=_exit_with_parent, args=(parent.sentinel,), daemon=True).start()
    limit_threads(threads)
    if initializer is not None:
        initializer(*initargs)


def _exit_with_parent(sentinel: int) -> None:
    from multiprocessing.connection import wait as wait_for

    wait_for([sentinel])
    os._exit(1)
