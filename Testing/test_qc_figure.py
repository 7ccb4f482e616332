"""The QC picture: brain-mask outline over the input in three planes.

A synthetic head (scalp shell around a brighter, off-centre 'brain') on an anisotropic grid
stored in a non-RAS orientation, inside a field of view much larger than the head. The picture
is read back as drawn: its green pixels are mapped to voxels through each panel's axes and must
lie on the mask's edge.
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from BrainAgeLib.errors import BrainAgeError
from BrainAgeLib.explain.qc_figure import qc_figure, qc_frame, write_qc_figure
from BrainAgeLib.explain.slice_views import PLANES
from BrainAgeLib.volume import Volume

SPACING = (1.5, 1.2, 2.0)
SHAPE = (150, 200, 110)


@pytest.fixture(scope="module")
def head():
    affine = np.eye(4)
    affine[:3, :3] = np.diag(SPACING)
    affine[:3, 3] = -np.asarray(SHAPE) * SPACING / 2 + [20, 30, -15]
    ras = Volume(np.zeros(SHAPE, np.float32), affine)
    world = ras.voxel_to_world(np.stack(np.indices(SHAPE), axis=-1).astype(float))

    def inside(centre, radii):
        return np.sum((world - np.asarray(centre)) ** 2 / np.asarray(radii, float) ** 2, axis=-1) <= 1

    scalp = inside((0, 0, 0), (75, 95, 80))
    brain = inside((12, 8, 10), (55, 70, 55))   # off-centre: a flipped panel would miss it
    rng = np.random.default_rng(3)
    image = np.where(scalp, 300.0, 0.0) + np.where(brain, 500.0, 0.0) + rng.normal(0, 8, SHAPE)
    volume = ras.with_array(np.abs(image).astype(np.float32)).reoriented("LPI")
    mask = ras.with_array(brain.astype(np.uint8)).reoriented("LPI").array > 0
    return volume, mask, scalp


def test_the_png_is_written_atomically_at_the_figures_size(head, tmp_path):
    import matplotlib.image

    volume, mask, _ = head
    path = write_qc_figure(volume, mask, tmp_path / "sub-01_qc.png", "sub-01 | brain mask 1030 ml | no QC flags")
    assert path == tmp_path / "sub-01_qc.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["sub-01_qc.png"]     # no temporary file left
    pixels = matplotlib.image.imread(path)
    fig = qc_figure(volume, mask, "sub-01 | brain mask 1030 ml | no QC flags")
    width, height = fig.get_size_inches() * fig.dpi
    assert abs(pixels.shape[0] - height) <= 1 and abs(pixels.shape[1] - width) <= 1
    # the three panels share one mm scale, so the picture is about as wide as the head is long
    assert 1.5 < pixels.shape[1] / pixels.shape[0] < 4.0
    assert "sub-01 | brain mask 1030 ml | no QC flags" in [t.get_text() for t in fig.texts]


def test_the_outline_lies_on_the_masks_edge_in_every_plane(head):
    volume, mask, _ = head
    fig = qc_figure(volume, mask, "edge")
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(float) / 255
    green = (rgb[..., 1] > 0.6) & (rgb[..., 0] < 0.35) & (rgb[..., 1] - rgb[..., 2] > 0.3)
    frame = qc_frame(volume.reoriented("RAS"), volume.with_array(mask.astype(np.uint8)).reoriented("RAS").array > 0)
    mask_ras = volume.with_array(mask.astype(np.uint8)).reoriented("RAS").array > 0
    # voxels within two voxels of the boundary (the contour runs between voxel centres, 1-2 px wide)
    near_edge = ndimage.binary_dilation(mask_ras, iterations=2) & ~ndimage.binary_erosion(mask_ras, iterations=2)
    axes = sorted((ax for ax in fig.axes if ax.images), key=lambda ax: ax.get_position().x0)
    assert [ax.get_title() for ax in axes] == list(PLANES)
    height = rgb.shape[0]
    for ax, name in zip(axes, PLANES):
        box = ax.get_window_extent()
        rows, cols = np.nonzero(green[int(height - box.y1):int(height - box.y0), int(box.x0):int(box.x1)])
        assert rows.size > 200, f"{name}: {rows.size} outline pixels"
        display = np.column_stack([cols + int(box.x0) + 0.5, height - (rows + int(height - box.y1) + 0.5)])
        x_mm, y_mm = ax.transData.inverted().transform(display).T
        across, up = frame.pixel_centres(name)
        column = x_mm / (across[1] - across[0]) - 0.5
        row = y_mm / (up[1] - up[0]) - 0.5
        voxels = np.array([frame.planes_voxel(name, c, r) for c, r in zip(column, row)])
        index = np.clip(np.round(voxels).astype(int), 0, np.array(mask_ras.shape) - 1)
        on_edge = near_edge[tuple(index.T)]
        assert on_edge.mean() > 0.97, f"{name}: {on_edge.mean():.3f} of the outline on the mask's edge"
        # and the outline goes all round: it reaches the mask's extent in the plane on every side
        plane_mask = frame.plane(mask_ras, name)
        filled_rows, filled_cols = np.nonzero(plane_mask)
        assert column.min() <= filled_cols.min() + 1.5 and column.max() >= filled_cols.max() - 1.5, name
        assert row.min() <= filled_rows.min() + 1.5 and row.max() >= filled_rows.max() - 1.5, name


def test_planes_go_through_the_masks_centre_and_panels_show_the_head_not_the_field_of_view(head):
    volume, mask, scalp = head
    ras = volume.reoriented("RAS")
    mask_ras = volume.with_array(mask.astype(np.uint8)).reoriented("RAS").array > 0
    frame = qc_frame(ras, mask_ras)
    assert mask_ras[frame.point]
    centroid = np.argwhere(mask_ras).mean(axis=0)
    assert np.all(np.abs((np.array(frame.point) - centroid) * SPACING) <= np.array(SPACING))
    head_extent = [(np.ptp(np.flatnonzero(scalp.any(axis=tuple(a for a in range(3) if a != axis)))) + 1) * SPACING[axis]
                   for axis in range(3)]                         # mm along R-L, P-A, I-S
    for name, (across, up) in zip(PLANES, [(0, 1), (0, 2), (1, 2)]):
        _, width, _, height = frame.extent(name)
        assert head_extent[across] <= width <= head_extent[across] + 15, name
        assert head_extent[up] <= height <= head_extent[up] + 15, name


def test_a_mask_on_another_grid_is_refused(head, tmp_path):
    volume, mask, _ = head
    with pytest.raises(BrainAgeError, match="different grids"):
        write_qc_figure(volume, mask[:-1], tmp_path / "qc.png", "x")
    assert not list(tmp_path.iterdir())


def test_an_empty_mask_still_gives_a_picture_that_says_so(head, tmp_path):
    volume, mask, _ = head
    path = write_qc_figure(volume, np.zeros_like(mask), tmp_path / "qc.png", "sub-02 | no brain found")
    assert path.stat().st_size > 10_000
    assert any("empty" in t.get_text() for t in qc_figure(volume, np.zeros_like(mask), "x").texts)
