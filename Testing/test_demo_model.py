"""The bundled demo model: loads by name, says what it is, meets its targets, and `brainage demo` runs.

These tests use only files shipped in the repository (the model, its card and the sample
head), nothing downloaded or generated.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from BrainAgeLib.io import load_volume
from BrainAgeLib.inference import predict_prepared
from BrainAgeLib.preprocess.pipeline import prepare
from BrainAgeLib.resources import resource_path

MODEL = resource_path("Models", "brainage_demo.safetensors")
CARD = resource_path("Models", "brainage_demo.md")
#: Issue 4's targets on held-out phantoms.
TARGET_MAE, TARGET_R = 3.0, 0.95


@pytest.fixture(scope="module")
def demo_model():
    from BrainAgeLib.model.checkpoint import load_model

    return load_model("demo")


def test_demo_model_is_small_and_documented():
    assert MODEL.exists(), "the demo model is built by scripts/train_demo_model.sh"
    assert MODEL.stat().st_size <= 25 * 1024 * 1024
    card = CARD.read_text()
    for words in ("synthetic phantoms", "NOT for clinical use", "held-out phantoms", "Intended use",
                  "scripts/train_demo_model.sh"):
        assert words in card


def test_demo_model_metadata_says_synthetic_demo_and_beats_the_baselines(demo_model):
    meta = demo_model.metadata
    assert meta["is_demo"] is True and meta["trained"] is True
    assert "NOT for clinical" in meta["intended_use"]
    assert meta["preset"] == "demo" and demo_model.config.name == "demo"
    data = meta["training_data"]
    assert data["n_subjects"] >= 600 and data["n_test"] >= 60
    assert 20 <= data["age_range"][0] < data["age_range"][1] <= 90
    test = meta["metrics"]["test"]
    assert test["n"] == data["n_test"]
    baselines = meta["metrics"]["baselines"]
    # on unseen phantoms the model beats predicting the mean age and a ridge on image-derived volumes
    assert test["mae"] < baselines["ridge_mae"] < baselines["mean_age_mae"]
    assert test["pearson_r"] > 0.9
    # the card quotes the same numbers as the checkpoint
    card = CARD.read_text()
    assert f"{test['mae']:.2f}" in card and f"{baselines['ridge_mae']:.2f}" in card
    correction = demo_model.bias_correction
    assert correction is not None and correction.n_reference == data["n_val"]


HELDOUT = resource_path("Models", "brainage_demo_heldout.json")


def test_demo_model_meets_the_issue_targets(demo_model):
    """The targets on the held-out phantoms, computed here from the ages the build predicted
    (brainage_demo_heldout.json), which must also be what the checkpoint and the card report."""
    heldout = json.loads(HELDOUT.read_text())
    age = np.array([row["age"] for row in heldout])
    predicted = np.array([row["predicted_age"] for row in heldout])
    mae = float(np.mean(np.abs(predicted - age)))
    r = float(np.corrcoef(age, predicted)[0, 1])
    test = demo_model.metadata["metrics"]["test"]
    assert test["n"] == len(heldout)
    assert test["mae"] == pytest.approx(mae, abs=1e-3) and test["pearson_r"] == pytest.approx(r, abs=1e-3)
    assert f"{mae:.2f}" in CARD.read_text()
    assert mae <= TARGET_MAE and r >= TARGET_R


def test_shipped_model_reproduces_its_heldout_predictions(demo_model, tmp_path):
    """Three held-out test phantoms, regenerated from their cohort seed, through today's
    preprocessing and the shipped weights: the ages the training run predicted (and the card's
    metrics summarise) come out again, so the reported metrics describe the shipped model."""
    from BrainAgeLib.synth.phantoms import cohort_specs, write_phantom

    heldout = json.loads(HELDOUT.read_text())
    assert len(heldout) == demo_model.metadata["training_data"]["n_test"]
    first = heldout[0]
    specs = {spec.id: spec for spec in cohort_specs(first["n_phantoms"], first["cohort_seed"],
                                                     spacing=(1.5, 2.0), skull_fraction=0.5)}
    for row in (heldout[0], heldout[len(heldout) // 2], heldout[-1]):
        spec = specs[row["id"]]
        assert (spec.age, spec.sex, spec.spacing, spec.has_skull) == (
            row["age"], row["sex"], row["spacing_mm"], row["has_skull"])
        written = write_phantom(spec, tmp_path)          # the same int16 NIfTI training read
        # the brain extraction its training used (the card says so); predictions use deepbet
        assert demo_model.metadata["training_data"]["skull_strip"] == "template"
        config = dataclasses.replace(demo_model.config.preprocess, skull_strip="template")
        prepared = prepare(load_volume(tmp_path / written["path"]), config)
        result = predict_prepared(demo_model, prepared, spec.sex, spec.age, device="cpu")
        assert result.predicted_age == pytest.approx(row["predicted_age"], abs=0.05), row["id"]


def test_demo_command_predicts_the_bundled_sample_head(capsys):
    from BrainAgeLib.cli import main
    from BrainAgeLib.cli.demo import SAMPLE_AGE

    assert main(["demo", "--device", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model_is_demo"] is True
    assert "synthetic phantoms" in report["disclaimer"] and "NOT for clinical use" in report["disclaimer"]
    assert report["chronological_age"] == pytest.approx(SAMPLE_AGE)
    assert abs(report["predicted_age"] - SAMPLE_AGE) < 10.0  # an unseen head, well within the age range
    assert report["brain_age_gap"] == pytest.approx(report["predicted_age"] - SAMPLE_AGE)
    assert np.isfinite(report["corrected_brain_age_gap"])

    assert main(["demo", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "Predicted brain age" in text and "brain-age gap" in text
    assert "synthetic phantoms" in text and "NOT for clinical use" in text


def test_demo_sex_accepts_what_predict_accepts(capsys):
    from BrainAgeLib.cli import main

    assert main(["demo", "--device", "cpu", "--json", "--sex", "male", "--age", "45"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sex"] == "M" and report["sex_was_unknown"] is False
    assert report["chronological_age"] == pytest.approx(45.0)
    assert main(["demo", "--device", "cpu", "--json", "--sex", "Unknown", "--age", "45"]) == 0
    unknown = json.loads(capsys.readouterr().out)
    assert unknown["sex"] == "unknown" and unknown["sex_was_unknown"] is True
    assert main(["demo", "--device", "cpu", "--sex", "X"]) == 2
    assert "sex must be F, M" in capsys.readouterr().err
