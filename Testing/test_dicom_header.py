"""A DICOM series' PatientAge and PatientSex fill in the age and sex the user did not give, in
`brainage predict` and `brainage batch` alike: said in the result's warnings, never overriding
what was given."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from BrainAgeLib.cli import main
from BrainAgeLib.cohort.predictions_csv import FILENAME, read_predictions

from cohort_heads import write_cohort_csv
from test_io import write_dicom_series

HEADER_AGE = 52  # years, written as PatientAge "052Y"
HEADER_SEX = "M"


@pytest.fixture(scope="module")
def dicom_head(tmp_path_factory) -> Path:
    """A 3 mm phantom head as a DICOM series whose header says PatientAge 052Y, PatientSex M."""
    from BrainAgeLib.io import save_volume
    from BrainAgeLib.synth.phantoms import make_phantom

    folder = tmp_path_factory.mktemp("dicom")
    phantom = make_phantom(float(HEADER_AGE), HEADER_SEX, seed=1, spacing=3.0, skull=False, with_tissue=False)
    image = sitk.ReadImage(str(save_volume(phantom.volume, folder / "head.nrrd")))  # LPS, as DICOM stores it
    array = sitk.GetArrayFromImage(image)
    write_dicom_series(folder / "series", np.round(1000 * array / array.max()), image.GetSpacing(), image.GetOrigin(),
                       image.GetDirection(),
                       extra_tags={"0010|1010": f"{HEADER_AGE:03d}Y", "0010|0040": HEADER_SEX})
    return folder / "series"


def predict_json(capsys, source: Path, out: Path, *options: str) -> dict:
    assert main(["predict", str(source), "--preset", "tiny", "--json", "--out", str(out), *options]) == 0
    return json.loads(capsys.readouterr().out)


def header_warnings(warnings) -> list:
    return [w for w in warnings if "DICOM header" in w]


def test_predict_takes_age_and_sex_from_the_dicom_header_and_says_so(dicom_head, tmp_path, capsys):
    before = sorted((p.name, p.stat().st_mtime_ns) for p in dicom_head.iterdir())
    report = predict_json(capsys, dicom_head, tmp_path / "a")
    assert report["chronological_age"] == pytest.approx(HEADER_AGE)
    assert report["sex"] == HEADER_SEX
    assert report["brain_age_gap"] == pytest.approx(report["predicted_age"] - HEADER_AGE, abs=1e-6)
    notes = header_warnings(report["warnings"])
    assert any(f"age {HEADER_AGE} years from the DICOM header (PatientAge {HEADER_AGE:03d}Y)" in w for w in notes), notes
    assert any(f"sex {HEADER_SEX} from the DICOM header" in w for w in notes), notes
    # the same prediction as giving those values by hand: the header's values reached the model
    given = predict_json(capsys, dicom_head, tmp_path / "b", "--age", str(HEADER_AGE), "--sex", HEADER_SEX)
    assert given["predicted_age"] == report["predicted_age"]
    assert header_warnings(given["warnings"]) == []
    assert sorted((p.name, p.stat().st_mtime_ns) for p in dicom_head.iterdir()) == before


def test_predict_never_overrides_an_age_or_sex_the_user_gave(dicom_head, tmp_path, capsys):
    report = predict_json(capsys, dicom_head, tmp_path / "a", "--age", "40", "--sex", "F")
    assert (report["chronological_age"], report["sex"]) == (40.0, "F")
    assert header_warnings(report["warnings"]) == []
    only_age = predict_json(capsys, dicom_head, tmp_path / "b", "--age", "40", "--sex", "unknown")
    assert (only_age["chronological_age"], only_age["sex"]) == (40.0, "unknown")
    assert header_warnings(only_age["warnings"]) == []
    only_sex = predict_json(capsys, dicom_head, tmp_path / "c", "--sex", "F")
    assert (only_sex["chronological_age"], only_sex["sex"]) == (pytest.approx(HEADER_AGE), "F")
    assert [w.split(" ")[0] for w in header_warnings(only_sex["warnings"])] == ["age"]


def test_batch_fills_in_a_rows_missing_age_and_sex_from_the_dicom_header(dicom_head, tmp_path, capsys):
    cohort = write_cohort_csv(tmp_path / "cohort.csv", [("bare", dicom_head, None, ""), ("given", dicom_head, 40.0, "F")])
    out = tmp_path / "run"
    assert main(["batch", str(cohort), "--preset", "tiny", "--workers", "0", "--no-plots", "--out", str(out)]) == 0
    capsys.readouterr()
    rows = {row.id: row for row in read_predictions(out / FILENAME)}
    bare, given = rows["bare"], rows["given"]
    assert bare.ok and given.ok
    assert (bare.chronological_age, bare.sex) == (pytest.approx(HEADER_AGE), HEADER_SEX)
    assert bare.brain_age_gap == pytest.approx(bare.predicted_age - HEADER_AGE, abs=1e-3)
    assert len(header_warnings(bare.warnings)) == 2, bare.warnings
    assert (given.chronological_age, given.sex) == (40.0, "F")
    assert header_warnings(given.warnings) == []
