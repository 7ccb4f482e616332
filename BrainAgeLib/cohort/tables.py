"""Reading a cohort: which images, of whom (age in years, sex), from a table or a folder.

:func:`read_cohort` accepts

- a **CSV or TSV table** with an image column (``path``, ``t1``, ``t1w``, ``image`` or
  ``filename``; relative paths are resolved against the table's folder), ``age`` (years) and
  ``sex``, and optionally an id (``id``, ``subject``, ``subject_id`` or ``participant_id``) and
  ``site``. Other columns are kept, as text, in :attr:`Subject.extra`. Column names are
  case-insensitive. ``.tsv``/``.txt`` are tab-separated; ``.csv`` comma- (or semicolon-)
  separated.
- a **BIDS** ``participants.tsv`` (``participant_id``, ``age``, ``sex``) without an image
  column, or a **BIDS dataset folder**: each participant's T1-weighted images are found under
  ``sub-<label>/anat/*_T1w.nii[.gz]`` and ``sub-<label>/ses-<label>/anat/`` (one image per
  session: the first by name, so ``run-1`` before ``run-2``). Every participant of
  ``participants.tsv`` and every ``sub-*`` folder (one missing from the table is read, with a
  warning) is looked at. Age and sex come from ``participants.tsv``; each subject's
  ``sub-<label>_sessions.tsv`` gives each session's values (``age`` above all), which override
  the participant's where the session's cell is not empty or ``n/a``. Subjects and sessions
  without a T1-weighted image (only a T2w, no folder...) are left out, logged, and listed with
  the reason in :attr:`Cohort.skipped`.
- a **plain folder of images** (NIfTI, MGH, NRRD, MetaImage): one subject per file, and one
  per subfolder holding a DICOM series (named after the subfolder); age and sex unknown.

Sex is "F", "M" or "unknown": ``F``/``female``/``M``/``male`` in any case; the numbers ``1``
(female) and ``0`` (male), the coding the regressor itself uses (M = 0, F = 1, see
:data:`BrainAgeLib.sex.SEX_CODES`); an empty cell, ``n/a``, ``NA`` or ``unknown`` for unknown.
Any other value (``2`` included: numeric codings other than 0/1 differ between datasets) is an
error. Problems raise :class:`~BrainAgeLib.errors.CohortError` naming the file, the line and
what is wrong.
"""
from __future__ import annotations

import csv
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

from ..errors import CohortError
from ..io import DICOM_EXTENSIONS, image_stem

PathLike = Union[str, Path]

logger = logging.getLogger(__name__)

PATH_COLUMNS = ("path", "t1", "t1w", "image", "filename")
ID_COLUMNS = ("id", "subject", "subject_id", "participant_id")
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mgz", ".mgh", ".nrrd", ".nhdr", ".mha", ".mhd")
MISSING = ("", "n/a", "na", "nan", "none", "null", "unknown", "?")
MAX_AGE_YEARS = 130.0


@dataclass
class Subject:
    """One scan of a cohort: what reading a cohort gives, and what batch runs and training take.

    ``age`` in years (None when unknown); ``sex`` "F", "M" or "unknown" (None reads as
    unknown); ``path`` absolute when read from a table or folder; ``participant`` the person the
    scan belongs to (equal to ``id`` except for BIDS sessions, where several scans share one
    participant: splits must keep them together); ``extra`` the table's other columns, as text.
    """

    id: str
    path: Path
    age: Optional[float] = None
    sex: str = "unknown"
    site: Optional[str] = None
    extra: Dict[str, str] = field(default_factory=dict)
    participant: str = ""

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if self.sex is None:
            self.sex = "unknown"
        if not self.participant:
            self.participant = self.id


def as_subject(item: Union["Subject", PathLike, object]) -> Subject:
    """A cohort list's entry as a :class:`Subject`: a Subject as it is; an image path (the id
    from the file name, age and sex unknown); any other object with ``id`` and ``path`` (and
    ``age``, ``sex``, ``site`` when it has them) copied into one."""
    if isinstance(item, Subject):
        return item
    if isinstance(item, (str, os.PathLike)):
        return Subject(id=image_stem(item) or str(item), path=item)
    if hasattr(item, "id") and hasattr(item, "path"):
        return Subject(id=str(item.id), path=item.path, age=getattr(item, "age", None), sex=getattr(item, "sex", None),
                       site=getattr(item, "site", None))
    raise CohortError(f"{item!r} is neither an image path nor a subject (with an id and a path)")


class Cohort(list):
    """The :class:`Subject` list :func:`read_cohort` returns, with ``skipped``: the subjects (or
    BIDS sessions) of the dataset that are not in it, each as "id: why"."""

    def __init__(self, subjects: Iterable[Subject] = (), skipped: Iterable[str] = ()):
        super().__init__(subjects)
        self.skipped: List[str] = list(skipped)


def read_cohort(path: PathLike, *, check_files: bool = True) -> Cohort:
    """The subjects of a cohort table, BIDS dataset or image folder (see the module docstring).

    With ``check_files`` (default) every image must exist.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CohortError(f"{path}: no such file or folder")
    if path.is_dir():
        if (path / "participants.tsv").is_file():
            return _read_table(path / "participants.tsv", check_files)
        if any(child.is_dir() and child.name.startswith("sub-") for child in path.iterdir()):
            return _read_bids(path, {}, path)
        return Cohort(_read_folder(path))
    return _read_table(path, check_files)


# ----------------------------------------------------------------------------------------
# Values
# ----------------------------------------------------------------------------------------


def parse_cohort_sex(value: Optional[str]) -> str:
    """A table's sex cell as "F", "M" or "unknown" (convention in the module docstring)."""
    text = "" if value is None else str(value).strip()
    lowered = text.lower()
    if lowered in MISSING:
        return "unknown"
    try:
        number = float(lowered)
    except ValueError:
        number = None
    if number is not None:
        if number == 1.0:
            return "F"
        if number == 0.0:
            return "M"
        raise ValueError(f"numeric sex {text!r} is ambiguous: use 1 (female), 0 (male), F or M")
    from ..sex import parse_sex

    try:
        return parse_sex(text)
    except ValueError:
        raise ValueError(f"sex {text!r} is not F, M, female, male, 1 (female), 0 (male) or n/a") from None


def parse_age(value: Optional[str]) -> Optional[float]:
    """A table's age cell in years; None when missing. ``89+`` (BIDS top-coding) reads as 89."""
    text = "" if value is None else str(value).strip()
    if text.lower() in MISSING:
        return None
    try:
        age = float(text[:-1] if text.endswith("+") else text)
    except ValueError:
        raise ValueError(f"age {text!r} is not a number of years") from None
    if not math.isfinite(age) or not 0.0 <= age <= MAX_AGE_YEARS:
        raise ValueError(f"age {text!r} is outside 0-{MAX_AGE_YEARS:g} years")
    return age


# ----------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------


def read_table_rows(table: Path) -> tuple:
    """(header, rows as (line number, {lower-case column: cell})) of a CSV/TSV file."""
    try:
        text = table.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise CohortError(f"{table}: not a UTF-8 text table") from None
    except OSError as error:
        raise CohortError(f"{table}: cannot read it ({error.strerror})") from None
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise CohortError(f"{table}: the table is empty (no header line)")
    if table.suffix.lower() in (".tsv", ".txt"):
        delimiter = "\t"
    else:
        first = lines[0]
        delimiter = ";" if first.count(";") > first.count(",") else ("\t" if "\t" in first and "," not in first else ",")
    reader = csv.reader(lines, delimiter=delimiter)
    header = [name.strip().lower() for name in next(reader)]
    duplicates = sorted({name for name in header if header.count(name) > 1 and name})
    if duplicates:
        raise CohortError(f"{table}: column(s) {', '.join(duplicates)} appear more than once in the header")
    rows = []
    for line_number, cells in enumerate(reader, start=2):
        if not any(cell.strip() for cell in cells):
            continue
        if len(cells) > len(header):
            raise CohortError(f"{table}, line {line_number}: {len(cells)} cells but the header has "
                              f"{len(header)} columns (delimiter {delimiter!r})")
        cells = cells + [""] * (len(header) - len(cells))
        rows.append((line_number, {name: cell.strip() for name, cell in zip(header, cells)}))
    return header, rows


def first_column(header: Sequence[str], candidates: Sequence[str]) -> Optional[str]:
    """The first of ``candidates`` (lower-case column names, in order of preference) that
    ``header`` (as :func:`read_table_rows` gives it) holds; None when it holds none."""
    return next((name for name in candidates if name in header), None)


def _read_table(table: Path, check_files: bool) -> Cohort:
    header, rows = read_table_rows(table)
    path_column = first_column(header, PATH_COLUMNS)
    if path_column is None:
        if "participant_id" in header:  # BIDS participants.tsv: find the images beside it
            values = {row["participant_id"]: (line, row) for line, row in rows}
            return _read_bids(table.parent, values, table)
        raise CohortError(f"{table}: no image column; name one of {', '.join(PATH_COLUMNS)} "
                          "(or give a BIDS participants.tsv with participant_id)")
    id_column = first_column(header, ID_COLUMNS)
    used = {path_column, id_column, "age", "sex", "site"}
    subjects, seen = [], {}
    for line, row in rows:
        where = f"{table}, line {line}"
        cell = row[path_column]
        if not cell:
            raise CohortError(f"{where}: the {path_column!r} cell is empty")
        image = Path(cell).expanduser()
        if not image.is_absolute():
            image = table.parent / image
        if check_files and not image.exists():
            raise CohortError(f"{where}: image {image} does not exist")
        subject_id = row.get(id_column, "") if id_column else ""
        subject_id = subject_id or image_stem(image)
        if subject_id in seen:
            raise CohortError(f"{where}: id {subject_id!r} already used on line {seen[subject_id]}")
        seen[subject_id] = line
        subjects.append(_subject(where, subject_id, image, row, used))
    if not subjects:
        raise CohortError(f"{table}: the table has a header but no rows")
    return Cohort(subjects)


def _subject(where: str, subject_id: str, image: Path, row: Dict[str, str], used, participant: str = "") -> Subject:
    try:
        age = parse_age(row.get("age"))
        sex = parse_cohort_sex(row.get("sex"))
    except ValueError as error:
        raise CohortError(f"{where}: {error}") from None
    extra = {name: value for name, value in row.items() if name not in used and name}
    return Subject(id=subject_id, path=image.resolve(), age=age, sex=sex, site=row.get("site") or None,
                   extra=extra, participant=participant)


# ----------------------------------------------------------------------------------------
# BIDS
# ----------------------------------------------------------------------------------------


def _t1w_images(folder: Path) -> List[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and (p.name.endswith("_T1w.nii.gz") or p.name.endswith("_T1w.nii")))


def _no_t1w(anat_folders: Sequence[Path], root: Path) -> str:
    """Why a subject or session has no image: what its anat folder(s) hold instead."""
    where = " or ".join(f"{folder.relative_to(root)}/" for folder in anat_folders)
    others = sorted(p.name for folder in anat_folders if folder.is_dir()
                    for p in folder.iterdir() if p.is_file() and not p.name.endswith(".json"))
    return (f"no T1-weighted image (*_T1w.nii[.gz]) in {where}"
            + (f"; it holds {', '.join(others[:4])}" + (", ..." if len(others) > 4 else "") if others else ""))


def _read_bids(root: Path, participants: Dict[str, tuple], source: Path) -> Cohort:
    """Subjects of a BIDS dataset; ``participants`` maps participant_id -> (line, row)."""
    folders = sorted(child.name for child in root.iterdir() if child.is_dir() and child.name.startswith("sub-"))
    unlisted = [label for label in folders if participants and label not in participants]
    if unlisted:
        logger.warning("%s: %d subject folder(s) have no row in it (%s): read with the ages and sexes of their "
                       "sessions.tsv only", source, len(unlisted), ", ".join(unlisted[:10])
                       + (", ..." if len(unlisted) > 10 else ""))
    subjects: List[Subject] = []
    skipped: List[str] = []
    used = {"participant_id", "age", "sex", "site", "session_id"}
    for label in sorted(set(participants) | set(folders)):
        line, row = participants.get(label, (None, {}))
        where = f"{source}, line {line}" if line else str(root / label)
        if not label.startswith("sub-"):
            raise CohortError(f"{where}: participant_id {label!r} does not start with 'sub-'")
        subject_dir = root / label
        if not subject_dir.is_dir():
            skipped.append(f"{label}: no folder {label}/ in {root}")
            continue
        found: List[Subject] = []
        images = _t1w_images(subject_dir / "anat")
        if images:
            found.append(_subject(where, label, images[0], row, used, participant=label))
        session_table, sessions = _session_rows(subject_dir, label)
        session_dirs = sorted(p for p in subject_dir.glob("ses-*") if p.is_dir())
        empty_sessions = []
        for session in session_dirs:
            session_id = f"{label}_{session.name}"
            images = _t1w_images(session / "anat")
            if not images:
                if (session / "anat").is_dir():
                    empty_sessions.append(f"{session_id}: {_no_t1w([session / 'anat'], root)}")
                continue
            session_line, session_row = sessions.get(session.name, (None, {}))
            given = {k: v for k, v in session_row.items() if v.strip().lower() not in MISSING}
            if given:  # a bad session value names sessions.tsv; the rest come from participants.tsv
                _subject(f"{session_table}, line {session_line}", session_id, images[0], given, used)
            found.append(_subject(where, session_id, images[0], {**row, **given}, used, participant=label))
        if found:
            subjects.extend(found)
            skipped.extend(empty_sessions)
        else:
            anat = [folder for folder in [subject_dir / "anat", *(s / "anat" for s in session_dirs)] if folder.is_dir()]
            skipped.append(f"{label}: {_no_t1w(anat or [subject_dir / 'anat'], root)}")
    if skipped:
        logger.warning("%s: %d subject(s) or session(s) left out: %s", source, len(skipped),
                       "; ".join(skipped[:10]) + (f"; ... and {len(skipped) - 10} more" if len(skipped) > 10 else ""))
    if not subjects:
        raise CohortError(f"{source}: no T1-weighted images found in the BIDS dataset {root}"
                          + (f" ({'; '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''})" if skipped else ""))
    return Cohort(subjects, skipped)


def _session_rows(subject_dir: Path, label: str) -> tuple:
    """(the subject's sessions.tsv, {session_id: (line, {column: cell})}); ids without the
    ``ses-`` prefix get it."""
    table = subject_dir / f"{label}_sessions.tsv"
    if not table.is_file():
        return table, {}
    header, rows = read_table_rows(table)
    if "session_id" not in header:
        raise CohortError(f"{table}: no session_id column")
    sessions = {}
    for line, row in rows:
        session_id = row["session_id"] if row["session_id"].startswith("ses-") else f"ses-{row['session_id']}"
        sessions[session_id] = (line, {k: v for k, v in row.items() if k != "session_id"})
    return table, sessions


# ----------------------------------------------------------------------------------------
# A plain folder
# ----------------------------------------------------------------------------------------


def _read_folder(folder: Path) -> List[Subject]:
    """Every image file in ``folder``, and every subfolder holding a DICOM series (id: its name)."""
    images = sorted(p for p in folder.iterdir()
                    if not p.name.startswith(".")
                    and ((p.is_file() and any(p.name.lower().endswith(s) for s in IMAGE_SUFFIXES))
                         or (p.is_dir() and _holds_dicom(p))))
    if not images:
        raise CohortError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}), no DICOM series folders, "
                          "no participants.tsv and no sub-* folders: nothing to read as a cohort")
    return [Subject(id=image_stem(p) if p.is_file() else p.name, path=p.resolve(), age=None, sex="unknown")
            for p in images]


def _holds_dicom(folder: Path, probe: int = 5) -> bool:
    """True when one of the first ``probe`` files of ``folder`` is DICOM (by extension or the
    'DICM' marker at byte 128 of the DICOM file format)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    for path in files[:probe]:
        if path.suffix.lower() in DICOM_EXTENSIONS:
            return True
        try:
            with open(path, "rb") as handle:
                handle.seek(128)
                if handle.read(4) == b"DICM":
                    return True
        except OSError:
            continue
    return False
