"""Cohort inference: every subject of a cohort through one model, results never lost.

``run_batch(cohort, out_dir)`` writes ``out_dir/predictions.csv`` (see
:mod:`BrainAgeLib.cohort.predictions_csv`): one row per subject, appended and flushed the moment the
subject is done, with an ``error`` column, so a bad scan is recorded and the run goes on, a
re-run resumes where the last one stopped, and Ctrl-C leaves a consistent file.

Throughput: the model is loaded once. Reading and preprocessing (``load_volume`` +
``prepare``: N4, skull stripping, slicing; CPU work in SimpleITK, SciPy and PIL) run in a pool
of worker processes that keep a few subjects ahead, while the main process runs the ViT (slices
in batches sized to the device) and the regressor on the subjects already prepared. A worker
hands back a ``Prepared`` (numpy arrays, cheap to pickle between our own processes). Workers
are started with "spawn" (no fork of a process whose torch/OpenMP threads are running) and
limited to a share of the CPU threads, so they do not fight the ViT for cores
(:func:`BrainAgeLib.parallel.worker_pool`).

Sharding: launched with ``torchrun --nproc-per-node N brainage batch ...`` (or any launcher that
sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``), each rank takes
every N-th subject of the cohort (rank r: subjects r, r + N, r + 2N, ... in cohort order;
:class:`BrainAgeLib.parallel.RankContext`) and appends its rows to its own part file,
``predictions.part-r-of-N.csv``. When all ranks are done (a barrier over a gloo process group: it
only synchronises, so it works beside CUDA too), rank 0 merges the parts into ``predictions.csv``
in cohort order. The merged file is the same as a single-process run's.

The cohort is split by position before finished subjects are skipped, so every rank agrees on
who does what whatever the others have written; a resumed run with another number of ranks
still covers every subject exactly once. Ranks can also be given by hand (``rank``,
``world_size``) without a process group, e.g. as the tasks of a cluster job array on a shared
file system: each leaves its part, and a final plain run merges them (skipping everyone).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from ..atomic_files import write_bytes_atomic
from ..errors import BrainAgeError, CohortError, message_naming
from ..result import DEMO_DISCLAIMER
from .predictions_csv import (
    FILENAME, PredictionRow, PredictionsFileError, PredictionsWriter, check_model_matches, finished_ids,
    latest_rows, merge_predictions, part_path, read_all_predictions,
)

if TYPE_CHECKING:
    from .tables import Cohort, Subject

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

#: ``progress(fraction in [0, 1], message)``; an exception raised inside it stops the run
#: (finished rows stay in the CSV, as after Ctrl-C).
BatchProgress = Callable[[float, str], None]

#: Subjects prepared ahead of the one being inferred, per worker.
PREFETCH_PER_WORKER = 2


@dataclass
class BatchSummary:
    """What a batch run did. Counts of this run, plus the whole predictions file's state.

    ``n_done``/``n_failed``: subjects that succeeded / got an error row in this run;
    ``n_skipped``: subjects already finished by an earlier run (under torchrun, these counts
    and ``timings`` are summed over all the ranks, on every rank; ranks given by hand without a
    process group count their own share); ``workers``: preprocessing
    processes used (0: all in this process, as for a single subject); ``rows``: the final rows of
    predictions.csv (one per subject, cohort order; on a sharded run's non-zero ranks, this
    rank's rows). ``volumes_per_minute`` counts the subjects this run processed. ``excluded``:
    subjects of the dataset that are not in the cohort, "id: why" (a BIDS subject or session
    without a T1-weighted image: ``cohort.Cohort.skipped``).
    """

    out_dir: Path
    predictions_csv: Path
    n_subjects: int
    n_done: int = 0
    n_failed: int = 0
    n_skipped: int = 0
    seconds: float = 0.0
    model_name: str = ""
    model_is_demo: bool = False
    device: str = ""
    workers: int = 0
    rank: int = 0
    world_size: int = 1
    rows: List[PredictionRow] = field(default_factory=list)
    timings: Dict[str, float] = field(default_factory=dict)
    excluded: List[str] = field(default_factory=list)

    @property
    def n_processed(self) -> int:
        return self.n_done + self.n_failed

    @property
    def volumes_per_minute(self) -> float:
        return 60.0 * self.n_processed / self.seconds if self.seconds > 0 else 0.0

    @property
    def n_succeeded_total(self) -> int:
        return sum(1 for row in self.rows if row.ok)

    @property
    def n_failed_total(self) -> int:
        return sum(1 for row in self.rows if not row.ok)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "out_dir": str(self.out_dir), "predictions_csv": str(self.predictions_csv),
            "n_subjects": self.n_subjects, "n_done": self.n_done, "n_failed": self.n_failed,
            "n_skipped": self.n_skipped, "n_succeeded_total": self.n_succeeded_total,
            "n_failed_total": self.n_failed_total, "seconds": self.seconds,
            "volumes_per_minute": self.volumes_per_minute, "model_name": self.model_name,
            "device": self.device, "workers": self.workers, "rank": self.rank,
            "world_size": self.world_size, "timings": dict(self.timings),
            "model_is_demo": self.model_is_demo, "excluded": list(self.excluded),
            **({"disclaimer": DEMO_DISCLAIMER} if self.model_is_demo else {}),
        }


# --------------------------------------------------------------------------------------------
# Cohort
# --------------------------------------------------------------------------------------------

def cohort_subjects(cohort: Union[PathLike, Sequence[Any]]) -> Cohort:
    """The subjects of ``cohort``: a cohort file/folder (``cohort.tables.read_cohort``), or a list
    of :class:`~BrainAgeLib.cohort.tables.Subject` (or objects with ``id``, ``path`` and
    optionally ``age``, ``sex``, ``site``) or of image paths (ids from the file names, sex
    unknown, no age): ``tables.as_subject``. Ids must be unique. Returns a ``Cohort`` (its
    ``skipped``: the dataset's subjects left out, kept from a Cohort given)."""
    from .tables import Cohort, as_subject, read_cohort

    if isinstance(cohort, (str, os.PathLike)):
        subjects = read_cohort(cohort, check_files=False)  # a missing scan is an error row
    else:
        subjects = Cohort((as_subject(item) for item in cohort),
                          cohort.skipped if isinstance(cohort, Cohort) else ())
    seen: Dict[str, int] = {}
    for index, subject in enumerate(subjects):
        key = str(subject.id)
        if key in seen:
            raise CohortError(f"subject id {key!r} appears twice (entries {seen[key] + 1} and {index + 1}: "
                              f"{subjects[seen[key]].path} and {subject.path}); ids must be unique")
        seen[key] = index
    return subjects


# --------------------------------------------------------------------------------------------
# Worker side: read + prepare
# --------------------------------------------------------------------------------------------

@dataclass
class PreparedSubject:
    """A worker's answer for one subject: the Prepared slices, or why it failed."""

    index: int
    prepared: Any = None                  # preprocess.Prepared
    volume: Any = None                    # the input Volume (kept only when explaining)
    error: str = ""
    timings: Dict[str, float] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)  # what loading repaired (e.g. NaN voxels set to 0)
    dicom_header: Dict[str, Any] = field(default_factory=dict)  # a DICOM series' age and sex (io.load_volume)


def _warm_up() -> None:
    """Import what preparing needs, so the first subject does not pay for it."""
    import importlib

    for module in ("io", "preprocess.pipeline"):
        importlib.import_module(f"BrainAgeLib.{module}")


def load_and_prepare(index: int, path: str, preset: Any, keep_volume: bool, device: str = "cpu") -> PreparedSubject:
    """Read and preprocess one subject (runs in a worker; never raises for a bad subject)."""
    started, cpu = time.perf_counter(), time.process_time()
    try:
        from ..io import load_volume
        from ..preprocess.pipeline import prepare

        notes: List[str] = []
        header: Dict[str, Any] = {}
        volume = load_volume(path, notes=notes, dicom_header=header)
        loaded = time.perf_counter()
        prepared = prepare(volume, preset, device=device)
        done = time.perf_counter()
        return PreparedSubject(index, prepared, volume if keep_volume else None,
                               timings={"load": loaded - started, "prepare": done - loaded,
                                        "cpu": time.process_time() - cpu}, notes=notes, dicom_header=header)
    except BrainAgeError as error:
        return PreparedSubject(index, error=message_naming(error, path))
    except MemoryError:
        return PreparedSubject(index, error=f"{path}: out of memory while preprocessing")
    except Exception as error:  # an unforeseen failure is this subject's, not the cohort's
        logger.debug("preparing %s failed", path, exc_info=True)
        return PreparedSubject(index, error=f"{path}: {type(error).__name__}: {error}")


#: A preprocessing worker's peak memory with deepbet's networks loaded (bytes; measured ~1.5 GB).
WORKER_MEMORY_BYTES = int(1.5 * 2**30)


def default_workers(cores: Optional[int] = None, memory_bytes: Optional[int] = None) -> int:
    """Preprocessing workers when not told: one per core given (``parallel.available_cores``,
    shared among torchrun's ranks on this node), as many as the available memory holds at
    :data:`WORKER_MEMORY_BYTES` each (keeping one worker's worth for the model); at least 1.

    Preparing a head is mostly single-threaded (SciPy, NumPy and SimpleITK's N4 and
    registration gain little from a second thread), so one worker per core keeps them busy; the
    model takes the cores the workers are not using at that moment (``_ThreadBalance``): all of
    them while the workers wait (a slow ViT, as the paper preset's on a CPU), one while every
    worker prepares.
    """
    from ..parallel import available_cores, available_memory_bytes

    if cores is None:
        ranks_here = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
        cores = max(1, available_cores() // ranks_here)
    memory = available_memory_bytes() if memory_bytes is None else memory_bytes
    by_memory = cores if memory is None else int(memory // WORKER_MEMORY_BYTES) - 1
    return max(1, min(int(cores), by_memory))


class _Preparer:
    """Feeds prepared subjects in completion order: a process pool, or in-process (workers=0).

    The pool starts (and its workers import their libraries) as soon as it is made, while the
    main process is still loading the model; ``preset`` must be set before iterating.
    """

    def __init__(self, tasks: Sequence[Tuple[int, str]], keep_volume: bool, workers: int):
        self.tasks = list(tasks)
        self.preset: Any = None
        self.device = "cpu"           # where deepbet runs (the batch's device)
        self.keep_volume = keep_volume
        self.workers = workers
        self.pool: Optional[ProcessPoolExecutor] = None
        self._pending: Dict[Future, Tuple[int, str]] = {}
        if workers > 0 and len(self.tasks) > 1:
            self.pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        from ..parallel import worker_pool

        from ..parallel import available_cores

        threads = max(1, available_cores() // (self.workers + 1))
        # Workers ignore Ctrl-C (the main process decides) and exit as soon as the main process
        # is gone (killed with SIGKILL, it cannot tell them). Preparing imports torch only for
        # deepbet's brain extraction: its two networks are loaded once per worker (~0.5 s), and
        # a worker's peak memory is ~1.5 GB with them (~0.6 GB without).
        pool = worker_pool(self.workers, threads, ignore_interrupt=True, exit_with_parent=True)
        for _ in range(self.workers):
            pool.submit(_warm_up)
        return pool

    def __iter__(self):
        if self.pool is None:
            for index, path in self.tasks:
                yield load_and_prepare(index, path, self.preset, self.keep_volume, self.device)
            return
        pending = self._pending
        queue = list(reversed(self.tasks))
        window = self.workers * PREFETCH_PER_WORKER
        crashes: Dict[Tuple[int, str], int] = {}
        answered = False
        while queue or pending:
            broken = False
            results: List[PreparedSubject] = []
            try:
                while queue and len(pending) < window:
                    future = self.pool.submit(load_and_prepare, queue[-1][0], queue[-1][1], self.preset,
                                              self.keep_volume, self.device)
                    pending[future] = queue.pop()
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            except BrokenProcessPool:
                broken, finished = True, set()
            for future in finished:
                try:
                    results.append(future.result())
                    del pending[future]
                except BrokenProcessPool:
                    broken = True
            for result in results:
                answered = True
                yield result
            if not broken:
                continue
            in_flight = sorted(pending.values())
            pending.clear()
            self.close()
            if not answered:
                # The pool cannot start here (some embedded interpreters): work in-process.
                logger.warning("preprocessing workers could not start; preparing subjects in this process")
                for index, path in in_flight + list(reversed(queue)):
                    yield load_and_prepare(index, path, self.preset, self.keep_volume, self.device)
                return
            # A worker died (killed, out of memory): a subject on which that happens twice gets
            # an error row; the others are tried again in a fresh pool.
            logger.warning("a preprocessing worker died; restarting the workers")
            for item in in_flight:
                crashes[item] = crashes.get(item, 0) + 1
                if crashes[item] >= 2:
                    yield PreparedSubject(item[0], error=f"{item[1]}: the preprocessing worker died twice "
                                                         "while preparing it (out of memory?)")
                else:
                    queue.append(item)
            self.pool = self._new_pool()

    def busy(self) -> int:
        """Workers preparing a subject now (submitted, not finished; at most the pool's size)."""
        if self.pool is None:
            return 0
        return min(self.workers, sum(1 for future in list(self._pending) if not future.done()))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None


# --------------------------------------------------------------------------------------------
# Main side: inference
# --------------------------------------------------------------------------------------------

def _resolve_model(model: Any, device: Any):
    from ..model.checkpoint import load_model
    from ..devices import resolve_device

    target = resolve_device(device)
    if isinstance(model, (str, os.PathLike)):
        model = load_model(model, device=target)
    else:
        model.to(target)
    model.eval()
    return model, target


def _sex_of(subject: Subject) -> str:
    """The subject's sex, "F", "M" or "unknown" (a Subject made by hand may say "female", or NaN)."""
    from ..sex import parse_sex

    value = subject.sex
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return "unknown"
    return parse_sex(str(value))


def _age_of(subject: Subject) -> Optional[float]:
    """The subject's age in years, or None (a Subject made by hand may give a text, or NaN)."""
    value = subject.age
    if value is None or value == "":
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _base_row(subject: Subject, model_name: str) -> PredictionRow:
    try:
        sex = _sex_of(subject)
    except BrainAgeError:
        sex = str(subject.sex or "")
    try:
        age = _age_of(subject)
    except (TypeError, ValueError):
        age = None
    return PredictionRow(id=str(subject.id), path=str(subject.path), sex=sex, chronological_age=age,
                         site=str(subject.site or ""), model=model_name)


def _stem(subject_id: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in subject_id)
    return keep.strip(".") or "subject"


def infer_subject(model: Any, item: PreparedSubject, subject: Subject, out_dir: Path, explain: Optional[str],
                  explain_format: str, precision: str, qc: bool = False, report: bool = False, *,
                  on_progress: Optional[Callable[[float, str], None]] = None) -> PredictionRow:
    """The row of one prepared subject: predict (and write its explanation files, with ``qc``
    its QC picture in ``out_dir/qc/``, with ``report`` its HTML report in ``out_dir/report/subjects/``).
    ``on_progress``: ``predict_prepared``'s progress callback (batch mode rebalances threads there)."""
    row = _base_row(subject, model.name)
    if item.error:
        row.error = item.error
        return row
    try:
        from ..demographics import with_header_defaults

        given_sex = _sex_of(subject)  # a row without age or sex takes a DICOM series' header values
        age, sex, header_notes = with_header_defaults(_age_of(subject), None if given_sex == "unknown" else given_sex,
                                                      item.dicom_header)
        from ..inference import predict_prepared

        result = predict_prepared(model, item.prepared, sex, age, explain=explain, precision=precision,
                                  progress=on_progress)
        if explain:
            from ..explain.outputs import write_explanation_outputs

            maps_dir = out_dir / "attention"
            maps_dir.mkdir(exist_ok=True)
            paths = write_explanation_outputs(
                result, maps_dir, _stem(row.id), explain_format, volume=item.volume,
                input_to_template=getattr(item.prepared, "input_to_template", None), input_path=subject.path)
            row.attention_map = str(paths["attention"].relative_to(out_dir))
        qc_picture = None
        if (qc or explain) and item.volume is not None:   # as predict: --explain draws the mask too
            from ..explain.qc_figure import write_result_qc_figure

            qc_dir = out_dir / "qc"
            qc_dir.mkdir(exist_ok=True)
            qc_picture = write_result_qc_figure(result, item.volume, qc_dir, _stem(row.id))
        if report:
            from ..report.cohort_report import subject_report_path
            from ..report.subject import write_subject_report

            write_subject_report(result, subject_report_path(out_dir, row.id), model=model, volume=item.volume,
                                 subject=row.id, qc_picture=qc_picture,
                                 montage=paths.get("montage") if explain else None)
    except BrainAgeError as error:
        row.error = message_naming(error, subject.path)
        return row
    except Exception as error:  # e.g. CUDA out of memory: this subject's failure, not the cohort's
        logger.warning("inference of %s failed", subject.id, exc_info=True)
        row.error = f"{subject.path}: {type(error).__name__}: {error}"
        return row
    row.predicted_age = result.predicted_age
    row.brain_age_gap = result.brain_age_gap
    row.corrected_brain_age_gap = result.corrected_brain_age_gap
    if result.interval is not None:
        row.interval_low, row.interval_high = result.interval
        row.interval_level = result.interval_level
    row.gap_z = result.gap_z
    row.sex = result.sex
    row.chronological_age = result.chronological_age
    row.warnings = list(item.notes) + header_notes + list(result.warnings)
    row.brain_volume_ml = None if result.qc.brain_volume_ml is None else round(result.qc.brain_volume_ml, 1)
    row.qc_flags = list(result.qc.flags)
    return row


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------

def run_batch(
    cohort: Union[PathLike, Sequence[Any]],
    out_dir: PathLike,
    model: Any = "demo",
    explain: Union[bool, str, None] = False,
    device: Any = "auto",
    workers: Optional[int] = None,
    progress: Optional[BatchProgress] = None,
    *,
    retry_failed: bool = False,
    explain_format: str = "nii.gz",
    precision: str = "auto",
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    qc: bool = False,
    report: bool = False,
) -> BatchSummary:
    """Predict every subject of ``cohort`` into ``out_dir/predictions.csv`` (resumable).

    ``cohort``: a CSV/TSV, BIDS folder or image folder (``cohort.read_cohort``), or a list of
    subjects or image paths. ``model``: a registered name, a checkpoint path or a loaded
    ``BrainAgeModel``. ``explain`` writes each subject's attention map files into
    ``out_dir/attention/``: "paper" (or True) or "relevance", as ``inference.predict``. ``workers``: preprocessing processes (None: one per core, at most 4;
    0: everything in this process). ``progress(fraction, message)`` after each subject; raising
    in it stops the run cleanly. Subjects already in the CSV are skipped (``retry_failed``:
    failed ones are tried again). ``rank``/``world_size`` (default: from ``torchrun``'s
    environment) shard the cohort: each rank writes its own part file, and rank 0 merges.
    ``qc`` (and ``explain``) writes each subject's QC picture (brain-mask outline over the input)
    into ``out_dir/qc/``; every row has the QC columns either way. ``report`` writes each
    subject's HTML report into ``out_dir/report/subjects/`` (``BrainAgeLib.report``; the
    cohort's index page is ``report.write_batch_report``, which ``brainage batch --report`` adds).
    """
    from ..inference import resolve_explain_method
    from ..parallel import RankContext

    explain = resolve_explain_method(explain)   # an unknown method fails before anything runs
    subjects = cohort_subjects(cohort)
    with RankContext.from_environment(rank, world_size) as context:
        return _run(subjects, Path(out_dir), model, explain, device, workers, progress,
                    retry_failed, explain_format, precision, context, qc, report)


def _run(subjects: Cohort, out_dir: Path, model: Any, explain: Optional[str], device: Any,
         workers: Optional[int], progress: Optional[BatchProgress], retry_failed: bool,
         explain_format: str, precision: str, context: Any, qc: bool = False, report: bool = False) -> BatchSummary:
    started = time.perf_counter()
    html_report = report  # the flag; ``report`` is the progress callback below
    report = progress or (lambda fraction, message: None)
    order = [str(s.id) for s in subjects]
    earlier = read_all_predictions(out_dir)
    done_ids = finished_ids(earlier, retry_failed)
    mine = context.shard_with_indices(subjects)
    todo = [(index, s) for index, s in mine if str(s.id) not in done_ids]
    by_index = dict(todo)
    n_workers = default_workers() if workers is None else max(0, int(workers))
    preparer = _Preparer([(index, str(s.path)) for index, s in todo], bool(explain or qc or html_report), n_workers)
    try:
        model, target = _resolve_model(model, context.device_for(device))
        out_dir.mkdir(parents=True, exist_ok=True)  # only once the model loaded: a failed start leaves no folder
        identity = model_identity(model)
        check_run_record(out_dir, earlier, identity)
        check_model_matches(earlier, model.name, out_dir / FILENAME)
    except BaseException:
        preparer.close()
        raise
    from ..presets import get_preset

    preparer.preset = get_preset(model.config)
    preparer.device = str(target)
    csv_path = out_dir / FILENAME if context.world_size == 1 else part_path(out_dir, context.rank, context.world_size)
    summary = BatchSummary(out_dir=out_dir, predictions_csv=out_dir / FILENAME, n_subjects=len(subjects),
                           n_skipped=len(mine) - len(todo), model_name=model.name,
                           model_is_demo=bool(model.metadata.get("is_demo", False)), device=str(target),
                           workers=n_workers if preparer.pool is not None else 0, rank=context.rank,
                           world_size=context.world_size, excluded=list(subjects.skipped))
    # seconds summed over subjects: load/prepare (wall, in the workers), cpu (the workers' CPU
    # time), infer (this process), wait (this process idle, waiting for a prepared subject)
    timings = {"load": 0.0, "prepare": 0.0, "cpu": 0.0, "infer": 0.0, "wait": 0.0}
    balance = _ThreadBalance(target, preparer)
    try:
        # before the first row, flushed to disk as the rows are: rows never outlive their record
        write_bytes_atomic(out_dir / RUN_RECORD, (json.dumps(identity, indent=2) + "\n").encode(), fsync=True)
        with PredictionsWriter(csv_path) as writer:
            report(0.0, f"{len(todo)} subjects to predict ({summary.n_skipped} already done)")
            waited = time.perf_counter()
            for item in preparer:
                timings["wait"] += time.perf_counter() - waited
                for key in ("load", "prepare", "cpu"):
                    timings[key] += item.timings.get(key, 0.0)
                subject = by_index[item.index]
                tic = time.perf_counter()
                balance()
                row = infer_subject(model, item, subject, out_dir, explain, explain_format, precision, qc,
                                    html_report, on_progress=balance.on_progress)
                timings["infer"] += time.perf_counter() - tic
                writer.append(row)
                if row.ok:
                    summary.n_done += 1
                else:
                    summary.n_failed += 1
                    logger.warning("%s", row.error)
                n = summary.n_processed
                report(n / max(1, len(todo)), f"{n}/{len(todo)} {row.id}: "
                       + (f"{row.predicted_age:.1f} years" if row.ok else f"failed ({row.error})"))
                waited = time.perf_counter()
    finally:
        preparer.close()
        balance.restore()
    summary.timings = timings
    summary.rows = _finish(out_dir, order, context, csv_path)
    if context.synchronised:  # the whole run's counts and timings, summed over the ranks
        counts = ("n_done", "n_failed", "n_skipped")
        totals = context.sum([getattr(summary, name) for name in counts] + list(timings.values()))
        for name, total in zip(counts, totals):
            setattr(summary, name, int(total))
        summary.timings = dict(zip(timings, totals[len(counts):]))
    summary.seconds = time.perf_counter() - started
    return summary


# --------------------------------------------------------------------------------------------
# Which model made predictions.csv (resume checks)
# --------------------------------------------------------------------------------------------

#: Beside predictions.csv: the model whose predictions it holds (name, weights digest,
#: preprocessing), written before the first row; a resumed run must match it.
RUN_RECORD = "predictions.model.json"


def model_identity(model: Any) -> Dict[str, Any]:
    """What makes a model's predictions comparable: its name, the SHA-256 of its weights (as in
    a checkpoint card's ``weights_sha256``, computed from the weights in memory) and its
    preprocessing settings."""
    from ..model.checkpoint import weights_digest

    return {"model": model.name, "weights_sha256": weights_digest(model.state_dict()),
            "preprocessing": model.config.preprocess.to_dict()}


def check_run_record(out_dir: Path, earlier: Sequence[PredictionRow], ours: Dict[str, Any]) -> None:
    """Refuse to resume predictions made by other weights or with other preprocessing than
    those of ``ours`` (a :func:`model_identity`).

    Only a file that holds predictions is checked (error rows carry none). A file of
    predictions without the record cannot be tied to any weights, and is refused too.
    """
    if not any(row.ok for row in earlier):
        return
    csv_path, record_path = out_dir / FILENAME, out_dir / RUN_RECORD
    try:
        theirs = json.loads(record_path.read_text(encoding="utf-8"))
        if not isinstance(theirs, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        raise PredictionsFileError(
            f"{csv_path}: holds predictions but {record_path.name} (which weights made them) is missing, "
            f"so resuming with model {ours['model']!r} (weights sha256 {ours['weights_sha256']}) cannot be "
            "checked; choose another output folder") from None
    except (OSError, ValueError) as error:
        raise PredictionsFileError(f"{record_path}: unreadable ({error}); choose another output folder") from None
    if theirs.get("weights_sha256") != ours["weights_sha256"]:
        raise PredictionsFileError(
            f"{csv_path}: holds predictions of model {theirs.get('model')!r} with weights sha256 "
            f"{theirs.get('weights_sha256')}, but this run's model {ours['model']!r} has weights sha256 "
            f"{ours['weights_sha256']}; resume with the same checkpoint or choose another output folder")
    before, now = theirs.get("preprocessing") or {}, ours["preprocessing"]
    changed = [f"{key} {before.get(key)!r} there, {now.get(key)!r} now"
               for key in sorted(set(before) | set(now)) if before.get(key) != now.get(key)]
    if changed:
        raise PredictionsFileError(
            f"{csv_path}: holds predictions made with other preprocessing settings ({'; '.join(changed)}) "
            f"by the same weights (sha256 {ours['weights_sha256']}); resume with the same settings or "
            "choose another output folder")


class _ThreadBalance:
    """On a CPU with preprocessing workers, the model's torch threads are the cores the workers
    leave free at that moment (at least one): set before each subject and again after each batch
    of slices through the ViT (``on_progress``). While every worker prepares, the model runs on
    one thread (torch's idle OpenMP threads spin-wait and would take the workers' cores); once
    the workers have filled their prefetch window and wait, it runs on all the cores given. On
    CUDA, or without workers, nothing changes. :meth:`restore` puts the thread count back."""

    def __init__(self, device: Any, preparer: "_Preparer"):
        import torch

        from ..parallel import available_cores

        self.before = torch.get_num_threads()
        self.preparer = preparer
        self.active = preparer.pool is not None and getattr(device, "type", str(device)) == "cpu"
        self.cores = min(self.before, available_cores())
        self.current = self.before
        self()

    def __call__(self) -> None:
        if not self.active:
            return
        import torch

        threads = max(1, self.cores - self.preparer.busy())
        if threads != self.current:
            torch.set_num_threads(threads)
            self.current = threads

    def on_progress(self, fraction: float, message: str) -> None:
        self()

    def restore(self) -> None:
        if self.active:
            import torch

            torch.set_num_threads(self.before)


def _finish(out_dir: Path, order: List[str], context: Any, csv_path: Path) -> List[PredictionRow]:
    """After a complete run: predictions.csv in cohort order, one row per subject.

    Sharded: every rank waits for all the others (barrier); rank 0 merges the parts and the
    others wait for the merge, so when ``run_batch`` returns on any rank the file is whole.
    Without a process group (ranks given by hand), each rank leaves its part file; the next
    unsharded run (or ``merge_predictions``) joins them.
    """
    if context.world_size == 1:
        return merge_predictions(out_dir, order)
    from .predictions_csv import read_predictions

    own = list(latest_rows(read_predictions(csv_path)).values()) if csv_path.exists() else []
    if not context.synchronised:
        return own
    context.barrier()
    rows = merge_predictions(out_dir, order) if context.rank == 0 else own
    context.barrier()
    return rows


# --------------------------------------------------------------------------------------------
# Cohort statistics (the end-of-run summary)
# --------------------------------------------------------------------------------------------

def cohort_statistics(rows: Sequence[PredictionRow], out_dir: Optional[PathLike] = None,
                      plots: bool = True) -> Optional[Dict[str, Any]]:
    """Accuracy and brain-age-gap statistics of the successful rows that have an age.

    Returns None with fewer than two such rows. Otherwise a dict with ``n``, ``metrics``
    (``evaluate.compute_metrics``: MAE with bootstrap CI, RMSE, r, ...), ``bag`` (mean and SD
    of the raw gap, years), ``corrected_bag`` (mean and SD of the model's bias-corrected gap,
    when the model has coefficients, else None) and, as ``brainage evaluate`` does on this
    table, ``evaluation`` (the de Lange & Cole correction fitted on a reference part of this
    cohort and the metrics after it; with fewer than four rows, or without ``out_dir``, None),
    ``files`` (metrics.json, scatter.png and bland_altman.png in ``out_dir/evaluation``) and
    ``notes`` (``evaluate.report_notes``: the demo model's disclaimer, too few rows).
    """
    import numpy as np

    from .evaluate import Predictions, compute_metrics, evaluate_predictions, report_notes

    usable = [r for r in rows if r.ok and r.chronological_age is not None and r.predicted_age is not None]
    if len(usable) < 2:
        return None
    age = np.array([r.chronological_age for r in usable], dtype=np.float64)
    predicted = np.array([r.predicted_age for r in usable], dtype=np.float64)
    gap = predicted - age

    def spread(values: np.ndarray) -> Dict[str, float]:
        return {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if values.size > 1 else 0.0}

    corrected = [r.corrected_brain_age_gap for r in usable if r.corrected_brain_age_gap is not None]
    models = sorted({r.model for r in usable if r.model})
    statistics: Dict[str, Any] = {
        "n": len(usable),
        "metrics": compute_metrics(age, predicted, [r.sex for r in usable]),
        "bag": spread(gap),
        "corrected_bag": spread(np.array(corrected)) if len(corrected) == len(usable) else None,
        "evaluation": None,
        "files": {},
        "notes": report_notes(models, len(usable)),
    }
    if out_dir is None or len(usable) < 4:
        return statistics
    table = Predictions([r.id for r in usable], age, predicted, [r.sex for r in usable], [""] * len(usable),
                        str(Path(out_dir) / FILENAME), models=models)
    report = evaluate_predictions(table, Path(out_dir) / "evaluation", plots=plots)
    statistics["evaluation"] = {"bias_correction": report.bias_correction, "reference": report.reference,
                                "evaluated": report.evaluated, "corrected": report.corrected,
                                "gap_age_correlation": report.gap_age_correlation}
    statistics["files"] = dict(report.files)
    statistics["notes"] = list(report.notes)  # on the evaluated rows, as metrics.json says
    return statistics
