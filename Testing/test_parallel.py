"""parallel: the rank/world context of sharded batch runs and DDP, and the one worker pool."""
from __future__ import annotations

import pytest

from BrainAgeLib.errors import BrainAgeError
from BrainAgeLib.parallel import THREAD_VARIABLES, RankContext, worker_pool


def _thread_limits():
    """In a worker: the thread variables, SimpleITK's threads, and torch's once imported."""
    import os

    import SimpleITK as sitk
    import torch

    return ([os.environ.get(name) for name in THREAD_VARIABLES],
            sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(), torch.get_num_threads())


def test_worker_pool_limits_every_library_to_the_threads_given():
    with worker_pool(2, threads=1) as pool:
        answers = [pool.submit(_thread_limits).result(timeout=120) for _ in range(2)]
    for variables, itk_threads, torch_threads in answers:
        assert variables == ["1"] * len(THREAD_VARIABLES)
        assert itk_threads == 1 and torch_threads == 1


def test_rank_context_from_the_environment_and_by_hand(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    alone = RankContext.from_environment()
    assert (alone.rank, alone.world_size, alone.is_main, alone.enabled, alone.synchronised) == (0, 1, True, False, False)
    assert alone.shard(list("abc")) == list("abc") and alone.sum([1, 2.5]) == [1.0, 2.5]
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    launched = RankContext.from_environment()   # no MASTER_ADDR: no process group to join
    assert (launched.rank, launched.world_size, launched.local_rank, launched.synchronised) == (3, 4, 1, False)
    assert not launched.is_main and launched.shard(list("abcdefgh")) == ["d", "h"]
    assert RankContext.from_environment(world_size=2).rank == 0   # another world: rank 0 of it
    assert RankContext.from_environment(1, 2).rank == 1
    with pytest.raises(BrainAgeError, match="rank 2 is not in a run of 2"):
        RankContext.from_environment(2, 2)
