"""The quality-control picture: the brain mask's outline over the input, in three planes (PNG).

A glance at it says whether skull stripping kept the whole brain and nothing else: the outline
should follow the brain's surface, not cut off the top of the brain nor take in skull, scalp or
face. The planes pass through the mask's centre; each panel shows the head (the input's
non-background voxels and the mask) plus a small margin, to scale in mm, axial and coronal in
radiological view (as the attention montage; both are framed by :mod:`BrainAgeLib.explain.slice_views`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Tuple, Union

import numpy as np

from ..errors import BrainAgeError
from .slice_views import PLANES, Frame, figure_layout, frame_for, head_mask, mask_centre, style_panel, window
from ..volume import Volume

PathLike = Union[str, "os.PathLike[str]"]

#: Colour of the mask's outline: bright green, clear on a grey image.
OUTLINE_COLOUR = "#00ff40"
OUTLINE_WIDTH = 1.2  # points
#: A slab of the image counts as head where it holds at least this fraction of the fullest slab's
#: head voxels, so stray bright noise in the air does not widen the panels.
HEAD_SLAB_FRACTION = 0.02


def qc_frame(volume_ras: Volume, mask_ras: np.ndarray) -> Frame:
    """Planes through the mask's centre (its voxel nearest its centroid; the head's when the mask
    is empty), each panel the head's box plus a margin. Both arguments RAS-ordered."""
    mask_ras = np.asarray(mask_ras, dtype=bool)
    head = head_mask(volume_ras.array) | mask_ras
    point = mask_centre(mask_ras if mask_ras.any() else head, volume_ras.spacing)
    return frame_for(volume_ras.shape, volume_ras.spacing, point, head, min_fraction=HEAD_SLAB_FRACTION)


def _as_ras(volume: Volume, brain_mask: np.ndarray) -> Tuple[Volume, np.ndarray]:
    mask = np.asarray(brain_mask)
    if mask.shape != volume.shape:
        raise BrainAgeError(f"the brain mask {mask.shape} and the image {volume.shape} are on different grids")
    mask_ras = volume.with_array(mask.astype(bool).astype(np.uint8)).reoriented("RAS").array > 0
    return volume.reoriented("RAS"), mask_ras


def qc_figure(volume: Volume, brain_mask: np.ndarray, title: str, dpi: int = 110) -> Any:
    """The matplotlib figure :func:`write_qc_figure` saves (see there)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    ras, mask_ras = _as_ras(volume, brain_mask)
    frame = qc_frame(ras, mask_ras)
    image = window(ras.array, region=head_mask(ras.array) | mask_ras)
    layout = figure_layout(frame, right_in=0.4, top_in=0.8, bottom_in=0.45, min_width_in=9.0)
    fig = plt.figure(figsize=layout["figsize"], facecolor="black", dpi=dpi)
    grid = fig.add_gridspec(1, 3, **layout["gridspec"])
    for n, name in enumerate(PLANES):
        ax = fig.add_subplot(grid[0, n])
        extent = frame.extent(name)
        ax.imshow(frame.plane(image, name), cmap="gray", origin="lower", extent=extent, vmin=0, vmax=1,
                  interpolation="bilinear")
        plane_mask = frame.plane(mask_ras, name).astype(np.float32)
        if plane_mask.any() and not plane_mask.all():
            x, y = frame.pixel_centres(name)
            ax.contour(x, y, plane_mask, levels=[0.5], colors=[OUTLINE_COLOUR], linewidths=OUTLINE_WIDTH)
        ax.set_xlim(extent[0], extent[1])
        ax.set_ylim(extent[2], extent[3])
        style_panel(ax, name, name)
    fig.suptitle(title, color="white", fontsize=11)
    world = ras.voxel_to_world(np.array(frame.point, dtype=float))
    voxel_ml = float(np.prod(ras.spacing)) / 1000.0
    footer = (f"brain mask outline (green), {np.count_nonzero(mask_ras) * voxel_ml:.0f} ml; planes through the "
              f"mask's centre, RAS ({world[0]:.0f}, {world[1]:.0f}, {world[2]:.0f}) mm"
              if mask_ras.any() else "the brain mask is empty; planes through the head's centre")
    fig.text(0.01, 0.02, footer, color="0.8", fontsize=7.5)
    return fig


def write_qc_figure(volume: Volume, brain_mask: np.ndarray, path: PathLike, title: str) -> Path:
    """Write the QC picture of ``volume`` with ``brain_mask`` to ``path`` (PNG, atomically); returns the path.

    ``brain_mask`` is boolean (or 0/1) on ``volume``'s own grid, whatever its orientation.
    ``title`` is the first line (e.g. subject, mask volume and QC flags). The figure shows the
    input in grey with the mask's outline (:data:`OUTLINE_COLOUR`) in axial, coronal and sagittal
    planes through the mask's centre, each panel cropped to the head and drawn to scale in mm.
    Raises ``BrainAgeError`` when the mask is not on the volume's grid.
    """
    from .outputs import save_figure

    fig = qc_figure(volume, brain_mask, title)
    return save_figure(fig, path, dpi=int(fig.dpi))


def qc_figure_path(out_dir: PathLike, stem: str) -> Path:
    """Where a prediction's QC picture goes: ``OUT/<stem>_qc.png``."""
    return Path(out_dir) / f"{stem}_qc.png"


def write_result_qc_figure(result: Any, volume: Volume, out_dir: PathLike, stem: str) -> Path:
    """The QC picture of one prediction: its brain mask over ``volume`` (the input), titled with
    the subject, the mask's volume and method, and the QC flags (or "QC: no flags")."""
    import textwrap

    mask = getattr(result, "brain_mask", None)
    if mask is None:
        raise BrainAgeError("the result carries no brain mask to draw")
    qc = result.qc
    volume_text = "" if qc.brain_volume_ml is None else f"{qc.brain_volume_ml:.0f} ml, "
    flags = "QC: " + ("; ".join(qc.flags) if qc.flags else "no flags")
    title = f"{stem}: brain mask {volume_text}{qc.skull_strip}\n" + "\n".join(textwrap.wrap(flags, 120))
    return write_qc_figure(volume, np.asarray(mask.array) > 0, qc_figure_path(out_dir, stem), title)
