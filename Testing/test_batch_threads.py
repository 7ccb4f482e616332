"""Batch mode on every core: workers scale to the cores and memory given, and the model's torch
threads are the cores the workers leave free at that moment (``cohort.batch._ThreadBalance``)."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from BrainAgeLib.cohort import batch
from BrainAgeLib.parallel import available_cores

GB = 2**30


def test_workers_follow_the_cores_and_the_memory(monkeypatch):
    assert batch.default_workers(cores=16, memory_bytes=64 * GB) == 16   # no cap at 4 any more
    assert batch.default_workers(cores=16, memory_bytes=8 * GB) == 4     # 1.5 GB a worker, one kept back
    assert batch.default_workers(cores=2, memory_bytes=64 * GB) == 2
    assert batch.default_workers(cores=4, memory_bytes=1 * GB) == 1      # at least one
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")                          # torchrun: the node's cores shared
    assert batch.default_workers(memory_bytes=64 * GB) == max(1, available_cores() // 2)
    assert 1 <= available_cores() <= (__import__("os").cpu_count() or 1)


def test_model_threads_are_the_cores_the_workers_leave(monkeypatch):
    before = torch.get_num_threads()
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    monkeypatch.setattr("BrainAgeLib.parallel.available_cores", lambda: 8)
    preparer = SimpleNamespace(pool=object(), busy=lambda: preparer.n_busy, n_busy=3)
    balance = batch._ThreadBalance(torch.device("cpu"), preparer)
    assert calls == [5]                       # 8 cores, 3 workers preparing
    preparer.n_busy = 0
    balance.on_progress(0.5, "Encoded 32/160 slices")
    assert calls == [5, 8]                    # the workers wait: the ViT takes every core
    preparer.n_busy = 8
    balance()
    balance()                                 # unchanged: not set again
    assert calls == [5, 8, 1]                 # every worker busy: one thread, never zero
    balance.restore()
    assert calls[-1] == 8
    calls.clear()
    gpu = batch._ThreadBalance(torch.device("cuda"), preparer)
    gpu.on_progress(0.5, "")
    gpu.restore()
    assert calls == []                        # CUDA: the threads are left alone
    monkeypatch.undo()
    assert torch.get_num_threads() == before
