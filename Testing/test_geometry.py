"""One geometry: RAS <-> LPS, Volume <-> SimpleITK and resampling, each defined in BrainAgeLib.geometry."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from BrainAgeLib import geometry
from BrainAgeLib.geometry import (
    LPS_TO_RAS,
    resample,
    resample_array,
    sitk_affine,
    sitk_to_volume,
    volume_to_sitk,
    voxel_map_between,
)
from BrainAgeLib.io import load_volume, save_volume
from BrainAgeLib.preprocess.registration import ras_matrix_from_sitk
from BrainAgeLib.volume import Volume


def oblique_affine(degrees: float = 20.0) -> np.ndarray:
    angle = np.deg2rad(degrees)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-3.0, -2.5, 3.5])
    affine[:3, 3] = [40.0, 50.0, -25.0]
    return affine


@pytest.fixture
def oblique(rng) -> Volume:
    return Volume(rng.random((20, 21, 22)).astype(np.float32), oblique_affine())


def test_lps_to_ras_negates_x_and_y_and_is_its_own_inverse():
    np.testing.assert_array_equal(LPS_TO_RAS @ [10.0, -20.0, 30.0, 1.0], [-10.0, 20.0, 30.0, 1.0])
    np.testing.assert_array_equal(LPS_TO_RAS @ LPS_TO_RAS, np.eye(4))
    with pytest.raises(ValueError):
        LPS_TO_RAS[0, 0] = 1.0   # one constant, shared: nobody may change it


def test_volume_to_sitk_places_each_voxel_at_its_lps_point_and_back(oblique):
    image = volume_to_sitk(oblique)
    for index in [(0, 0, 0), (10, 20, 21), (19, 3, 7)]:
        lps = np.asarray(image.TransformIndexToPhysicalPoint(index))
        np.testing.assert_allclose(LPS_TO_RAS[:3, :3] @ lps, oblique.voxel_to_world(np.asarray(index)), atol=1e-9)
        assert image[index] == oblique.array[index]
    back = sitk_to_volume(image)
    np.testing.assert_array_equal(back.array, oblique.array)
    np.testing.assert_allclose(back.affine, oblique.affine, atol=1e-9)


def test_an_oblique_nrrd_written_by_io_has_the_geometry_volume_to_sitk_gives(tmp_path, oblique):
    """io writes and reads SimpleITK files through geometry's converters and LPS constant."""
    path = save_volume(oblique, tmp_path / "oblique.nrrd")
    on_disk = sitk.ReadImage(str(path))
    expected = volume_to_sitk(oblique, dtype=None, orthonormal_directions=False)
    np.testing.assert_allclose(on_disk.GetOrigin(), expected.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(on_disk.GetDirection(), expected.GetDirection(), atol=1e-9)
    np.testing.assert_allclose(on_disk.GetSpacing(), expected.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(sitk_affine(on_disk), oblique.affine, atol=1e-9)
    loaded = load_volume(path)
    np.testing.assert_array_equal(loaded.array, oblique.array)
    np.testing.assert_allclose(loaded.affine, oblique.affine, atol=1e-9)


def test_a_sitk_transform_is_read_as_the_ras_map_it_is():
    """SimpleITK's LPS translation of (+5, +6, +7) mm moves RAS points by (-5, -6, +7) mm."""
    shift = sitk.Euler3DTransform()
    shift.SetTranslation((5.0, 6.0, 7.0))
    np.testing.assert_allclose(ras_matrix_from_sitk(shift), [[1, 0, 0, -5.0], [0, 1, 0, -6.0], [0, 0, 1, 7.0],
                                                             [0, 0, 0, 1]], atol=1e-12)


def test_resample_array_with_the_identity_and_an_integer_shift_copies_voxels(rng):
    array = rng.random((12, 13, 14)).astype(np.float32)
    np.testing.assert_array_equal(resample_array(array, np.eye(4), array.shape, order=1), array)
    shift = np.eye(4)
    shift[:3, 3] = [2, 3, 4]
    out = resample_array(array, shift, (10, 10, 10), order=3)
    np.testing.assert_allclose(out, array[2:12, 3:13, 4:14], atol=1e-5)
    assert out.dtype == np.float32


def test_resample_onto_a_rotated_grid_follows_the_world_not_the_indices(rng):
    volume = Volume(rng.random((8, 9, 10)).astype(np.float32), oblique_affine(0.0))
    # the same field of view with its voxel axes turned by 90 degrees about S
    turned = volume.reoriented("ASR")
    out = resample(volume, turned.affine, turned.shape, order=1, mode="nearest")   # edges: rounding
    np.testing.assert_allclose(out.affine, turned.affine)
    np.testing.assert_allclose(out.array, turned.array, atol=1e-6)


def test_resample_through_a_world_map_and_outside_the_source_is_cval(rng):
    volume = Volume(rng.random((10, 10, 10)).astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    moved = np.eye(4)
    moved[:3, 3] = [4.0, 0.0, 0.0]       # target RAS + 4 mm in x = source RAS: two voxels along i
    out = resample(volume, volume.affine, volume.shape, order=1, world_map=moved, cval=-1.0)
    np.testing.assert_allclose(out.array[:8], volume.array[2:], atol=1e-6)
    assert np.all(out.array[8:] == -1.0)
    np.testing.assert_allclose(voxel_map_between(volume.affine, volume.affine, moved)[:3, 3], [2.0, 0.0, 0.0])


def test_geometry_imports_without_simpleitk_or_scipy_until_used():
    """Volume and io stay importable in Slicer before SimpleITK is installed."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['SimpleITK'] = None; sys.modules['scipy'] = None; "
            "import BrainAgeLib.geometry, BrainAgeLib.io; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "ok", result.stderr
    assert geometry.__all__
