"""Volume: spacing/orientation from the affine, exact reorientation, voxel <-> RAS mapping."""
from __future__ import annotations

import numpy as np
import pytest

from BrainAgeLib.volume import Volume

# A small oblique-free grid: 20 x 24 x 16 voxels of 2 x 2.5 x 3 mm, axes L, P, S (like LPS DICOM).
LPS_AFFINE = np.array([
    [-2.0, 0.0, 0.0, 30.0],
    [0.0, -2.5, 0.0, 40.0],
    [0.0, 0.0, 3.0, -20.0],
    [0.0, 0.0, 0.0, 1.0],
])


@pytest.fixture
def lps_volume(rng) -> Volume:
    return Volume(rng.random((20, 24, 16)).astype(np.float32), LPS_AFFINE)


def test_spacing_shape_and_orientation_come_from_the_affine(lps_volume):
    assert lps_volume.shape == (20, 24, 16)
    assert lps_volume.spacing == pytest.approx((2.0, 2.5, 3.0))
    assert lps_volume.orientation == ("L", "P", "S")
    assert lps_volume.array.dtype == np.float32


def test_integer_labelmaps_keep_their_dtype_and_other_arrays_become_float32():
    assert Volume(np.zeros((2, 2, 2), np.int16), np.eye(4)).array.dtype == np.int16
    assert Volume(np.zeros((2, 2, 2), np.float64), np.eye(4)).array.dtype == np.float32
    with pytest.raises(ValueError, match="3D"):
        Volume(np.zeros((2, 2)), np.eye(4))


def test_voxel_to_world_and_back(lps_volume):
    # Voxel (0,0,0) sits at the origin column; voxel (1,2,3) moves 2 mm left, 5 mm posterior, 9 mm up.
    assert lps_volume.voxel_to_world([0, 0, 0]) == pytest.approx([30.0, 40.0, -20.0])
    assert lps_volume.voxel_to_world([1, 2, 3]) == pytest.approx([28.0, 35.0, -11.0])
    points = np.array([[28.0, 35.0, -11.0], [0.0, 0.0, 0.0]])
    ijk = lps_volume.world_to_voxel(points)
    assert ijk.shape == (2, 3)
    assert ijk[0] == pytest.approx([1, 2, 3])
    assert ijk[1] == pytest.approx([15.0, 16.0, 20.0 / 3.0])
    assert lps_volume.voxel_to_world(ijk) == pytest.approx(points)


def test_reoriented_to_ras_flips_axes_and_keeps_every_voxel_in_place(lps_volume):
    ras = lps_volume.reoriented("RAS")
    assert ras.orientation == ("R", "A", "S")
    assert ras.shape == (20, 24, 16)
    assert ras.spacing == pytest.approx((2.0, 2.5, 3.0))
    np.testing.assert_array_equal(ras.array, lps_volume.array[::-1, ::-1, :])
    # The L axis ran from x=30 leftward over 20 voxels, so the R-pointing axis starts at 30-2*19.
    assert ras.affine[:3, 3] == pytest.approx([30.0 - 2.0 * 19, 40.0 - 2.5 * 23, -20.0])
    # Every voxel keeps its world position and value.
    for ijk in [(0, 0, 0), (3, 7, 11), (19, 23, 15)]:
        world = lps_volume.voxel_to_world(ijk)
        new_ijk = np.rint(ras.world_to_voxel(world)).astype(int)
        assert ras.world_to_voxel(world) == pytest.approx(new_ijk)
        assert ras.array[tuple(new_ijk)] == lps_volume.array[ijk]


@pytest.mark.parametrize("codes", ["PSR", ("L", "I", "A"), "RAS", "SRP"])
def test_reoriented_permutes_axes_exactly_and_round_trips(lps_volume, codes):
    moved = lps_volume.reoriented(codes)
    assert moved.orientation == tuple(codes)
    assert sorted(moved.spacing) == pytest.approx([2.0, 2.5, 3.0])
    assert moved.array.flags.c_contiguous
    back = moved.reoriented("LPS")
    np.testing.assert_array_equal(back.array, lps_volume.array)
    np.testing.assert_allclose(back.affine, lps_volume.affine, atol=1e-9)
    # The centre of the field of view does not move.
    centre = (np.asarray(lps_volume.shape) - 1) / 2
    moved_centre = (np.asarray(moved.shape) - 1) / 2
    assert moved.voxel_to_world(moved_centre) == pytest.approx(lps_volume.voxel_to_world(centre))


def test_reoriented_does_not_modify_the_original(lps_volume):
    before = lps_volume.array.copy()
    lps_volume.reoriented("RAS").array[...] = 0
    np.testing.assert_array_equal(lps_volume.array, before)
    assert lps_volume.affine == pytest.approx(LPS_AFFINE)


def test_repr_is_one_short_line_naming_grid_and_values_not_the_array():
    """print(result.attention) must not dump millions of numbers."""
    array = np.zeros((181, 217, 181), np.float32)
    array[90, 100, 80] = 0.75
    array[0, 0, 0] = -0.25
    volume = Volume(array, LPS_AFFINE)
    text = repr(volume)
    assert "\n" not in text and len(text) < 160, text
    assert "181x217x181" in text and "2 x 2.5 x 3 mm" in text and "LPS" in text and "float32" in text
    assert "-0.25" in text and "0.75" in text
    assert str(volume) == text
    labels = Volume(np.arange(24, dtype=np.uint8).reshape(2, 3, 4), np.eye(4))
    assert "uint8" in repr(labels) and "0..23" in repr(labels)
