"""Prediction intervals (split conformal), gap z and site calibration (``brainage calibrate``).

The numbers-level tests use a simulated model (predictions regress toward the mean with noise);
the end-to-end ones the tiny preset with seeded random weights on 3 mm phantoms, listed under
many ids (its predictions mean nothing, but the weights, files and refusals are real).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from BrainAgeLib.bias_correction import BiasCorrection
from BrainAgeLib.cohort.calibrate import CalibrationRefused, calibrate_model, fit_site_calibration
from BrainAgeLib.cohort.predictions_csv import read_predictions
from BrainAgeLib.conformal import NOT_CALIBRATED, ConformalCalibration, format_interval
from BrainAgeLib.digests import weights_digest
from BrainAgeLib.inference import predict
from BrainAgeLib.model.checkpoint import load_model, read_metadata

from cohort_heads import tiny_checkpoint, write_cohort_csv, write_heads

REPO = Path(__file__).resolve().parents[1]


def simulated_site(n: int, offset: float, seed: int):
    """Ages 20-85 and a model's predictions there: shrunk toward 55 (slope 0.8), noise SD 4,
    and ``offset`` years added by the site (scanner, sequence)."""
    rng = np.random.default_rng(seed)
    age = rng.uniform(20, 85, n)
    return age, 0.8 * age + 11 + rng.normal(0, 4, n) + offset


def test_conformal_intervals_cover_their_level_on_new_subjects():
    age, predicted = simulated_site(300, 0.0, seed=1)
    calibration = ConformalCalibration.fit(age, predicted, BiasCorrection.fit(age, predicted))
    assert len(calibration.band_edges) == 3          # 300 subjects: 4 bands of 75
    new_age, new_predicted = simulated_site(4000, 0.0, seed=2)
    inside = [lo <= a <= hi for a, (lo, hi) in zip(new_age, map(calibration.interval, new_predicted))]
    assert np.mean(inside) == pytest.approx(0.9, abs=0.03)
    # the level can be asked for later; a band too small for a level gives no interval
    assert calibration.half_width(50.0, 0.5) < calibration.half_width(50.0, 0.9)
    small = ConformalCalibration.fit(age[:5], predicted[:5])
    assert small.interval(50.0) is None
    # the card's dict round-trips
    again = ConformalCalibration.from_dict(json.loads(json.dumps(calibration.to_dict())))
    assert again.interval(61.0) == pytest.approx(calibration.interval(61.0), abs=0.02)


def test_gap_z_is_the_corrected_gap_in_reference_sds():
    age, predicted = simulated_site(200, 0.0, seed=3)
    correction = BiasCorrection.fit(age, predicted)
    calibration = ConformalCalibration.fit(age, predicted, correction)
    corrected = correction.corrected_gap(predicted, age)
    assert calibration.gap_sd == pytest.approx(np.std(corrected, ddof=1), rel=1e-9)
    assert calibration.gap_z(2 * calibration.gap_sd) == pytest.approx(2.0)
    assert format_interval(67.23, (61.41, 73.05), 0.9) == "67.2 years (90% interval 61.4\u201373.0)"
    assert format_interval(67.23, None, None) == f"67.2 years ({NOT_CALIBRATED})"


def test_site_calibration_removes_a_constant_offset_from_the_corrected_gap():
    # the model's own calibration comes from its validation subjects (no offset) ...
    age, predicted = simulated_site(150, 0.0, seed=4)
    trained, _ = fit_site_calibration(age, predicted)
    # ... a site whose scanner makes everyone look 6 years older
    site_age, site_predicted = simulated_site(60, 6.0, seed=5)
    patients_age, patients_predicted = simulated_site(500, 6.0, seed=6)
    before = np.mean(trained.corrected_gap(patients_predicted, patients_age))
    assert before == pytest.approx(6.0, abs=1.5)
    site, calibration = fit_site_calibration(site_age, site_predicted)
    after = np.mean(site.corrected_gap(patients_predicted, patients_age))
    assert abs(after) < 1.0
    inside = [lo <= a <= hi for a, (lo, hi) in zip(patients_age, map(calibration.interval, patients_predicted))]
    assert np.mean(inside) == pytest.approx(0.9, abs=0.06)


def test_site_calibration_removes_a_scanner_offset_from_the_demo_models_phantom_predictions():
    """The demo model's own predictions for its 96 held-out phantoms (recorded by
    scripts/interval_coverage.py --record), as a site whose scanner adds 6 years to every age:
    calibrating on half of them removes the offset from the other half's corrected gaps."""
    record = json.loads((REPO / "Resources" / "Models" / "brainage_demo_interval_check.json").read_text(encoding="utf-8"))
    age = np.array([p["age"] for p in record["phantoms"]])
    predicted = np.array([p["predicted_age"] for p in record["phantoms"]])
    controls, patients = slice(0, None, 2), slice(1, None, 2)  # both spread over the whole age range
    shipped = load_model("demo").bias_correction
    baseline = np.mean(shipped.corrected_gap(predicted[patients], age[patients]))
    before = np.mean(shipped.corrected_gap(predicted[patients] + 6.0, age[patients]))
    assert before - baseline == pytest.approx(6.0, abs=1e-6)  # the shipped correction keeps the offset
    site, calibration = fit_site_calibration(age[controls], predicted[controls] + 6.0)
    after = site.corrected_gap(predicted[patients] + 6.0, age[patients])
    assert abs(np.mean(after)) < 1.0, np.mean(after)
    assert calibration.n_reference == len(age[controls])


def test_too_few_controls_or_too_narrow_ages_are_refused_with_the_reason():
    age, predicted = simulated_site(19, 0.0, seed=7)
    with pytest.raises(CalibrationRefused, match="19 control subjects with an age, at least 20"):
        fit_site_calibration(age, predicted, "site.csv")
    narrow = np.linspace(60, 69, 30)
    with pytest.raises(CalibrationRefused, match=r"site.csv: the 30 controls' ages span 9.0 years"):
        fit_site_calibration(narrow, narrow + 1, "site.csv")


@pytest.fixture(scope="module")
def controls(tmp_path_factory):
    """24 controls (3 phantom heads under 8 ids each, ages 20-78) and a tiny checkpoint."""
    folder = tmp_path_factory.mktemp("calibrate")
    heads = write_heads(folder / "heads")
    entries = [(f"sub-{n:02d}{k}", file, 20.0 + 2.5 * (3 * n + k), sex)
               for n in range(8) for k, (file, _, sex) in enumerate(heads)]
    return {"csv": write_cohort_csv(folder / "controls.csv", entries), "entries": entries,
            "checkpoint": tiny_checkpoint(folder / "model"), "folder": folder}


def test_calibrate_writes_the_same_weights_with_the_new_calibration(controls, tmp_path):
    source = controls["checkpoint"]
    out = tmp_path / "tiny_site.safetensors"
    run = calibrate_model(controls["csv"], source, out, workers=0, device="cpu")
    card, before = read_metadata(out), read_metadata(source)
    assert card["weights_sha256"] == before["weights_sha256"]
    assert weights_digest(load_model(out).state_dict()) == weights_digest(load_model(source).state_dict())
    calibration = card["calibration"]
    assert calibration["source"]["n"] == 24 and calibration["source"]["age_range"] == [20.0, 77.5]
    assert calibration["source"]["cohort"] == "controls.csv" and calibration["source"]["date"]
    assert len(calibration["reference"]["age"]) == 24
    assert card["bias_correction"]["n_reference"] == 24
    # the controls' corrected gaps average zero with the new coefficients; predictions get intervals
    rows = read_predictions(run.work_dir / "predictions.csv")
    model = load_model(out)
    gaps = [model.bias_correction.corrected_gap(r.predicted_age, r.chronological_age) for r in rows]
    assert abs(np.mean(gaps)) < 1e-6
    head, age, sex = controls["entries"][0][1:]
    result = predict(model, head, sex, age, device="cpu", use_cache=False)
    assert result.interval is not None and result.interval[0] < result.predicted_age < result.interval[1]
    assert result.interval_level == 0.9 and result.gap_z is not None
    assert "90% interval" in result.summary() and result.to_dict()["interval"] == list(result.interval)
    # the uncalibrated model says so
    plain = predict(load_model(source), head, sex, age, device="cpu", use_cache=False)
    assert plain.interval is None and plain.gap_z is None and NOT_CALIBRATED in plain.summary()
    # calibrating again keeps the earlier calibration in the history
    again = calibrate_model(controls["csv"], out, tmp_path / "twice.safetensors", work_dir=run.work_dir, workers=0)
    assert read_metadata(again.checkpoint)["calibration_history"][0]["calibration"]["source"]["n"] == 24


def test_cli_refuses_too_few_controls_naming_the_file(controls, tmp_path):
    few = write_cohort_csv(tmp_path / "few.csv", controls["entries"][:12])
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "BrainAgeLib", "calibrate", str(few), "--model",
                           str(controls["checkpoint"]), "--out", str(tmp_path / "x.safetensors")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert f"{few}: 12 control subjects with an age, at least 20" in done.stderr
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "x_calibration").exists()


def test_slicer_results_text_shows_the_interval_and_gap_z_or_says_not_calibrated():
    from BrainAgeLib.result import Result
    from BrainAgeLib.slicer_bridge import result_text

    calibrated = Result(predicted_age=67.23, chronological_age=60.0, brain_age_gap=7.23, corrected_brain_age_gap=6.5,
                        interval=(61.41, 73.05), interval_level=0.9, gap_z=1.4)
    text = result_text(calibrated)
    assert "67.2 years (90% interval 61.4\u201373.0)" in text and "+1.40" in text and "extreme" in text
    assert NOT_CALIBRATED in result_text(Result(predicted_age=50.0))


def test_a_checkpoint_whose_header_length_starts_with_0x80_is_not_taken_for_a_pickle(tmp_path):
    """A safetensors file begins with its header's length (8 bytes, little-endian); a pickle with
    the byte 0x80. One calibrated card in 32 has such a length: it must still load."""
    import struct

    from BrainAgeLib.model import build_model
    from BrainAgeLib.model.checkpoint import save_checkpoint

    model = build_model("tiny", seed=0)
    for pad in range(0, 64):
        path = save_checkpoint(model, tmp_path / "padded.safetensors", {"note": "x" * (8 * pad)})
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no padding gave a header length whose first byte is 0x80")
    assert struct.unpack("<Q", path.read_bytes()[:8])[0] % 256 == 0x80
    assert read_metadata(path)["note"] and load_model(path) is not None


def test_a_predictions_file_of_the_earlier_columns_is_read_and_upgraded_on_resume(tmp_path):
    import csv

    from BrainAgeLib.cohort.predictions_csv import COLUMNS, LEGACY_COLUMNS, PredictionRow, PredictionsWriter

    path = tmp_path / "predictions.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(LEGACY_COLUMNS)
        writer.writerow(["sub-1" if c == "id" else "61.2" if c == "predicted_age" else "" for c in LEGACY_COLUMNS])
    assert read_predictions(path)[0].predicted_age == 61.2
    with PredictionsWriter(path) as appending:
        appending.append(PredictionRow(id="sub-2", predicted_age=50.0, interval_low=40.0, interval_high=60.0,
                                       interval_level=0.9, gap_z=0.5))
    rows = read_predictions(path)
    assert path.read_text(encoding="utf-8").splitlines()[0] == ",".join(COLUMNS)
    assert [r.id for r in rows] == ["sub-1", "sub-2"] and rows[1].interval_high == 60.0 and rows[1].gap_z == 0.5
