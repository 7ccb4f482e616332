"""Time and memory of ``prepare``, step by step (``profile_prepare``), in a child process so the
resident-memory peak is that run's alone."""
from __future__ import annotations

import os
import resource
import sys
import tracemalloc
from dataclasses import dataclass
from typing import Dict, Tuple

import numpy as np

from ..preprocess.pipeline import PresetLike, prepare
from ..volume import Volume


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


@dataclass
class PrepareProfile:
    """Time and memory of one ``prepare`` run, split by step."""

    seconds: Dict[str, float]          # wall-clock seconds per step, plus "total"
    cpu_seconds: Dict[str, float]      # CPU seconds per step (all threads of the process)
    peak_traced_mb: Dict[str, float]   # peak Python/numpy allocations during each step (tracemalloc)
    peak_rss_mb: float                 # peak resident memory of the process that ran prepare
    baseline_rss_mb: float             # resident memory before prepare (libraries and input loaded)
    input_shape: Tuple[int, int, int]
    input_spacing: Tuple[float, float, float]

    def table(self) -> str:
        """A plain-text table: step, wall seconds, CPU seconds, peak traced MB."""
        lines = [f"{'step':<28}{'wall s':>8}{'CPU s':>8}{'peak MB':>9}"]
        for name, seconds in self.seconds.items():
            peak = self.peak_traced_mb.get(name)
            lines.append(f"{name:<28}{seconds:>8.2f}{self.cpu_seconds.get(name, 0.0):>8.2f}"
                         f"{'' if peak is None else f'{peak:>9.0f}'}")
        lines.append(f"peak RSS {self.peak_rss_mb:.0f} MB (before prepare {self.baseline_rss_mb:.0f} MB)")
        return "\n".join(lines)


def _profile_here(volume: Volume, preset: PresetLike) -> PrepareProfile:
    baseline = peak_rss_mb()
    timed = prepare(volume, preset)          # timings without tracemalloc's overhead
    peak_rss = peak_rss_mb()
    tracemalloc.start()
    try:
        traced = prepare(volume, preset)
    finally:
        tracemalloc.stop()
    return PrepareProfile(
        seconds=timed.timings, cpu_seconds=timed.cpu_timings,
        peak_traced_mb=traced.peak_memory_mb, peak_rss_mb=peak_rss,
        baseline_rss_mb=baseline, input_shape=volume.shape, input_spacing=volume.spacing,
    )


def _profile_child(volume_file: str, preset: PresetLike, queue) -> None:
    try:
        with np.load(volume_file) as stored:
            volume = Volume(stored["array"], stored["affine"])
        queue.put(("ok", _profile_here(volume, preset)))
    except BaseException as error:  # reported to the parent, which raises it
        queue.put(("error", f"{type(error).__name__}: {error}"))


def profile_prepare(volume: Volume, preset: PresetLike = "paper", isolate: bool = True) -> PrepareProfile:
    """Time ``prepare`` step by step and measure its memory.

    ``prepare`` runs twice: once plainly (seconds per step, peak resident memory) and once
    under ``tracemalloc`` (peak of numpy/Python allocations within each step; SimpleITK's own
    C++ buffers are not traced, the resident-memory peak includes them). With ``isolate`` it
    runs in a fresh child process, so the resident-memory peak is this run's alone.
    """
    if not isolate:
        return _profile_here(volume, preset)
    import multiprocessing
    import queue as queues
    import tempfile

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    with tempfile.TemporaryDirectory(prefix="brainage-profile-") as folder:
        # The volume goes through a file, not the process arguments: a child that dies while
        # starting would leave the parent blocked for ever writing a large argument to it.
        volume_file = os.path.join(folder, "volume.npz")
        np.savez(volume_file, array=np.asarray(volume.array), affine=volume.affine)
        child = context.Process(target=_profile_child, args=(volume_file, preset, queue))
        child.start()
        while True:
            try:
                status, payload = queue.get(timeout=1.0)
                break
            except queues.Empty:
                if not child.is_alive():   # died before reporting: never wait for it for ever
                    raise RuntimeError(
                        f"the profiling child process exited (code {child.exitcode}) without a result; a "
                        "script read from stdin or an interactive session cannot be re-imported by a "
                        "'spawn' child: run it from a file, or pass isolate=False") from None
        child.join()
    if status != "ok":
        raise RuntimeError(f"profiling prepare failed in the child process: {payload}")
    return payload
