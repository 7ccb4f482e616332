"""How the Slicer module talks to its background worker process (``BrainAgeLib.slicer_worker``).

The module writes the input volume to a temporary folder, starts the worker with
``worker_command(...)`` (``slicer.util.launchConsoleProcess``: stdout and stderr merged, text),
reads its output lines on a thread (``WorkerMonitor``), drains them from a Qt timer, and loads
the files back with ``load_worker_result(out_dir)``. Cancel is ``kill_process_tree(pid)``.

The worker says what it does in lines of its own on stdout, one per step; everything else the
process prints (a library's note, a traceback) is passed through as plain output:

- ``BRAINAGE_PROGRESS <fraction 0-1> <message>``
- ``BRAINAGE_DONE <output folder>``, the last line of a run that wrote all its files (exit 0)
- ``BRAINAGE_ERROR <message>``, the last line of a run that failed: exit 2 for a problem the
  user can fix (a ``BrainAgeError``: unreadable input, bad model file...), 1 for anything else.

The result file (``RESULT_FILE``) is written last, atomically, like every other output: a folder
without it holds no result, whatever else it holds.

Importing this module needs only the standard library and numpy; psutil (to kill the process
tree) and nibabel (to read the outputs back) are imported where they are used.
"""
from __future__ import annotations

import json
import math
import os
import queue
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple, Union

from .errors import BrainAgeError

if TYPE_CHECKING:  # pragma: no cover
    from .explain.labelmap import AttentionLabelmap
    from .preprocess.qc import QualityControl
    from .result import Result
    from .volume import Volume

PathLike = Union[str, "os.PathLike[str]"]

PROGRESS = "BRAINAGE_PROGRESS"
DONE = "BRAINAGE_DONE"
ERROR = "BRAINAGE_ERROR"
#: Exit codes of the worker: success, a problem the user can fix, anything else.
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
#: The module (and worker) import path of the worker, for ``python -m``.
WORKER_MODULE = "BrainAgeLib.slicer_worker"
#: File names in the worker's output folder: the input the module writes, the stem of every output.
INPUT_FILE = "input.nii.gz"
OUTPUT_STEM = "brainage"
#: The result (``Result.to_dict()`` plus ``"outputs"``: key -> file name in the folder), written last.
RESULT_FILE = f"{OUTPUT_STEM}_result.json"
BRAIN_MASK_FILE = f"{OUTPUT_STEM}_brain_mask.nii.gz"


# --- the line protocol ----------------------------------------------------------------------

def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def progress_line(fraction: float, message: str) -> str:
    """``BRAINAGE_PROGRESS <fraction> <message>`` (fraction clipped to 0-1, message on one line)."""
    fraction = float(fraction)
    fraction = min(max(fraction, 0.0), 1.0) if math.isfinite(fraction) else 0.0
    return f"{PROGRESS} {fraction:.4f} {_one_line(message)}".rstrip()


def done_line(out_dir: PathLike) -> str:
    return f"{DONE} {out_dir}"


def error_line(message: str) -> str:
    return f"{ERROR} {_one_line(message) or 'unknown error'}"


class ProgressWriter:
    """``inference.predict``'s ``progress`` callback that prints protocol lines to ``stream``
    (default: stdout), each flushed at once so the module sees it while the step runs.

    ``start``/``span`` map the callback's 0-1 onto part of the whole run (predict is one step).
    """

    def __init__(self, stream=None, start: float = 0.0, span: float = 1.0):
        self.stream = stream
        self.start, self.span = float(start), float(span)

    def __call__(self, fraction: float, message: str = "") -> None:
        self.write(progress_line(self.start + self.span * float(fraction), message))

    def part(self, start: float, span: float) -> "ProgressWriter":
        """A writer for the part [start, start + span] of this one's range."""
        return ProgressWriter(self.stream, self.start + self.span * start, self.span * span)

    def done(self, out_dir: PathLike) -> None:
        self.write(done_line(out_dir))

    def error(self, message: str) -> None:
        self.write(error_line(message))

    def write(self, line: str) -> None:
        stream = self.stream or sys.stdout
        stream.write(line + "\n")
        stream.flush()


@dataclass(frozen=True)
class WorkerMessage:
    """One output line of the worker, parsed.

    ``kind``: "progress" (``fraction``, ``text`` = message), "done" (``text`` = output folder),
    "error" (``text`` = message), "output" (any other line: ``text`` as printed) or "malformed"
    (a line that starts like a protocol line but is not one: ``text`` as printed, worth a warning).
    """

    kind: str
    text: str
    fraction: Optional[float] = None


def parse_worker_line(line: str) -> WorkerMessage:
    """The :class:`WorkerMessage` of one output line (trailing newline allowed)."""
    text = line.rstrip("\r\n")
    keyword, _, rest = text.partition(" ")
    if keyword == PROGRESS:
        number, _, message = rest.partition(" ")
        try:
            fraction = float(number)
        except ValueError:
            return WorkerMessage("malformed", text)
        if not (math.isfinite(fraction) and 0.0 <= fraction <= 1.0):
            return WorkerMessage("malformed", text)
        return WorkerMessage("progress", message.strip(), fraction)
    if keyword == DONE and rest.strip():
        return WorkerMessage("done", rest.strip())
    if keyword == ERROR and rest.strip():
        return WorkerMessage("error", rest.strip())
    if keyword.startswith("BRAINAGE_"):
        return WorkerMessage("malformed", text)
    return WorkerMessage("output", text)


# --- starting the worker --------------------------------------------------------------------

def worker_python(which: Callable[[str], Optional[str]] = shutil.which, executable: str = sys.executable) -> str:
    """The Python to run the worker with: Slicer's ``PythonSlicer`` where it is on the PATH (inside
    Slicer it is; ``sys.executable`` may be the Slicer application itself), else this Python."""
    return which("PythonSlicer") or executable


def library_parent() -> str:
    """The folder that holds the BrainAgeLib package: the worker's working directory, so that
    ``python -m BrainAgeLib.slicer_worker`` finds it wherever Slicer installed the extension."""
    return str(Path(__file__).resolve().parent.parent)


def worker_command(python_executable: str, input_path: PathLike, out_dir: PathLike, sex: Optional[str],
                   age: Optional[float], model: str, device: str, explain: Union[bool, str] = True,
                   levels: Optional[int] = None) -> List[str]:
    """The argument list that predicts one volume in a worker process.

    ``input_path``: the volume file (the module writes ``out_dir/INPUT_FILE``); ``sex`` "F", "M"
    or "unknown" (None: unknown); ``age`` years or None; ``model`` a registered name or a
    checkpoint path; ``device`` auto/cpu/cuda; ``explain``: also the attention map, its labelmap
    (``levels`` levels) and montage (True: the paper's map; or a method's name, "relevance").
    """
    command = [str(python_executable), "-m", WORKER_MODULE, "predict", str(input_path), "--out", str(out_dir),
               "--sex", "unknown" if sex is None else str(sex), "--model", str(model), "--device", str(device)]
    if age is not None:
        command += ["--age", repr(float(age))]
    if not explain:
        command.append("--no-explain")
    elif isinstance(explain, str):
        command += ["--explain-method", explain]
    if levels is not None:
        command += ["--levels", str(int(levels))]
    return command


def batch_command(python_executable: str, cohort: Union[PathLike, Sequence[PathLike]], out_dir: PathLike,
                  model: str = "demo", device: str = "auto", explain: Union[bool, str] = False) -> List[str]:
    """The argument list that runs a batch (``cohort.batch.run_batch``) in a worker process:
    ``cohort`` is a CSV/TSV table, a BIDS or image folder, or a list of image files."""
    items = [cohort] if isinstance(cohort, (str, os.PathLike)) else list(cohort)
    if not items:
        raise BrainAgeError("the batch has no input: give a cohort table, a folder or image files")
    command = [str(python_executable), "-m", WORKER_MODULE, "batch", *map(str, items), "--out", str(out_dir),
               "--model", str(model), "--device", str(device)]
    if explain:
        command.append("--explain")
    if isinstance(explain, str):
        command += ["--explain-method", explain]
    return command


def download_command(python_executable: str, name: str, cache_dir: Optional[PathLike] = None) -> List[str]:
    """The argument list that fetches the registered model ``name`` into the cache in a worker process
    (its last line, ``done_line``, names the model's file)."""
    command = [str(python_executable), "-m", WORKER_MODULE, "download", str(name)]
    if cache_dir is not None:
        command += ["--cache-dir", str(cache_dir)]
    return command


def report_command(python_executable: str, folder: PathLike, out_path: PathLike, model: str,
                   subject: str = "") -> List[str]:
    """The argument list that writes the HTML report of a finished ``predict`` folder to ``out_path``."""
    return [str(python_executable), "-m", WORKER_MODULE, "report", str(folder), "--out", str(out_path),
            "--model", str(model), "--subject", str(subject)]


# --- reading it back ------------------------------------------------------------------------

@dataclass
class WorkerOutputs:
    """What a finished worker left: ``result`` (the result file's dict) and ``paths`` (output key ->
    file: result, attention, labelmap, color_table, montage, sidecar, brain_mask, qc_figure)."""

    result: Dict[str, object]
    paths: Dict[str, Path]


def read_worker_outputs(out_dir: PathLike) -> WorkerOutputs:
    """The result dict and output files of a finished worker in ``out_dir``.

    Raises ``BrainAgeError`` naming the file when the result file is missing (the worker did not
    finish: nothing else in the folder is to be trusted) or unreadable, or a file it lists is gone.
    """
    out_dir = Path(out_dir)
    result_path = out_dir / RESULT_FILE
    if not result_path.is_file():
        raise BrainAgeError(f"{result_path}: no result file; the worker did not finish")
    try:
        result = json.loads(result_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise BrainAgeError(f"{result_path}: not a readable result file ({error})") from None
    if not isinstance(result, dict) or not isinstance(result.get("outputs", {}), dict):
        raise BrainAgeError(f"{result_path}: not a result file (expected a JSON object with 'outputs')")
    paths = {"result": result_path}
    for key, name in result.get("outputs", {}).items():
        path = out_dir / str(name)
        if Path(str(name)).name != str(name) or not path.is_file():
            raise BrainAgeError(f"{result_path}: lists {key} as {name}, which is not a file in {out_dir}")
        paths[str(key)] = path
    return WorkerOutputs(result, paths)


def quality_control_from_dict(data: Dict[str, object]) -> "QualityControl":
    """The inverse of ``QualityControl.to_dict`` (as rounded there)."""
    from .preprocess.qc import QualityControl

    return QualityControl(
        brain_volume_ml=None if data.get("brain_volume_ml") is None else float(data["brain_volume_ml"]),
        voxel_size_mm=tuple(float(s) for s in data.get("voxel_size_mm") or (0.0, 0.0, 0.0)),
        border_sides=tuple(str(s) for s in data.get("border_sides") or ()),
        t1_contrast=None if data.get("t1_contrast") is None else float(data["t1_contrast"]),
        skull_strip=str(data.get("skull_strip") or ""),
        flags=[str(f) for f in data.get("flags") or []],
        measured=bool(data.get("measured", False)))


def read_volume_file(path: PathLike) -> "Volume":
    """A NIfTI file the worker wrote, as a Volume in the file's own voxel order (no reorienting:
    the worker's maps lie on the grid of the input the module wrote, voxel for voxel)."""
    import nibabel as nib
    import numpy as np

    from .volume import Volume

    try:
        image = nib.load(str(path))
        return Volume(np.asarray(image.dataobj), np.asarray(image.affine, dtype=np.float64))
    except Exception as error:  # nibabel raises many types for a damaged file
        raise BrainAgeError(f"{path}: not a readable NIfTI file ({error})") from None


def load_worker_result(out_dir: PathLike) -> Tuple["Result", Optional["AttentionLabelmap"]]:
    """The worker's ``Result`` (with its attention map and brain mask) and its attention labelmap
    (labels and colour table as the worker wrote them; None without an explanation)."""
    import numpy as np

    from .explain.labelmap import AttentionLabelmap, read_color_table
    from .result import Result

    outputs = read_worker_outputs(out_dir)
    data, paths = outputs.result, outputs.paths
    if not isinstance(data.get("predicted_age"), (int, float)):
        raise BrainAgeError(f"{paths['result']}: no predicted_age in the result file")
    number = lambda key: None if data.get(key) is None else float(data[key])  # noqa: E731
    result = Result(
        predicted_age=float(data["predicted_age"]),
        chronological_age=number("chronological_age"), brain_age_gap=number("brain_age_gap"),
        corrected_brain_age_gap=number("corrected_brain_age_gap"), sex=str(data.get("sex", "unknown")),
        sex_was_unknown=bool(data.get("sex_was_unknown", False)),
        timings={str(k): float(v) for k, v in (data.get("timings") or {}).items() if v is not None},
        model_name=str(data.get("model_name", "")), model_intended_use=str(data.get("model_intended_use", "")),
        model_is_demo=bool(data.get("model_is_demo", False)), warnings=[str(w) for w in data.get("warnings") or []],
        qc=quality_control_from_dict(data.get("qc") or {}),
        model_weights_sha256=str(data.get("model_weights_sha256") or ""), explain_method=data.get("explain_method"),
        interval=tuple(float(v) for v in data["interval"]) if data.get("interval") else None,
        interval_level=number("interval_level"), gap_z=number("gap_z"),
        precision=str(data.get("precision") or ""))
    if "attention" in paths:
        result.attention = read_volume_file(paths["attention"])
    if "brain_mask" in paths:
        result.brain_mask = read_volume_file(paths["brain_mask"])
    labelmap = None
    if "labelmap" in paths and "color_table" in paths:
        labels = read_volume_file(paths["labelmap"])
        colors = read_color_table(paths["color_table"])
        labelmap = AttentionLabelmap(labels, colors, np.asarray(data.get("attention_thresholds") or [], dtype=float))
    return result, labelmap


# --- watching and cancelling ----------------------------------------------------------------

class WorkerMonitor:
    """Reads a worker's merged stdout/stderr on a thread into a queue; ``drain()`` returns the
    parsed lines so far, ``poll()`` (from a GUI timer) hands them on. ``process`` is a
    ``subprocess.Popen`` with text stdout (what ``slicer.util.launchConsoleProcess`` returns).

    ``progress(fraction, message)`` receives the progress lines, ``log(text)`` every other line
    (library output, tracebacks), ``finished(monitor)`` is called once, by the ``poll`` that finds
    the worker ended and all its output handed on.
    """

    def __init__(self, process, progress: Optional[Callable[[float, str], None]] = None,
                 log: Optional[Callable[[str], None]] = None,
                 finished: Optional[Callable[["WorkerMonitor"], None]] = None) -> None:
        self.process = process
        self.progress, self.log, self.finished_callback = progress, log, finished
        self.started = time.monotonic()
        self.lines: "queue.Queue[str]" = queue.Queue()
        self.cancelled = False
        self.ended = False  # poll() found the worker ended and called finished
        self.final: Optional[WorkerMessage] = None  # the done or error line, once read
        self.poller = None  # what calls poll() (the Slicer module's QTimer), kept alive with the job
        self._reader = threading.Thread(target=self._read, name="BrainAge worker output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        stream = self.process.stdout
        while True:
            try:
                line = stream.readline()
            except UnicodeDecodeError:  # not text in the locale's encoding: skipped, as MONAIAuto3DSeg does
                continue
            except ValueError:  # the pipe was closed
                break
            if not line:
                break
            self.lines.put(line)
        self.process.wait()

    def drain(self) -> List[WorkerMessage]:
        """The lines read since the last call, parsed."""
        messages = []
        while True:
            try:
                message = parse_worker_line(self.lines.get_nowait())
            except queue.Empty:
                break
            if message.kind in ("done", "error"):
                self.final = message
            messages.append(message)
        return messages

    def poll(self) -> bool:
        """Hand the lines read so far to ``progress``/``log``; True once the worker has ended (then
        ``finished`` has been called, exactly once)."""
        for message in self.drain():
            if message.kind == "progress":
                if self.progress is not None:
                    self.progress(message.fraction, message.text)
            elif self.log is not None and message.kind in ("output", "malformed"):
                self.log(message.text)
        if not self.ended and self.finished and self.lines.empty():
            self.ended = True
            if self.finished_callback is not None:
                self.finished_callback(self)
        return self.ended

    def poll_until_finished(self, interval_s: float = 0.1) -> Optional[str]:
        """``poll`` until the worker ends (blocking); why it failed, None when it succeeded."""
        while not self.poll():
            time.sleep(interval_s)
        return self.failure()

    @property
    def finished(self) -> bool:
        """The process has exited and all its output has been read (``drain`` may still hold lines)."""
        return not self._reader.is_alive()

    @property
    def returncode(self) -> Optional[int]:
        return self.process.poll()

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        """Wait for the process to exit and its output to be read; the exit code (None: timed out)."""
        self._reader.join(timeout)
        return None if self._reader.is_alive() else self.process.poll()

    def cancel(self, timeout_s: float = 2.0) -> List[int]:
        """Kill the worker and every process it started; the process ids killed."""
        self.cancelled = True
        return kill_process_tree(self.process.pid, timeout_s)

    def failure(self) -> Optional[str]:
        """Why a finished worker failed (None when it succeeded): its error line, else its exit code."""
        code = self.returncode
        if self.cancelled:
            return "cancelled by the user"
        if code == EXIT_OK and self.final is not None and self.final.kind == "done":
            return None
        if self.final is not None and self.final.kind == "error":
            return self.final.text
        return f"the BrainAge worker stopped with exit code {code} and no result (see the Python console)"


def kill_process_tree(pid: int, timeout_s: float = 2.0) -> List[int]:
    """Kill process ``pid`` and all its descendants (children first, so none is re-parented and
    missed), then wait up to ``timeout_s`` for them to be gone. Returns the ids that were killed.

    Raises ``BrainAgeError`` naming the survivors when some are still running after the wait.
    A process that is already gone is not an error.
    """
    import psutil

    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return []
    try:
        processes = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        processes = [parent]
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    # Polled here rather than with psutil.wait_procs: a killed grandchild stays a zombie until its new
    # parent reaps it (in a container that may be never), and wait_procs would wait for the reaping.
    deadline = time.monotonic() + timeout_s
    alive = processes
    while True:
        alive = [p for p in alive if _running(p)]
        if not alive or time.monotonic() >= deadline:
            break
        time.sleep(0.005)
    if alive:
        raise BrainAgeError("could not stop the BrainAge worker: process(es) "
                            f"{', '.join(str(p.pid) for p in alive)} still running after {timeout_s:g} s")
    return [p.pid for p in processes]


def _running(process) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
