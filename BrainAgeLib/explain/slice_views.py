"""Three orthogonal planes of a volume for the PNG figures (attention montage, cohort maps, QC).

One place decides how a figure frames a 3D image: which voxel the axial, coronal and sagittal
planes pass through, which box of the volume each panel shows (the brain or head, plus a small
margin, so a small or off-centre brain fills its panel), and how each panel is scaled (in mm, so
anisotropic voxels keep their true aspect). Arrays here are RAS-ordered (``Volume.reoriented("RAS")``).

Panels are arranged for ``imshow(origin="lower")``: axial and coronal in radiological convention
(patient right on the viewer's left, as Slicer shows them), sagittal with anterior to the right.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

PLANES = ("axial", "coronal", "sagittal")
#: plane -> (axis held fixed, axis along the panel's width, axis along its height, width flipped)
_LAYOUT = {"axial": (2, 0, 1, True), "coronal": (1, 0, 2, True), "sagittal": (0, 1, 2, False)}
#: plane -> the patient directions at the panel's left and right edges
EDGE_LABELS = {"axial": ("R", "L"), "coronal": ("R", "L"), "sagittal": ("P", "A")}
#: margin (mm) left around the framed region on every side
MARGIN_MM = 6.0


@dataclass(frozen=True)
class Frame:
    """Where a figure looks: ``point`` (voxel of the RAS array the three planes pass through),
    ``box`` (the voxel box each panel shows: (start, stop) per axis) and the voxel ``spacing`` (mm)."""

    point: Tuple[int, int, int]
    box: Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int]]
    spacing: Tuple[float, float, float]

    def plane(self, array: np.ndarray, name: str) -> np.ndarray:
        """The 2D image of ``array`` (RAS [I, J, K], optionally with trailing channels) in plane
        ``name``, cropped to the box: rows bottom to top, for ``imshow(origin="lower")``."""
        fixed, across, up, flip = _LAYOUT[name]
        index = [slice(start, stop) for start, stop in self.box]
        index[fixed] = self.point[fixed]
        image = np.asarray(array)[tuple(index)]
        # the two remaining axes keep their order: (across, up) with across < up in every layout
        image = np.swapaxes(image, 0, 1)
        return image[:, ::-1] if flip else image

    def extent(self, name: str) -> Tuple[float, float, float, float]:
        """(left, right, bottom, top) of the panel in mm, for ``imshow(extent=...)``."""
        _, across, up, _ = _LAYOUT[name]
        width = (self.box[across][1] - self.box[across][0]) * self.spacing[across]
        height = (self.box[up][1] - self.box[up][0]) * self.spacing[up]
        return (0.0, width, 0.0, height)

    def pixel_centres(self, name: str) -> Tuple[np.ndarray, np.ndarray]:
        """x (mm) of each column and y (mm) of each row of ``plane(..., name)``, e.g. for ``contour``."""
        _, across, up, _ = _LAYOUT[name]
        columns = self.box[across][1] - self.box[across][0]
        rows = self.box[up][1] - self.box[up][0]
        return ((np.arange(columns) + 0.5) * self.spacing[across], (np.arange(rows) + 0.5) * self.spacing[up])

    def panel_widths(self) -> Sequence[float]:
        """Widths (mm) of the three panels, for a figure's width ratios."""
        return [self.extent(name)[1] for name in PLANES]

    def planes_voxel(self, name: str, column: float, row: float) -> Tuple[float, float, float]:
        """The RAS-array voxel (continuous) shown at pixel (``column``, ``row``) of plane ``name``."""
        fixed, across, up, flip = _LAYOUT[name]
        columns = self.box[across][1] - self.box[across][0]
        voxel = [0.0, 0.0, 0.0]
        voxel[fixed] = float(self.point[fixed])
        voxel[across] = self.box[across][0] + ((columns - 1 - column) if flip else column)
        voxel[up] = self.box[up][0] + row
        return tuple(voxel)  # type: ignore[return-value]


def bounding_box(mask: np.ndarray, spacing: Sequence[float], margin_mm: float = MARGIN_MM,
                 min_fraction: float = 0.0) -> Tuple[Tuple[int, int], ...]:
    """The box (start, stop per axis) around ``mask``'s voxels, ``margin_mm`` wider on each side,
    clipped to the array. ``min_fraction``: a slab counts only where it holds at least that
    fraction of the fullest slab's voxels (so stray noise voxels do not stretch the box).
    The whole array when the mask is empty."""
    mask = np.asarray(mask, dtype=bool)
    box = []
    for axis in range(3):
        counts = mask.sum(axis=tuple(a for a in range(3) if a != axis))
        keep = np.flatnonzero(counts > max(0.0, min_fraction * float(counts.max(initial=0))))
        if keep.size == 0:
            return tuple((0, n) for n in mask.shape)
        margin = int(np.ceil(margin_mm / max(float(spacing[axis]), 1e-6)))
        box.append((max(0, int(keep[0]) - margin), min(mask.shape[axis], int(keep[-1]) + 1 + margin)))
    return tuple(box)


def nearest_voxel_of(mask: np.ndarray, point: Sequence[float], spacing: Sequence[float]) -> Tuple[int, int, int]:
    """The voxel of ``mask`` nearest (in mm) to the continuous voxel position ``point``."""
    voxels = np.argwhere(mask)
    distances = (((voxels - np.asarray(point, dtype=float)) * np.asarray(spacing, dtype=float)) ** 2).sum(axis=1)
    return tuple(int(v) for v in voxels[int(np.argmin(distances))])  # type: ignore[return-value]


def mask_centre(mask: np.ndarray, spacing: Sequence[float],
                weights: Optional[np.ndarray] = None) -> Tuple[int, int, int]:
    """The voxel of ``mask`` nearest its (``weights``-weighted) centroid; the array's centre if empty."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return tuple(int(n // 2) for n in mask.shape)  # type: ignore[return-value]
    voxels = np.argwhere(mask).astype(float)
    w = None if weights is None else np.asarray(weights, dtype=float)[mask]
    centre = np.average(voxels, axis=0, weights=w if w is not None and w.sum() > 0 else None)
    return nearest_voxel_of(mask, centre, spacing)


#: A top region more spread than this (RMS distance of its voxels from its centre, mm) is narrowed
#: to its brighter part (next quantile of :data:`NARROWING_QUANTILES`) before its centre is taken.
COMPACT_RMS_MM = 15.0
NARROWING_QUANTILES = (0.95, 0.98, 0.99)


def top_region_centre(values: np.ndarray, region: np.ndarray, spacing: Sequence[float],
                      quantile: float = 0.9) -> Tuple[int, int, int]:
    """Where to put the planes to show a map: the centre of its top-``quantile`` region.

    The voxels of ``region`` (the brain) whose value is at or above the ``quantile`` of the values
    there form the top region; of its connected parts the one holding the most of the map is
    taken. A diffuse map gives a top region spread over the brain, whose centre may fall between
    its bright spots: while the part is more spread than :data:`COMPACT_RMS_MM`, it is narrowed to
    its own brighter voxels (:data:`NARROWING_QUANTILES`), again keeping the connected part with
    the most of the map. The planes go through the part's value-weighted centre (the part's voxel
    nearest to it, so they always cut the bright region and lie inside the brain). Falls back to
    the centre of ``region`` when the map is 0 there.
    """
    values = np.asarray(values, dtype=np.float32)
    region = np.asarray(region, dtype=bool) & np.isfinite(values)
    inside = values[region]
    if inside.size == 0 or float(inside.max()) <= 0.0:
        return mask_centre(region, spacing)
    part = _heaviest_part(values, region, quantile)
    for narrower in NARROWING_QUANTILES:
        if narrower <= quantile or _rms_spread_mm(part, spacing, values) <= COMPACT_RMS_MM:
            continue
        part = _heaviest_part(values, part, narrower)
    return mask_centre(part, spacing, weights=values)


def _heaviest_part(values: np.ndarray, region: np.ndarray, quantile: float) -> np.ndarray:
    """The connected part (26-neighbour) of ``region``'s top-``quantile`` voxels holding the most of the map."""
    from scipy import ndimage

    threshold = max(float(np.quantile(values[region], quantile)), float(np.finfo(np.float32).tiny))
    top = region & (values >= threshold)
    if not top.any():
        return region
    labels, count = ndimage.label(top, structure=np.ones((3, 3, 3), bool))
    if count <= 1:
        return top
    mass = ndimage.sum_labels(values, labels, index=np.arange(1, count + 1))
    return labels == (int(np.argmax(mass)) + 1)


def _rms_spread_mm(mask: np.ndarray, spacing: Sequence[float], weights: np.ndarray) -> float:
    voxels = np.argwhere(mask).astype(float) * np.asarray(spacing, dtype=float)
    w = np.asarray(weights, dtype=float)[mask]
    w = w if w.sum() > 0 else None
    centre = np.average(voxels, axis=0, weights=w)
    return float(np.sqrt(np.average(((voxels - centre) ** 2).sum(axis=1), weights=w)))


def head_mask(array: np.ndarray) -> np.ndarray:
    """The voxels brighter than a tenth of the image's robust maximum (its 99.5th percentile of
    non-zero voxels): head or brain, not air. For framing, not segmentation."""
    array = np.asarray(array, dtype=np.float32)
    finite = array[np.isfinite(array) & (array > 0)]
    if finite.size == 0:
        return np.zeros(array.shape, dtype=bool)
    return array > 0.1 * float(np.percentile(finite, 99.5))


def window(array: np.ndarray, region: Optional[np.ndarray] = None,
           percentiles: Tuple[float, float] = (1.0, 99.5)) -> np.ndarray:
    """``array`` scaled to [0, 1] between two percentiles (of ``region``'s voxels when given)."""
    array = np.asarray(array, dtype=np.float32)
    sample = array[region] if region is not None and np.any(region) else array
    low, high = np.percentile(sample, percentiles)
    return np.clip((array - low) / max(float(high - low), 1e-6), 0.0, 1.0)


def style_panel(ax, name: str, title: Optional[str] = None) -> None:
    """Black panel without ticks, the plane's name above and patient directions beside it."""
    ax.set_facecolor("black")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title is not None:
        ax.set_title(title, color="white", fontsize=10)
    left, right = EDGE_LABELS[name]
    ax.text(-0.01, 0.5, left, color="white", transform=ax.transAxes, fontsize=9, va="center", ha="right")
    ax.text(1.01, 0.5, right, color="white", transform=ax.transAxes, fontsize=9, va="center", ha="left")


def frame_for(shape: Sequence[int], spacing: Sequence[float], point: Sequence[int],
              box_mask: np.ndarray, min_fraction: float = 0.0) -> Frame:
    """A Frame through ``point`` showing ``box_mask``'s bounding box (grown to contain ``point``)."""
    box = bounding_box(box_mask, spacing, min_fraction=min_fraction)
    box = tuple((min(start, int(p)), max(stop, int(p) + 1)) for (start, stop), p in zip(box, point))
    return Frame(point=tuple(int(p) for p in point), box=box,  # type: ignore[arg-type]
                 spacing=tuple(float(s) for s in spacing))  # type: ignore[arg-type]


def figure_layout(frame: Frame, rows: int = 1, panel_height_in: float = 3.6, *, left_in: float = 0.4,
                  right_in: float = 1.2, top_in: float = 0.9, bottom_in: float = 0.8, gap_in: float = 0.45,
                  row_gap_in: float = 0.2, min_width_in: float = 0.0) -> Dict[str, Any]:
    """Sizes for ``rows`` rows of the three panels of ``frame`` on one scale (inches per mm), the
    tallest panel ``panel_height_in`` high and each as wide as its mm extent; margins in inches
    (``right_in`` holds the colour bar). Returns ``figsize``, ``gridspec`` (keyword arguments for
    ``Figure.add_gridspec``) and ``colorbar`` (the colour bar's [left, bottom, width, height] in
    figure fractions). A figure narrower than ``min_width_in`` gets wider side margins."""
    heights = [frame.extent(name)[3] for name in PLANES]
    widths_mm = [max(w, 1e-6) for w in frame.panel_widths()]
    scale = panel_height_in / max(max(heights), 1e-6)           # inches per mm
    widths_in = [w * scale for w in widths_mm]
    width = left_in + sum(widths_in) + 2 * gap_in + right_in
    if width < min_width_in:
        left_in += (min_width_in - width) / 2
        right_in += (min_width_in - width) / 2
        width = min_width_in
    height = top_in + rows * panel_height_in + (rows - 1) * row_gap_in + bottom_in
    panels_top = 1 - top_in / height
    panels_bottom = bottom_in / height
    gridspec = {"width_ratios": widths_mm, "left": left_in / width, "right": 1 - right_in / width,
                "top": panels_top, "bottom": panels_bottom,
                "wspace": gap_in / (sum(widths_in) / 3), "hspace": row_gap_in / panel_height_in}
    bar_height = min(panels_top - panels_bottom, 3.0 / height)
    colorbar = [1 - right_in / width + 0.35 / width, (panels_top + panels_bottom - bar_height) / 2,
                0.14 / width, bar_height]
    return {"figsize": (width, height), "gridspec": gridspec, "colorbar": colorbar}
