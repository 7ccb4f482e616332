"""``prepare``: a T1 volume -> sagittal slices for the encoder, and model space -> input grid.

Real anatomy: nilearn's MNI152 2009a T1 (brain only) downsampled to 2 mm for speed, and
Colin27 ``ch2.nii.gz`` (whole head) at 1 mm for the one run of the full paper preset.
"""
from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from BrainAgeLib import PRESETS, InvalidVolumeError, PreprocessConfig, Volume, get_preset
from BrainAgeLib.io import load_volume, save_volume
from BrainAgeLib.preprocess.pipeline import (
    MIN_NEIGHBOUR_CORRELATION,
    Prepared,
    check_stripped_brain,
    crop_to_largest_component,
    cubic_zoom_matrix,
    neighbour_correlation,
    prepare,
    resize_slices,
)
from BrainAgeLib.bench.profile_prepare import profile_prepare
from BrainAgeLib.preprocess.registration import resample_to_spacing

# Small but complete: N4 and (where needed) template skull stripping, 48 slices of 64 x 64.
SMALL = PreprocessConfig(n4_bias_correction=True, n4_shrink_factor=2, skull_strip="template",
                         registration_spacing_mm=4.0, n_slices=48, image_size=64)
NO_N4 = PreprocessConfig(n4_bias_correction=False, skull_strip="template", n_slices=48, image_size=64)
# For 2 mm whole heads: N4 on 8 mm voxels, registration on 4 mm voxels.
HEAD = PreprocessConfig(n4_bias_correction=True, n4_shrink_factor=4, skull_strip="template",
                        registration_spacing_mm=4.0, n_slices=48, image_size=64)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


# ------------------------------------------------------------------------------------------
# Shapes, ranges, presets
# ------------------------------------------------------------------------------------------

def test_prepare_gives_sagittal_slices_in_unit_range(mni_2mm):
    prepared = prepare(mni_2mm, SMALL)
    assert isinstance(prepared, Prepared)
    assert prepared.slices.shape == (48, 64, 64) and prepared.slices.dtype == np.float32
    assert prepared.slices.min() >= 0.0 and prepared.slices.max() <= 1.0
    # 8-bit quantisation: every value is k / 255
    np.testing.assert_allclose(prepared.slices * 255, np.round(prepared.slices * 255), atol=1e-4)
    assert prepared.brain_mask.shape == (48, 64, 64) and prepared.brain_mask.dtype == bool
    assert 0.3 < prepared.brain_mask.mean() < 0.9
    # the brain-only MNI template is recognised as skull-stripped: no registration needed
    assert prepared.skull_stripped_input and prepared.input_to_template is None
    assert prepared.input_shape == mni_2mm.shape
    np.testing.assert_array_equal(prepared.input_affine, mni_2mm.affine)
    for step in ("reorient_to_ras", "n4_bias_correction", "crop_to_largest_component",
                 "resample_slices", "resize_slices", "total"):
        assert prepared.timings[step] >= 0.0
    assert "skull_strip" not in prepared.timings


def test_slices_are_left_to_right_with_anterior_rows_and_superior_columns(mni_2mm):
    """Model space is the authors' data[i, :, :] of the RAS volume."""
    prepared = prepare(mni_2mm, NO_N4)
    corners = prepared.model_to_world(np.array([[0, 0, 0], [47, 0, 0], [0, 63, 0], [0, 0, 63]]))
    origin = corners[0]
    assert corners[1][0] - origin[0] > 100      # slices: left -> right (x grows)
    assert corners[2][1] - origin[1] > 100      # rows: posterior -> anterior (y grows)
    assert corners[3][2] - origin[2] > 100      # columns: inferior -> superior (z grows)
    np.testing.assert_allclose(prepared.world_to_model(corners), [[0, 0, 0], [47, 0, 0],
                                                                  [0, 63, 0], [0, 0, 63]], atol=1e-9)


def test_preset_name_model_config_and_preprocess_config_agree(mni_2mm):
    tiny = get_preset("tiny")
    by_name = prepare(mni_2mm, "tiny").slices
    np.testing.assert_array_equal(by_name, prepare(mni_2mm, tiny).slices)
    np.testing.assert_array_equal(by_name, prepare(mni_2mm, tiny.preprocess).slices)
    assert by_name.shape == (tiny.n_slices, tiny.image_size, tiny.image_size)
    with pytest.raises(KeyError, match="unknown preset"):
        prepare(mni_2mm, "huge")


def test_every_preset_slices_match_its_model(mni_2mm):
    for name, config in PRESETS.items():
        assert config.preprocess.n_slices == config.n_slices, name
        assert config.preprocess.image_size == config.image_size, name


# ------------------------------------------------------------------------------------------
# The authors' exact operations
# ------------------------------------------------------------------------------------------

def test_cubic_resampling_equals_scipy_zoom_on_the_left_right_axis(rng):
    data = rng.normal(size=(37, 5, 4))
    expected = ndimage.zoom(data, (160 / 37, 1, 1), order=3)
    matrix = cubic_zoom_matrix(37, 160)
    got = (matrix @ data.reshape(37, -1)).reshape(160, 5, 4)
    np.testing.assert_allclose(got, expected, atol=1e-10)


def test_slices_match_the_authors_torchvision_pipeline(mni_2mm):
    """Reproduce wjalal/BrainRotViT's crop -> zoom -> per-slice min-max -> ToPILImage ->
    Resize -> ToTensor by hand and compare with ``prepare`` (N4 and stripping off)."""
    from torchvision import transforms

    config = PreprocessConfig(n4_bias_correction=False, skull_strip="none", n_slices=40,
                              image_size=56)
    # a non-RAS input: the authors reorient with nibabel first
    lia = mni_2mm.reoriented("LIA")
    prepared = prepare(lia, config)

    data = lia.reoriented("RAS").array.astype(np.float64)
    normalized = (data - data.min()) / (data.max() - data.min())
    labels, _ = ndimage.label(normalized > 0.1)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    box = ndimage.find_objects((labels == np.argmax(sizes)).astype(int))[0]
    data = ndimage.zoom(data[box], (40 / data[box].shape[0], 1, 1), order=3)
    pipeline = transforms.Compose([transforms.ToPILImage(), transforms.Resize((56, 56)),
                                   transforms.ToTensor()])
    expected = []
    for plane in data:
        plane = (plane - plane.min()) / (np.ptp(plane) if np.ptp(plane) > 0 else 1)
        expected.append(pipeline(plane)[0].numpy())
    expected = np.stack(expected)
    assert prepared.slices.shape == expected.shape
    assert np.abs(prepared.slices - expected).max() <= 1 / 255 + 1e-6
    assert np.mean(prepared.slices == expected) > 0.999


def test_resize_is_pil_bilinear_with_antialiasing():
    stripes = np.tile([0.0, 1.0], (64, 32))            # 64 x 64, one-pixel stripes
    resized = resize_slices(stripes[None], 16)[0]
    # antialiased 4x reduction averages the stripes; plain bilinear sampling would not
    assert np.abs(resized[2:-2, 2:-2] - 0.5).max() < 0.02


def test_crop_is_the_box_of_the_largest_bright_component():
    data = np.zeros((40, 40, 40), dtype=np.float32)
    data[5:25, 8:30, 10:20] = 1.0       # the brain
    data[30:33, 30:33, 30:33] = 1.0     # a brighter-than-0.1 speck elsewhere
    data[5:25, 8:30, 20:22] = 0.05      # dim rim below the threshold
    box = crop_to_largest_component(data, 0.1)
    assert box == (slice(5, 25), slice(8, 30), slice(10, 20))


# ------------------------------------------------------------------------------------------
# Orientation and geometry
# ------------------------------------------------------------------------------------------

def test_same_head_in_other_orientations_and_formats_gives_the_same_slices(mni_2mm, tmp_path):
    """LPS NRRD, PSR NIfTI and LIA MGZ of one head give the same prepared slices."""
    reference = prepare(mni_2mm, NO_N4).slices
    lps = tmp_path / "head_lps.nrrd"
    save_volume(mni_2mm.reoriented("LPS"), lps)
    psr = tmp_path / "head_psr.nii.gz"
    save_volume(mni_2mm.reoriented("PSR"), psr)
    lia = mni_2mm.reoriented("LIA")
    mgz = tmp_path / "head_lia.mgz"
    nib.save(nib.MGHImage(lia.array.astype(np.float32), lia.affine), str(mgz))
    for path, codes in ((lps, ("L", "P", "S")), (psr, ("P", "S", "R")), (mgz, ("L", "I", "A"))):
        volume = load_volume(path)
        assert volume.orientation == codes
        slices = prepare(volume, NO_N4).slices
        assert correlation(slices, reference) > 0.99, path.name


def test_marker_maps_through_prepare_and_back_to_where_it_was(mni_2mm):
    """A small bright marker in an oblique, anisotropic, non-RAS head comes back within 2 mm."""
    # a 1.5 x 2 x 2.5 mm LIA grid, tilted by 10 degrees about the left-right axis
    head = resample_to_spacing(mni_2mm, 2.0).reoriented("LIA")
    tilt = np.eye(4)
    angle = np.deg2rad(10)
    tilt[1:3, 1:3] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    head = Volume(head.array, tilt @ head.affine)
    marker_ras = np.array([30.0, -20.0, 25.0])              # right parietal white matter
    centre = np.round(head.world_to_voxel(marker_ras)).astype(int)
    marked = head.array.copy()
    marked[tuple(slice(c - 1, c + 2) for c in centre)] = head.array.max()
    marker_ras = head.voxel_to_world(centre)

    config = PreprocessConfig(n4_bias_correction=False, skull_strip="none", n_slices=80,
                              image_size=96)
    with_marker = prepare(head.with_array(marked), config)
    without = prepare(head, config)
    assert with_marker.crop_start == without.crop_start
    difference = np.clip(with_marker.slices - without.slices, 0, None)

    back = with_marker.to_input_grid(difference)
    assert back.shape == head.shape
    np.testing.assert_array_equal(back.affine, head.affine)
    weights = np.where(back.array > 0.5 * back.array.max(), back.array, 0)
    found_voxel = (np.argwhere(weights) * weights[weights > 0][:, None]).sum(0) / weights.sum()
    error_mm = np.linalg.norm(head.voxel_to_world(found_voxel) - marker_ras)
    print(f"marker: {error_mm:.2f} mm from where it was")
    assert error_mm < 2.0

    # and in model space the marker is where world_to_model says
    peak = np.array(np.unravel_index(np.argmax(ndimage.gaussian_filter(difference, 1)),
                                     difference.shape))
    expected = with_marker.world_to_model(marker_ras)
    assert np.all(np.abs(peak - expected) <= 2.0)


def test_to_model_space_and_back_is_the_identity_inside_the_crop(mni_2mm):
    prepared = prepare(mni_2mm, NO_N4)
    # a smooth ramp along anterior-posterior in world space
    i, j, k = np.meshgrid(*[np.arange(n) for n in mni_2mm.shape], indexing="ij")
    world_y = mni_2mm.voxel_to_world(np.stack([i, j, k], -1))[..., 1]
    ramp = mni_2mm.with_array(world_y.astype(np.float32))
    model = prepared.to_model_space(ramp)
    assert model.shape == prepared.slices.shape
    # rows run posterior -> anterior, so the ramp grows along axis 1
    assert np.all(np.diff(model[:, :, 10], axis=1) > 0)
    back = prepared.to_input_grid(model).array
    box = tuple(slice(a, a + n) for a, n in zip(prepared.crop_start, prepared.crop_shape))
    inside = np.zeros(mni_2mm.shape, dtype=bool)
    inside[box] = True       # the MNI volume is RAS already, so the crop box is in its grid
    assert np.abs(back[inside] - world_y[inside]).max() < 0.5      # mm
    assert np.all(back[~inside] == 0)


def test_prepared_affine_places_model_voxel_centres_where_to_input_grid_puts_them(mni_2mm):
    """Prepared.affine (model voxel -> RAS mm) agrees with to_input_grid and to_model_space, on an
    input stored L-P-I (so the reorientation is part of the map)."""
    lpi = mni_2mm.reoriented("LPI")
    prepared = prepare(lpi, NO_N4)
    affine = prepared.affine
    n_slices, height, width = prepared.model_shape
    n_i, n_j, n_k = prepared.crop_shape
    start = np.asarray(prepared.crop_start)
    ras = mni_2mm.reoriented("RAS")
    np.testing.assert_allclose(prepared.ras_affine, ras.affine)
    # the first and last slices lie on the crop box's first and last voxel planes: (n - 1) / (S - 1)
    # input voxels per slice, as the cubic zoom resamples them; rows and columns are PIL's pixel
    # centres, (x + 0.5) * n / size - 0.5 input voxels
    for s, h, w in [(0, 0, 0), (n_slices - 1, height - 1, width - 1), (17, 30, 41)]:
        box_voxel = np.array([s * (n_i - 1) / (n_slices - 1), (h + 0.5) * n_j / height - 0.5,
                              (w + 0.5) * n_k / width - 0.5])
        np.testing.assert_allclose(affine @ [s, h, w, 1.0], ras.affine @ [*(start + box_voxel), 1.0], atol=1e-9)
    # voxel -> RAS -> the input's own voxel: a model map that is its own s (h, w) coordinate, put
    # on the input grid, reads at each input voxel the model coordinate the affine gives it
    coordinates = np.indices(prepared.model_shape).astype(np.float32)
    on_input = np.stack([prepared.to_input_grid(c).array for c in coordinates], axis=-1)
    voxels = np.stack(np.indices(lpi.shape), axis=-1).reshape(-1, 3)
    expected = nib.affines.apply_affine(np.linalg.inv(affine), lpi.voxel_to_world(voxels))
    scale = np.array([(n_slices - 1) / (n_i - 1), height / n_j, width / n_k])
    interior = np.all((expected >= scale) & (expected <= np.asarray(prepared.model_shape) - 1 - scale), axis=1)
    assert interior.sum() > 0.5 * np.prod(prepared.crop_shape)
    np.testing.assert_allclose(on_input.reshape(-1, 3)[interior], expected[interior], atol=1e-3)
    assert np.all(on_input.reshape(-1, 3)[~interior & (on_input.reshape(-1, 3) != 0).any(axis=1)] >= -0.5)
    # and back: the input's world coordinates, brought into model space, are the affine's
    world = np.moveaxis(lpi.voxel_to_world(np.stack(np.indices(lpi.shape), axis=-1)), -1, 0)
    in_model = np.stack([prepared.to_model_space(lpi.with_array(c.astype(np.float32))) for c in world], -1)
    centres = nib.affines.apply_affine(affine, np.stack(np.indices(prepared.model_shape), axis=-1))
    inner = (slice(2, -2),) * 3
    np.testing.assert_allclose(in_model[inner], centres[inner], atol=1e-3)
    np.testing.assert_allclose(prepared.world_to_model(prepared.model_to_world(voxels[:50] * 0.5)),
                               voxels[:50] * 0.5, atol=1e-9)


def test_the_model_space_brain_mask_measures_the_brain_the_input_grid_mask_does(mni_2mm):
    """A model voxel's volume is |det Prepared.affine|: the slice cache's brain volume (from the
    mask in model space) matches the brain mask on the input's own grid."""
    from BrainAgeLib.geometry import voxel_volume_mm3
    from BrainAgeLib.train.slice_cache import prepared_brain_volume_ml

    prepared = prepare(mni_2mm, NO_N4)
    on_input_ml = prepared.input_brain_mask.sum() * np.prod(mni_2mm.spacing) / 1000.0
    in_model_ml = prepared_brain_volume_ml(prepared, mni_2mm)
    assert in_model_ml == pytest.approx(prepared.brain_mask.sum() * voxel_volume_mm3(prepared.affine) / 1000.0)
    print(f"brain: {on_input_ml:.1f} ml on the input grid, {in_model_ml:.1f} ml in model space")
    # (48 slices of a 2 mm brain: the threshold at 0.5 of the trilinear mask loses 0.7%; with
    # crop / S instead of (n - 1) / (S - 1) per slice it was 1.4% low)
    assert in_model_ml == pytest.approx(on_input_ml, rel=0.01)


def test_to_input_grid_rejects_maps_of_the_wrong_shape(mni_2mm):
    prepared = prepare(mni_2mm, "tiny")
    with pytest.raises(ValueError, match="model map must have shape"):
        prepared.to_input_grid(np.zeros((3, 4, 5)))
    with pytest.raises(ValueError, match="input's shape"):
        prepared.to_model_space(np.zeros((3, 4, 5)))


# ------------------------------------------------------------------------------------------
# Skull stripping inside prepare
# ------------------------------------------------------------------------------------------

def test_whole_head_is_skull_stripped_in_any_orientation(colin27):
    head = resample_to_spacing(colin27, 2.0)
    stripped = prepare(head, HEAD)
    assert not stripped.skull_stripped_input
    assert stripped.input_to_template is not None and stripped.timings["skull_strip"] > 0
    # the mask mapped back onto the input's grid holds a brain-sized volume (ml)
    mask_back = stripped.to_input_grid(stripped.brain_mask.astype(np.float32)).array > 0.5
    assert 1300 < mask_back.sum() * 8 / 1000 < 2100
    # N4, registration and stripping do not depend on how the voxels are stored
    lps = prepare(head.reoriented("LPS"), HEAD)
    assert correlation(lps.slices, stripped.slices) > 0.99
    np.testing.assert_allclose(lps.input_to_template, stripped.input_to_template, atol=0.05)


def test_a_strong_intensity_bias_does_not_stop_skull_stripping(colin27):
    """A strong smooth bias (x0.3 to x6, as near a surface coil) spoils the first registration;
    the retry on a bias-corrected copy finds the brain, and the mask matches the unbiased head's."""
    from BrainAgeLib.preprocess.pipeline import MIN_MUTUAL_INFORMATION, template_brain_mask, template_strip

    head = resample_to_spacing(colin27, 2.0)
    i, j, k = np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in head.shape], indexing="ij")
    biased = head.with_array((head.array * np.exp(0.6 * i + 0.5 * j - 0.4 * k + 0.3 * i * j)).astype(np.float32))
    first = template_brain_mask(biased, registration_spacing_mm=4.0)
    assert first.registration.metric > -MIN_MUTUAL_INFORMATION   # the case the retry is for
    _, mask, _ = template_strip(biased, 4.0)
    _, reference, _ = template_strip(head, 4.0)
    dice = 2 * np.count_nonzero(mask & reference) / (np.count_nonzero(mask) + np.count_nonzero(reference))
    assert dice > 0.9


def test_declared_skull_stripped_input_is_not_stripped_again(colin27):
    head = resample_to_spacing(colin27, 2.0)
    declared = prepare(head, NO_N4, skull_stripped=True)
    assert declared.skull_stripped_input and declared.input_to_template is None
    assert "skull_strip" not in declared.timings
    # unstripped, the crop keeps the scalp: the box is larger than a brain's (mm^3)
    assert np.prod(declared.crop_shape) * 8 > 2.0e6


def test_bad_volumes_are_refused_with_a_clear_error(mni_2mm):
    constant = mni_2mm.with_array(np.full(mni_2mm.shape, 7.0, dtype=np.float32))
    with pytest.raises(InvalidVolumeError, match="brighter than 0.1"):
        prepare(constant, "tiny")
    with pytest.raises(ValueError, match="skull_strip must be"):
        prepare(mni_2mm, PreprocessConfig(skull_strip="bet"))


def test_a_volume_that_is_no_head_is_refused_by_skull_stripping(rng):
    """A box of noise: nothing in it matches the template's brain."""
    noise = Volume(rng.random((60, 60, 60)).astype(np.float32) * 100, np.diag([3.0, 3, 3, 1]))
    with pytest.raises(InvalidVolumeError, match="does not match the MNI152 brain template"):
        prepare(noise, HEAD)


def test_an_already_stripped_input_must_look_like_a_brain(mni_t1, rng):
    """Stripped inputs skip registration, so nothing else would notice noise or a blob."""
    grid = np.mgrid[:80, :80, :80] - 40
    ball = (grid ** 2).sum(axis=0) < 36 ** 2            # 2 mm voxels: 1,560 ml
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    noise = Volume((rng.random(ball.shape) * ball).astype(np.float32), affine)
    blob = Volume(ball.astype(np.float32) * 100, affine)
    for volume in (noise, blob):
        with pytest.raises(InvalidVolumeError, match="no anatomy-like structure"):
            prepare(volume, "tiny")
    small = Volume((ball * 100 + rng.random(ball.shape)).astype(np.float32) * ball, np.diag([1.0, 1.0, 1.0, 1.0]))
    with pytest.raises(InvalidVolumeError, match="too small for a brain"):
        check_stripped_brain(small, ball)

    # real brains pass, also subsampled without smoothing to 4 mm (the worst case measured: 0.61)
    brain = mni_t1
    mask = brain.array > 0
    for step in (1, 2, 4):
        sub = Volume(brain.array[::step, ::step, ::step], brain.affine @ np.diag([step, step, step, 1]))
        assert neighbour_correlation(sub.array, mask[::step, ::step, ::step]) > 2 * MIN_NEIGHBOUR_CORRELATION
        check_stripped_brain(sub, mask[::step, ::step, ::step])
    assert abs(neighbour_correlation(noise.array, ball)) < 0.05
    assert neighbour_correlation(blob.array, ball) == 0.0


# ------------------------------------------------------------------------------------------
# The paper preset at 1 mm (the one slow test)
# ------------------------------------------------------------------------------------------

def test_paper_preset_on_a_whole_head_at_1mm(colin27, colin27_brain_mask):
    prepared = prepare(colin27, dataclasses.replace(PRESETS["paper"].preprocess, skull_strip="template"))
    assert prepared.slices.shape == (160, 224, 224)
    assert not prepared.skull_stripped_input and prepared.input_to_template is not None
    # the template method's brain mask, back on the input grid, matches Colin27's extracted
    # brain (deepbet, the default, is checked in test_real_heads.py)
    truth = colin27_brain_mask
    mask = prepared.to_input_grid(prepared.brain_mask.astype(np.float32)).array > 0.5
    dice = 2 * np.count_nonzero(mask & truth) / (mask.sum() + truth.sum())
    assert dice > 0.93, dice
    # the middle slice is brain: bright, and masked mostly inside
    middle = prepared.slices[80]
    assert middle[prepared.brain_mask[80]].mean() > 2 * middle[~prepared.brain_mask[80]].mean()


def test_profile_prepare_reports_time_and_memory_per_step(mni_2mm):
    profile = profile_prepare(mni_2mm, "tiny", isolate=False)
    assert profile.seconds["total"] >= profile.seconds["resize_slices"]
    assert profile.peak_traced_mb["crop_to_largest_component"] > 0
    assert profile.peak_rss_mb >= profile.baseline_rss_mb > 0
    assert "total" in profile.table()


def test_a_brain_of_implausible_size_is_refused(mni_2mm, monkeypatch):
    """If stripping ever returns a brain far from 250-3000 ml, prepare stops with a clear error
    instead of feeding the model a sliver (the stripping itself is replaced here)."""
    import BrainAgeLib.preprocess.pipeline as preprocess
    from BrainAgeLib.preprocess.registration import RegistrationResult
    from BrainAgeLib.preprocess.template_strip import TemplateBrainMask

    sliver = np.zeros(mni_2mm.shape, dtype=bool)
    sliver[40:50, 40:50, 40:50] = True                       # 8 ml
    registration = RegistrationResult(np.eye(4), metric=-0.8, iterations=10, seconds=0.1)
    monkeypatch.setattr(preprocess, "template_brain_mask",
                        lambda volume, **kw: TemplateBrainMask(sliver, registration))
    with pytest.raises(InvalidVolumeError, match="found a brain of 8 ml"):
        prepare(mni_2mm, NO_N4, skull_stripped=False)


def test_n4_grid_in_mm_gives_the_same_fitting_grid_for_any_input_spacing():
    """The demo preset fits its bias field on an ~8 mm grid: shrink 8 at 1 mm, 4 at 2 mm, 5 at
    1.5 mm (the finest axis decides); presets without n4_grid_mm shrink by n4_shrink_factor."""
    from BrainAgeLib.preprocess.pipeline import n4_shrink_for
    from BrainAgeLib.presets import PRESETS

    demo = PRESETS["demo"].preprocess
    assert [n4_shrink_for(demo, (s, s, s)) for s in (1.0, 1.5, 2.0)] == [8, 5, 4]
    assert n4_shrink_for(demo, (2.0, 1.0, 3.0)) == 8
    assert n4_shrink_for(demo, (12.0, 12.0, 12.0)) == 1
    paper = PRESETS["paper"].preprocess
    assert paper.n4_grid_mm is None
    assert [n4_shrink_for(paper, (s, s, s)) for s in (1.0, 2.0)] == [4, 4]


def test_n4_removes_a_smooth_bias_on_a_coarse_grid(mni_2mm):
    """N4 on the 8 mm grid still takes out most of a multiplicative linear bias (brain only)."""
    from BrainAgeLib.preprocess.pipeline import n4_bias_correction

    brain = mni_2mm.array > 0.2 * mni_2mm.array.max()
    x = np.linspace(-1, 1, mni_2mm.shape[0])[:, None, None]
    bias = np.exp(0.6 * x) * np.ones(mni_2mm.shape)
    biased = Volume((mni_2mm.array * bias).astype(np.float32), mni_2mm.affine)
    corrected = n4_bias_correction(biased, shrink_factor=4, mask=brain)

    def left_right_ratio(volume):
        half = mni_2mm.shape[0] // 2
        left, right = volume.array[:half][brain[:half]], volume.array[half:][brain[half:]]
        return float(np.median(right) / np.median(left))

    truth = left_right_ratio(mni_2mm)
    assert abs(np.log(left_right_ratio(biased) / truth)) > 0.25
    assert abs(np.log(left_right_ratio(corrected) / truth)) < 0.1
