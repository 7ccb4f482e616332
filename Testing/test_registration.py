"""Affine registration to the bundled MNI152 template and template-based skull stripping.

Real anatomy: nilearn's MNI152 2009a T1 (brain only) and Colin27 ``ch2.nii.gz`` (whole head)
with its brain ``ch2better.nii.gz`` from Debian's mricron-data. Known rigid motions are applied
and must be recovered within 2 mm (mean displacement over the brain).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from BrainAgeLib.geometry import volume_to_sitk
from BrainAgeLib.preprocess.registration import (
    register_to_template,
    resample_template_mask,
    resample_to_spacing,
)
from BrainAgeLib.preprocess.template_strip import detect_skull_stripped, template_brain_mask
from BrainAgeLib.preprocess.template import load_template
from BrainAgeLib.volume import Volume

def random_rigid(rng: np.random.Generator, max_degrees: float = 15.0, max_mm: float = 20.0,
                 centre=(0.0, -18.0, 18.0)) -> np.ndarray:
    """4x4 RAS rigid motion: a random rotation of ``max_degrees`` about ``centre`` (mm), then a
    random translation of ``max_mm``."""
    axis = rng.normal(size=3)
    rotation = Rotation.from_rotvec(np.deg2rad(max_degrees) * axis / np.linalg.norm(axis))
    direction = rng.normal(size=3)
    motion = np.eye(4)
    motion[:3, :3] = rotation.as_matrix()
    centre = np.asarray(centre)
    motion[:3, 3] = centre - motion[:3, :3] @ centre + max_mm * direction / np.linalg.norm(direction)
    return motion


def move_content(volume: Volume, motion: np.ndarray) -> Volume:
    """The head moved by ``motion`` (RAS mm) and resampled onto the same voxel grid."""
    # output voxel -> world -> world before the motion -> input voxel
    voxel_map = np.linalg.inv(volume.affine) @ np.linalg.inv(motion) @ volume.affine
    moved = ndimage.affine_transform(volume.array, voxel_map[:3, :3], offset=voxel_map[:3, 3],
                                     order=1, mode="constant", cval=0.0)
    return volume.with_array(moved.astype(np.float32))


def mean_displacement_mm(a: np.ndarray, b: np.ndarray, points: np.ndarray) -> float:
    """Mean distance (mm) between where two 4x4 affines send the same points [N, 3]."""
    pa = points @ a[:3, :3].T + a[:3, 3]
    pb = points @ b[:3, :3].T + b[:3, 3]
    return float(np.linalg.norm(pa - pb, axis=1).mean())


def brain_points(template) -> np.ndarray:
    mask = template.brain_mask
    ijk = np.argwhere(mask.array > 0)[::7]
    return ijk @ mask.affine[:3, :3].T + mask.affine[:3, 3]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b)))


def test_bundled_template_is_mni152_2009a_at_2mm():
    template = load_template()
    assert template.t1.shape == template.brain_mask.shape == (99, 117, 95)
    assert template.t1.spacing == pytest.approx((2.0, 2.0, 2.0))
    assert template.t1.orientation == ("R", "A", "S")
    # MNI origin: the anterior commissure at world (0, 0, 0) lies inside the brain mask
    ac = np.round(template.brain_mask.world_to_voxel(np.zeros(3))).astype(int)
    assert template.brain_mask.array[tuple(ac)] == 1
    assert 1700 < template.brain_volume_ml < 2000
    notice = (template_dir := Path(__file__).resolve().parent.parent / "Resources" / "Templates")
    assert "Louis Collins" in (notice / "LICENSE-MNI152.txt").read_text()
    assert sum(p.stat().st_size for p in template_dir.iterdir()) < 2 * 2 ** 20


def test_volume_to_sitk_converts_ras_to_lps(mni_2mm):
    oblique = Volume(mni_2mm.array, random_rigid(np.random.default_rng(3)) @ mni_2mm.affine)
    image = volume_to_sitk(oblique)
    index = (10, 20, 30)
    lps = np.asarray(image.TransformIndexToPhysicalPoint(index))
    ras = oblique.voxel_to_world(np.asarray(index))
    np.testing.assert_allclose(lps * [-1, -1, 1], ras, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_registration_recovers_known_rigid_motion_of_brain(mni_2mm, seed):
    rng = np.random.default_rng(seed)
    motion = random_rigid(rng)
    moved = move_content(mni_2mm, motion)
    result = register_to_template(moved, spacing_mm=3.0, with_skull=False)
    # the template sits where the unmoved MNI brain was: input -> template undoes the motion
    moved_brain = brain_points(load_template()) @ motion[:3, :3].T + motion[:3, 3]
    error = mean_displacement_mm(result.input_to_template, np.linalg.inv(motion), moved_brain)
    print(f"brain: mean displacement {error:.2f} mm")
    assert error < 2.0, f"mean displacement {error:.2f} mm over the brain"


def test_registration_recovers_known_rigid_motion_of_whole_head(colin27):
    """With skull, scalp and neck: the motion found is the known one composed with Colin27's
    own (small) offset from MNI152."""
    head = resample_to_spacing(colin27, 2.0)
    reference = register_to_template(head, spacing_mm=3.0, with_skull=True)
    motion = random_rigid(np.random.default_rng(7))
    moved = register_to_template(move_content(head, motion), spacing_mm=3.0, with_skull=True)
    expected = reference.input_to_template @ np.linalg.inv(motion)
    points = brain_points(load_template())
    in_moved_head = points @ np.linalg.inv(expected)[:3, :3].T + np.linalg.inv(expected)[:3, 3]
    error = mean_displacement_mm(moved.input_to_template, expected, in_moved_head)
    print(f"whole head: mean displacement {error:.2f} mm")
    assert error < 2.0, f"mean displacement {error:.2f} mm over the brain"


def test_registration_is_deterministic(mni_2mm):
    """Same input, same answer (to 0.001 mm: multithreaded sums differ in the last digits)."""
    moved = move_content(mni_2mm, random_rigid(np.random.default_rng(2), 10, 10))
    first = register_to_template(moved, spacing_mm=4.0, with_skull=False)
    second = register_to_template(moved, spacing_mm=4.0, with_skull=False)
    np.testing.assert_allclose(first.input_to_template, second.input_to_template, atol=1e-3)


def test_template_mask_follows_the_registration(mni_2mm):
    """Carried back through the recovered transform, the template mask covers the moved brain."""
    motion = random_rigid(np.random.default_rng(11), max_degrees=10, max_mm=15)
    moved = move_content(mni_2mm, motion)
    result = register_to_template(moved, spacing_mm=3.0, with_skull=False)
    template_mask = load_template().brain_mask
    carried = resample_template_mask(template_mask, moved, result.input_to_template) > 0.5
    # truth: the template mask on the unmoved grid (MNI space), moved with the head
    unmoved = resample_template_mask(template_mask, mni_2mm, np.eye(4))
    truth = move_content(mni_2mm.with_array(unmoved), motion).array > 0.5
    assert dice(carried, truth) > 0.97


def test_detects_already_skull_stripped_inputs(mni_t1, colin27, colin27_brain_mask):
    assert detect_skull_stripped(mni_t1)                     # MNI152 2009a as nilearn ships it
    assert detect_skull_stripped(colin27.with_array(colin27.array * colin27_brain_mask))  # its brain
    assert not detect_skull_stripped(colin27)                 # Colin27 with scalp and skull
    assert not detect_skull_stripped(resample_to_spacing(colin27, 2.0))


def test_colin27_skull_strip_matches_its_extracted_brain(colin27, colin27_brain_mask):
    """Colin27 moved by a known rigid motion (so the MNI-space start is not a free gift)."""
    motion = random_rigid(np.random.default_rng(5), max_degrees=10, max_mm=10)
    moved = move_content(colin27, motion)
    truth = move_content(colin27.with_array(colin27_brain_mask.astype(np.float32)), motion).array > 0.5
    result = template_brain_mask(moved, registration_spacing_mm=3.0)
    score = dice(result.brain_mask, truth)
    print(f"Colin27 skull strip: Dice {score:.4f} against ch2better")
    assert score > 0.93, f"Dice {score:.3f} against ch2better"
    volume_ml = result.brain_mask.sum() * np.prod(colin27.spacing) / 1000
    assert 1400 < volume_ml < 2000


def test_small_synthetic_head_is_not_fitted_to_its_scalp():
    """A brain 18 % smaller (linear) than MNI152 inside a bright scalp (BrainAgeLib.synth.phantoms):
    with sparse random metric sampling the registration once locked onto the scalp."""
    from BrainAgeLib.synth.phantoms import make_phantom

    phantom = make_phantom(40, "F", 1, spacing=2.0, skull=True)
    tissue = phantom.tissue
    truth = (tissue["gm"].array + tissue["wm"].array + tissue["csf"].array) > 0.5
    assert truth.sum() * 8 / 1000 < 1100      # ml: a small brain (MNI152's is ~1890)
    result = template_brain_mask(phantom.volume, registration_spacing_mm=3.0)
    score = dice(result.brain_mask, truth)
    print(f"small phantom skull strip: Dice {score:.3f}")
    assert score > 0.9
    assert abs(result.brain_mask.sum() / truth.sum() - 1) < 0.2


def test_template_side_is_computed_once_per_template_and_grid():
    """Registration derives the template's registration grid and brain centre once per process
    (read-only, shared); another template object, or another grid, gets its own."""
    import dataclasses

    from BrainAgeLib.preprocess import registration

    template = load_template()
    grid = registration.template_grid(template, 4.0, 4.0)
    assert registration.template_grid(template, 4.0, 4.0) is grid
    assert registration.template_grid(template, 3.0, 4.0)[0].shape != grid[0].shape
    assert not grid[0].array.flags.writeable and not grid[1].flags.writeable
    centre, top = registration.template_brain(template)
    mask = template.brain_mask
    points = np.argwhere(mask.array > 0) @ mask.affine[:3, :3].T + mask.affine[:3, 3]
    np.testing.assert_allclose(centre, points.mean(axis=0))
    assert top == pytest.approx(np.percentile(points[:, 2], 99.9))
    other = dataclasses.replace(template)                  # equal content, another object
    assert registration.template_grid(other, 4.0, 4.0) is not grid
    np.testing.assert_array_equal(registration.template_grid(other, 4.0, 4.0)[1], grid[1])
