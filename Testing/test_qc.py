"""Quality control (qc.py), the hot-voxel guard and reproducible preprocessing."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from BrainAgeLib.io import load_volume, save_volume
from BrainAgeLib.preprocess.pipeline import (
    HOT_VOXEL_FACTOR, prepare, reorient_to_ras, suppress_hot_voxels,
)
from BrainAgeLib.preprocess.qc import (
    ADULT_BRAIN_ML, CHILD_BRAIN_ML, MAX_BORDER_MM2, border_sides, volume_flags, voxel_flags,
)
from BrainAgeLib.preprocess.registration import register_to_template
from BrainAgeLib.synth.phantoms import make_phantom
from BrainAgeLib.volume import Volume


def test_voxel_size_flags():
    assert voxel_flags((1.0, 1.0, 1.0)) == [] and voxel_flags((1.2, 1.2, 3.0)) == []
    assert "thicker than 3 mm" in voxel_flags((1.0, 1.0, 4.0))[0]
    assert "times longer" in voxel_flags((0.5, 0.5, 2.0))[0]


def test_brain_volume_flags_name_the_measurement_and_the_range():
    low, high = ADULT_BRAIN_ML
    assert volume_flags((low + high) / 2) == []
    below, above, child = volume_flags(low - 50), volume_flags(high + 100), volume_flags(CHILD_BRAIN_ML - 300)
    assert "below the adult range" in below[0] and f"{low:.0f}-{high:.0f} ml" in below[0]
    assert "above the adult range" in above[0] and "skull" in above[0]
    assert "child's or an infant's" in child[0]


def test_border_sides_say_which_edge_the_brain_touches():
    mask = np.zeros((40, 40, 40), dtype=bool)
    mask[10:30, 10:30, 5:40] = True               # reaches the superior face: 400 mm^2
    assert border_sides(mask, (1.0, 1.0, 1.0)) == ("superior",)
    mask[:] = False
    mask[18:22, 18:22, 0:20] = True                # a brainstem-sized 16 mm^2 at the inferior face
    assert border_sides(mask, (1.0, 1.0, 1.0)) == ()
    mask[0, 10:20, 10:20] = True                  # 100 mm^2 on the left face
    assert 100 > MAX_BORDER_MM2 and border_sides(mask, (1.0, 1.0, 1.0)) == ("left",)


@pytest.fixture(scope="module")
def stripped_phantom() -> Volume:
    return make_phantom(55, "F", 7, spacing=2.0, skull=False, with_tissue=False).volume


def test_one_hot_voxel_no_longer_kills_a_scan(stripped_phantom):
    """A single voxel at 65,527 in a brain peaking near 1,000 used to leave nothing above 0.1 of
    the range: 'the brain's bounding box (1, 1, 1) is too thin'."""
    hot = stripped_phantom.array.copy()
    centre = tuple(int(n) // 2 for n in hot.shape)
    hot[centre] = 65527.0
    spiked = stripped_phantom.with_array(hot)
    clean_prepared = prepare(stripped_phantom, "demo")
    prepared = prepare(spiked, "demo")
    assert prepared.slices.shape == clean_prepared.slices.shape
    # one voxel replaced by its neighbours' median: the slices hardly differ anywhere
    assert np.abs(prepared.slices - clean_prepared.slices).mean() < 2e-3
    assert any("isolated voxel" in w for w in prepared.warnings)
    assert stripped_phantom.array[centre] != 65527.0   # the input is not modified


def test_one_dark_spike_no_longer_sets_the_minimum(stripped_phantom):
    """A voxel at -65,527 made the whole field of view 'brain' of a stripped input (its
    foreground is everything above the minimum) and squashed every slice's scaling."""
    spiked = stripped_phantom.array.copy()
    spiked[tuple(int(n) // 2 for n in spiked.shape)] = -65527.0
    clean, prepared = prepare(stripped_phantom, "demo"), prepare(stripped_phantom.with_array(spiked), "demo")
    assert (prepared.crop_start, prepared.crop_shape) == (clean.crop_start, clean.crop_shape)
    assert np.abs(prepared.slices - clean.slices).mean() < 2e-3
    assert any("isolated voxel" in w for w in prepared.warnings)


def test_ordinary_scans_have_no_hot_voxel_and_pass_unchanged(real_heads, stripped_phantom):
    for volume in [load_volume(h["path"]) for h in real_heads] + [stripped_phantom]:
        ras = reorient_to_ras(volume)
        cleaned, count, threshold = suppress_hot_voxels(ras)
        assert count == 0 and cleaned is ras
        assert np.abs(ras.array).max() < threshold / HOT_VOXEL_FACTOR * 2   # a margin of 1.5x below the guard


def test_registration_gives_the_same_transform_every_run(real_heads):
    volume = reorient_to_ras(load_volume(real_heads[0]["path"]))
    first = register_to_template(volume).input_to_template
    for _ in range(2):
        assert np.array_equal(register_to_template(volume).input_to_template, first)


def _n4_in_a_process(path: str, threads: int, one_core: bool = False) -> list:
    code = (
        "import os, sys, json, numpy as np, SimpleITK as sitk\n"
        + ("os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n" if one_core else "")
        + f"sitk.ProcessObject.SetGlobalDefaultNumberOfThreads({threads})\n"
        "from BrainAgeLib.io import load_volume\n"
        "from BrainAgeLib.preprocess.pipeline import n4_bias_correction, reorient_to_ras\n"
        f"v = reorient_to_ras(load_volume({path!r}))\n"
        "out = n4_bias_correction(v, 2, mask=v.array > np.percentile(v.array, 60)).array\n"
        "print(json.dumps([float(out.sum(dtype=np.float64)), float(out.max()), float(out[40:50, 50:60, 50:60].sum())]))\n"
    )
    return json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                     check=True).stdout)


def test_n4_gives_the_same_field_whatever_the_thread_count(real_heads):
    """Batch workers run ITK on one thread (and may share a core), the command line on all cores:
    the same field, so the same age, both ways."""
    path = str(real_heads[0]["path"])
    assert _n4_in_a_process(path, 1, one_core=True) == _n4_in_a_process(path, 2)


def test_the_same_input_twice_gives_the_same_slices(real_heads):
    volume = load_volume(real_heads[3]["path"])
    first = prepare(volume, "demo")
    second = prepare(volume, "demo")
    assert np.array_equal(first.slices, second.slices)
    assert np.array_equal(first.input_brain_mask, second.input_brain_mask)


def test_strict_qc_exits_4_and_qc_writes_the_picture(tmp_path):
    phantom = make_phantom(50, "M", 3, spacing=1.5, skull=False, with_tissue=False).volume
    thick = Volume(phantom.array[:, :, ::3], phantom.affine @ np.diag([1.0, 1.0, 3.0, 1.0]))  # 4.5 mm slices
    path = save_volume(thick, tmp_path / "thick.nii.gz")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "BrainAgeLib", "predict", str(path), "--preset", "tiny", "--device", "cpu",
               "--out", str(out), "--qc", "--json"]
    plain = subprocess.run(command, capture_output=True, text=True)
    assert plain.returncode == 0, plain.stderr
    report = json.loads(plain.stdout)
    assert any("thicker than 3 mm" in flag for flag in report["qc"]["flags"])
    assert report["qc"]["brain_volume_ml"] > 0 and (out / "thick_qc.png").stat().st_size > 10_000
    strict = subprocess.run(command + ["--strict-qc"], capture_output=True, text=True)
    assert strict.returncode == 4 and "QC flag" in strict.stderr and "thick.nii.gz" in strict.stderr
    assert (out / "thick_brainage.json").exists()   # the results are still written


def test_old_cards_predict_with_deepbet_and_say_their_training_differed():
    from BrainAgeLib.inference import extractor_warnings, training_extractor
    from BrainAgeLib.presets import PreprocessConfig
    from BrainAgeLib.preprocess.qc import QualityControl

    assert PreprocessConfig.from_dict({"skull_strip": "auto"}).skull_strip == "deepbet"
    old_card = {"preprocessing": {"skull_strip": "auto"}}
    assert training_extractor(old_card) == "template"
    assert training_extractor({"training_data": {"skull_strip": "deepbet"}, **old_card}) == "deepbet"
    warned = extractor_warnings(old_card, QualityControl(skull_strip="deepbet"))
    assert warned and "'template'" in warned[0] and "'deepbet'" in warned[0]
    assert extractor_warnings(old_card, QualityControl(skull_strip="already stripped")) == []
    with pytest.raises(ValueError, match="skull_strip must be one of deepbet, template, none"):
        PreprocessConfig(skull_strip="bet")
