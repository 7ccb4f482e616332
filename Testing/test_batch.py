"""Cohort batch runs: bad subjects become error rows, kills and Ctrl-C lose and repeat nothing.

The model is the tiny preset with seeded random weights, saved as a checkpoint (so the CLI in
a subprocess can load it); heads are 3 mm phantoms. Predicted ages are meaningless numbers,
but they are real model outputs and must equal what ``predict`` gives for the same file.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from BrainAgeLib.cohort.batch import cohort_subjects, run_batch
from BrainAgeLib.inference import predict
from BrainAgeLib.model.checkpoint import load_model, save_checkpoint
from BrainAgeLib.errors import BrainAgeError, CohortError
from BrainAgeLib.cohort.predictions_csv import FILENAME, PredictionsFileError, read_predictions

from cohort_heads import cohort_folder, write_cohort_csv

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cohort_files(tmp_path_factory):
    return cohort_folder(tmp_path_factory.mktemp("batch_cohort"))


def long_cohort(cohort_files, path: Path, repeats: int) -> Path:
    """A cohort listing the heads many times over (ids differ), with ages and sexes."""
    entries = []
    for n in range(repeats):
        for k, (file, age, sex) in enumerate(cohort_files["heads"]):
            entries.append((f"sub-{n:02d}{k}", file, age + n, sex))
    return write_cohort_csv(path, entries)


def cli(*args: str, env_extra=None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-m", "BrainAgeLib", "batch", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_rows(csv_path: Path, minimum: int, process: subprocess.Popen, timeout: float = 120.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if csv_path.exists():
            lines = csv_path.read_bytes().count(b"\n") - 1
            if lines >= minimum:
                return lines
        if process.poll() is not None:
            raise AssertionError(f"batch ended before {minimum} rows: {process.communicate()}")
        time.sleep(0.01)
    raise AssertionError(f"no {minimum} rows within {timeout} s")


def test_bad_subjects_get_error_rows_and_the_others_succeed(cohort_files, tmp_path):
    heads, bad = cohort_files["heads"], cohort_files["bad"]
    entries = [(f"good{k}", file, age, sex) for k, (file, age, sex) in enumerate(heads)]
    entries.insert(1, ("corrupt", bad["corrupt"], 40.0, "F"))
    entries.insert(3, ("flat", bad["flat2d"], 40.0, "M"))
    entries.append(("missing", bad["missing"], None, "unknown"))
    cohort = write_cohort_csv(tmp_path / "cohort.csv", entries)

    summary = run_batch(cohort, tmp_path / "out", model=str(cohort_files["checkpoint"]), device="cpu", workers=1)

    assert (summary.n_done, summary.n_failed, summary.n_skipped) == (3, 3, 0)
    rows = {row.id: row for row in read_predictions(tmp_path / "out" / FILENAME)}
    assert list(rows) == [e[0] for e in entries]  # cohort order, one row each
    assert "corrupt.nii.gz" in rows["corrupt"].error and rows["corrupt"].predicted_age is None
    assert "flat2d.nii.gz" in rows["flat"].error and "2D" in rows["flat"].error
    assert "no_such_scan.nii.gz" in rows["missing"].error and "not found" in rows["missing"].error
    model = load_model(cohort_files["checkpoint"])
    for k, (file, age, sex) in enumerate(heads):
        row = rows[f"good{k}"]
        assert row.ok and row.sex == sex and row.chronological_age == age and row.model == "tiny-test"
        expected = predict(model, file, sex, age=age, device="cpu", use_cache=False)
        assert row.predicted_age == pytest.approx(expected.predicted_age, abs=2e-4)
        assert row.brain_age_gap == pytest.approx(expected.predicted_age - age, abs=2e-4)
    assert summary.n_succeeded_total == 3 and summary.n_failed_total == 3


def test_killed_run_resumes_without_losing_or_repeating(cohort_files, tmp_path):
    cohort = long_cohort(cohort_files, tmp_path / "cohort.csv", repeats=8)  # 24 subjects
    out = tmp_path / "out"
    csv_path = out / FILENAME
    process = cli(str(cohort), "--out", str(out), "--model", str(cohort_files["checkpoint"]),
                  "--device", "cpu", "--workers", "1")
    wait_for_rows(csv_path, 3, process)
    process.send_signal(signal.SIGKILL)  # the main process only: its worker must notice and exit
    process.communicate(timeout=60)  # EOF on the pipes: no orphaned worker holds them open
    assert process.returncode == -signal.SIGKILL
    before = read_predictions(csv_path)
    assert 3 <= len(before) < 24, "the run was not killed in the middle"

    summary = run_batch(cohort, out, model=str(cohort_files["checkpoint"]), device="cpu", workers=0)

    assert summary.n_skipped == len(before)
    assert summary.n_done == 24 - len(before) and summary.n_failed == 0
    after = read_predictions(csv_path)
    ids = [s.id for s in cohort_subjects(cohort)]
    assert [r.id for r in after] == ids  # everyone exactly once, in cohort order
    kept = {r.id: r for r in after}
    for row in before:  # the rows finished before the kill are untouched
        assert kept[row.id] == row


def test_ctrl_c_leaves_a_consistent_csv_and_exit_code_130(cohort_files, tmp_path):
    cohort = long_cohort(cohort_files, tmp_path / "cohort.csv", repeats=8)
    out = tmp_path / "out"
    process = cli(str(cohort), "--out", str(out), "--model", str(cohort_files["checkpoint"]),
                  "--device", "cpu", "--workers", "1")
    wait_for_rows(out / FILENAME, 2, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    text = (out / FILENAME).read_text()
    assert text.endswith("\n")
    rows = read_predictions(out / FILENAME)
    assert 2 <= len(rows) < 24 and all(r.ok for r in rows)
    assert len({r.id for r in rows}) == len(rows)


def test_cancel_from_progress_then_resume(cohort_files, tmp_path):
    cohort = long_cohort(cohort_files, tmp_path / "cohort.csv", repeats=2)  # 6 subjects
    seen = []

    def progress(fraction, message):
        seen.append(fraction)
        if len(seen) == 3:  # the start message, then two subjects
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_batch(cohort, tmp_path / "out", model=str(cohort_files["checkpoint"]), device="cpu",
                  workers=1, progress=progress)
    assert len(read_predictions(tmp_path / "out" / FILENAME)) == 2
    summary = run_batch(cohort, tmp_path / "out", model=str(cohort_files["checkpoint"]), device="cpu", workers=0)
    assert (summary.n_skipped, summary.n_done) == (2, 4)
    assert len(summary.rows) == 6


def test_retry_failed_replaces_the_error_row(cohort_files, tmp_path):
    head, age, sex = cohort_files["heads"][1]
    late = tmp_path / "late.nii.gz"
    cohort = write_cohort_csv(tmp_path / "cohort.csv", [("a", head, age, sex), ("late", late, age, sex)])
    first = run_batch(cohort, tmp_path / "out", model=str(cohort_files["checkpoint"]), device="cpu", workers=0)
    assert (first.n_done, first.n_failed) == (1, 1)
    late.write_bytes(head.read_bytes())  # the missing scan arrives
    again = run_batch(cohort, tmp_path / "out", model=str(cohort_files["checkpoint"]), device="cpu", workers=0)
    assert (again.n_done, again.n_failed, again.n_skipped) == (0, 0, 2)  # errors count as finished
    retried = run_batch(cohort, tmp_path / "out", model=str(cohort_files["checkpoint"]), device="cpu",
                        workers=0, retry_failed=True)
    assert (retried.n_done, retried.n_skipped) == (1, 1)
    rows = read_predictions(tmp_path / "out" / FILENAME)
    assert [r.id for r in rows] == ["a", "late"] and all(r.ok for r in rows)
    assert rows[1].predicted_age == pytest.approx(rows[0].predicted_age, abs=1e-6)


def test_explain_writes_attention_maps_named_in_the_csv(cohort_files, tmp_path):
    from BrainAgeLib.io import load_volume

    head, age, sex = cohort_files["heads"][0]
    cohort = [cohort_subjects([head])[0]]
    summary = run_batch(cohort, tmp_path / "out", model=str(cohort_files["checkpoint"]), device="cpu",
                        workers=0, explain=True)
    row = summary.rows[0]
    assert row.ok and row.id == "head0" and row.attention_map == "attention/head0_attention.nii.gz"
    attention = load_volume(tmp_path / "out" / row.attention_map)
    scan = load_volume(head)
    assert attention.shape == scan.shape
    expected = predict(load_model(cohort_files["checkpoint"]), head, None, device="cpu", explain=True, use_cache=False)
    assert np.allclose(attention.array, expected.attention.array, atol=1e-4)
    assert 0.5 < attention.array.max() <= 1.0 and attention.array.min() >= 0.0
    assert (tmp_path / "out" / "attention" / "head0_attention.png").exists()


def test_batch_explain_method_is_used_and_recorded(cohort_files, tmp_path):
    """``--explain-method relevance`` implies --explain; each sidecar names the method (so cohort
    maps can refuse to mix methods) and the map is predict's relevance map."""
    import json

    from BrainAgeLib.cli import main
    from BrainAgeLib.io import load_volume

    head = cohort_files["heads"][0][0]
    cohort = write_cohort_csv(tmp_path / "cohort.csv", [("r", head, 40, "F")])
    code = main(["batch", str(cohort), "--out", str(tmp_path / "out"), "--model", str(cohort_files["checkpoint"]),
                 "--device", "cpu", "--workers", "0", "--explain-method", "relevance", "--no-plots"])
    assert code == 0
    sidecar = json.loads((tmp_path / "out" / "attention" / "r_attention.json").read_text())
    assert sidecar["explain_method"] == "relevance"
    expected = predict(load_model(cohort_files["checkpoint"]), head, "F", 40, device="cpu", explain="relevance",
                       use_cache=False)
    attention = load_volume(tmp_path / "out" / "attention" / "r_attention.nii.gz")
    assert np.allclose(attention.array, expected.attention.array, atol=1e-4)
    with pytest.raises(BrainAgeError, match="unknown explanation method"):
        run_batch(cohort, tmp_path / "other", model=str(cohort_files["checkpoint"]), explain="gradcam", workers=0)


def test_resuming_with_another_model_is_refused(cohort_files, tmp_path):
    from BrainAgeLib.model import build_model

    cohort = long_cohort(cohort_files, tmp_path / "cohort.csv", repeats=1)
    run_batch(cohort, tmp_path / "out", model=str(cohort_files["checkpoint"]), device="cpu", workers=0)
    with pytest.raises(PredictionsFileError, match="tiny-test"):
        run_batch(cohort, tmp_path / "out", model=build_model("tiny", seed=1), device="cpu", workers=0)


def test_duplicate_ids_are_refused(cohort_files, tmp_path):
    head = cohort_files["heads"][0][0]
    cohort = write_cohort_csv(tmp_path / "cohort.csv", [("x", head, 30, "F"), ("x", head, 31, "F")])
    with pytest.raises(CohortError, match="'x' already used"):
        run_batch(cohort, tmp_path / "out", model=str(cohort_files["checkpoint"]), device="cpu", workers=0)
    subjects = cohort_subjects([head])  # a list of paths: ids from the file names
    assert subjects[0].id == "head0" and subjects[0].sex == "unknown" and subjects[0].age is None
    with pytest.raises(CohortError, match="'head0' appears twice"):
        cohort_subjects(subjects + [head])


def test_a_killed_preprocessing_worker_is_replaced(cohort_files, tmp_path):
    import multiprocessing

    cohort = long_cohort(cohort_files, tmp_path / "cohort.csv", repeats=2)  # 6 subjects
    killed = []

    def progress(fraction, message):
        if not killed and fraction > 0:  # after the first subject: kill the worker(s) mid-run
            for child in multiprocessing.active_children():
                os.kill(child.pid, signal.SIGKILL)
                killed.append(child.pid)

    summary = run_batch(cohort, tmp_path / "out", model=str(cohort_files["checkpoint"]), device="cpu",
                        workers=1, progress=progress)
    assert killed
    assert (summary.n_done, summary.n_failed) == (6, 0)
    assert [r.id for r in summary.rows] == [s.id for s in cohort_subjects(cohort)]


def test_cli_summary_reports_accuracy_and_evaluation_plots(cohort_files, tmp_path):
    import json

    cohort = long_cohort(cohort_files, tmp_path / "cohort.csv", repeats=2)  # 6 subjects with ages
    out = tmp_path / "out"
    process = cli(str(cohort), "--out", str(out), "--model", str(cohort_files["checkpoint"]),
                  "--device", "cpu", "--workers", "0", "--json")
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    report = json.loads(stdout)
    assert (report["n_done"], report["n_failed"], report["n_succeeded_total"]) == (6, 0, 6)
    rows = read_predictions(out / FILENAME)
    gaps = np.array([r.predicted_age - r.chronological_age for r in rows])
    statistics = report["statistics"]
    assert statistics["n"] == 6
    assert statistics["metrics"]["mae"] == pytest.approx(np.abs(gaps).mean(), abs=1e-3)
    assert statistics["bag"]["mean"] == pytest.approx(gaps.mean(), abs=1e-3)
    assert statistics["bag"]["sd"] == pytest.approx(gaps.std(ddof=1), abs=1e-3)
    assert statistics["corrected_bag"] is None  # the test model carries no bias-correction coefficients
    assert statistics["evaluation"]["bias_correction"] is None  # 2 reference subjects: refused
    assert "2 reference subjects" in statistics["evaluation"]["reference"]["note"]
    assert any("only 4 rows" in note for note in statistics["notes"])  # 6 - 2 reference rows
    for name in ("scatter", "bland_altman", "metrics"):
        assert Path(statistics["files"][name]).is_file()


def test_a_demo_model_batch_says_it_is_synthetic_in_the_summary(cohort_files, tmp_path):
    from BrainAgeLib.cli.batch import summary_text
    from BrainAgeLib.result import DEMO_DISCLAIMER

    file, age, sex = cohort_files["heads"][0]
    cohort = write_cohort_csv(tmp_path / "cohort.csv", [("demo0", file, age, sex)])
    summary = run_batch(cohort, tmp_path / "out", model="demo", device="cpu", workers=0)
    assert summary.n_done == 1 and summary.model_is_demo
    assert summary.to_dict()["disclaimer"] == DEMO_DISCLAIMER
    assert DEMO_DISCLAIMER in summary_text(summary, None)

    tiny = run_batch(cohort, tmp_path / "tiny", model=str(cohort_files["checkpoint"]), device="cpu", workers=0)
    assert not tiny.model_is_demo and "disclaimer" not in tiny.to_dict()
    assert DEMO_DISCLAIMER not in summary_text(tiny, None)


def test_resume_refuses_other_weights_or_preprocessing_under_the_same_name(cohort_files, tmp_path):
    """A different checkpoint saved under the model's name, or the same weights with other
    preprocessing, must not add its predictions to the file (issue 20, item 4)."""
    import dataclasses

    from BrainAgeLib.model.checkpoint import read_metadata
    from BrainAgeLib.model import BrainAgeModel, build_model

    checkpoint = cohort_files["checkpoint"]
    out = tmp_path / "out"
    run_batch(long_cohort(cohort_files, tmp_path / "first.csv", repeats=1), out, model=str(checkpoint),
              device="cpu", workers=0)
    cohort = long_cohort(cohort_files, tmp_path / "more.csv", repeats=2)  # 3 more subjects to do
    before = (out / FILENAME).read_bytes()

    impostor = save_checkpoint(build_model("tiny", seed=1), tmp_path / "impostor.safetensors", {"name": "tiny-test"})
    ours, theirs = read_metadata(checkpoint)["weights_sha256"], read_metadata(impostor)["weights_sha256"]
    assert ours != theirs and load_model(impostor).name == "tiny-test"
    with pytest.raises(PredictionsFileError) as error:
        run_batch(cohort, out, model=str(impostor), device="cpu", workers=0)
    assert ours in str(error.value) and theirs in str(error.value) and str(out / FILENAME) in str(error.value)
    assert (out / FILENAME).read_bytes() == before

    same = load_model(checkpoint)
    config = dataclasses.replace(same.config, preprocess=dataclasses.replace(same.config.preprocess,
                                                                             crop_threshold=0.2))
    other_preprocessing = BrainAgeModel(config, metadata=same.metadata)
    other_preprocessing.load_state_dict(same.state_dict())
    with pytest.raises(PredictionsFileError, match="crop_threshold") as error:
        run_batch(cohort, out, model=other_preprocessing, device="cpu", workers=0)
    assert "preprocessing" in str(error.value)
    assert (out / FILENAME).read_bytes() == before

    resumed = run_batch(cohort, out, model=str(checkpoint), device="cpu", workers=0)  # the same model resumes
    assert (resumed.n_skipped, resumed.n_done) == (3, 3)


def test_cli_resume_with_other_weights_exits_2_naming_both_digests(cohort_files, tmp_path):
    from BrainAgeLib.model.checkpoint import read_metadata
    from BrainAgeLib.model import build_model

    checkpoint = cohort_files["checkpoint"]
    cohort = long_cohort(cohort_files, tmp_path / "cohort.csv", repeats=1)
    out = tmp_path / "out"
    run_batch(cohort, out, model=str(checkpoint), device="cpu", workers=0)
    impostor = save_checkpoint(build_model("tiny", seed=2), tmp_path / "impostor.safetensors", {"name": "tiny-test"})
    process = cli(str(cohort), "--out", str(out), "--model", str(impostor), "--device", "cpu", "--workers", "0")
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 2, stderr
    assert read_metadata(checkpoint)["weights_sha256"] in stderr
    assert read_metadata(impostor)["weights_sha256"] in stderr
    assert "Traceback" not in stderr and "Done:" not in stdout


def test_the_terminal_summary_prints_every_flag_and_no_corrected_mae_of_a_refused_fit(cohort_files, tmp_path):
    """Issue 20, item 5: the small-n flag was only in metrics.json, and a correction fitted on 2
    reference subjects was printed as a "corrected MAE"."""
    import json

    from BrainAgeLib.cohort.batch import cohort_statistics
    from BrainAgeLib.cli.batch import summary_text

    checkpoint = str(cohort_files["checkpoint"])
    cohort = long_cohort(cohort_files, tmp_path / "cohort.csv", repeats=2)  # 6 subjects with ages
    summary = run_batch(cohort, tmp_path / "out", model=checkpoint, device="cpu", workers=0)
    statistics = cohort_statistics(summary.rows, summary.out_dir, plots=False)
    text = summary_text(summary, statistics)
    saved = json.loads((tmp_path / "out" / "evaluation" / "metrics.json").read_text())
    assert saved["notes"] and saved["corrected"] is None
    for flag in saved["notes"] + [saved["reference"]["note"]]:
        assert flag in text
    assert "Bias-corrected on this cohort" not in text

    # 3 subjects: too few for the evaluation, still flagged in the terminal
    small = long_cohort(cohort_files, tmp_path / "small.csv", repeats=1)
    summary = run_batch(small, tmp_path / "small", model=checkpoint, device="cpu", workers=0)
    statistics = cohort_statistics(summary.rows, summary.out_dir, plots=False)
    assert statistics["evaluation"] is None
    assert any("only 3 rows" in note for note in statistics["notes"])
    for note in statistics["notes"]:
        assert note in summary_text(summary, statistics)


def test_a_bids_cohort_lists_the_subjects_it_skips_in_the_summary(cohort_files, tmp_path):
    """Issue 20, item 12: a subject with only a T2w was dropped without a word."""
    from BrainAgeLib.cli.batch import summary_text

    head, _, _ = cohort_files["heads"][0]
    root = tmp_path / "bids"
    for path in (root / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_T1w.nii.gz",
                 root / "sub-02" / "anat" / "sub-02_T2w.nii.gz"):
        path.parent.mkdir(parents=True)
        path.write_bytes(head.read_bytes())
    (root / "participants.tsv").write_text("participant_id\tage\tsex\nsub-01\t30\tF\nsub-02\t40\tM\n")
    (root / "sub-01" / "sub-01_sessions.tsv").write_text("session_id\tage\nses-1\t31.5\n")

    summary = run_batch(root, tmp_path / "out", model=str(cohort_files["checkpoint"]), device="cpu", workers=0)
    assert [(r.id, r.chronological_age, r.ok) for r in summary.rows] == [("sub-01_ses-1", 31.5, True)]
    assert len(summary.excluded) == 1 and summary.excluded[0].startswith("sub-02: ")
    assert "sub-02_T2w.nii.gz" in summary.excluded[0]
    assert summary.to_dict()["excluded"] == summary.excluded
    assert summary.excluded[0] in summary_text(summary, None)
