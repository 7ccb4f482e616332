"""Brain extraction and quality control on real heads (issue: real scans).

The 8 IXI heads of ../shared/data/real-t1 (2 mm, with neck and face; skipped with the reason
when ../shared is not beside the checkout) and Colin27 from mricron-data. These heads are a
development check: nothing is trained or tuned on them.
"""
from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from BrainAgeLib.io import load_volume, save_volume
from BrainAgeLib.inference import predict, predict_prepared
from BrainAgeLib.preprocess.pipeline import prepare, reorient_to_ras
from BrainAgeLib.presets import PRESETS
from BrainAgeLib.preprocess.qc import ADULT_BRAIN_ML, MIN_T1_CONTRAST, age_flags, assess
from BrainAgeLib.preprocess.template_strip import otsu_threshold
from BrainAgeLib.volume import Volume

# The demo preset's preprocessing (fast N4 grid); the extraction is the same for every preset.
DEEPBET = PRESETS["demo"].preprocess
TEMPLATE = dataclasses.replace(DEEPBET, skull_strip="template")
_PREPARED: dict = {}


def prepared_head(head: dict, config=DEEPBET):
    key = (head["id"], config.skull_strip)
    if key not in _PREPARED:
        _PREPARED[key] = prepare(load_volume(head["path"]), config)
    return _PREPARED[key]


def head_top_gap_mm(volume: Volume, mask: np.ndarray) -> float:
    """mm between the top of the brain mask and the top of the head above the brain's centre."""
    ras = reorient_to_ras(volume)
    mask = nib.orientations.apply_orientation(
        mask, nib.orientations.ornt_transform(nib.orientations.io_orientation(volume.affine),
                                              nib.orientations.axcodes2ornt("RAS")))
    head = ras.array > otsu_threshold(ras.array[::2, ::2, ::2].ravel())
    ci, cj = (int(x) for x in np.argwhere(mask).mean(axis=0)[:2])
    column = head[ci - 5:ci + 5, cj - 5:cj + 5, :].any(axis=(0, 1))
    return float((np.nonzero(column)[0].max() - np.nonzero(mask.any(axis=(0, 1)))[0].max()) * ras.spacing[2])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b)))


def test_every_real_head_gets_a_whole_plausible_brain_mask(real_heads):
    for head in real_heads:
        prepared = prepared_head(head)
        volume = load_volume(head["path"])
        mask = prepared.input_brain_mask
        assert mask.shape == volume.shape and mask.dtype == bool, head["id"]
        qc = prepared.qc
        assert ADULT_BRAIN_ML[0] <= qc.brain_volume_ml <= ADULT_BRAIN_ML[1], (head["id"], qc.brain_volume_ml)
        assert qc.flags == [], (head["id"], qc.flags)
        assert qc.t1_contrast >= MIN_T1_CONTRAST and qc.skull_strip == "deepbet"
        # the top of the brain is inside the mask: above the mask lie only skull and scalp (5-20 mm)
        gap = head_top_gap_mm(volume, mask)
        assert 3.0 <= gap <= 20.0, (head["id"], gap)


def test_the_template_method_keeping_the_skull_is_flagged(real_heads):
    head = next(h for h in real_heads if h["id"].startswith("IXI357"))
    prepared = prepared_head(head, TEMPLATE)
    assert prepared.qc.brain_volume_ml > ADULT_BRAIN_ML[1]
    assert any("above the adult range" in flag for flag in prepared.qc.flags), prepared.qc.flags


def test_colin27_deepbet_mask_holds_the_extracted_brain(colin27, colin27_brain_mask):
    """deepbet's mask is intracranial (the brain with the CSF around it); ch2better is brain
    tissue only. So ch2better's brain must lie inside the mask, and the mask must match
    ch2better's outline (sulci closed) with Dice >= 0.95 (against ch2better itself: 0.91)."""
    prepared = prepare(colin27, DEEPBET)
    mask = prepared.input_brain_mask
    truth = colin27_brain_mask
    assert np.count_nonzero(truth & mask) / np.count_nonzero(truth) >= 0.99
    outline = sitk.GetArrayFromImage(sitk.BinaryFillhole(sitk.BinaryMorphologicalClosing(
        sitk.GetImageFromArray(truth.astype(np.uint8)), [8, 8, 8], sitk.sitkBall))).astype(bool)
    assert dice(mask, outline) >= 0.95
    assert prepared.qc.flags == []


def test_the_contrast_check_flags_an_inverted_real_head(real_heads):
    """The head's intensities inverted (background kept): through the whole pipeline, and with
    the normal head's own mask, the contrast check flags it; the normal head passes."""
    head = real_heads[0]
    volume = load_volume(head["path"])
    array = volume.array
    background = otsu_threshold(array[::2, ::2, ::2].ravel())
    inverted = volume.with_array(np.where(array > background, array.max() - array + background, array))
    prepared = prepare(inverted, DEEPBET)
    assert prepared.qc.t1_contrast < MIN_T1_CONTRAST
    assert any("or the image is not T1-weighted" in flag for flag in prepared.qc.flags)
    # the check alone, on the normal head's mask
    ras_mask = reorient_to_ras(Volume(prepared_head(head).input_brain_mask.astype(np.uint8), volume.affine)).array > 0
    ras = reorient_to_ras(volume)
    normal = assess(ras.array, ras_mask, ras.spacing, "deepbet")
    flagged = assess(ras.array.max() - ras.array, ras_mask, ras.spacing, "deepbet")
    assert normal.flags == [] and normal.t1_contrast > MIN_T1_CONTRAST and normal.ok
    assert flagged.t1_contrast < MIN_T1_CONTRAST and not flagged.ok


def test_the_border_check_flags_a_head_cropped_through_the_brain(real_heads):
    head = real_heads[0]
    volume = reorient_to_ras(load_volume(head["path"]))
    mask = prepared_head(head).input_brain_mask
    top = int(np.nonzero(reorient_to_ras(Volume(mask.astype(np.uint8), load_volume(head["path"]).affine))
                         .array.any(axis=(0, 1)))[0].max())
    cropped = Volume(volume.array[:, :, : top - 15], volume.affine)   # 30 mm off the top of the brain
    qc = prepare(cropped, DEEPBET).qc
    assert "superior" in qc.border_sides
    assert any("touches the superior edge" in flag for flag in qc.flags)


def test_an_age_outside_the_training_range_is_flagged():
    metadata = {"training_data": {"age_range": [20, 90]}}
    assert age_flags(metadata, 3.0) and "outside the training ages 20-90" in age_flags(metadata, 3.0)[0]
    assert age_flags(metadata, 45.0) == [] and age_flags(metadata, None) == []


def test_a_prediction_at_age_3_carries_the_flag(real_heads):
    from BrainAgeLib.model.checkpoint import load_model

    model = load_model("demo")
    result = predict_prepared(model, prepared_head(real_heads[1]), "F", 3.0, device="cpu")
    assert any("outside the training ages" in flag for flag in result.qc.flags)
    assert result.to_dict()["qc"]["flags"] == result.qc.flags
    assert "QC flag:" in result.summary()
    # the demo model's phantoms went through the template method; deepbet here, and it says so
    assert any("skull-stripped with 'template'; this input with 'deepbet'" in w for w in result.warnings)


def test_one_head_in_three_orientations_and_formats_gives_the_same_mask(real_heads, tmp_path):
    head = real_heads[2]
    original = load_volume(head["path"])
    reference = prepared_head(head).input_brain_mask
    for codes, suffix in (("LPS", ".nrrd"), ("PIR", ".mha"), ("ASL", ".nii")):
        path = tmp_path / f"head_{codes}{suffix}"
        save_volume(original.reoriented(codes), path)
        copy = load_volume(path)
        mask = prepare(copy, DEEPBET).input_brain_mask
        # back onto the original grid, voxel by voxel through world coordinates
        voxel_map = np.linalg.inv(copy.affine) @ original.affine
        resampled = ndimage.affine_transform(mask.astype(np.float32), voxel_map[:3, :3], offset=voxel_map[:3, 3],
                                             output_shape=original.shape, order=0) > 0.5
        assert dice(resampled, reference) >= 0.98, codes


def test_attention_is_zero_outside_an_already_stripped_brain(colin27_bet_path):
    """ch2bet is skull-stripped (0 outside the brain): 146.6 ml of attention lay on that zero
    background, spread by the map's interpolation; the map is 0 outside the brain mask."""
    from BrainAgeLib.model.checkpoint import load_model

    volume = load_volume(colin27_bet_path)
    result = predict(load_model("demo"), volume, "M", explain=True, device="cpu", use_cache=False)
    background = volume.array == 0
    outside_ml = np.count_nonzero(result.attention.array[background] > 0) * np.prod(volume.spacing) / 1000
    assert outside_ml == 0.0
    assert np.count_nonzero(result.attention.array > 0) * np.prod(volume.spacing) / 1000 > 800
    assert result.qc.skull_strip == "already stripped"


def test_batch_and_the_command_line_give_the_same_age_and_qc(real_heads, tmp_path):
    """A batch worker prepares on one thread, the command line on all cores: the same age, to
    the last digit predictions.csv keeps, and the same QC; --qc draws each subject's mask."""
    import json
    import subprocess
    import sys

    from BrainAgeLib.cohort.batch import run_batch
    from BrainAgeLib.cohort.predictions_csv import FILENAME, read_predictions

    head = real_heads[4]
    cohort = tmp_path / "cohort.csv"
    cohort.write_text(f"id,path,age,sex\nsubj,{head['path']},{head['age']},{head['sex']}\n")
    summary = run_batch(cohort, tmp_path / "batch", model="demo", device="cpu", workers=1, qc=True)
    assert summary.n_done == 1
    row = read_predictions(tmp_path / "batch" / FILENAME)[0]
    assert (tmp_path / "batch" / "qc" / "subj_qc.png").stat().st_size > 10_000
    command = subprocess.run([sys.executable, "-m", "BrainAgeLib", "predict", str(head["path"]), "--sex", head["sex"],
                              "--age", str(head["age"]), "--device", "cpu", "--json", "--out", str(tmp_path / "one")],
                             capture_output=True, text=True, check=True)
    report = json.loads(command.stdout)
    assert f"{report['predicted_age']:.4f}" == f"{row.predicted_age:.4f}"
    assert row.brain_volume_ml == pytest.approx(report["qc"]["brain_volume_ml"], abs=0.05)
    assert row.qc_flags == report["qc"]["flags"] == []
