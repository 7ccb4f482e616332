"""The numpy side of the Slicer module: KJI arrays <-> Volume, colour rows, result text (with the
quality control), which labelmap is shown, input checks, first-run requirements."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from BrainAgeLib import Volume
from BrainAgeLib.inference import predict
from BrainAgeLib.explain.labelmap import attention_colors
from BrainAgeLib.preprocess.qc import ADULT_BRAIN_ML, QualityControl
from BrainAgeLib.result import Result
from BrainAgeLib.slicer_bridge import (
    PIP_REQUIREMENTS,
    QC_FLAG_COLOR,
    SLICER_BUNDLED,
    QC_NO_FLAGS,
    at_least,
    check_inputs,
    checked_ijk_to_ras,
    environment_problems,
    module_available,
    color_table_rows,
    installed_version,
    kji_from_volume,
    label_layer_node,
    missing_requirements,
    model_download_path,
    qc_html,
    result_text,
    same_grid,
    torch_missing,
    volume_from_kji,
)

REPO = Path(__file__).resolve().parents[1]


def oblique_flipped_ijk_to_ras():
    """Rotated 25 deg about S then 10 deg about R, spacing 1.2/0.9/3 mm, the I axis flipped."""
    a, b = np.radians(25.0), np.radians(10.0)
    about_s = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    about_r = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    matrix = np.eye(4)
    matrix[:3, :3] = about_r @ about_s @ np.diag([-1.2, 0.9, 3.0])
    matrix[:3, 3] = [91.5, -120.25, -60.0]
    return matrix


def test_kji_array_becomes_ijk_volume_and_a_marker_keeps_its_ras_position():
    ijk_to_ras = oblique_flipped_ijk_to_ras()
    array_kji = np.random.default_rng(0).random((7, 9, 11)).astype(np.float32)  # K=7, J=9, I=11
    i, j, k = 3, 5, 2
    array_kji[k, j, i] = 1000.0  # the marker, written the way slicer.util.arrayFromVolume indexes

    volume = volume_from_kji(array_kji, ijk_to_ras)

    assert volume.shape == (11, 9, 7)
    assert np.unravel_index(np.argmax(volume.array), volume.shape) == (i, j, k)
    marker_ras = ijk_to_ras @ np.array([i, j, k, 1.0])
    np.testing.assert_allclose(volume.voxel_to_world(np.array([i, j, k])), marker_ras[:3])
    np.testing.assert_allclose(volume.spacing, (1.2, 0.9, 3.0))
    assert volume.orientation[0] in ("L", "P")  # the flipped I axis points leftwards-ish

    # The Volume is a copy: changing it leaves the node's array alone.
    volume.array[0, 0, 0] = -5.0
    assert array_kji[0, 0, 0] != -5.0


def test_round_trip_volume_kji_volume_is_exact_for_labelmaps_too():
    ijk_to_ras = oblique_flipped_ijk_to_ras()
    labels = np.random.default_rng(1).integers(0, 11, size=(6, 8, 5)).astype(np.uint8)  # [I,J,K]
    volume = Volume(labels, ijk_to_ras)

    array_kji, matrix = kji_from_volume(volume)
    assert array_kji.shape == (5, 8, 6) and array_kji.dtype == np.uint8
    assert array_kji.flags.c_contiguous
    np.testing.assert_array_equal(matrix, ijk_to_ras)
    assert array_kji[4, 7, 5] == labels[5, 7, 4]

    back = volume_from_kji(array_kji, matrix)
    np.testing.assert_array_equal(back.array, labels)
    assert back.array.dtype == np.uint8
    assert same_grid(back, volume)
    shifted = ijk_to_ras.copy()
    shifted[0, 3] += 0.5  # half a millimetre to the left
    assert not same_grid(Volume(labels, shifted), volume)
    assert not same_grid(Volume(labels[:, :, :4], ijk_to_ras), volume)


def test_kji_layout_matches_simpleitk_reading_the_same_oblique_file(tmp_path):
    """SimpleITK's GetArrayFromImage is [K,J,I] like arrayFromVolume; its geometry is LPS."""
    import nibabel as nib
    import SimpleITK as sitk

    ijk_to_ras = oblique_flipped_ijk_to_ras()
    data = np.random.default_rng(2).random((11, 9, 7)).astype(np.float32)  # [I,J,K]
    path = tmp_path / "oblique.nii.gz"
    nib.save(nib.Nifti1Image(data, ijk_to_ras), str(path))

    image = sitk.ReadImage(str(path))
    direction = np.array(image.GetDirection()).reshape(3, 3)
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = direction * np.array(image.GetSpacing())
    ijk_to_lps[:3, 3] = image.GetOrigin()
    from_sitk = volume_from_kji(sitk.GetArrayFromImage(image), np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijk_to_lps)

    np.testing.assert_array_equal(from_sitk.array, data)
    np.testing.assert_allclose(from_sitk.affine, ijk_to_ras, atol=1e-4)


def test_ijk_to_ras_must_be_a_finite_affine():
    with pytest.raises(ValueError, match="4x4"):
        checked_ijk_to_ras(np.eye(3))
    bad = np.eye(4)
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        checked_ijk_to_ras(bad)
    projective = np.eye(4)
    projective[3, 0] = 0.1
    with pytest.raises(ValueError, match="0 0 0 1"):
        checked_ijk_to_ras(projective)
    with pytest.raises(ValueError, match="3D"):
        volume_from_kji(np.zeros((4, 4)), np.eye(4))


def test_color_table_rows_are_0_to_1_and_fill_gaps_with_transparent_black():
    colors = attention_colors(3)
    count, rows = color_table_rows(colors)
    assert count == 4 and [row[0] for row in rows] == [0, 1, 2, 3]
    assert rows[0] == (0, "Background", 0.0, 0.0, 0.0, 0.0)
    label, name, rgba = colors[3]
    assert rows[3][1] == name
    np.testing.assert_allclose(rows[3][2:], np.array(rgba) / 255.0)
    assert all(0.0 <= c <= 1.0 for row in rows for c in row[2:])

    count, rows = color_table_rows([(0, "Background", (0, 0, 0, 0)), (2, "two", (255, 128, 0, 255))])
    assert count == 3 and rows[1][2:] == (0.0, 0.0, 0.0, 0.0)
    np.testing.assert_allclose(rows[2][2:], (1.0, 128 / 255, 0.0, 1.0))


def demo_qc(**changes):
    values = dict(brain_volume_ml=1432.4, voxel_size_mm=(1.0, 1.0, 1.2), t1_contrast=1.45, skull_strip="deepbet",
                  measured=True)
    values.update(changes)
    return QualityControl(**values)


def demo_result(**changes):
    values = dict(
        predicted_age=71.26, chronological_age=68.0, brain_age_gap=3.26, corrected_brain_age_gap=2.04,
        sex="F", model_name="demo <tiny>", model_intended_use="software demonstration and tests",
        model_is_demo=True, timings={"total": 4.27}, warnings=["input was not skull-stripped"], qc=demo_qc(),
    )
    values.update(changes)
    return Result(**values)


def test_result_text_shows_ages_gaps_model_and_the_demo_disclaimer_first():
    text = result_text(demo_result())
    assert text.index("Demo model: synthetic, not clinical") < text.index("Predicted brain age")
    assert "NOT for clinical use" in text
    for expected in ("71.3 years", "68.0 years", "+3.3 years", "+2.0 years", "4.3 s",
                     "demo &lt;tiny&gt;", "software demonstration and tests", "input was not skull-stripped"):
        assert expected in text, expected
    assert "<tiny>" not in text  # names are escaped, never interpreted as HTML


def test_result_text_without_age_or_demo_says_what_is_missing():
    text = result_text(demo_result(chronological_age=None, brain_age_gap=None, corrected_brain_age_gap=None,
                                   model_is_demo=False, model_name="BrainRotViT (published)", warnings=[]))
    assert "Demo model" not in text
    assert "enter the chronological age" in text
    assert "Warnings" not in text
    no_correction = result_text(demo_result(corrected_brain_age_gap=None))
    assert "no bias-correction coefficients" in no_correction
    negative = result_text(demo_result(brain_age_gap=-4.04))
    assert "-4.0 years" in negative


def test_result_text_shows_the_brain_mask_volume_and_method_and_says_when_qc_has_no_flags():
    text = result_text(demo_result())
    low, high = ADULT_BRAIN_ML
    assert f"1432 ml (adult range {low:.0f}-{high:.0f} ml), by deepbet (trained brain extractor)" in text
    assert "voxels 1 x 1 x 1.2 mm" in text
    assert QC_NO_FLAGS in text and "QC flag" not in text and QC_FLAG_COLOR not in text
    # the QC comes after the ages and before the prediction's warnings
    assert text.index("Predicted brain age") < text.index("Brain mask:") < text.index(QC_NO_FLAGS) < text.index("Warnings")
    not_run = result_text(demo_result(qc=QualityControl()))   # never measured: not shown as passed
    assert QC_NO_FLAGS not in not_run and "QC: not run" in not_run
    template = result_text(demo_result(qc=demo_qc(skull_strip="template")))
    assert "by template registration" in template and "deepbet" not in template


def test_each_qc_flag_is_its_own_warning_coloured_line_and_no_flags_is_not_claimed():
    flags = ["the brain mask is 2412 ml, above the adult range 900-2000 ml: it may hold skull, scalp or neck",
             "chronological age 3 is outside the training ages 20-90; expect a larger error",
             "a <b>tag</b> & more."]
    text = result_text(demo_result(qc=demo_qc(brain_volume_ml=2412.0, skull_strip="template", flags=flags)))
    assert QC_NO_FLAGS not in text
    lines = [line for line in text.splitlines() if "QC flag:" in line]
    assert len(lines) == 3
    assert all(line.startswith(f'<p style="color:{QC_FLAG_COLOR}">') and "&#9888;" in line for line in lines)
    assert "The brain mask is 2412 ml, above the adult range 900-2000 ml: it may hold skull, scalp or neck." in lines[0]
    assert "Chronological age 3 is outside the training ages 20-90; expect a larger error." in lines[1]
    assert lines[2].endswith("A &lt;b&gt;tag&lt;/b&gt; &amp; more.</p>") and "<b>tag</b>" not in text  # escaped


def test_qc_without_measurements_says_so():
    html_text = qc_html(QualityControl(flags=["the brain mask is empty"]))
    assert "Brain mask:</b> not measured" in html_text and "voxels" not in html_text
    assert "The brain mask is empty." in html_text and QC_NO_FLAGS not in html_text
    assert "already skull-stripped" in qc_html(demo_qc(skull_strip="already stripped"))


def test_the_label_layer_shows_the_brain_mask_only_when_asked_and_there_is_one():
    attention, mask = object(), object()
    assert label_layer_node(True, attention, mask) is mask
    assert label_layer_node(False, attention, mask) is attention
    assert label_layer_node(True, attention, None) is attention
    assert label_layer_node(True, None, mask) is mask
    assert label_layer_node(False, None, mask) is None  # nothing to show: the layer is left alone


def test_check_inputs_accepts_a_complete_form(tmp_path):
    model_file = tmp_path / "model.safetensors"
    model_file.write_bytes(b"x")
    assert check_inputs((192, 256, 256), "F", 63.5, "demo", "auto") == []
    assert check_inputs((192, 256, 256), "unknown", None, str(model_file), "cpu") == []
    assert check_inputs((192, 256, 256), "male", None, "https://example.org/m.safetensors", "cuda", True) == []


@pytest.mark.parametrize("args, problem", [
    ((None, "F", None, "demo", "auto"), "Select an input volume"),
    (((256, 256, 1), "F", None, "demo", "auto"), "must be 3D"),
    (((256, 256), "F", None, "demo", "auto"), "must be 3D"),
    (((64, 64, 64), "X", None, "demo", "auto"), "Sex"),
    (((64, 64, 64), "F", 150.0, "demo", "auto"), "between 0 and 130"),
    (((64, 64, 64), "F", float("nan"), "demo", "auto"), "between 0 and 130"),
    (((64, 64, 64), "F", -1.0, "demo", "auto"), "between 0 and 130"),
    (((64, 64, 64), "F", None, "", "auto"), "Choose a model"),
    (((64, 64, 64), "F", None, "/no/such/model.safetensors", "auto"), "/no/such/model.safetensors"),
    (((64, 64, 64), "F", None, "http://example.org/m.safetensors", "auto"), "https"),
    (((64, 64, 64), "F", None, "demo", "tpu"), "Device"),
    (((64, 64, 64), "F", None, "demo", "cuda", False), "no CUDA GPU"),
])
def test_check_inputs_names_each_problem(args, problem):
    problems = check_inputs(*args)
    assert len(problems) == 1 and problem in problems[0], problems


def test_a_colour_or_vector_volume_is_refused():
    with pytest.raises(ValueError, match="3 components per voxel"):
        volume_from_kji(np.zeros((8, 9, 10, 3), dtype=np.uint8), np.eye(4))
    problems = check_inputs((64, 64, 64), "F", None, "demo", "auto", components=3)
    assert len(problems) == 1 and "3 components per voxel" in problems[0] and "scalar" in problems[0]
    assert check_inputs((64, 64, 64), "F", None, "demo", "auto", components=1) == []


@pytest.mark.parametrize("age", [0.5, 67.0, 120.5, 129.9, 130.0, 130.1, 500.0, -0.1, float("inf")])
def test_the_panel_accepts_exactly_the_ages_the_library_accepts(age):
    from BrainAgeLib.demographics import check_age
    from BrainAgeLib.errors import BrainAgeError

    try:
        check_age(age)
        library_accepts = True
    except BrainAgeError:
        library_accepts = False
    assert (check_inputs((64, 64, 64), "F", age, "demo", "auto") == []) == library_accepts


def test_cuda_is_not_rejected_while_its_availability_is_unknown():
    assert check_inputs((64, 64, 64), "F", None, "demo", "cuda", None) == []


def test_a_node_under_a_linear_transform_is_read_where_slicer_shows_it():
    """A scan whose orientation was fixed with a (not hardened) transform: the model must see
    the fixed scan, i.e. the voxels at parent_to_world @ IJKToRAS."""
    ijk_to_ras = oblique_flipped_ijk_to_ras()
    array_kji = np.random.default_rng(2).random((7, 9, 11)).astype(np.float32)
    turn = np.radians(90.0)
    parent_to_world = np.array([[np.cos(turn), -np.sin(turn), 0, 10.0],
                                [np.sin(turn), np.cos(turn), 0, -5.0],
                                [0, 0, 1, 2.5],
                                [0, 0, 0, 1]])
    volume = volume_from_kji(array_kji, ijk_to_ras, parent_to_world)
    np.testing.assert_allclose(volume.affine, parent_to_world @ ijk_to_ras)
    marker = np.array([3, 5, 2, 1.0])
    np.testing.assert_allclose(volume.voxel_to_world(marker[:3]), (parent_to_world @ ijk_to_ras @ marker)[:3])
    np.testing.assert_array_equal(volume.array, volume_from_kji(array_kji, ijk_to_ras).array)
    with pytest.raises(ValueError):
        volume_from_kji(array_kji, ijk_to_ras, np.zeros((4, 4)))  # a singular transform


def test_torch_and_torchvision_come_together_from_the_pytorch_extension():
    assert torch_missing({"torchvision": "0.29.1"}.get)
    assert torch_missing({"torch": "2.14.1"}.get)  # timm would pull torchvision (and maybe a torch) from pip
    assert not torch_missing({"torch": "2.14.1", "torchvision": "0.29.1"}.get)


def test_the_attention_output_may_not_be_the_input_volume():
    problems = check_inputs((64, 64, 64), "F", None, "demo", "cpu", attention_output_is_input=True)
    assert len(problems) == 1 and "would be overwritten" in problems[0]


def test_missing_requirements_are_floors_and_never_what_slicer_bundles():
    installed = {"nibabel": "5.0.0", "scipy": "1.10.0", "SimpleITK": "2.3.0", "tqdm": "4.59.0"}
    missing = missing_requirements(installed.get)
    assert not any(spec.startswith("nibabel") for spec in missing)  # at its floor: kept, not replaced
    assert f"tqdm>={PIP_REQUIREMENTS['tqdm']}" in missing  # older than its floor: upgraded
    assert "matplotlib" not in PIP_REQUIREMENTS  # Slicer's worker draws no PNG; the colour table ships as .ctbl
    assert f"timm>={PIP_REQUIREMENTS['timm']}" in missing
    assert all(">=" in spec and "==" not in spec for spec in missing)
    bundled = {name.lower() for name in SLICER_BUNDLED} | {"torch", "torchvision"}
    assert not {spec.split(">=")[0].lower() for spec in missing_requirements({}.get)} & bundled
    assert {"numpy", "scipy", "simpleitk", "pillow", "vtk"} <= bundled
    assert missing_requirements(lambda name: "99.0") == []


@pytest.mark.parametrize("version, floor, ok", [
    ("2.14.1+cu121", "2.1", True), ("2.0.1", "2.1", False), ("2.1", "2.1", True), ("1.0rc1", "1.0", True),
    ("0.4.5", "0.4", True), (None, "1.0", False), ("10.0", "9.2", True)])
def test_versions_compare_by_their_numbers(version, floor, ok):
    assert at_least(version, floor) is ok


def test_environment_problems_name_what_no_install_fixes():
    good = {"numpy": "2.1.0", "scipy": "1.14.1", "SimpleITK": "2.4.0", "pillow": "11.0.0", "vtk": "9.4.2"}
    nothing_importable = lambda module: False  # noqa: E731
    assert environment_problems(good.get, (3, 12, 10), nothing_importable) == []
    assert environment_problems({**good, "torch": "2.5.1"}.get, (3, 13, 0), nothing_importable) == []
    (python,) = environment_problems(good.get, (3, 9, 10), nothing_importable)
    assert "Slicer 5.10 or later" in python and "Python 3.9.10" in python
    (torch,) = environment_problems({**good, "torch": "1.13.1"}.get, (3, 12, 0), nothing_importable)
    assert "torch 2.1 or later" in torch and "1.13.1" in torch and "PyTorch Utils" in torch
    no_scipy = {k: v for k, v in good.items() if k != "scipy"}
    (scipy,) = environment_problems(no_scipy.get, (3, 12, 0), nothing_importable)
    assert "scipy" in scipy and "missing" in scipy and "never replaces" in scipy
    (old,) = environment_problems({**good, "numpy": "1.21.6"}.get, (3, 12, 0), nothing_importable)
    assert "numpy 1.23 or later" in old and "is 1.21.6" in old


def test_a_package_slicer_built_without_pip_metadata_counts_as_present():
    """Slicer builds VTK (and may build SimpleITK) from source: importable, but no version to read."""
    pip_only = {"numpy": "2.1.0", "scipy": "1.14.1", "pillow": "11.0.0"}
    assert environment_problems(pip_only.get, (3, 12, 0), lambda module: module in ("vtk", "SimpleITK")) == []
    assert "vtk" in " ".join(environment_problems(pip_only.get, (3, 12, 0), lambda module: module == "SimpleITK"))
    # this venv's real numpy, scipy, SimpleITK and pillow pass (it has no VTK: counted as present here)
    assert environment_problems(python_version=(3, 12, 0),
                                module_available=lambda module: module == "vtk" or module_available(module)) == []


def test_deepbet_and_what_it_imports_are_installed_on_first_use():
    missing = missing_requirements({}.get)
    assert f"deepbet>={PIP_REQUIREMENTS['deepbet']}" in missing
    for name in ("connected-components-3d", "fill_voids", "pandas", "nibabel", "tqdm"):
        assert any(spec.startswith(name + ">=") for spec in missing), name
    import importlib.metadata as metadata
    import re

    requires = {re.split(r"[\s;<>=!~\[(]", spec, maxsplit=1)[0].lower().replace("_", "-")
                for spec in metadata.requires("deepbet") or [] if "extra ==" not in spec}
    pinned = {name.lower().replace("_", "-") for name in PIP_REQUIREMENTS}
    # torch comes from the PyTorch extension; customtkinter (deepbet's GUI, never imported) with deepbet
    assert requires - {"torch", "customtkinter"} <= pinned, requires - pinned


def test_installed_version_and_the_model_download_path(monkeypatch, tmp_path):
    assert installed_version("numpy") == np.__version__
    assert installed_version("no-such-distribution-brainage") is None
    monkeypatch.setenv("BRAINAGE_CACHE", str(tmp_path))
    from BrainAgeLib.resources import cache_dir

    first = model_download_path("https://example.org/models/brain.safetensors?x=1")
    other = model_download_path("https://example.org/other/brain.safetensors")
    assert Path(first).parent == cache_dir() and first.endswith("-brain.safetensors")
    assert first != other  # same file name, different URLs
    assert model_download_path("https://example.org/").endswith("-model.safetensors")


def test_bridge_imports_and_checks_inputs_with_numpy_alone():
    """Slicer imports the bridge before BrainAge's dependencies are installed."""
    code = (
        "import sys\n"
        "for name in ('nibabel', 'torch', 'scipy', 'SimpleITK', 'matplotlib', 'timm', 'safetensors'):\n"
        "    sys.modules[name] = None\n"
        "from BrainAgeLib.slicer_bridge import MODEL_CHOICES, check_inputs, model_argument, model_status_html\n"
        "assert check_inputs((64, 64, 64), 'F', 70.0, 'demo', 'auto') == []\n"
        "assert all(model_status_html(model_argument(choice, '')) is not None for choice in MODEL_CHOICES)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_ellipsoid_phantom_head_is_a_plausible_oblique_head():
    from BrainAgeLib.io import validate_volume
    from BrainAgeLib.slicer_bridge import phantom_head

    head = validate_volume(phantom_head(spacing_mm=3.0, use_template=False))
    assert head.shape == (64, 75, 64) and head.spacing == pytest.approx((3.0, 3.0, 3.0))
    centre_ijk = (np.array(head.shape) - 1) / 2
    np.testing.assert_allclose(head.voxel_to_world(centre_ijk), (0.0, 0.0, 0.0), atol=1e-9)
    assert head.array[32, 37, 32] == 800.0  # white matter in the middle
    assert head.array[0, 0, 0] == 0.0       # air in the corner
    assert set(np.unique(head.array)) == {0.0, 60.0, 120.0, 300.0, 600.0, 800.0}
    assert not np.allclose(head.affine[:3, :3], np.diag(np.diag(head.affine[:3, :3])))  # oblique


def test_the_module_flow_from_kji_arrays_to_a_labelmap_on_the_input_grid():
    """What BrainAgeLogic.process does between slicer.util.arrayFromVolume and updateVolumeFromArray,
    with a small random-weight model (the bundled demo model is checked by the Slicer self-test)."""
    from BrainAgeLib.explain.labelmap import attention_labelmap
    from BrainAgeLib.io import validate_volume
    from BrainAgeLib.model import build_model
    from BrainAgeLib.slicer_bridge import phantom_head

    node_kji, node_ijk_to_ras = kji_from_volume(phantom_head(spacing_mm=3.0, use_template=False))
    volume = validate_volume(volume_from_kji(node_kji, node_ijk_to_ras), path="phantom node")
    model = build_model("tiny", seed=0)
    reported = []

    result = predict(model, volume, "F", age=70.0, explain=True, device="cpu",
                     progress=lambda fraction, message: reported.append(fraction))

    assert np.isfinite(result.predicted_age)
    assert result.brain_age_gap == pytest.approx(result.predicted_age - 70.0)
    assert reported[-1] == 1.0
    labelmap = attention_labelmap(result, levels=10)
    label_kji, label_ijk_to_ras = kji_from_volume(labelmap.volume)
    assert label_kji.shape == node_kji.shape
    np.testing.assert_allclose(label_ijk_to_ras, node_ijk_to_ras, atol=1e-6)
    assert int(label_kji.max()) == 10 and label_kji.dtype == np.uint8
    mask_kji, mask_ijk_to_ras = kji_from_volume(result.brain_mask)  # -> the "<input> brain mask" labelmap
    assert mask_kji.shape == node_kji.shape and mask_kji.dtype == np.uint8 and set(np.unique(mask_kji)) == {0, 1}
    np.testing.assert_allclose(mask_ijk_to_ras, node_ijk_to_ras, atol=1e-6)
    text = result_text(result)
    assert "Predicted brain age" in text and f"{result.qc.brain_volume_ml:.0f} ml" in text
    assert (QC_NO_FLAGS in text) == (not result.qc.flags) and text.count("QC flag:") == len(result.qc.flags)



# --- the panel's model choice, Reload, offline installs, the self-test --------------------------

def test_model_choices_list_the_published_model_first_and_map_to_library_names(tmp_path):
    from BrainAgeLib.registry import REGISTRY
    from BrainAgeLib.slicer_bridge import MODEL_CHOICES, model_argument

    choices = list(MODEL_CHOICES)
    assert MODEL_CHOICES[choices[0]] == "brainrotvit" and MODEL_CHOICES[choices[1]] == "demo"
    assert all(name is None or name in REGISTRY for name in MODEL_CHOICES.values())
    assert model_argument(choices[0], "ignored") == "brainrotvit"
    file_choice = next(label for label, name in MODEL_CHOICES.items() if name is None)
    assert model_argument(file_choice, " ~/m.safetensors ") == str(Path.home() / "m.safetensors")
    assert model_argument(file_choice, "https://example.org/~me/m.safetensors") == "https://example.org/~me/m.safetensors"
    with pytest.raises(Exception, match="unknown model choice"):
        model_argument("GPT", "")
    assert check_inputs((64, 64, 64), "F", None, "brainrotvit", "auto") == []  # a registered name, not a file


def test_model_status_says_whether_the_published_model_is_downloaded(tmp_path):
    from BrainAgeLib.registry import REGISTRY
    from BrainAgeLib.slicer_bridge import model_needs_download, model_status_html

    assert model_needs_download("brainrotvit", str(tmp_path))
    text = model_status_html("brainrotvit", str(tmp_path))
    assert "Not downloaded yet" in text and "wjalal/BrainRotViT" in text and "brainage models download brainrotvit" in text
    REGISTRY["brainrotvit"].local_path(str(tmp_path)).write_bytes(b"x" * 3_000_000)
    assert not model_needs_download("brainrotvit", str(tmp_path))
    text = model_status_html("brainrotvit", str(tmp_path))
    assert "Downloaded (3 MB)" in text and str(tmp_path) in text
    assert not model_needs_download("demo") and "synthetic phantoms" in model_status_html("demo")
    assert "color:#b00000" in model_status_html("demo")  # the demo's warning is red
    assert model_status_html("/models/mine.safetensors") == "" and not model_needs_download("/models/mine.safetensors")


def test_the_explanation_choices_are_the_library_methods():
    from BrainAgeLib.explain.methods import METHODS
    from BrainAgeLib.slicer_bridge import EXPLAIN_CHOICES, SEX_CHOICES
    from BrainAgeLib.sex import parse_sex

    assert tuple(EXPLAIN_CHOICES) == tuple(METHODS)
    assert [parse_sex(choice) for choice in SEX_CHOICES] == ["F", "M", "unknown"]


def test_reload_forgets_every_brainagelib_module_and_nothing_else():
    from BrainAgeLib.slicer_bridge import forget_library_modules

    modules = {"BrainAgeLib": 1, "BrainAgeLib.io": 2, "BrainAgeLib.model.checkpoint": 3, "BrainAgeLibrary": 4,
               "numpy": 5}
    assert forget_library_modules(modules) == ["BrainAgeLib", "BrainAgeLib.io", "BrainAgeLib.model.checkpoint"]
    assert modules == {"BrainAgeLibrary": 4, "numpy": 5}


def test_offline_install_message_gives_the_wheel_folder_route():
    from BrainAgeLib.slicer_bridge import offline_install_message

    text = offline_install_message(["timm>=1.0", "psutil>=5.9"], "no network")
    assert "no network" in text and 'pip download "timm>=1.0" "psutil>=5.9" -d WHEELS' in text
    assert 'slicer.util.pip_install("--no-index --find-links WHEELS' in text


def test_the_self_test_installs_nothing_unless_allowed():
    from BrainAgeLib.slicer_bridge import SELFTEST_INSTALL_VARIABLE, selftest_inference_allowed

    assert selftest_inference_allowed([], False, {}) == (True, "all packages present")
    allowed, reason = selftest_inference_allowed(["timm>=1.0"], True, {})
    assert not allowed and "torch, timm>=1.0 not installed" in reason and SELFTEST_INSTALL_VARIABLE in reason
    assert selftest_inference_allowed(["timm>=1.0"], False, {SELFTEST_INSTALL_VARIABLE: "1"})[0]
    assert not selftest_inference_allowed(["timm>=1.0"], False, {SELFTEST_INSTALL_VARIABLE: "yes"})[0]


def test_panel_values_are_the_inverse_of_model_argument():
    from BrainAgeLib.slicer_bridge import MODEL_CHOICES, model_argument, panel_values

    for model in ("brainrotvit", "demo", "/models/mine.safetensors", "https://example.org/m.safetensors"):
        values = panel_values("F", 63.5, model)
        assert model_argument(values["modelChoice"], values["modelLocation"]) == model
    assert panel_values("m", None, "demo") == {"sex": "male", "chronologicalAge": 0.0,
                                               "modelChoice": list(MODEL_CHOICES)[1], "modelLocation": ""}
    assert panel_values(None, 40, "demo")["sex"] == "unknown"


def test_report_packages_are_asked_for_only_when_a_report_is_saved():
    from BrainAgeLib.slicer_bridge import REPORT_REQUIREMENTS

    assert not set(REPORT_REQUIREMENTS) & set(PIP_REQUIREMENTS)  # the estimate itself never needs them
    assert missing_requirements({"matplotlib": "3.8.0"}.get, REPORT_REQUIREMENTS) == [f"jinja2>={REPORT_REQUIREMENTS['jinja2']}"]
