"""Evaluation: metrics against hand-computed values, bias correction on a reference split,
plots and the ``brainage evaluate`` command."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from BrainAgeLib.errors import CohortError
from BrainAgeLib.cohort.evaluate import (bootstrap_mae_ci, choose_reference, compute_metrics, decade_label,
                                  evaluate_predictions, read_prediction_table)

# Four subjects: errors (predicted - age) are +9, -8, +5, -2.
AGE = [20.0, 30.0, 40.0, 50.0]
PREDICTED = [29.0, 22.0, 45.0, 48.0]
SEX = ["F", "M", "F", "M"]


def test_metrics_match_hand_computed_values():
    m = compute_metrics(AGE, PREDICTED, SEX)
    assert m["n"] == 4
    assert m["mae"] == pytest.approx(24 / 4)
    assert m["rmse"] == pytest.approx(math.sqrt((81 + 64 + 25 + 4) / 4))
    assert m["mean_error"] == pytest.approx(4 / 4)
    # Deviations from the means (35, 36): age -15,-5,5,15; predicted -7,-14,9,12.
    # Sum of products 400, sums of squares 500 and 470 -> r = 400 / sqrt(500 * 470).
    assert m["pearson_r"] == pytest.approx(400 / math.sqrt(500 * 470))
    # Ranks of the predictions 2,1,3,4 against 1,2,3,4: sum d^2 = 2 -> rho = 1 - 6*2/(4*15).
    assert m["spearman_rho"] == pytest.approx(0.8)
    assert m["r2"] == pytest.approx(1 - 174 / 500)  # SS_res = 174, SS_tot = 500
    assert m["per_decade"] == {"20-29": {"n": 1, "mae": 9.0}, "30-39": {"n": 1, "mae": 8.0},
                               "40-49": {"n": 1, "mae": 5.0}, "50-59": {"n": 1, "mae": 2.0}}
    assert m["per_sex"] == {"F": {"n": 2, "mae": 7.0}, "M": {"n": 2, "mae": 5.0}}
    lo, hi = m["mae_ci95"]
    assert 2.0 <= lo < m["mae"] < hi <= 9.0
    json.dumps(m)  # JSON-ready


def test_bootstrap_interval_is_seeded_and_narrows_with_more_subjects(rng):
    age = rng.uniform(20, 90, 400)
    predicted = age + rng.normal(0, 4, 400)
    small = bootstrap_mae_ci(age[:40], predicted[:40], seed=3)
    assert small == bootstrap_mae_ci(age[:40], predicted[:40], seed=3)
    assert small != bootstrap_mae_ci(age[:40], predicted[:40], seed=4)
    large = bootstrap_mae_ci(age, predicted, seed=3)
    assert large[1] - large[0] < 0.6 * (small[1] - small[0])
    true_mae = 4 * math.sqrt(2 / math.pi)  # E|N(0, 4)|
    assert large[0] < true_mae < large[1]
    assert bootstrap_mae_ci([30, 40], [33, 37]) == [3.0, 3.0]  # every resample has MAE 3


def test_undefined_values_are_none_and_bad_input_is_refused():
    m = compute_metrics([40.0, 40.0], [41.0, 43.0])
    assert m["pearson_r"] is None and m["spearman_rho"] is None and m["r2"] is None
    assert "per_sex" not in m
    assert compute_metrics([40.0], [45.0])["mae_ci95"] is None
    with pytest.raises(ValueError, match="2 ages but 3"):
        compute_metrics([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="finite"):
        compute_metrics([1, float("nan")], [1, 2])
    assert decade_label(29.99) == "20-29" and decade_label(30.0) == "30-39"


def test_decade_labels():
    assert decade_label(64.9) == "60-69"
    assert decade_label(70.0) == "70-79"
    assert decade_label(7.5, width=5) == "5-9"
    assert decade_label(np.float32(64.9)) == "60-69"


def write_table(path, age, predicted, sex, split=None):
    lines = ["id,age,predicted_age,sex" + (",split" if split is not None else "")]
    for i, (a, p, s) in enumerate(zip(age, predicted, sex)):
        lines.append(f"s{i},{a:.3f},{p:.3f},{s}" + (f",{split[i]}" if split is not None else ""))
    path.write_text("\n".join(lines) + "\n")
    return path


def biased_predictions(rng, n=120):
    """Predictions regressed toward the mean, as brain-age models' are: slope 0.7."""
    age = rng.uniform(20, 90, n)
    predicted = 0.7 * age + 16.5 + rng.normal(0, 2.0, n)
    sex = ["F" if i % 2 else "M" for i in range(n)]
    return age, predicted, sex


def test_bias_correction_is_fitted_on_the_reference_split(tmp_path, rng):
    age, predicted, sex = biased_predictions(rng)
    split = ["val" if i < 40 else "test" for i in range(age.size)]
    report = evaluate_predictions(write_table(tmp_path / "p.csv", age, predicted, sex, split))
    assert report.reference == {"n": 40, "chosen_by": "split column"}
    assert report.evaluated["n"] == 80 and report.all["n"] == 120
    assert report.bias_correction["slope"] == pytest.approx(-0.3, abs=0.05)
    assert report.bias_correction["n_reference"] == 40
    # The raw gap falls with age; the corrected one does not.
    assert report.gap_age_correlation["uncorrected"] < -0.8
    assert abs(report.gap_age_correlation["corrected"]) < 0.5
    corrected_gap = report.corrected["mean_error"]
    assert abs(corrected_gap) < 1.0 and report.corrected["mae"] < 0.5 * report.evaluated["mae"]
    # Applied by hand, the stored coefficients give the corrected MAE reported.
    slope, intercept = report.bias_correction["slope"], report.bias_correction["intercept"]
    by_hand = predicted[40:] - age[40:] - (slope * age[40:] + intercept)
    assert report.corrected["mae"] == pytest.approx(np.mean(np.abs(by_hand)), rel=1e-3)
    assert abs(np.polyfit(age[40:], by_hand, 1)[0]) < 0.08
    # The evaluated rows are exactly the non-reference rows.
    assert report.evaluated["mae"] == pytest.approx(np.mean(np.abs(predicted[40:] - age[40:])), abs=2e-3)


def test_without_a_split_a_seeded_fraction_is_the_reference(tmp_path, rng):
    age, predicted, sex = biased_predictions(rng, n=50)
    table = write_table(tmp_path / "p.csv", age, predicted, sex)
    predictions = read_prediction_table(table)
    first = choose_reference(predictions, 0.3, seed=1)
    assert first.sum() == 15 and np.array_equal(first, choose_reference(predictions, 0.3, seed=1))
    assert not np.array_equal(first, choose_reference(predictions, 0.3, seed=2))
    report = evaluate_predictions(table, reference_fraction=0.3, seed=1)
    assert report.reference["n"] == 15 and report.evaluated["n"] == 35
    assert "random 0.3" in report.reference["chosen_by"]


def test_plots_and_metrics_file_are_written(tmp_path, rng):
    age, predicted, sex = biased_predictions(rng, n=30)
    out = tmp_path / "out"
    report = evaluate_predictions(write_table(tmp_path / "p.csv", age, predicted, sex), out)
    for name in ("scatter.png", "bland_altman.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["all"]["mae"] == pytest.approx(report.all["mae"])
    assert sorted(p.name for p in out.iterdir()) == ["bland_altman.png", "metrics.json", "scatter.png"]


def test_evaluate_command_line(tmp_path, rng, capsys):
    from BrainAgeLib.cli import main

    age, predicted, sex = biased_predictions(rng, n=50)
    table = write_table(tmp_path / "p.csv", age, predicted, sex, ["reference"] * 20 + ["test"] * 30)
    assert main(["evaluate", str(table), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["reference"]["n"] == 20 and printed["evaluated"]["n"] == 30
    assert main(["evaluate", str(table), "--out", str(tmp_path / "o")]) == 0
    text = capsys.readouterr().out
    assert "MAE" in text and "bias-corrected" in text and "scatter" in text
    assert (tmp_path / "o" / "scatter.png").exists()


def test_bad_prediction_tables(tmp_path, capsys):
    from BrainAgeLib.cli import main

    missing = tmp_path / "m.csv"
    missing.write_text("id,age,sex\na,30,F\n")
    with pytest.raises(CohortError, match="no predicted_age"):
        read_prediction_table(missing)
    bad = tmp_path / "b.csv"
    bad.write_text("age,predicted_age,sex\n30,31,F\n40,forty,M\n")
    with pytest.raises(CohortError, match=r"b\.csv, line 3: .*must both be numbers"):
        read_prediction_table(bad)
    assert main(["evaluate", str(bad)]) == 2
    assert "line 3" in capsys.readouterr().err
    negative = tmp_path / "n.csv"
    negative.write_text("age,predicted_age,sex\n30,31,F\n-30,40,M\n")
    with pytest.raises(CohortError, match=r"n\.csv, line 3: age '-30' is outside 0-130 years"):
        read_prediction_table(negative)


def test_a_batch_table_with_failed_subjects_and_missing_ages_is_evaluated_on_the_rest(tmp_path, capsys):
    """`brainage batch` writes error rows and rows without an age; evaluate reads the file as it is."""
    from BrainAgeLib.cli import main

    table = tmp_path / "predictions.csv"
    table.write_text(
        "id,path,sex,chronological_age,predicted_age,brain_age_gap,error\n"
        "a,/d/a.nii.gz,F,30,33,3,\n"
        "b,/d/b.nii.gz,M,50,47,-3,\n"
        "c,/d/c.nii.gz,F,40,,,/d/c.nii.gz: truncated file\n"
        "d,/d/d.nii.gz,M,,61,,\n"
        "e,/d/e.nii.gz,F,70,72,2,\n")
    predictions = read_prediction_table(table)
    assert predictions.ids == ["a", "b", "e"]
    assert predictions.skipped == ["c: failed (/d/c.nii.gz: truncated file)", "d: no chronological age"]
    assert main(["evaluate", str(table), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["all"]["n"] == 3 and report["all"]["mae"] == pytest.approx((3 + 3 + 2) / 3)
    assert len(report["skipped"]) == 2
    only_failures = tmp_path / "failed.csv"
    only_failures.write_text("id,chronological_age,predicted_age,error\nc,40,,broken\n")
    with pytest.raises(CohortError, match="no row has both an age and a prediction"):
        read_prediction_table(only_failures)


def test_predictions_of_the_demo_model_carry_its_disclaimer_and_few_rows_are_flagged(tmp_path, capsys):
    from BrainAgeLib.cli import main
    from BrainAgeLib.cohort.evaluate import FEW_ROWS, demo_model_names
    from BrainAgeLib.result import DEMO_DISCLAIMER

    names = demo_model_names()
    assert names and "synthetic" in names[0]
    rows = [f"s{i},{20 + 5 * i},{22 + 5 * i},{'FM'[i % 2]},{names[0]}" for i in range(6)]
    table = tmp_path / "predictions.csv"
    table.write_text("id,age,predicted_age,sex,model\n" + "\n".join(rows) + "\n")
    assert main(["evaluate", str(table), "--out", str(tmp_path / "ev")]) == 0
    printed = capsys.readouterr().out
    assert f"NOTE: {DEMO_DISCLAIMER}" in printed and "rows were evaluated: these figures" in printed
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["models"] == names and DEMO_DISCLAIMER in metrics["notes"]
    # another model's table, large enough: no notes
    rows = [f"s{i},{20 + i},{21 + i},F,my model" for i in range(FEW_ROWS * 2)]
    table.write_text("id,age,predicted_age,sex,model\n" + "\n".join(rows) + "\n")
    assert main(["evaluate", str(table), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["notes"] == []


def test_bias_correction_is_refused_on_few_reference_rows_or_a_narrow_age_range(tmp_path, rng, capsys):
    """Issue 20, item 5: 2 reference subjects gave slope -4.4 and a "corrected MAE"; below the
    stated minimum the fit is refused, and the reports (terminal, metrics.json) say so instead."""
    from BrainAgeLib.bias_correction import MIN_REFERENCE_AGE_RANGE_YEARS, MIN_REFERENCE_SUBJECTS
    from BrainAgeLib.cli import main

    age, predicted, sex = biased_predictions(rng, n=60)
    few = MIN_REFERENCE_SUBJECTS - 1
    table = write_table(tmp_path / "few.csv", age, predicted, sex, ["val"] * few + ["test"] * (60 - few))
    report = evaluate_predictions(table, tmp_path / "few", plots=False)
    assert report.corrected is None and report.bias_correction is None
    note = report.reference["note"]
    assert f"{few} reference subjects" in note and f"at least {MIN_REFERENCE_SUBJECTS}" in note
    saved = json.loads((tmp_path / "few" / "metrics.json").read_text())
    assert saved["corrected"] is None and saved["bias_correction"] is None and saved["reference"]["note"] == note
    assert main(["evaluate", str(table)]) == 0
    text = capsys.readouterr().out
    assert note in text
    assert not [line for line in text.splitlines() if "bias-corrected" in line and "MAE" in line]

    # enough subjects, but all within a narrower span of ages than the minimum
    narrow = rng.uniform(60.0, 60.0 + MIN_REFERENCE_AGE_RANGE_YEARS - 1.0, 100)
    table = write_table(tmp_path / "narrow.csv", narrow, 0.7 * narrow + 16.5, ["F"] * 100,
                        ["val"] * 50 + ["test"] * 50)
    report = evaluate_predictions(table)
    assert report.corrected is None and "span" in report.reference["note"]
    assert f"{MIN_REFERENCE_AGE_RANGE_YEARS:g} years" in report.reference["note"]

    # at the minimum (that many subjects, ages 20-90) the correction is fitted
    enough = ["val"] * MIN_REFERENCE_SUBJECTS + ["test"] * (60 - MIN_REFERENCE_SUBJECTS)
    report = evaluate_predictions(write_table(tmp_path / "enough.csv", age, predicted, sex, enough))
    assert report.corrected is not None and report.bias_correction["n_reference"] == MIN_REFERENCE_SUBJECTS
    assert "note" not in report.reference
