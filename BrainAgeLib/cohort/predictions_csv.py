"""``predictions.csv``: the cohort results, one row per subject, never lost.

A batch run appends one row as soon as a subject is finished, with a single ``os.write`` of
the whole line to a file opened with ``O_APPEND``, followed by ``fsync``: a row is either
entirely in the file or not at all, so a run killed at any moment (Ctrl-C, ``kill``, a crash)
leaves a CSV whose every complete line is a finished subject. Should a line ever be torn (a
power cut in the middle of the write), readers drop it and the next run repairs the file.

A failed subject gets a row too, with the reason in ``error`` and the numbers empty: the run
goes on. Re-running resumes: subjects that already have a row are skipped (with
``retry_failed``, subjects whose row is an error are tried again, and their new row wins).

Sharded runs (``torchrun``) write one part file per rank, ``predictions.part-R-of-N.csv``;
:func:`merge_predictions` joins the main file and the parts into ``predictions.csv`` in cohort
order, atomically, keeping the last row of each subject. Columns: :data:`COLUMNS` (documented
in the README's "Batch mode" section).
"""
from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Union

from ..atomic_files import write_bytes_atomic
from ..errors import BrainAgeError

PathLike = Union[str, "os.PathLike[str]"]

FILENAME = "predictions.csv"
PART_GLOB = "predictions.part-*.csv"

#: Columns of predictions.csv, in order, with what each holds (README "Batch mode" lists them).
COLUMN_DOCS: Dict[str, str] = {
    "id": "subject id (from the cohort; unique)",
    "path": "the input image (file or DICOM folder), as an absolute path",
    "sex": "F, M or unknown, as the model used it",
    "chronological_age": "age in years from the cohort (empty when not given)",
    "predicted_age": "predicted brain age in years (empty on error)",
    "brain_age_gap": "predicted - chronological age, years (empty without an age)",
    "corrected_brain_age_gap": "BAG minus the model's age trend (de Lange & Cole), years; empty "
                               "without an age or when the model has no bias-correction coefficients",
    "interval_low": "low end of the prediction interval, years (empty when the model is not calibrated)",
    "interval_high": "high end of the prediction interval, years (empty when the model is not calibrated)",
    "interval_level": "the interval's probability of holding the chronological age, e.g. 0.9",
    "gap_z": "corrected BAG in SDs of the model's reference set (|z| > 1: extreme, the paper's criterion); "
             "empty without an age or calibration",
    "site": "acquisition site from the cohort (empty when not given)",
    "model": "name of the model that made the prediction",
    "attention_map": "file of the attention map, relative to the output folder (--explain only)",
    "brain_volume_ml": "volume of the brain mask preprocessing used, ml (QC; empty on error)",
    "qc_flags": "the quality-control flags of the input, joined with ' | ' (empty: none)",
    "warnings": "the prediction's warnings, joined with ' | '",
    "error": "empty when the subject succeeded; otherwise why it failed (file and problem)",
}
COLUMNS: List[str] = list(COLUMN_DOCS)
#: Columns added since the first version; a file without them is read (they stay empty) and
#: upgraded to :data:`COLUMNS` when a run appends to it.
ADDED_COLUMNS = ("interval_low", "interval_high", "interval_level", "gap_z")
LEGACY_COLUMNS: List[str] = [name for name in COLUMNS if name not in ADDED_COLUMNS]

#: Decimals written for ages and gaps (1e-4 years is under an hour).
AGE_DECIMALS = 4


class PredictionsFileError(BrainAgeError, ValueError):
    """An existing predictions file cannot be resumed (other columns, another model...)."""


@dataclass
class PredictionRow:
    """One subject's row: numbers in years (None = empty cell), ``error`` empty on success."""

    id: str
    path: str = ""
    sex: str = "unknown"
    chronological_age: Optional[float] = None
    predicted_age: Optional[float] = None
    brain_age_gap: Optional[float] = None
    corrected_brain_age_gap: Optional[float] = None
    interval_low: Optional[float] = None
    interval_high: Optional[float] = None
    interval_level: Optional[float] = None
    gap_z: Optional[float] = None
    site: str = ""
    model: str = ""
    attention_map: str = ""
    brain_volume_ml: Optional[float] = None
    qc_flags: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error

    def to_cells(self) -> List[str]:
        """The CSV cells, in :data:`COLUMNS` order (one line: newlines become ' | ')."""
        values = {
            "id": self.id,
            "path": self.path,
            "sex": self.sex,
            "chronological_age": _format_number(self.chronological_age, plain=True),
            "predicted_age": _format_number(self.predicted_age),
            "brain_age_gap": _format_number(self.brain_age_gap),
            "corrected_brain_age_gap": _format_number(self.corrected_brain_age_gap),
            "interval_low": _format_number(self.interval_low),
            "interval_high": _format_number(self.interval_high),
            "interval_level": _format_number(self.interval_level, plain=True),
            "gap_z": _format_number(self.gap_z),
            "site": self.site,
            "model": self.model,
            "attention_map": self.attention_map,
            "brain_volume_ml": _format_number(self.brain_volume_ml, plain=True),
            "qc_flags": " | ".join(self.qc_flags),
            "warnings": " | ".join(self.warnings),
            "error": self.error,
        }
        return [_one_line(str(values[name])) for name in COLUMNS]

    @classmethod
    def from_cells(cls, cells: Mapping[str, str]) -> "PredictionRow":
        """A row read back from the CSV (a mapping column -> text)."""
        warnings = cells.get("warnings") or ""
        qc_flags = cells.get("qc_flags") or ""
        return cls(
            id=cells.get("id", ""),
            path=cells.get("path", ""),
            sex=cells.get("sex", "") or "unknown",
            chronological_age=_parse_number(cells.get("chronological_age")),
            predicted_age=_parse_number(cells.get("predicted_age")),
            brain_age_gap=_parse_number(cells.get("brain_age_gap")),
            corrected_brain_age_gap=_parse_number(cells.get("corrected_brain_age_gap")),
            interval_low=_parse_number(cells.get("interval_low")),
            interval_high=_parse_number(cells.get("interval_high")),
            interval_level=_parse_number(cells.get("interval_level")),
            gap_z=_parse_number(cells.get("gap_z")),
            site=cells.get("site", ""),
            model=cells.get("model", ""),
            attention_map=cells.get("attention_map", ""),
            brain_volume_ml=_parse_number(cells.get("brain_volume_ml")),
            qc_flags=[f for f in qc_flags.split(" | ") if f],
            warnings=[w for w in warnings.split(" | ") if w],
            error=cells.get("error", ""),
        )


def _format_number(value: Optional[float], plain: bool = False) -> str:
    if value is None:
        return ""
    value = float(value)
    if not math.isfinite(value):
        return ""
    if plain:
        return f"{value:.10g}"
    text = f"{value:.{AGE_DECIMALS}f}"
    return "0.0000" if text == "-0.0000" else text


def _parse_number(text: Optional[str]) -> Optional[float]:
    if text is None or not text.strip():
        return None
    try:
        return float(text)
    except ValueError:
        return None


def _one_line(text: str) -> str:
    if "\n" not in text and "\r" not in text:
        return text
    return " | ".join(part.strip() for part in text.replace("\r", "\n").split("\n") if part.strip())


def _encode_line(cells: Sequence[str]) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(cells)
    return buffer.getvalue().encode("utf-8")


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

def read_predictions(path: PathLike) -> List[PredictionRow]:
    """Every complete row of a predictions file, in file order (a torn last line is dropped).

    Raises :class:`PredictionsFileError` when the header is not predictions.csv's.
    """
    path = Path(path)
    data = path.read_bytes()
    if not data:
        return []
    end = data.rfind(b"\n")
    complete = data[: end + 1] if end >= 0 else b""  # a last line without "\n" is torn
    reader = csv.reader(io.StringIO(complete.decode("utf-8", errors="replace"), newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return []
    if header not in (COLUMNS, LEGACY_COLUMNS):
        raise PredictionsFileError(
            f"{path}: not a BrainAge predictions file of this version (columns {header[:4]}..., "
            f"expected {COLUMNS[:4]}...); use another output folder")
    rows = []
    for cells in reader:
        if len(cells) != len(header):
            continue  # cannot happen with our writer; a hand-edited line is ignored
        rows.append(PredictionRow.from_cells(dict(zip(header, cells))))
    return rows


def latest_rows(rows: Iterable[PredictionRow]) -> Dict[str, PredictionRow]:
    """The last row of each subject id (a retried subject's newest row wins)."""
    latest: Dict[str, PredictionRow] = {}
    for row in rows:
        latest.pop(row.id, None)
        latest[row.id] = row
    return latest


def finished_ids(rows: Iterable[PredictionRow], retry_failed: bool = False) -> set:
    """Ids a resumed run skips: every subject with a row (only successes with ``retry_failed``)."""
    return {row.id for row in latest_rows(rows).values() if row.ok or not retry_failed}


def part_paths(out_dir: PathLike) -> List[Path]:
    """The part files of sharded runs in ``out_dir`` (sorted by name)."""
    return sorted(Path(out_dir).glob(PART_GLOB))


def part_path(out_dir: PathLike, rank: int, world_size: int) -> Path:
    """Part file of ``rank`` in a run of ``world_size`` processes."""
    return Path(out_dir) / f"predictions.part-{rank}-of-{world_size}.csv"


def read_all_predictions(out_dir: PathLike) -> List[PredictionRow]:
    """Rows of ``out_dir/predictions.csv`` followed by those of every part file."""
    out_dir = Path(out_dir)
    rows: List[PredictionRow] = []
    for path in [out_dir / FILENAME, *part_paths(out_dir)]:
        if path.exists():
            rows.extend(read_predictions(path))
    return rows


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

class PredictionsWriter:
    """Appends rows to a predictions file, each durable and whole once ``append`` returns.

    Opening an existing file checks its header and repairs a torn last line (atomically);
    a new file is created with its header atomically, so it never exists half-written.
    Use as a context manager or call :meth:`close`.
    """

    def __init__(self, path: PathLike, fsync: bool = True):
        self.path = Path(path)
        self.fsync = fsync
        self.rows: List[PredictionRow] = []
        if self.path.exists():
            self.rows = read_predictions(self.path)
            data = self.path.read_bytes()
            if data.startswith(_encode_line(LEGACY_COLUMNS)):   # an earlier version's file: add the new columns
                data = _encode_line(COLUMNS) + b"".join(_encode_line(row.to_cells()) for row in self.rows)
                _atomic_write(self.path, data)
            if data and not data.endswith(b"\n"):
                _atomic_write(self.path, data[: data.rfind(b"\n") + 1] or _encode_line(COLUMNS))
            elif not data:
                _atomic_write(self.path, _encode_line(COLUMNS))
        else:
            _atomic_write(self.path, _encode_line(COLUMNS))
        self._fd: Optional[int] = os.open(self.path, os.O_WRONLY | os.O_APPEND)

    def append(self, row: PredictionRow) -> None:
        """Write one row: a single append of the whole line, then flushed to disk."""
        if self._fd is None:
            raise ValueError(f"{self.path}: the predictions file is closed")
        line = _encode_line(row.to_cells())
        view = memoryview(line)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        if self.fsync:
            os.fsync(self._fd)
        self.rows.append(row)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "PredictionsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_predictions(path: PathLike, rows: Iterable[PredictionRow]) -> Path:
    """Write a whole predictions file atomically (temp file in the same folder, then rename)."""
    data = _encode_line(COLUMNS) + b"".join(_encode_line(row.to_cells()) for row in rows)
    return _atomic_write(Path(path), data)


def merge_predictions(out_dir: PathLike, order: Optional[Sequence[str]] = None,
                      remove_parts: bool = True) -> List[PredictionRow]:
    """Join ``predictions.csv`` and the part files into ``predictions.csv``; returns its rows.

    One row per subject (the last one written wins), sorted by ``order`` (cohort ids; ids not
    in it follow in the order they were first written). The file is replaced atomically; the
    part files are removed afterwards (a crash in between only leaves parts whose rows are
    already merged, and merging again gives the same file).
    """
    out_dir = Path(out_dir)
    parts = part_paths(out_dir)
    latest = latest_rows(read_all_predictions(out_dir))
    first_seen = {row_id: n for n, row_id in enumerate(latest)}
    rank = {row_id: n for n, row_id in enumerate(order or [])}
    beyond = len(rank)
    rows = sorted(latest.values(), key=lambda r: (rank.get(r.id, beyond), first_seen[r.id]))
    write_predictions(out_dir / FILENAME, rows)
    if remove_parts:
        for part in parts:
            part.unlink(missing_ok=True)
    return rows


def check_model_matches(rows: Iterable[PredictionRow], model_name: str, path: PathLike) -> None:
    """Refuse to resume a file whose successful rows came from another model."""
    others = sorted({row.model for row in rows if row.ok and row.model and row.model != model_name})
    if others:
        raise PredictionsFileError(
            f"{path}: holds predictions of model {others[0]!r}, not {model_name!r}; resume with the "
            "same model or choose another output folder")


def _atomic_write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_bytes_atomic(path, data, fsync=True)


