"""Cohort throughput: volumes per minute, one ``predict`` after another vs batch mode.

``run_cohort_benchmark(n)`` writes ``n`` synthetic phantoms (1 mm, whole head with skull, from
``synth.make_cohort``; not timed), builds the preset's model with random weights once, and in
the same process times

- **sequential**: ``predict(model, path, sex, age)`` for each head in turn, as a script calling
  the library would (the model is loaded once here too, so the comparison is about the
  pipeline, not about model loading; the embedding cache is off), and
- **batch**: ``run_batch`` on the same heads and model (worker processes prepare the next
  heads while the main process runs the model; rows written to predictions.csv), and
- **sequential commands** (``cli_baseline``): one ``brainage predict HEAD --model FILE --json``
  process per head, as a shell loop over a cohort would run them: each pays Python's start,
  importing torch and loading the checkpoint (the same weights, saved once to a file).

- **scaling** (``scaling``, the CLI's default when ``--workers`` is not given): batch mode again
  with 1, 2, ... workers (up to the cores given), each one's volumes per minute and the CPU
  cores it kept busy.

Both include reading the files and, with ``explain``, writing the explanation files. The two
runs must agree on every predicted age (``max_difference_years``). On a machine shared with
other work, the 1-minute load average at the start is reported alongside.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

#: Heads of the benchmark cohort are whole-head phantoms at this spacing (mm), as clinical T1s.
HEAD_SPACING_MM = 1.0


@dataclass
class CohortBenchResult:
    """Seconds and volumes per minute of both modes on the same heads."""

    preset: str
    device: str
    n_heads: int
    head_spacing_mm: float
    explain: bool
    workers: int
    sequential_s: float
    batch_s: float
    volumes_per_minute_sequential: float
    volumes_per_minute_batch: float
    speedup: float
    max_difference_years: float
    torch_threads: int
    cpu_count: int
    load_average_1min: Optional[float] = None
    #: CPU cores kept busy on average (CPU seconds / wall seconds; batch: this process + workers)
    sequential_cores_used: float = 0.0
    batch_cores_used: float = 0.0
    repeats: int = 1
    sequential_stage_s: Dict[str, float] = field(default_factory=dict)
    batch_stage_s: Dict[str, float] = field(default_factory=dict)
    #: one `brainage predict` process per head (None when not measured)
    sequential_cli_s: Optional[float] = None
    volumes_per_minute_sequential_cli: Optional[float] = None
    speedup_vs_cli: Optional[float] = None
    cli_max_difference_years: Optional[float] = None
    #: batch mode by number of workers: [{"workers", "seconds", "volumes_per_minute", "cores_used"}]
    scaling: List[Dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        load = "" if self.load_average_1min is None else f", load average {self.load_average_1min:.1f} at the start"
        lines = [
            f"brainage bench --cohort {self.n_heads}: preset {self.preset}, {self.device}, "
            f"{self.n_heads} heads at {self.head_spacing_mm:g} mm{', explain' if self.explain else ''}, "
            f"{self.cpu_count} CPUs, {self.torch_threads} torch threads{load}",
            f"  sequential predict calls  {self.sequential_s:8.1f} s  {self.volumes_per_minute_sequential:7.2f} volumes/minute"
            f"  ({self.sequential_cores_used:.2f} cores busy)",
            f"  batch ({self.workers} worker{'s' if self.workers != 1 else ''})        "
            f"{self.batch_s:8.1f} s  {self.volumes_per_minute_batch:7.2f} volumes/minute"
            f"  ({self.batch_cores_used:.2f} cores busy)",
            f"  speed-up                  {self.speedup:8.2f} x   (predictions agree to {self.max_difference_years:.1e} years)",
        ]
        if self.sequential_cli_s is not None:
            lines.append(f"  one `brainage predict` command per head {self.sequential_cli_s:.1f} s  "
                         f"{self.volumes_per_minute_sequential_cli:.2f} volumes/minute; batch is "
                         f"{self.speedup_vs_cli:.2f} x faster (agree to {self.cli_max_difference_years:.1e} years)")
        for row in self.scaling:
            lines.append(f"  batch, {row['workers']:>2} worker{'s' if row['workers'] != 1 else ' '}      "
                         f"{row['seconds']:8.1f} s  {row['volumes_per_minute']:7.2f} volumes/minute"
                         f"  ({row['cores_used']:.2f} cores busy)")
        if self.sequential_stage_s:
            lines.append("  sequential stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in self.sequential_stage_s.items()))
        if self.batch_stage_s:
            lines.append("  batch, summed over subjects (s; load/prepare in the workers): "
                         + ", ".join(f"{k} {v:.1f}" for k, v in self.batch_stage_s.items()))
        return "\n".join(lines)


def run_cohort_benchmark(
    n_heads: int = 8,
    preset: str = "demo",
    device: str = "auto",
    workers: Optional[int] = None,
    explain: bool = False,
    precision: str = "auto",
    seed: int = 0,
    spacing: float = HEAD_SPACING_MM,
    repeats: int = 1,
    cli_baseline: bool = True,
    log: Callable[[str], None] = lambda message: None,
    scaling: Optional[Sequence[int]] = None,
) -> CohortBenchResult:
    """Time ``n_heads`` generated heads through sequential ``predict`` calls and through batch mode.

    ``repeats`` > 1 runs both modes that many times, alternating, and keeps each one's fastest
    run (on a machine shared with other work, the least disturbed one). ``scaling``: worker
    counts to time batch mode with as well (:func:`scaling_counts` gives 1, 2, ... up to the cores).
    """
    import torch

    from ..cohort.batch import default_workers, run_batch
    from ..cohort.tables import read_cohort
    from ..devices import resolve_device
    from ..inference import predict
    from ..model import build_model
    from ..model.checkpoint import save_checkpoint
    from ..synth.phantoms import make_cohort

    if n_heads < 1:
        raise ValueError(f"the cohort benchmark needs at least one head, got {n_heads}")
    target = resolve_device(device)
    n_workers = default_workers() if workers is None else int(workers)
    with tempfile.TemporaryDirectory(prefix="brainage_cohort_bench_") as folder:
        root = Path(folder)
        log(f"generating {n_heads} heads at {spacing:g} mm (not timed)")
        table = make_cohort(n_heads, root / "heads", seed, spacing=float(spacing), skull_fraction=1.0,
                            workers=1, progress=False)
        subjects = read_cohort(table)
        model = build_model(preset, seed=0).to(target).eval()
        with torch.no_grad():  # first calls into the kernel libraries, outside the clock
            model.embed(torch.rand(2, model.config.image_size, model.config.image_size), precision=precision)
        load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

        model_file = save_checkpoint(model, root / "bench_model.safetensors") if cli_baseline else None
        sequential_s = batch_s = cli_s = float("inf")
        sequential_cpu = batch_cpu = 0.0
        scaled: Dict[int, Dict[str, float]] = {}
        cli_ages: Dict[str, float] = {}
        for attempt in range(max(1, int(repeats))):
            if model_file is not None:
                log(f"one brainage predict command per head ({attempt + 1}/{repeats})")
                tic = time.perf_counter()
                ages = {subject.id: run_predict_command(subject, model_file, target, precision, explain, root / "cli")
                        for subject in subjects}
                seconds = time.perf_counter() - tic
                if seconds < cli_s:
                    cli_s, cli_ages = seconds, ages
            log(f"sequential predict calls ({attempt + 1}/{repeats})")
            sequential_ages: Dict[str, float] = {}
            stages: Dict[str, float] = {}
            tic, cpu = time.perf_counter(), time.process_time()
            for subject in subjects:
                result = predict(model, subject.path, subject.sex, age=subject.age, explain=explain, device=target,
                                       precision=precision, use_cache=False)
                if explain:
                    from ..explain.outputs import write_explanation_outputs
                    from ..io import load_volume

                    out = root / "sequential"
                    out.mkdir(exist_ok=True)
                    write_explanation_outputs(result, out, subject.id, volume=load_volume(subject.path),
                                              input_to_template=result.input_to_template)
                sequential_ages[subject.id] = result.predicted_age
                for key in ("load", "prepare", "embed", "regress", "explain"):
                    stages[key] = stages.get(key, 0.0) + float(result.timings.get(key, 0.0))
            seconds = time.perf_counter() - tic
            if seconds < sequential_s:
                sequential_s, sequential_cpu, sequential_stages = seconds, time.process_time() - cpu, stages

            log(f"batch mode, {n_workers} workers ({attempt + 1}/{repeats})")
            tic, cpu = time.perf_counter(), time.process_time()
            summary = run_batch(subjects, root / f"batch{attempt}", model=model, explain=explain, device=target,
                                workers=n_workers, precision=precision)
            seconds = time.perf_counter() - tic
            if seconds < batch_s:
                batch_s = seconds
                # the workers' CPU time (in-process preparing is already in this process's)
                batch_cpu = time.process_time() - cpu + (summary.timings["cpu"] if summary.workers else 0.0)
                batch_stages = dict(summary.timings)
            for count in scaling or ():
                if count == n_workers:
                    continue
                log(f"batch mode, {count} workers ({attempt + 1}/{repeats})")
                tic, cpu = time.perf_counter(), time.process_time()
                scaled_summary = run_batch(subjects, root / f"batch{attempt}w{count}", model=model, explain=explain,
                                           device=target, workers=count, precision=precision)
                seconds = time.perf_counter() - tic
                busy = time.process_time() - cpu + (scaled_summary.timings["cpu"] if scaled_summary.workers else 0.0)
                if count not in scaled or seconds < scaled[count]["seconds"]:
                    scaled[count] = {"workers": count, "seconds": seconds,
                                     "volumes_per_minute": 60.0 * n_heads / seconds, "cores_used": busy / seconds}

    if scaling:
        scaled[n_workers] = {"workers": n_workers, "seconds": batch_s, "volumes_per_minute": 60.0 * n_heads / batch_s,
                             "cores_used": batch_cpu / batch_s}
    failed = [row for row in summary.rows if not row.ok]
    if failed:
        raise RuntimeError(f"batch mode failed on {failed[0].id}: {failed[0].error}")
    differences: List[float] = [abs(row.predicted_age - sequential_ages[row.id]) for row in summary.rows]
    per_minute_sequential = 60.0 * n_heads / sequential_s
    per_minute_batch = 60.0 * n_heads / batch_s
    cli = {}
    if cli_ages:
        cli = dict(sequential_cli_s=cli_s, volumes_per_minute_sequential_cli=60.0 * n_heads / cli_s,
                   speedup_vs_cli=cli_s / batch_s,
                   cli_max_difference_years=max(abs(cli_ages[k] - sequential_ages[k]) for k in cli_ages))
    return CohortBenchResult(
        preset=model.config.name, device=str(target), n_heads=n_heads, head_spacing_mm=float(spacing),
        explain=explain, workers=summary.workers, sequential_s=sequential_s, batch_s=batch_s,
        volumes_per_minute_sequential=per_minute_sequential, volumes_per_minute_batch=per_minute_batch,
        speedup=per_minute_batch / per_minute_sequential, max_difference_years=max(differences),
        torch_threads=torch.get_num_threads(), cpu_count=os.cpu_count() or 1, load_average_1min=load_average,
        sequential_stage_s=sequential_stages, batch_stage_s=batch_stages, repeats=max(1, int(repeats)),
        sequential_cores_used=sequential_cpu / sequential_s, batch_cores_used=batch_cpu / batch_s, **cli,
        scaling=[scaled[count] for count in sorted(scaled)],
    )


def scaling_counts(cores: Optional[int] = None) -> List[int]:
    """Worker counts to time: 1, 2, ... up to ``cores`` (default: the cores given), every one up
    to 8, then doublings and the cores themselves."""
    from ..parallel import available_cores

    cores = available_cores() if cores is None else max(1, int(cores))
    counts = list(range(1, min(cores, 8) + 1))
    step = 16
    while step < cores:
        counts.append(step)
        step *= 2
    if cores not in counts:
        counts.append(cores)
    return counts


def run_predict_command(subject: Any, model_file: Path, device: Any, precision: str, explain: bool, out: Path) -> float:
    """Run ``brainage predict`` on one head in a new Python process; its predicted age."""
    import json
    import subprocess
    import sys

    command = [sys.executable, "-m", "BrainAgeLib", "predict", str(subject.path), "--sex", str(subject.sex),
               "--model", str(model_file), "--device", str(device), "--precision", precision,
               "--out", str(out), "--json"]
    if subject.age is not None:
        command += ["--age", str(subject.age)]
    if explain:
        command.append("--explain")
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"brainage predict failed on {subject.path}: {done.stderr.strip()[-500:]}")
    return float(json.loads(done.stdout)["predicted_age"])
