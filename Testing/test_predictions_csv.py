"""predictions.csv: whole rows only, resume bookkeeping, merging shards, documented columns."""
from __future__ import annotations

import csv
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from BrainAgeLib.cohort.predictions_csv import (
    COLUMNS, FILENAME, PredictionRow, PredictionsFileError, PredictionsWriter, check_model_matches,
    finished_ids, merge_predictions, part_path, read_predictions, write_predictions,
)

README = Path(__file__).resolve().parents[1] / "README.md"


def ok_row(subject_id: str, predicted: float = 61.23456, age: float = 58.0) -> PredictionRow:
    return PredictionRow(id=subject_id, path=f"/data/{subject_id}.nii.gz", sex="F", chronological_age=age,
                         predicted_age=predicted, brain_age_gap=predicted - age, corrected_brain_age_gap=1.5,
                         site="A", model="demo", warnings=["first", "second"])


def failed_row(subject_id: str) -> PredictionRow:
    return PredictionRow(id=subject_id, path=f"/data/{subject_id}.nii.gz", model="demo",
                         error=f"/data/{subject_id}.nii.gz: file is truncated,\nor damaged")


def test_rows_round_trip_with_four_decimals(tmp_path):
    path = tmp_path / FILENAME
    with PredictionsWriter(path) as writer:
        writer.append(ok_row("sub-01"))
        writer.append(failed_row("sub-02"))
    text = path.read_text()
    assert text.splitlines()[0] == ",".join(COLUMNS)
    rows = read_predictions(path)
    assert [r.id for r in rows] == ["sub-01", "sub-02"]
    first, second = rows
    assert first.predicted_age == pytest.approx(61.2346, abs=1e-9)  # 4 decimals on disk
    assert first.brain_age_gap == pytest.approx(3.2346, abs=1e-9)
    assert first.chronological_age == 58.0 and first.sex == "F" and first.site == "A"
    assert first.warnings == ["first", "second"] and first.ok
    # the error's newline became " | ": one row is one line, whatever the message
    assert not second.ok and second.predicted_age is None and second.brain_age_gap is None
    assert second.error == "/data/sub-02.nii.gz: file is truncated, | or damaged"
    assert len(text.splitlines()) == 3


def test_torn_last_line_is_ignored_and_repaired(tmp_path):
    path = tmp_path / FILENAME
    write_predictions(path, [ok_row("sub-01"), ok_row("sub-02")])
    whole = path.read_bytes()
    with open(path, "ab") as stream:
        stream.write(b"sub-03,/data/sub-03.nii.gz,F,58,61.2")  # a write cut short, no newline
    assert [r.id for r in read_predictions(path)] == ["sub-01", "sub-02"]
    with PredictionsWriter(path) as writer:  # opening repairs the file, then appends
        assert [r.id for r in writer.rows] == ["sub-01", "sub-02"]
        writer.append(ok_row("sub-03", predicted=70.0))
    assert path.read_bytes().startswith(whole)
    rows = read_predictions(path)
    assert [r.id for r in rows] == ["sub-01", "sub-02", "sub-03"] and rows[2].predicted_age == 70.0


def test_a_foreign_csv_is_refused(tmp_path):
    path = tmp_path / FILENAME
    path.write_text("subject,age\nsub-01,50\n")
    with pytest.raises(PredictionsFileError, match="not a BrainAge predictions file"):
        PredictionsWriter(path)


def test_resume_skips_finished_and_optionally_retries_failed():
    rows = [ok_row("a"), failed_row("b"), ok_row("c"), failed_row("d"), ok_row("d")]
    assert finished_ids(rows) == {"a", "b", "c", "d"}
    # "d" failed first and succeeded on a retry: its last row counts
    assert finished_ids(rows, retry_failed=True) == {"a", "c", "d"}


def test_resuming_with_another_model_is_refused(tmp_path):
    rows = [ok_row("a"), failed_row("b")]
    check_model_matches(rows, "demo", tmp_path)
    other = PredictionRow(id="c", model="paper-import", predicted_age=40.0)
    with pytest.raises(PredictionsFileError, match="paper-import"):
        check_model_matches(rows + [other], "demo", tmp_path)


def test_merge_orders_by_cohort_keeps_last_row_and_removes_parts(tmp_path):
    write_predictions(tmp_path / FILENAME, [failed_row("s2")])  # an earlier unsharded run
    write_predictions(part_path(tmp_path, 0, 2), [ok_row("s1", 50.0), ok_row("s3", 52.0)])
    write_predictions(part_path(tmp_path, 1, 2), [ok_row("s2", 51.0), ok_row("s4", 53.0), ok_row("extra", 9.0)])
    rows = merge_predictions(tmp_path, order=["s1", "s2", "s3", "s4"])
    assert [r.id for r in rows] == ["s1", "s2", "s3", "s4", "extra"]
    assert [r.predicted_age for r in rows] == [50.0, 51.0, 52.0, 53.0, 9.0]  # s2's retry won
    assert not list(tmp_path.glob("predictions.part-*"))
    merged = (tmp_path / FILENAME).read_bytes()
    merge_predictions(tmp_path, order=["s1", "s2", "s3", "s4"])  # merging again changes nothing
    assert (tmp_path / FILENAME).read_bytes() == merged


def test_rows_written_before_a_kill_are_whole(tmp_path):
    """A writer killed (SIGKILL) while appending as fast as it can leaves only complete rows."""
    path = tmp_path / FILENAME
    script = textwrap.dedent(f"""
        from BrainAgeLib.cohort.predictions_csv import PredictionRow, PredictionsWriter
        with PredictionsWriter({str(path)!r}, fsync=False) as writer:
            for n in range(10**7):
                writer.append(PredictionRow(id=f"sub-{{n:07d}}", path="/data/" + "x" * 300,
                                            predicted_age=n / 7, error="" if n % 3 else "bad, really\\nbad"))
    """)
    process = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not path.exists() or path.stat().st_size < 200_000):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    rows = read_predictions(path)
    assert len(rows) > 100
    assert [r.id for r in rows] == [f"sub-{n:07d}" for n in range(len(rows))]
    assert all(r.ok == bool(n % 3) for n, r in enumerate(rows))
    with open(path, newline="") as stream:
        lines = list(csv.reader(stream))
    # every complete line has all columns; at most the very last one is torn
    assert all(len(cells) == len(COLUMNS) for cells in lines[:-1])


def test_readme_documents_every_column():
    text = README.read_text(encoding="utf-8")
    match = re.search(r"^### Batch mode[^\n]*$(.*?)(?=^#{2,3} |\Z)", text, flags=re.M | re.S)
    assert match, "README has no '### Batch mode' section"
    section = match.group(1)
    documented = re.findall(r"^\|\s*`([a-z_]+)`\s*\|", section, flags=re.M)
    assert documented == COLUMNS
