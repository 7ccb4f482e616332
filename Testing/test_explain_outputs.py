"""The attention montage shows the brain and the map: framing, planes, streaks, title.

Each scene is a synthetic head on a known grid; the montage's figure is captured just before it
is saved (``save_figure``) and its panels are inspected as drawn: which pixels are brain, what
the overlay holds, how wide each panel is on the page.
"""
from __future__ import annotations

import numpy as np
import pytest

import BrainAgeLib.explain.outputs as explain_outputs
from BrainAgeLib.explain.outputs import montage_title, write_montage
from BrainAgeLib.result import DEMO_DISCLAIMER, Result
from BrainAgeLib.volume import Volume


def grid(shape, spacing, origin=None) -> Volume:
    spacing = np.asarray(spacing, float)
    origin = -np.asarray(shape) * spacing / 2 if origin is None else np.asarray(origin, float)
    affine = np.eye(4)
    affine[:3, :3] = np.diag(spacing)
    affine[:3, 3] = origin
    return Volume(np.zeros(shape, np.float32), affine)


def world_of(volume: Volume) -> np.ndarray:
    return volume.voxel_to_world(np.stack(np.indices(volume.shape), axis=-1).astype(float))


def ellipsoid(world: np.ndarray, centre, radii) -> np.ndarray:
    return np.sum((world - np.asarray(centre)) ** 2 / np.asarray(radii, float) ** 2, axis=-1) <= 1


def blob(world: np.ndarray, centre, sigma: float) -> np.ndarray:
    return np.exp(-np.sum((world - np.asarray(centre)) ** 2, axis=-1) / (2 * sigma ** 2))


@pytest.fixture
def captured(monkeypatch):
    """The montage figures, drawn, as they were handed to save_figure."""
    figures = []
    original = explain_outputs.save_figure

    def keep(fig, path, dpi=110):
        fig.canvas.draw()
        figures.append(fig)
        return original(fig, path, dpi=dpi)

    monkeypatch.setattr(explain_outputs, "save_figure", keep)
    monkeypatch.setattr("matplotlib.pyplot.close", lambda *a, **k: None)
    return figures


def panels(fig):
    """The three image panels (axial, coronal, sagittal), left to right."""
    axes = [ax for ax in fig.axes if ax.images and ax.get_label() != "<colorbar>"]
    axes.sort(key=lambda ax: ax.get_position().x0)
    assert [ax.get_title() for ax in axes] == ["axial", "coronal", "sagittal"]
    return axes


def drawn(fig, ax) -> np.ndarray:
    """The RGB pixels of panel ``ax`` as the PNG shows them."""
    rgba = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(float) / 255
    box = ax.get_window_extent()
    height = rgba.shape[0]
    return rgba[int(height - box.y1) + 1:int(height - box.y0) - 1, int(box.x0) + 1:int(box.x1) - 1]


def grey_fraction(pixels: np.ndarray) -> float:
    """Fraction of a panel's pixels showing the (grey) brain rather than black background."""
    return float(np.mean(pixels.mean(axis=-1) > 0.15))


def result_with(attention: Volume, **kwargs) -> Result:
    return Result(predicted_age=40.0, attention=attention, model_name="test", **kwargs)


def test_a_small_off_centre_brain_fills_its_panels_at_its_true_aspect(tmp_path, captured):
    """An infant-sized brain (semi-axes 40-55 mm) in one corner of a 256 mm field of view,
    anisotropic voxels (1 x 1.2 x 2.5 mm): each panel is cropped to the brain, and drawn in mm."""
    volume = grid((256, 214, 102), (1.0, 1.2, 2.5))
    world = world_of(volume)
    centre = (-60.0, 50.0, 40.0)
    brain = ellipsoid(world, centre, (40, 55, 38))
    image = volume.with_array(np.where(brain, 1.0, 0.0).astype(np.float32))
    attention = volume.with_array((blob(world, centre, 15.0) * brain).astype(np.float32))
    write_montage(result_with(attention), tmp_path / "m.png", volume=image)
    fig = captured[-1]
    for ax, expected in zip(panels(fig), [(80, 110), (80, 76), (110, 76)]):  # brain's width x height, mm
        assert grey_fraction(drawn(fig, ax)) > 0.45, ax.get_title()
        box = ax.get_window_extent()
        width, height = expected
        # shape of the panel on the page = shape of the brain in mm (plus the same margin all round)
        assert box.width / box.height == pytest.approx(width / height, rel=0.25), ax.get_title()


def test_planes_of_a_stripped_input_cut_the_brain_not_the_attention_left_on_the_background(tmp_path, captured):
    """A skull-stripped input (0 outside the brain) whose map also has a bright slab on the zero
    background above the vertex: the planes go through the brain's top-decile region."""
    volume = grid((90, 108, 90), (2.0, 2.0, 2.0))
    world = world_of(volume)
    brain = ellipsoid(world, (0, 0, 0), (65, 85, 60))
    image = volume.with_array(np.where(brain, 0.8 + 0.2 * np.cos(world[..., 1] / 9), 0).astype(np.float32))
    spot = (25.0, -30.0, 5.0)
    inside = 0.7 * blob(world, spot, 10.0) * brain
    slab = ~brain & (world[..., 2] > 45) & (world[..., 2] < 75) & (np.abs(world[..., 0]) < 50) & (np.abs(world[..., 1]) < 60)
    attention = volume.with_array(np.where(slab, 1.0, inside).astype(np.float32))
    write_montage(result_with(attention), tmp_path / "m.png", volume=image)
    fig = captured[-1]
    axial, coronal, sagittal = panels(fig)
    # the axial plane is not a sliver: it cuts at least half of the brain's widest axial section
    widest = brain.sum(axis=(0, 1)).max()
    assert (axial.images[0].get_array() > 0).sum() >= 0.5 * widest
    # every panel shows the spot at (nearly) its full strength
    for ax in (axial, coronal, sagittal):
        overlay = np.asarray(ax.images[-1].get_array())
        assert overlay[..., 3].max() > 0 and overlay_value(overlay).max() >= 0.6 * 0.7, ax.get_title()


def overlay_value(rgba: np.ndarray) -> np.ndarray:
    """The map value (0-1) behind each pixel's colour in an overlay drawn with the 'hot' colour map."""
    import matplotlib

    levels = np.linspace(0, 1, 256)
    table = matplotlib.colormaps["hot"](levels)[:, :3]
    rgb = np.asarray(rgba, float)[..., :3]
    if rgb.max() > 1.0:
        rgb = rgb / 255.0
    nearest = np.argmin(((rgb[..., None, :] - table) ** 2).sum(axis=-1), axis=-1)
    return levels[nearest]


def test_slice_by_slice_differences_of_the_map_do_not_show_as_streaks(tmp_path, captured):
    """The map is computed per sagittal slice; alternate slices at 100% and 35% of a smooth
    blob must not show as vertical streaks in the axial and coronal panels."""
    volume = grid((96, 110, 90), (1.5, 1.5, 1.5))
    world = world_of(volume)
    brain = ellipsoid(world, (0, 0, 0), (65, 80, 60))
    per_slice = np.where(np.arange(volume.shape[0]) % 2 == 0, 1.0, 0.35)[:, None, None]
    attention = volume.with_array((blob(world, (10, -5, 5), 25.0) * per_slice * brain).astype(np.float32))
    image = volume.with_array(brain.astype(np.float32))
    write_montage(result_with(attention), tmp_path / "m.png", volume=image)
    fig = captured[-1]
    axial, coronal, _ = panels(fig)
    for ax in (axial, coronal):
        values = overlay_value(np.asarray(ax.images[-1].get_array()))
        across = np.abs(np.diff(values, axis=1)).mean()  # left-right: from one sagittal slice to the next
        along = np.abs(np.diff(values, axis=0)).mean()
        assert across < 2.0 * along, (ax.get_title(), across, along)


def test_title_says_when_sex_was_unknown_and_the_demo_note_is_the_library_disclaimer(tmp_path, captured):
    volume = grid((40, 48, 40), (4.0, 4.0, 4.0))
    world = world_of(volume)
    brain = ellipsoid(world, (0, 0, 0), (60, 80, 55))
    attention = volume.with_array((blob(world, (0, 0, 0), 20.0) * brain).astype(np.float32))
    unknown = result_with(attention, sex="unknown", sex_was_unknown=True, model_is_demo=True)
    assert "sex unknown" in montage_title(unknown)
    assert "sex" not in montage_title(result_with(attention, sex="F"))
    write_montage(unknown, tmp_path / "m.png", volume=volume.with_array(brain.astype(np.float32)))
    texts = " ".join(t.get_text() for t in captured[-1].texts)
    assert "sex unknown" in texts
    assert DEMO_DISCLAIMER in texts.replace("\n", " ")


def test_a_brain_mask_given_by_the_caller_frames_the_panels(tmp_path, captured):
    """Preprocessing's brain mask, when the caller has it, decides the crop: a map spread over the
    whole head (a failed skull strip) does not widen the panels beyond the brain."""
    volume = grid((100, 120, 100), (2.0, 2.0, 2.0))
    world = world_of(volume)
    head = ellipsoid(world, (0, 0, 0), (90, 110, 90))
    brain = ellipsoid(world, (0, 10, 10), (50, 60, 45))
    image = volume.with_array(np.where(head, 0.6, 0) + np.where(brain, 0.4, 0)).reoriented("PSL")
    attention = volume.with_array((0.2 * head + blob(world, (10, 10, 10), 12.0) * brain).astype(np.float32)).reoriented("PSL")
    result = result_with(attention)
    write_montage(result, tmp_path / "whole.png", volume=image)
    write_montage(result, tmp_path / "brain.png", volume=image,
                  brain_mask=volume.with_array(brain.astype(np.uint8)).reoriented("PSL").array > 0)
    whole, masked = (panels(fig) for fig in captured[-2:])
    for name, a, b in zip(("axial", "coronal", "sagittal"), whole, masked):
        (_, w1, _, h1), (_, w2, _, h2) = a.images[0].get_extent(), b.images[0].get_extent()
        assert w2 < 0.7 * w1 and h2 < 0.7 * h1, name   # mm shown: brain (100-120) + margin, not head (180-220)
    with pytest.raises(Exception, match="different grids"):
        write_montage(result, tmp_path / "bad.png", volume=image, brain_mask=brain)
