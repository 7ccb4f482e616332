"""Cohort attention maps: subject maps carried into template space and averaged by age decade.

Each synthetic subject has its own grid (orientation, spacing, field of view) and its own
input -> template transform; its attention map is a blob placed where a known template-space
point lands in that subject. Averaged in template space, the blobs must come back to that point.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from BrainAgeLib.cli import main
from BrainAgeLib.explain.cohort_maps import (
    ExplainedSubject,
    attention_in_template_space,
    cohort_attention_maps,
    read_batch_explanations,
    write_cohort_maps,
)
from BrainAgeLib.errors import CohortError
from BrainAgeLib.explain.outputs import write_sidecar
from BrainAgeLib.io import load_volume, save_volume
from BrainAgeLib.result import Result
from BrainAgeLib.volume import Volume

# A 4 mm template grid covering MNI space, RAS-oriented.
TEMPLATE = Volume(np.zeros((45, 54, 45), np.float32),
                  np.array([[4, 0, 0, -90], [0, 4, 0, -126], [0, 0, 4, -72], [0, 0, 0, 1]], float))
YOUNG_SPOT = np.array([30.0, -20.0, 10.0])    # template RAS mm where young subjects' maps peak
OLD_SPOT = np.array([-24.0, 30.0, -6.0])      # ... and older subjects'


def rigid(angle_deg: float, axis: int, shift) -> np.ndarray:
    """4x4 rotation about one RAS axis followed by a shift (mm)."""
    a = np.deg2rad(angle_deg)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    m = np.eye(4)
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    m[:3, 3] = shift
    return m


def subject_map(spot_template: np.ndarray, input_to_template: np.ndarray, orientation: str,
                spacing: float) -> Volume:
    """A subject grid (LPS/PIR/... at ``spacing`` mm) with a Gaussian blob (sigma 8 mm) at the
    point that ``input_to_template`` sends to ``spot_template``."""
    shape = (48, 56, 44)
    ras = Volume(np.zeros(shape, np.float32),
                 np.diag([spacing, spacing, spacing, 1.0]) @ np.array(
                     [[1, 0, 0, -shape[0] / 2], [0, 1, 0, -shape[1] / 2], [0, 0, 1, -shape[2] / 2], [0, 0, 0, 1]]))
    grid = ras.reoriented(orientation)
    spot_input = (np.linalg.inv(input_to_template) @ np.append(spot_template, 1.0))[:3]
    world = grid.voxel_to_world(np.stack(np.indices(grid.shape), axis=-1).astype(float))
    blob = np.exp(-np.sum((world - spot_input) ** 2, axis=-1) / (2 * 8.0 ** 2))
    return grid.with_array((blob / blob.max()).astype(np.float32))


def peak_ras(volume: Volume) -> np.ndarray:
    index = np.unravel_index(int(np.argmax(volume.array)), volume.shape)
    return volume.voxel_to_world(np.array(index, float))


@pytest.fixture
def batch_folder(tmp_path):
    """What a batch run with --explain leaves: per subject a map and its JSON sidecar."""
    subjects = [  # (stem, age, spot, transform, orientation, spacing)
        ("sub-01", 23.0, YOUNG_SPOT, rigid(10, 2, [5, -8, 3]), "LPS", 3.0),
        ("sub-02", 27.5, YOUNG_SPOT, rigid(-15, 0, [-6, 4, 10]), "PIR", 3.5),
        ("sub-03", 64.0, OLD_SPOT, rigid(20, 1, [2, 2, -12]), "RAS", 3.0),
        ("sub-04", 69.9, OLD_SPOT, rigid(-8, 2, [0, -10, 0]), "ASL", 4.0),
    ]
    out = tmp_path / "batch"
    (out / "site-b").mkdir(parents=True)
    for n, (stem, age, spot, transform, orientation, spacing) in enumerate(subjects):
        folder = out if n < 2 else out / "site-b"
        attention = subject_map(spot, transform, orientation, spacing)
        save_volume(attention, folder / f"{stem}_attention.nii.gz")
        result = Result(predicted_age=age + 2, chronological_age=age, brain_age_gap=2.0, attention=attention)
        write_sidecar(result, folder / f"{stem}_attention.json", attention_file=f"{stem}_attention.nii.gz",
                      input_to_template=transform)
    return out


def test_resampling_follows_the_transform_and_the_grid_orientation():
    transform = rigid(25, 2, [12, -7, 4])
    attention = subject_map(YOUNG_SPOT, transform, "LIP", 3.0)
    mapped = attention_in_template_space(attention, transform, TEMPLATE)
    assert mapped.shape == TEMPLATE.shape and mapped.dtype == np.float32
    assert np.linalg.norm(peak_ras(TEMPLATE.with_array(mapped)) - YOUNG_SPOT) <= 4.0 * np.sqrt(3)
    # without the transform the blob lands somewhere else
    unregistered = TEMPLATE.with_array(attention_in_template_space(attention, None, TEMPLATE))
    assert np.linalg.norm(peak_ras(unregistered) - YOUNG_SPOT) > 10.0


def test_cohort_mean_and_decade_maps_land_on_the_template_anatomy(batch_folder, tmp_path):
    subjects = read_batch_explanations(batch_folder)
    assert [s.name for s in subjects] == ["sub-01", "sub-02", "sub-03", "sub-04"]
    assert subjects[2].chronological_age == 64.0 and subjects[2].input_to_template.shape == (4, 4)

    maps = cohort_attention_maps(subjects, TEMPLATE)
    assert maps.counts == {"all": 4, "20-29": 2, "60-69": 2}
    assert list(maps.by_decade) == ["20-29", "60-69"]
    young, old = maps.by_decade["20-29"], maps.by_decade["60-69"]
    voxel = 4.0 * np.sqrt(3)
    assert np.linalg.norm(peak_ras(young) - YOUNG_SPOT) <= voxel
    assert np.linalg.norm(peak_ras(old) - OLD_SPOT) <= voxel
    # both subjects of a decade agree after registration: the decade peak keeps ~full height
    assert young.array.max() > 0.85 and old.array.max() > 0.85
    # the overall mean is the count-weighted mean of the decades
    np.testing.assert_allclose(maps.mean.array, (young.array + old.array) / 2, atol=1e-6)
    young_index = np.round(young.world_to_voxel(YOUNG_SPOT)).astype(int)
    assert young.array[tuple(young_index)] > 10 * old.array[tuple(young_index)]

    paths = write_cohort_maps(maps, tmp_path)
    reloaded = load_volume(paths["mean"])
    np.testing.assert_allclose(reloaded.array, maps.mean.array, atol=1e-6)
    np.testing.assert_allclose(reloaded.affine, TEMPLATE.affine)
    assert paths["60-69"].name == "cohort_attention_60-69.nii.gz"
    summary = json.loads(paths["summary"].read_text())
    assert summary["counts"]["20-29"] == 2 and summary["subjects"][0] == "sub-01"
    assert paths["figure"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_subjects_without_age_count_only_in_the_mean(tmp_path):
    transform = np.eye(4)
    attention = subject_map(YOUNG_SPOT, transform, "RAS", 3.0)
    save_volume(attention, tmp_path / "a_attention.nii.gz")
    subjects = [ExplainedSubject("a", tmp_path / "a_attention.nii.gz", None, 50.0, transform),
                ExplainedSubject("b", tmp_path / "a_attention.nii.gz", 41.0, 50.0, transform)]
    maps = cohort_attention_maps(subjects, TEMPLATE)
    assert maps.counts == {"all": 2, "40-49": 1}


def test_missing_registration_is_an_error_unless_inputs_are_in_template_space(tmp_path):
    attention = subject_map(YOUNG_SPOT, np.eye(4), "RAS", 3.0)
    save_volume(attention, tmp_path / "s_attention.nii.gz")
    write_sidecar(Result(predicted_age=50.0, chronological_age=52.0, attention=attention),
                  tmp_path / "s_attention.json", attention_file="s_attention.nii.gz")
    subjects = read_batch_explanations(tmp_path)
    with pytest.raises(CohortError, match="s_attention.nii.gz.*no input -> template transform"):
        cohort_attention_maps(subjects, TEMPLATE)
    maps = cohort_attention_maps(subjects, TEMPLATE, assume_template_space=True)
    assert np.linalg.norm(peak_ras(maps.mean) - YOUNG_SPOT) <= 4.0 * np.sqrt(3)


def test_bad_batch_folders_name_the_problem(tmp_path):
    with pytest.raises(CohortError, match="no explanations"):
        read_batch_explanations(tmp_path)
    (tmp_path / "x_attention.json").write_text(json.dumps({"attention_file": "x_attention.nii.gz"}))
    with pytest.raises(CohortError, match="x_attention.json: its attention map x_attention.nii.gz is missing"):
        read_batch_explanations(tmp_path)
    (tmp_path / "x_attention.json").write_text("{not json")
    with pytest.raises(CohortError, match="x_attention.json: unreadable"):
        read_batch_explanations(tmp_path)


def test_cohort_maps_command(batch_folder, tmp_path, capsys):
    # the command uses the bundled MNI152 2 mm template grid
    out = tmp_path / "cohort"
    assert main(["cohort-maps", str(batch_folder), "--out", str(out), "--format", "nrrd"]) == 0
    printed = capsys.readouterr().out
    assert "averaged 4 subjects (20-29: 2, 60-69: 2)" in printed
    mean = load_volume(out / "cohort_attention_mean.nrrd")
    assert mean.spacing == pytest.approx((2.0, 2.0, 2.0))
    assert np.linalg.norm(peak_ras(load_volume(out / "cohort_attention_20-29.nrrd")) - YOUNG_SPOT) <= 2 * np.sqrt(3) + 1
    assert (out / "cohort_attention.png").exists()


def test_skull_stripped_inputs_without_stored_registration_are_registered_from_the_batch_table(tmp_path):
    """Preprocessing does not register already skull-stripped inputs, so their sidecar has no
    transform; cohort maps then register the input image that predictions.csv names."""
    from BrainAgeLib.cohort.predictions_csv import PredictionRow, write_predictions
    from BrainAgeLib.preprocess.template import load_template

    template = load_template().t1
    truth = rigid(15, 2, [10, -8, 6])                                # subject RAS -> MNI RAS
    grid = Volume(np.zeros((64, 76, 64), np.float32),
                  np.array([[2.5, 0, 0, -80], [0, 2.5, 0, -110], [0, 0, 2.5, -70], [0, 0, 0, 1]])).reoriented("LPS")
    # the MNI brain as this subject's scan: template sampled at truth(subject point)
    scan = grid.with_array(attention_in_template_space(template, np.linalg.inv(truth), grid))
    attention = subject_map(YOUNG_SPOT, truth, "RAS", 3.0)
    batch = tmp_path / "batch"
    (batch / "attention").mkdir(parents=True)
    save_volume(scan, tmp_path / "sub-09_T1w.nii.gz")
    save_volume(attention, batch / "attention" / "sub-09_attention.nii.gz")
    write_sidecar(Result(predicted_age=30.0, chronological_age=24.0, attention=attention),
                  batch / "attention" / "sub-09_attention.json", attention_file="sub-09_attention.nii.gz")
    write_predictions(batch / "predictions.csv", [PredictionRow(
        id="sub-09", path=str(tmp_path / "sub-09_T1w.nii.gz"), sex="F", chronological_age=24.0,
        predicted_age=30.0, attention_map="attention/sub-09_attention.nii.gz")])

    subjects = read_batch_explanations(batch)
    assert subjects[0].input_to_template is None
    assert subjects[0].input_path == tmp_path / "sub-09_T1w.nii.gz"
    maps = cohort_attention_maps(subjects, TEMPLATE)
    assert np.linalg.norm(peak_ras(maps.by_decade["20-29"]) - YOUNG_SPOT) <= 4.0 * np.sqrt(3) + 3.0


def test_a_sidecar_naming_its_input_file_is_enough_to_register_it(tmp_path):
    """`brainage predict --explain` leaves no predictions.csv: the sidecar names the input image."""
    from BrainAgeLib.preprocess.template import load_template

    template = load_template().t1
    truth = rigid(-12, 1, [4, 6, -5])
    grid = Volume(np.zeros((64, 76, 64), np.float32),
                  np.array([[2.5, 0, 0, -80], [0, 2.5, 0, -110], [0, 0, 2.5, -70], [0, 0, 0, 1]]))
    save_volume(grid.with_array(attention_in_template_space(template, np.linalg.inv(truth), grid)),
                tmp_path / "scan.nii.gz")
    attention = subject_map(OLD_SPOT, truth, "RAS", 3.0)
    out = tmp_path / "predict_out"
    out.mkdir()
    save_volume(attention, out / "scan_attention.nii.gz")
    write_sidecar(Result(predicted_age=70.0, chronological_age=66.0, attention=attention), out / "scan_attention.json",
                  attention_file="scan_attention.nii.gz", input_path=tmp_path / "scan.nii.gz")
    assert json.loads((out / "scan_attention.json").read_text())["input_file"] == str((tmp_path / "scan.nii.gz").resolve())
    subjects = read_batch_explanations(out)
    assert subjects[0].input_path == (tmp_path / "scan.nii.gz").resolve()
    maps = cohort_attention_maps(subjects, TEMPLATE)
    assert np.linalg.norm(peak_ras(maps.mean) - OLD_SPOT) <= 4.0 * np.sqrt(3) + 3.0


def test_maps_kept_inside_the_run_folder_and_copies_of_a_run_are_not_counted_again(batch_folder, tmp_path, capsys):
    import shutil

    out = batch_folder / "cohort"   # as README's example invites
    assert main(["cohort-maps", str(batch_folder), "--out", str(out)]) == 0
    assert (out / "cohort_maps.json").exists() and not list(out.glob("*_attention.json"))
    assert main(["cohort-maps", str(batch_folder), "--out", str(out)]) == 0   # searched again: same subjects
    assert capsys.readouterr().out.count("averaged 4 subjects") == 2
    # the same run twice (a copy): each map counted once, as long as its input file is known
    for sidecar in batch_folder.rglob("*_attention.json"):
        data = json.loads(sidecar.read_text())
        data["input_file"] = f"/data/{sidecar.name.split('_')[0]}_T1w.nii.gz"
        sidecar.write_text(json.dumps(data))
    shutil.copytree(batch_folder, tmp_path / "copy")
    subjects = read_batch_explanations([batch_folder, tmp_path / "copy"])
    assert sorted(s.name for s in subjects) == ["sub-01", "sub-02", "sub-03", "sub-04"]


def test_maps_of_different_models_are_not_averaged(batch_folder):
    for n, sidecar in enumerate(sorted(batch_folder.rglob("*_attention.json"))):
        data = json.loads(sidecar.read_text())
        data["model_name"] = "another model" if n == 0 else "BrainAge demo"
        sidecar.write_text(json.dumps(data))
    with pytest.raises(CohortError, match="come from 2 models"):
        read_batch_explanations(batch_folder)


def _sign(batch_folder, **fields):
    """Set sidecar fields of every subject of a batch folder, as the run that made them would."""
    for sidecar in batch_folder.rglob("*_attention.json"):
        data = json.loads(sidecar.read_text())
        data.update(fields)
        sidecar.write_text(json.dumps(data))


@pytest.fixture
def cohort_figures(monkeypatch):
    """The cohort figures, as handed to save_figure."""
    import BrainAgeLib.explain.outputs as explain_outputs

    figures = []
    original = explain_outputs.save_figure

    def keep(fig, path, dpi=110):
        figures.append(fig)
        return original(fig, path, dpi=dpi)

    monkeypatch.setattr(explain_outputs, "save_figure", keep)
    monkeypatch.setattr("matplotlib.pyplot.close", lambda *a, **k: None)
    return figures


def test_cohort_outputs_name_the_model_and_the_demo_model_carries_its_disclaimer(batch_folder, tmp_path,
                                                                                  cohort_figures):
    from BrainAgeLib.result import DEMO_DISCLAIMER

    digest = "3f" * 32
    result = Result(predicted_age=30.0, model_name="BrainAge demo", model_is_demo=True)
    write_sidecar(result, tmp_path / "probe.json", attention_file="x.nii.gz", model_weights_sha256=digest)
    assert json.loads((tmp_path / "probe.json").read_text())["model_weights_sha256"] == digest
    _sign(batch_folder, model_name="BrainAge demo", model_is_demo=True, model_weights_sha256=digest)

    (tmp_path / "demo").mkdir()
    paths = write_cohort_maps(cohort_attention_maps(read_batch_explanations(batch_folder), TEMPLATE), tmp_path / "demo")
    summary = json.loads(paths["summary"].read_text())
    assert summary["model"] == {"name": "BrainAge demo", "weights_sha256": digest, "is_demo": True}
    fig = cohort_figures[-1]
    texts = " ".join(t.get_text() for t in fig.texts).replace("\n", " ")
    assert DEMO_DISCLAIMER in texts
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 1
    # the bar spans the colours the maps are drawn with: 0 to the largest mean attention
    low, high = bars[0].get_ylim()
    assert low == 0 and high == pytest.approx(max(float(load_volume(p).array.max()) for key, p in paths.items()
                                                  if key not in ("summary", "figure")), rel=1e-4)

    _sign(batch_folder, model_name="my model", model_is_demo=False, model_weights_sha256="ab" * 32)
    (tmp_path / "mine").mkdir()
    paths = write_cohort_maps(cohort_attention_maps(read_batch_explanations(batch_folder), TEMPLATE), tmp_path / "mine")
    assert json.loads(paths["summary"].read_text())["model"]["name"] == "my model"
    assert DEMO_DISCLAIMER not in " ".join(t.get_text() for t in cohort_figures[-1].texts).replace("\n", " ")


def test_maps_of_one_model_name_with_different_weights_are_not_averaged(batch_folder):
    for n, sidecar in enumerate(sorted(batch_folder.rglob("*_attention.json"))):
        data = json.loads(sidecar.read_text())
        data.update(model_name="BrainAge demo", model_weights_sha256=("aa" if n else "bb") * 32)
        sidecar.write_text(json.dumps(data))
    with pytest.raises(CohortError, match="different weights.*" + "a" * 12):
        read_batch_explanations(batch_folder)


def test_maps_of_different_explanation_methods_are_not_averaged(batch_folder, tmp_path):
    sidecars = sorted(batch_folder.rglob("*_attention.json"))
    # a sidecar from before the method was recorded holds a paper map
    subjects = read_batch_explanations(batch_folder)
    assert len(subjects) > 1 and all(s.explain_method == "paper" for s in subjects)
    for n, sidecar in enumerate(sidecars):
        data = json.loads(sidecar.read_text())
        data["explain_method"] = "relevance" if n == 0 else "paper"
        sidecar.write_text(json.dumps(data))
    with pytest.raises(CohortError, match=rf"different methods \(1 paper, {len(sidecars) - 1} relevance|"
                                          rf"different methods \({len(sidecars) - 1} paper, 1 relevance"):
        read_batch_explanations(batch_folder)
    # the averaging itself refuses too, for subjects gathered some other way
    subjects[1].explain_method = "relevance"
    with pytest.raises(CohortError, match="one explanation method at a time"):
        cohort_attention_maps(subjects, TEMPLATE, assume_template_space=True)

    _sign(batch_folder, explain_method="relevance")
    (tmp_path / "relevance").mkdir()
    maps = cohort_attention_maps(read_batch_explanations(batch_folder), TEMPLATE)
    assert maps.explain_method == "relevance"
    paths = write_cohort_maps(maps, tmp_path / "relevance")
    assert json.loads(paths["summary"].read_text())["explain_method"] == "relevance"
