"""The bundled demo model's prediction intervals on phantoms it never saw.

Its card's intervals come from its 96 validation phantoms (``scripts/demo_calibration.py``, the
weights untouched); ``Resources/Models/brainage_demo_interval_check.json`` records the ages the
shipped model predicts for its 96 held-out test phantoms (``scripts/interval_coverage.py
--record``). Here: the 90% intervals hold 90% +- 6% of those 96 chronological ages, one of the
phantoms regenerated from its seed still gets the recorded prediction (so the record describes
the shipped model), and the weights are the ones trained.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from BrainAgeLib.inference import predict
from BrainAgeLib.model.checkpoint import load_model, read_metadata
from BrainAgeLib.resources import resource_path

REPO = Path(__file__).resolve().parents[1]
MODEL = resource_path("Models", "brainage_demo.safetensors")
RECORD = resource_path("Models", "brainage_demo_interval_check.json")
#: the weights digest of the demo build (commit 89bc4d6), before it got its intervals
TRAINED_WEIGHTS = "e91d4b2d2d22e26b1f1633aec52fb8b774da40b6ad94570c825bd2c39824b1bb"


def test_demo_intervals_cover_90_percent_of_96_held_out_phantoms():
    card = read_metadata(MODEL)
    from BrainAgeLib.conformal import ConformalCalibration

    calibration = ConformalCalibration.from_dict(card["calibration"])
    assert calibration.level == 0.9 and calibration.n_reference == 96
    phantoms = json.loads(RECORD.read_text(encoding="utf-8"))["phantoms"]
    assert len(phantoms) == 96
    held_out = {row["id"] for row in json.loads(resource_path("Models", "brainage_demo_heldout.json").read_text())}
    assert {row["id"] for row in phantoms} == held_out          # the test split: neither trained nor calibrated on
    intervals = [calibration.interval(row["predicted_age"]) for row in phantoms]
    inside = [lo <= row["age"] <= hi for row, (lo, hi) in zip(phantoms, intervals)]
    assert np.mean(inside) == pytest.approx(0.90, abs=0.06)


def test_the_record_is_what_the_shipped_model_predicts(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    from demo_split_phantoms import split_specs
    from BrainAgeLib.synth.phantoms import write_phantom

    phantoms = {row["id"]: row for row in json.loads(RECORD.read_text(encoding="utf-8"))["phantoms"]}
    spec = split_specs("test")[48]
    written = write_phantom(spec, tmp_path)
    model = load_model("demo")
    result = predict(model, tmp_path / written["path"], spec.sex, spec.age, device="cpu", use_cache=False)
    assert result.predicted_age == pytest.approx(phantoms[spec.id]["predicted_age"], abs=0.05)
    low, high = result.interval
    assert low < result.predicted_age < high and result.interval_level == 0.9
    assert result.gap_z == pytest.approx(result.corrected_brain_age_gap / model.calibration.gap_sd)


def test_calibrating_the_demo_left_its_weights_as_trained():
    from safetensors import safe_open

    from BrainAgeLib.digests import weights_digest

    with safe_open(str(MODEL), framework="pt") as handle:
        digest = weights_digest({key: handle.get_tensor(key) for key in handle.keys()})
    assert digest == read_metadata(MODEL)["weights_sha256"] == TRAINED_WEIGHTS
