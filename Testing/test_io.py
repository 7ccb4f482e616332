"""Volume I/O: every format round-trips, LPS/RAS is right, and every bad input gets a clear error."""
from __future__ import annotations

import gzip
import hashlib
import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from BrainAgeLib.errors import InvalidVolumeError
from BrainAgeLib.io import Volume, load_volume, save_volume, validate_volume

# A head-sized field of view on a coarse grid keeps every test fast: 24 x 28 x 20 voxels of 3 mm.
SHAPE = (24, 28, 20)
RAS_AFFINE = np.array([
    [3.0, 0.0, 0.0, -36.0],
    [0.0, 3.0, 0.0, -42.0],
    [0.0, 0.0, 3.0, -30.0],
    [0.0, 0.0, 0.0, 1.0],
])
BRIGHT_VOXEL = (5, 19, 13)  # a marker away from the centre, so a flipped axis would move it


def head_phantom(rng: np.random.Generator) -> np.ndarray:
    """A smooth ellipsoid 'head' with noise and one bright marker voxel."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij"))
    head = (np.sum(grid**2, axis=0) < 0.8).astype(np.float32) * 100
    head += rng.normal(0, 5, SHAPE).astype(np.float32)
    head[BRIGHT_VOXEL] = 1000.0
    return head


@pytest.fixture
def phantom(rng) -> Volume:
    return Volume(head_phantom(rng), RAS_AFFINE)


def bright_voxel_world(volume: Volume) -> np.ndarray:
    ijk = np.unravel_index(np.argmax(volume.array), volume.shape)
    return volume.voxel_to_world(ijk)


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray = RAS_AFFINE) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return path


def write_dicom_series(folder: Path, array_kji: np.ndarray, spacing, origin, direction,
                       series_uid: str = "1.2.826.0.1.3680043.2.1125.7.1", extra_tags=None) -> sitk.Image:
    """One MR slice per file with the tags a DICOM reader needs to stack them (LPS geometry),
    plus ``extra_tags`` ({"0010|1010": "039Y", ...}) in every file."""
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array_kji.astype(np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    d = image.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        slice_k = image[:, :, k]
        tags = {
            "0008|0060": "MR",
            "0020|000d": series_uid + ".0",  # study
            "0020|000e": series_uid,  # series
            "0008|0018": f"{series_uid}.{k + 1}",  # this instance
            "0020|0013": str(k + 1),
            "0020|0037": "\\".join(str(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
            "0020|0032": "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k))),
            "0018|0050": str(spacing[2]),
            **(extra_tags or {}),
        }
        for tag, value in tags.items():
            slice_k.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(slice_k)
    return image


def lps_point_to_ras(point) -> np.ndarray:
    return np.array([-point[0], -point[1], point[2]])


# ----------------------------------------------------------------------------------------------
# Round trips
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["head.nii", "head.nii.gz", "head.nrrd", "head.nhdr", "head.mha", "head.mhd"])
def test_every_writable_format_round_trips_exactly(tmp_path, phantom, name):
    save_volume(phantom, tmp_path / name)
    loaded = load_volume(tmp_path / name)
    assert loaded.array.dtype == np.float32
    assert loaded.shape == SHAPE
    np.testing.assert_array_equal(loaded.array, phantom.array)
    np.testing.assert_allclose(loaded.affine, RAS_AFFINE, atol=1e-5)
    assert loaded.orientation == ("R", "A", "S")
    assert bright_voxel_world(loaded) == pytest.approx([-21.0, 15.0, 9.0])


def test_oblique_lps_grid_round_trips_through_nrrd_and_nifti(tmp_path, rng):
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-3.0, -2.5, 3.5])
    affine[:3, 3] = [40.0, 50.0, -25.0]
    volume = Volume(head_phantom(rng), affine)
    for name in ["oblique.nrrd", "oblique.nii.gz"]:
        loaded = load_volume(save_volume(volume, tmp_path / name))
        np.testing.assert_array_equal(loaded.array, volume.array)
        np.testing.assert_allclose(loaded.affine, affine, atol=1e-5)


def test_mgz_is_read_in_ras(tmp_path, phantom):
    path = tmp_path / "head.mgz"
    nib.save(nib.MGHImage(phantom.array, RAS_AFFINE), str(path))
    loaded = load_volume(path)
    np.testing.assert_array_equal(loaded.array, phantom.array)
    np.testing.assert_allclose(loaded.affine, RAS_AFFINE, atol=1e-5)


@pytest.mark.parametrize("name", ["labels.nii.gz", "labels.nrrd", "labels.mha"])
def test_labelmaps_keep_an_integer_type_on_disk(tmp_path, rng, name):
    labels = Volume(rng.integers(0, 6, SHAPE).astype(np.int64), RAS_AFFINE)
    path = save_volume(labels, tmp_path / name)
    if name.endswith(".nii.gz"):
        assert np.issubdtype(nib.load(str(path)).get_data_dtype(), np.integer)
    else:
        assert "integer" in sitk.ReadImage(str(path)).GetPixelIDTypeAsString()
    np.testing.assert_array_equal(load_volume(path).array, labels.array)


def test_dicom_series_folder_is_read_with_lps_converted_to_ras(tmp_path, rng):
    array_kji = rng.integers(0, 400, size=(20, 24, 28))  # 28 columns (i), 24 rows (j), 20 slices (k)
    array_kji[4, 7, 9] = 2000  # marker at index (i, j, k) = (9, 7, 4)
    # Sagittal-ish acquisition: columns run along y (posterior), rows along z, slices along x.
    direction = (0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    image = write_dicom_series(tmp_path / "series", array_kji, (2.0, 2.5, 3.0), (10.0, -20.0, 5.0), direction)

    loaded = load_volume(tmp_path / "series")
    assert loaded.shape == (28, 24, 20)
    np.testing.assert_array_equal(loaded.array, array_kji.transpose(2, 1, 0))
    assert loaded.spacing == pytest.approx((2.0, 2.5, 3.0))
    # i runs toward +y LPS = posterior, j toward +z = superior, k toward +x LPS = left.
    assert loaded.orientation == ("P", "S", "L")
    marker_lps = image.TransformIndexToPhysicalPoint((9, 7, 4))
    assert bright_voxel_world(loaded) == pytest.approx(lps_point_to_ras(marker_lps))
    # One file of the series reads the whole series.
    one_file = load_volume(tmp_path / "series" / "slice005.dcm")
    np.testing.assert_array_equal(one_file.array, loaded.array)


def test_dicom_folder_with_two_series_asks_which_one(tmp_path, rng):
    folder = tmp_path / "study"
    write_dicom_series(folder / "a", rng.integers(0, 100, (20, 20, 20)), (3.0, 3.0, 3.0), (0.0, 0.0, 0.0),
                       (1, 0, 0, 0, 1, 0, 0, 0, 1), series_uid="1.2.3.1")
    write_dicom_series(folder / "b", rng.integers(0, 100, (18, 20, 20)), (3.0, 3.0, 3.0), (0.0, 0.0, 0.0),
                       (1, 0, 0, 0, 1, 0, 0, 0, 1), series_uid="1.2.3.2")
    for item in (folder / "b").iterdir():
        os.replace(item, folder / "a" / f"b_{item.name}")
    with pytest.raises(InvalidVolumeError, match=r"2 DICOM series.*1\.2\.3\.1 \(20 files\).*1\.2\.3\.2 \(18 files\)"):
        load_volume(folder / "a")
    assert load_volume(folder / "a", series_uid="1.2.3.2").shape == (20, 20, 18)


def test_a_dicom_series_with_a_missing_slice_is_refused(tmp_path, rng):
    """ITK would spread the remaining slices evenly and misplace every slice after the gap."""
    folder = tmp_path / "series"
    write_dicom_series(folder, rng.integers(0, 100, (20, 20, 20)), (3.0, 3.0, 3.0), (0.0, 0.0, 0.0),
                       (1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert load_volume(folder).shape == (20, 20, 20)
    (folder / "slice009.dcm").unlink()
    with pytest.raises(InvalidVolumeError, match=r"not evenly spaced: gap 6\.00 mm after slice 9 of 19.*3\.00 mm"):
        load_volume(folder)


def test_one_dicom_file_and_another_series_uid_is_an_error(tmp_path, rng):
    folder = tmp_path / "study"
    for uid in ("1.2.3.1", "1.2.3.2"):
        write_dicom_series(folder / uid, rng.integers(0, 100, (18, 20, 20)), (3.0, 3.0, 3.0), (0.0, 0.0, 0.0),
                           (1, 0, 0, 0, 1, 0, 0, 0, 1), series_uid=uid)
    for item in (folder / "1.2.3.2").iterdir():
        os.replace(item, folder / "1.2.3.1" / f"b_{item.name}")
    one_file = folder / "1.2.3.1" / "slice000.dcm"
    assert load_volume(one_file).shape == (20, 20, 18)
    with pytest.raises(InvalidVolumeError, match=r"slice000\.dcm: belongs to DICOM series '1\.2\.3\.1', not to the requested '1\.2\.3\.2'"):
        load_volume(one_file, series_uid="1.2.3.2")


def write_tagged_series(folder: Path, rng, **tags) -> Path:
    write_dicom_series(folder, rng.integers(0, 100, (20, 20, 20)), (3.0, 3.0, 3.0), (0.0, 0.0, 0.0),
                       (1, 0, 0, 0, 1, 0, 0, 0, 1), extra_tags={{"age": "0010|1010", "sex": "0010|0040"}[k]: v
                                                             for k, v in tags.items()})
    return folder


@pytest.mark.parametrize("age_text, number, years_per_unit", [
    ("039Y", 39, 1.0), ("006M", 6, 1 / 12), ("010W", 10, 7 / 365.25), ("200D", 200, 1 / 365.25)])
def test_a_dicom_series_gives_the_age_and_sex_its_header_records(tmp_path, rng, age_text, number, years_per_unit):
    folder = write_tagged_series(tmp_path / "series", rng, age=age_text, sex="M")
    header: dict = {}
    notes: list = []
    loaded = load_volume(folder, dicom_header=header, notes=notes)
    assert header["age"] == pytest.approx(number * years_per_unit)
    assert header["age_text"] == age_text and header["sex"] == "M"
    assert notes == []
    np.testing.assert_array_equal(loaded.array, load_volume(folder).array)  # the image is the same


def test_blank_or_unusable_dicom_age_and_sex_are_left_out(tmp_path, rng):
    header: dict = {}
    load_volume(write_tagged_series(tmp_path / "blank", rng, age="", sex=""), dicom_header=header)
    assert header == {}
    header, notes = {}, []
    load_volume(write_tagged_series(tmp_path / "odd", rng, age="39 years", sex="O"), dicom_header=header, notes=notes)
    assert header == {}
    assert any("PatientAge '39 years'" in note and "not used" in note for note in notes), notes
    assert any("PatientSex 'O'" in note and "not used" in note for note in notes), notes
    header = {}
    load_volume(write_nifti(tmp_path / "head.nii.gz", head_phantom(rng)), dicom_header=header)
    assert header == {}  # only DICOM has such tags


# ----------------------------------------------------------------------------------------------
# LPS / RAS correctness against sources other than our own writer
# ----------------------------------------------------------------------------------------------


def test_nrrd_round_trip_keeps_a_bright_voxel_at_its_ras_position(tmp_path, phantom):
    path = save_volume(phantom, tmp_path / "head.nrrd")
    # SimpleITK itself (LPS) must see the marker at the mirrored x and y.
    image = sitk.ReadImage(str(path))
    index_ijk = np.unravel_index(np.argmax(sitk.GetArrayFromImage(image)), image.GetSize()[::-1])[::-1]
    marker_lps = image.TransformIndexToPhysicalPoint(tuple(int(n) for n in index_ijk))
    assert marker_lps == pytest.approx((21.0, -15.0, 9.0))
    assert bright_voxel_world(load_volume(path)) == pytest.approx([-21.0, 15.0, 9.0])


def test_volume_written_by_simpleitk_with_a_rotated_direction(tmp_path, rng):
    array_kji = rng.normal(100, 5, (20, 22, 24)).astype(np.float32)
    array_kji[3, 15, 6] = 5000  # index (i, j, k) = (6, 15, 3)
    angle = np.deg2rad(30)
    direction = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    direction = direction @ np.array([[0, 1, 0], [1, 0, 0], [0, 0, -1]])  # and a permutation with a flip
    image = sitk.GetImageFromArray(array_kji)
    image.SetSpacing((2.5, 3.0, 2.8))
    image.SetOrigin((-12.0, 33.0, 7.5))
    image.SetDirection(tuple(direction.ravel()))
    sitk.WriteImage(image, str(tmp_path / "rotated.mha"))

    loaded = load_volume(tmp_path / "rotated.mha")
    marker_ras = lps_point_to_ras(image.TransformIndexToPhysicalPoint((6, 15, 3)))
    assert bright_voxel_world(loaded) == pytest.approx(marker_ras)
    assert loaded.spacing == pytest.approx((2.5, 3.0, 2.8))
    # Corners too: voxel (i,j,k) of our volume is SimpleITK's index (i,j,k) at the mirrored point.
    for corner in [(0, 0, 0), (23, 21, 19), (23, 0, 19)]:
        assert loaded.voxel_to_world(corner) == pytest.approx(
            lps_point_to_ras(image.TransformIndexToPhysicalPoint(corner)))


@pytest.mark.parametrize("space, expected_x_sign", [("right-anterior-superior", 1.0), ("left-posterior-superior", -1.0)])
def test_hand_written_nrrd_header_in_either_space(tmp_path, space, expected_x_sign):
    data = np.zeros((20, 20, 20), np.float32)  # stored x fastest, so array [k,j,i] in memory
    data[2, 3, 4] = 1.0  # i=4, j=3, k=2
    data[0, 0, 1] = 0.5
    (tmp_path / "vol.raw").write_bytes(data.astype("<f4").tobytes())
    (tmp_path / "vol.nhdr").write_text(
        "NRRD0004\ntype: float\ndimension: 3\n"
        f"space: {space}\nsizes: 20 20 20\n"
        "space directions: (3,0,0) (0,3,0) (0,0,3)\nkinds: domain domain domain\n"
        "endian: little\nencoding: raw\nspace origin: (10,20,30)\ndata file: vol.raw\n")
    loaded = load_volume(tmp_path / "vol.nhdr")
    assert loaded.array[4, 3, 2] == 1.0 and loaded.array[1, 0, 0] == 0.5
    # In RAS space the header's numbers are RAS already; in LPS space x and y change sign.
    sign = np.array([expected_x_sign, expected_x_sign, 1.0])
    assert loaded.voxel_to_world([4, 3, 2]) == pytest.approx(sign * [22.0, 29.0, 36.0])


# Axis codes -> (permutation of the RAS axes, flips), written out by hand, independent of nibabel.
ORIENTATIONS = {
    "LPS": ((0, 1, 2), (True, True, False)),
    "PSR": ((1, 2, 0), (True, False, False)),
    "LIA": ((0, 2, 1), (True, True, False)),
}


def reorient_by_hand(volume: Volume, codes: str) -> Volume:
    permutation, flips = ORIENTATIONS[codes]
    array = volume.array.transpose(permutation)
    affine = np.eye(4)
    affine[:3, 3] = volume.affine[:3, 3]
    for new_axis, (old_axis, flip) in enumerate(zip(permutation, flips)):
        column = volume.affine[:3, old_axis]
        if flip:
            array = np.flip(array, axis=new_axis)
            affine[:3, 3] += column * (volume.shape[old_axis] - 1)  # the new first voxel is the old last
            column = -column
        affine[:3, new_axis] = column
    return Volume(np.ascontiguousarray(array), affine)


@pytest.mark.parametrize("codes, name", [("LPS", "head.nii.gz"), ("PSR", "head.nii"), ("LIA", "head.nii.gz"),
                                         ("LPS", "head.nrrd"), ("PSR", "head.mha"), ("LIA", "head.mgz")])
def test_the_same_head_in_other_orientations_loads_identically_after_reorienting(tmp_path, phantom, codes, name):
    moved = reorient_by_hand(phantom, codes)
    assert moved.orientation == tuple(codes)
    path = tmp_path / name
    if name.endswith(".mgz"):
        nib.save(nib.MGHImage(moved.array, moved.affine), str(path))
    else:
        save_volume(moved, path)

    loaded = load_volume(path)
    assert loaded.orientation == tuple(codes)
    ras = loaded.reoriented("RAS")
    np.testing.assert_array_equal(ras.array, phantom.array)
    np.testing.assert_allclose(ras.affine, phantom.affine, atol=1e-5)
    assert bright_voxel_world(loaded) == pytest.approx(bright_voxel_world(phantom), abs=1e-4)


# ----------------------------------------------------------------------------------------------
# 4D
# ----------------------------------------------------------------------------------------------


def test_4d_with_one_volume_is_accepted_and_squeezed(tmp_path, phantom):
    write_nifti(tmp_path / "one.nii.gz", phantom.array[..., None])
    loaded = load_volume(tmp_path / "one.nii.gz")
    assert loaded.shape == SHAPE
    np.testing.assert_array_equal(loaded.array, phantom.array)

    image_3d = sitk.GetImageFromArray(phantom.array.transpose(2, 1, 0))
    image_3d.SetSpacing((3.0, 3.0, 3.0))
    image = sitk.JoinSeries([image_3d])
    assert image.GetDimension() == 4
    sitk.WriteImage(image, str(tmp_path / "one.mha"))
    np.testing.assert_array_equal(load_volume(tmp_path / "one.mha").array, phantom.array)


# ----------------------------------------------------------------------------------------------
# Bad input: the error type, the file and the problem
# ----------------------------------------------------------------------------------------------


def assert_rejected(path: Path, *problem_words: str, **kwargs) -> InvalidVolumeError:
    with pytest.raises(InvalidVolumeError) as caught:
        load_volume(path, **kwargs)
    error = caught.value
    assert error.path == str(path)
    assert str(path) in str(error)
    for word in problem_words:
        assert word.lower() in error.problem.lower(), error.problem
    return error


def test_missing_file(tmp_path):
    assert_rejected(tmp_path / "nobody.nii.gz", "not found")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path, phantom):
    path = save_volume(phantom, tmp_path / "locked.nii.gz")
    path.chmod(0)
    try:
        assert_rejected(path, "permission denied")
    finally:
        path.chmod(0o644)


def test_permission_error_while_reading_is_reported_not_raised_raw(tmp_path, phantom, monkeypatch):
    path = save_volume(phantom, tmp_path / "locked.nii")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(nib, "load", refuse)
    assert_rejected(path, "permission denied")


@pytest.mark.parametrize("name", ["cut.nii.gz", "cut.nii", "cut.nrrd", "cut.mha", "cut.mgz"])
def test_truncated_file(tmp_path, phantom, name):
    path = tmp_path / name
    if name.endswith(".mgz"):
        nib.save(nib.MGHImage(phantom.array, RAS_AFFINE), str(path))
    else:
        save_volume(phantom, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    error = assert_rejected(path)
    assert "truncated" in error.problem or "corrupt" in error.problem


def test_gzip_with_a_corrupted_middle(tmp_path, phantom):
    path = save_volume(phantom, tmp_path / "bad.nii.gz")
    data = bytearray(path.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\x00" * 64
    path.write_bytes(bytes(data))
    assert_rejected(path, "corrupt")


@pytest.mark.parametrize("name", ["notes.nii", "notes.nii.gz", "notes.nrrd", "notes.mha", "notes.mgz"])
def test_a_text_file_is_not_an_image(tmp_path, name):
    path = tmp_path / name
    text = b"subject,age\nsub-01,42\n" * 20
    path.write_bytes(gzip.compress(text) if name.endswith((".gz", ".mgz")) else text)
    error = assert_rejected(path, "not a readable")
    assert "Exception thrown" not in error.problem and "0x" not in error.problem


def test_unknown_extension_and_empty_folder(tmp_path, phantom):
    (tmp_path / "scan.png").write_bytes(b"\x89PNG")
    assert_rejected(tmp_path / "scan.png", "unsupported file type", ".png")
    (tmp_path / "empty").mkdir()
    assert_rejected(tmp_path / "empty", "no DICOM series")
    with pytest.raises(InvalidVolumeError, match=r"scan\.png.*cannot write '\.png'"):
        save_volume(phantom, tmp_path / "scan.png")


@pytest.mark.parametrize("name", ["empty.nii.gz", "empty.nii", "empty.mgz", "empty.nrrd", "empty.mha", "empty.dcm"])
def test_an_empty_file_is_reported_as_empty(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"")
    error = assert_rejected(path, "empty", "0 bytes")
    assert "gzip" not in error.problem and "not a readable" not in error.problem


def test_a_folder_of_images_is_not_taken_for_a_dicom_folder(tmp_path, phantom):
    """predict on a folder of NIfTI files: the message says what the folder holds and where
    a folder of images goes (batch), not only that it has no DICOM series."""
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("sub-01_T1w.nii.gz", "sub-02_T1w.nii.gz"):
        save_volume(phantom, folder / name)
    error = assert_rejected(folder, "2 image files", "sub-01_T1w.nii.gz", "brainage batch")
    assert "DICOM" in error.problem


def test_2d_images(tmp_path, rng):
    write_nifti(tmp_path / "plane.nii.gz", rng.random((64, 64)))
    assert_rejected(tmp_path / "plane.nii.gz", "2D")
    write_nifti(tmp_path / "slice.nii.gz", rng.random((64, 64, 1)))
    assert_rejected(tmp_path / "slice.nii.gz", "2D", "single slice")
    sitk.WriteImage(sitk.GetImageFromArray(rng.random((64, 64)).astype(np.float32)), str(tmp_path / "plane.nrrd"))
    assert_rejected(tmp_path / "plane.nrrd", "2D")


def test_4d_with_several_volumes(tmp_path, phantom):
    write_nifti(tmp_path / "fmri.nii.gz", np.stack([phantom.array] * 3, axis=-1))
    assert_rejected(tmp_path / "fmri.nii.gz", "4D", "3 volumes")
    image_3d = sitk.GetImageFromArray(phantom.array)
    image_3d.SetSpacing((3.0, 3.0, 3.0))
    image = sitk.JoinSeries([image_3d] * 2)
    sitk.WriteImage(image, str(tmp_path / "two.mha"))
    assert_rejected(tmp_path / "two.mha", "4D", "2 volumes")


def test_colour_image(tmp_path, rng):
    image = sitk.GetImageFromArray(rng.random((20, 20, 20, 3)).astype(np.float32), isVector=True)
    sitk.WriteImage(image, str(tmp_path / "rgb.nrrd"))
    assert_rejected(tmp_path / "rgb.nrrd", "3 values per voxel")


def test_all_zero_and_constant_volumes(tmp_path):
    write_nifti(tmp_path / "zero.nii.gz", np.zeros(SHAPE, np.float32))
    assert_rejected(tmp_path / "zero.nii.gz", "every voxel is zero")
    write_nifti(tmp_path / "flat.nii.gz", np.full(SHAPE, 7.5, np.float32))
    assert_rejected(tmp_path / "flat.nii.gz", "constant", "7.5")


def test_a_few_nan_and_inf_voxels_are_cleaned_to_zero_with_a_warning(tmp_path, phantom, caplog):
    array = phantom.array.copy()
    array[0, 0, :10] = np.nan
    array[1, 1, :3] = np.inf  # 13 of 13440 voxels: 0.1%
    write_nifti(tmp_path / "speckled.nii.gz", array)
    with caplog.at_level(logging.WARNING, logger="BrainAgeLib.io"):
        loaded = load_volume(tmp_path / "speckled.nii.gz")
    assert np.all(np.isfinite(loaded.array))
    assert np.all(loaded.array[0, 0, :10] == 0) and np.all(loaded.array[1, 1, :3] == 0)
    np.testing.assert_array_equal(loaded.array[2:], phantom.array[2:])
    assert "13 NaN/Inf voxels" in caplog.text and "speckled.nii.gz" in caplog.text


def test_many_nan_voxels_are_rejected(tmp_path, phantom):
    array = phantom.array.copy()
    array[:2] = np.nan  # 2 of 24 sagittal planes: 8% of the voxels
    write_nifti(tmp_path / "masked.nii.gz", array)
    assert_rejected(tmp_path / "masked.nii.gz", "1120 NaN/Inf voxels", "8.33%")


def test_singular_and_non_finite_affines(tmp_path, phantom):
    flat = RAS_AFFINE.copy()
    flat[:3, 2] = flat[:3, 0]  # the K axis runs along the I axis
    with pytest.raises(InvalidVolumeError, match=r"scan-42: has a singular"):
        validate_volume(Volume(phantom.array, flat), "scan-42")
    broken = RAS_AFFINE.copy()
    broken[0, 3] = np.nan
    with pytest.raises(InvalidVolumeError, match="non-finite"):
        validate_volume(Volume(phantom.array, broken))
    # The same from a file: a NIfTI whose sform has a zero-length K axis.
    image = nib.Nifti1Image(phantom.array, None)
    image.header.set_sform(np.diag([3.0, 3.0, 0.0, 1.0]), code=1)
    path = tmp_path / "squashed.nii.gz"
    nib.save(image, str(path))
    assert_rejected(path, "singular")


@pytest.mark.parametrize("spacing, shown", [(0.1, "0.1 x 3 x 3"), (10.0, "10 x 3 x 3")])
def test_absurd_spacing(tmp_path, rng, spacing, shown):
    path = write_nifti(tmp_path / "odd.nii.gz", rng.random((600, 28, 20)) if spacing < 1 else rng.random(SHAPE),
                       np.diag([spacing, 3.0, 3.0, 1.0]))
    assert_rejected(path, "implausible voxel spacing", shown)


def test_too_small_to_be_a_head(tmp_path, rng):
    path = write_nifti(tmp_path / "mouse.nii.gz", rng.random((20, 20, 20)), np.diag([2.0, 2.0, 2.0, 1.0]))
    assert_rejected(path, "too small to be a head", "40 x 40 x 40 mm")
    path = write_nifti(tmp_path / "thumbnail.nii.gz", rng.random((10, 30, 30)), np.diag([6.0, 3.0, 3.0, 1.0]))
    assert_rejected(path, "too small to be a head", "fewer than 16 voxels")


def test_validate_volume_returns_float32_and_leaves_its_input_alone(phantom):
    integers = Volume(np.rint(phantom.array).astype(np.int16), RAS_AFFINE)
    checked = validate_volume(integers)
    assert checked.array.dtype == np.float32
    assert integers.array.dtype == np.int16
    speckled = phantom.array.copy()
    speckled[0, 0, 0] = np.nan
    source = Volume(speckled, RAS_AFFINE)
    assert validate_volume(source).array[0, 0, 0] == 0
    assert np.isnan(source.array[0, 0, 0])


# ----------------------------------------------------------------------------------------------
# Atomic saving
# ----------------------------------------------------------------------------------------------


def test_save_is_atomic_and_leaves_inputs_untouched(tmp_path, phantom):
    source = save_volume(phantom, tmp_path / "input.nii.gz")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    volume = load_volume(source)
    array_before, affine_before = volume.array.copy(), volume.affine.copy()

    save_volume(volume, tmp_path / "copy.nrrd")
    save_volume(volume, tmp_path / "copy.nhdr")
    save_volume(volume.with_array(volume.array * 2), tmp_path / "copy.nrrd")  # overwrite in place

    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.nhdr", "copy.nrrd", "copy.raw.gz", "input.nii.gz"]
    assert hashlib.sha256(source.read_bytes()).hexdigest() == digest
    np.testing.assert_array_equal(volume.array, array_before)
    np.testing.assert_array_equal(volume.affine, affine_before)
    np.testing.assert_array_equal(load_volume(tmp_path / "copy.nrrd").array, phantom.array * 2)


def test_a_failed_save_keeps_the_old_file_and_leaves_no_temporary_files(tmp_path, phantom, monkeypatch):
    target = save_volume(phantom, tmp_path / "result.nii.gz")
    digest = hashlib.sha256(target.read_bytes()).hexdigest()

    def disk_full(image, filename):
        Path(filename).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nib, "save", disk_full)
    with pytest.raises(InvalidVolumeError, match=r"result\.nii\.gz: could not write the file \(No space left"):
        save_volume(phantom.with_array(phantom.array + 1), target)
    assert [p.name for p in tmp_path.iterdir()] == ["result.nii.gz"]
    assert hashlib.sha256(target.read_bytes()).hexdigest() == digest


def test_save_into_a_missing_folder(tmp_path, phantom):
    with pytest.raises(InvalidVolumeError, match="does not exist"):
        save_volume(phantom, tmp_path / "nowhere" / "head.nii.gz")


# ----------------------------------------------------------------------------------------------
# Real anatomy
# ----------------------------------------------------------------------------------------------


def test_mni152_t1_loads_in_ras_at_1mm(mni_t1_path):
    mni = load_volume(mni_t1_path)
    assert mni.shape == (197, 233, 189)
    assert mni.orientation == ("R", "A", "S")
    assert mni.spacing == pytest.approx((1.0, 1.0, 1.0))
    assert mni.array.dtype == np.float32
    # MNI (0, 0, 0) is the anterior commissure, inside the brain; in front of the face is background.
    inside = tuple(np.rint(mni.world_to_voxel([0.0, 0.0, 0.0])).astype(int))
    outside = tuple(np.rint(mni.world_to_voxel([0.0, 85.0, -60.0])).astype(int))
    assert mni.array[inside] > 0
    assert mni.array[outside] == 0
    # The brain is centred left-right, and the occipital pole lies further back (y ~ -105 mm)
    # than the frontal pole lies forward (y ~ +70 mm): both fail if an axis were flipped.
    brain = mni.voxel_to_world(np.argwhere(mni.array > 0))
    assert abs(brain[:, 0].mean()) < 1.0
    assert brain[:, 1].min() < -100 and 60 < brain[:, 1].max() < 80


def test_colin27_loads_in_ras_at_1mm(colin27_path):
    colin = load_volume(colin27_path)
    assert colin.shape == (181, 217, 181)
    assert colin.orientation == ("R", "A", "S")
    assert colin.spacing == pytest.approx((1.0, 1.0, 1.0))
    # The head's left and right halves are near mirror images in RAS (axis I is left-right).
    left, right = colin.array[:90], colin.array[91:][::-1]
    assert np.corrcoef(left.ravel(), right.ravel())[0, 1] > 0.8


@pytest.mark.parametrize("name, stem", [
    ("sub-01_T1w.nii.gz", "sub-01_T1w"), ("scan.NII", "scan"), ("scan.nii", "scan"), ("head.NRRD", "head"),
    ("brain.mgz", "brain"), ("a.b.mha", "a.b"),
    ("IM0001.dcm", "IM0001"), ("old.img", "old"), ("dicom_folder", "dicom_folder"), (".nii.gz", ".nii.gz"),
    ("notes.txt", "notes.txt"),
])
def test_image_stem_drops_only_a_known_image_extension(name, stem):
    from BrainAgeLib.io import image_stem

    assert image_stem(Path("/data") / name) == stem


def test_a_nifti_without_voxel_size_or_orientation_is_refused(tmp_path):
    """nibabel would take 1 mm for a pixdim of 0; the brain's size would then be a guess."""
    image = nib.Nifti1Image(np.random.default_rng(0).random((40, 40, 40)).astype(np.float32), None)
    image.header["pixdim"][1:4] = [1.0, 2.0, 2.0]
    nib.save(image, tmp_path / "no_size.nii")
    raw = bytearray((tmp_path / "no_size.nii").read_bytes())   # nibabel will not write a 0
    raw[80:84] = np.float32(0.0).tobytes()                       # pixdim[1] (header offset 76 + 4)
    (tmp_path / "no_size.nii").write_bytes(bytes(raw))
    with pytest.raises(InvalidVolumeError, match=r"no_size\.nii: the header gives no voxel size \(pixdim 0, 2, 2\)"):
        load_volume(tmp_path / "no_size.nii")
    # the same voxel sizes with an sform are fine (the sform says the size)
    ok = nib.Nifti1Image(np.asarray(image.dataobj), np.diag([2.0, 2.0, 2.0, 1.0]))
    nib.save(ok, tmp_path / "with_sform.nii")
    assert load_volume(tmp_path / "with_sform.nii").spacing == pytest.approx((2.0, 2.0, 2.0))


def test_a_nifti_whose_sform_and_qform_disagree_is_read_by_its_sform_and_said_so(tmp_path, caplog):
    data = np.random.default_rng(0).random((40, 40, 40)).astype(np.float32)
    sform = np.diag([2.0, 2.0, 2.0, 1.0])
    sform[:3, 3] = [-40, -40, -40]
    qform = sform.copy()
    qform[:3, 3] += [30, 5, 0]
    image = nib.Nifti1Image(data, sform)
    image.set_qform(qform, code=1)
    image.set_sform(sform, code=2)
    nib.save(image, tmp_path / "both.nii.gz")
    notes: list = []
    with caplog.at_level(logging.WARNING):
        volume = load_volume(tmp_path / "both.nii.gz", notes=notes)
    np.testing.assert_allclose(volume.affine, sform)
    assert len(notes) == 1 and "sform and qform disagree" in notes[0] and "30.4 mm" in notes[0]
    assert "both.nii.gz" in caplog.text
    image.set_qform(sform, code=1)   # agreeing headers: nothing to say
    nib.save(image, tmp_path / "agree.nii.gz")
    notes = []
    load_volume(tmp_path / "agree.nii.gz", notes=notes)
    assert notes == []
