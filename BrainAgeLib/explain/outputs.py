"""Files that show one explanation: the attention map, its labelmap + colour table, a PNG montage.

``write_explanation_outputs`` is what ``brainage predict --explain`` (and a batch run) call for
each subject. Into ``out_dir`` it writes, for ``stem``:

- ``<stem>_attention.nii.gz`` (or ``.nrrd``): the float32 map on the input's grid, [0, 1];
- ``<stem>_attention_label.nii.gz`` (or ``.nrrd``) and ``<stem>_attention_label.ctbl``: the map
  as an integer labelmap (0 = background, 1..N by attention quantile inside the brain) and the
  Slicer colour table that gives each level its colour and name;
- ``<stem>_attention.png``: the input with the map overlaid in axial, coronal and sagittal
  planes through the centre of its top-decile region, each panel cropped to the brain, predicted
  age and brain-age gap in the title (and the demo disclaimer for the demo model);
- ``<stem>_attention.json``: what a cohort map needs later (ages, model, the explanation
  method, the map's file name and, when registration ran, the input -> template transform).

Every file is written atomically (temporary file in the same folder, then ``os.replace``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np

from ..atomic_files import atomic_path, write_json_atomic
from ..errors import BrainAgeError
from .slice_views import PLANES, Frame, figure_layout, frame_for, head_mask, style_panel, top_region_centre, window
from ..volume import Volume

PathLike = Union[str, "os.PathLike[str]"]

#: Volume formats for the map and the labelmap; the keys are what ``--explain-format`` accepts.
FORMATS = {"nii.gz": ".nii.gz", "nii": ".nii", "nrrd": ".nrrd"}
#: End of the sidecar's file name, ``<stem>_attention.json`` (``explain.cohort_maps`` searches for it).
SIDECAR_SUFFIX = "_attention.json"


def explanation_paths(out_dir: PathLike, stem: str, fmt: str = "nii.gz") -> Dict[str, Path]:
    """The file names ``write_explanation_outputs`` uses for ``stem`` in ``out_dir``."""
    if fmt not in FORMATS:
        raise BrainAgeError(f"unknown explanation format {fmt!r}; use one of {', '.join(FORMATS)}")
    out_dir = Path(out_dir)
    ext = FORMATS[fmt]
    return {
        "attention": out_dir / f"{stem}_attention{ext}",
        "labelmap": out_dir / f"{stem}_attention_label{ext}",
        "color_table": out_dir / f"{stem}_attention_label.ctbl",
        "montage": out_dir / f"{stem}_attention.png",
        "sidecar": out_dir / f"{stem}{SIDECAR_SUFFIX}",
    }


def write_explanation_outputs(result: Any, out_dir: PathLike, stem: str, fmt: str = "nii.gz", *,
                              volume: Optional[Volume] = None,
                              input_to_template: Optional[np.ndarray] = None,
                              levels: Optional[int] = None,
                              write_map: bool = True,
                              input_path: Optional[PathLike] = None,
                              model_weights_sha256: Optional[str] = None,
                              brain_mask: Optional[np.ndarray] = None,
                              montage: bool = True) -> Dict[str, Path]:
    """Write the explanation files of one ``Result`` (see the module docstring); returns their paths.

    ``volume`` is the input image the map lies on (the montage's background; without it the
    montage shows the map alone). ``input_to_template`` is ``Prepared.input_to_template`` (4x4,
    input RAS mm -> template RAS mm), stored in the sidecar so cohort maps can be made later.
    ``write_map=False`` skips the float map when the caller already wrote it at the same path.
    ``input_path``: the input image's file, stored (absolute) in the sidecar so that cohort maps
    can register a subject whose preprocessing did not (a skull-stripped input).
    ``model_weights_sha256``: the digest of the model's weights (a checkpoint card's
    ``weights_sha256``; default: the result's ``model_weights_sha256`` if it has one), stored in
    the sidecar so that cohort maps name the exact model. ``brain_mask`` (bool, on the input's
    grid): the brain as preprocessing found it, for the montage's framing (default: the result's
    ``brain_mask``, else where the map is non-zero).
    ``montage=False`` skips the PNG (the one file that needs matplotlib; Slicer's worker without it).
    Raises ``BrainAgeError`` when the result has no attention map or the folder is missing.
    """
    attention = getattr(result, "attention", None)
    if attention is None:
        raise BrainAgeError("the result has no attention map; predict with explain=True first")
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise BrainAgeError(f"{out_dir}: output folder does not exist")
    if volume is not None and (tuple(volume.shape) != tuple(attention.shape)
                               or not np.allclose(volume.affine, attention.affine, atol=1e-3)):
        raise BrainAgeError(
            f"the input volume {volume.shape} and the attention map {attention.shape} are on different grids")
    from .labelmap import attention_labelmap, write_color_table
    from ..io import save_volume

    paths = explanation_paths(out_dir, stem, fmt)
    if write_map:
        save_volume(attention, paths["attention"])
    labelmap = attention_labelmap(result, levels) if levels else attention_labelmap(result)
    save_volume(labelmap.volume, paths["labelmap"])
    write_color_table(labelmap.colors, paths["color_table"])
    if brain_mask is None and getattr(result, "brain_mask", None) is not None:
        brain_mask = np.asarray(result.brain_mask.array) > 0
    if montage:
        write_montage(result, paths["montage"], volume=volume, brain_mask=brain_mask)
    else:
        del paths["montage"]
    if input_to_template is None:
        input_to_template = getattr(result, "input_to_template", None)
    write_sidecar(result, paths["sidecar"], attention_file=paths["attention"].name,
                  input_to_template=input_to_template, input_path=input_path,
                  model_weights_sha256=model_weights_sha256)
    return {key: path for key, path in paths.items()}


# ------------------------------------------------------------------------------------------
# Sidecar
# ------------------------------------------------------------------------------------------


def write_sidecar(result: Any, path: PathLike, *, attention_file: str,
                  input_to_template: Optional[np.ndarray] = None, input_path: Optional[PathLike] = None,
                  model_weights_sha256: Optional[str] = None) -> Path:
    """A small JSON file beside the map: ages (years), sex, model (name, weights digest, demo or
    not), the explanation method (``result.explain_method``: "paper" or "relevance"), map file,
    input file and input -> template transform."""
    if model_weights_sha256 is None:
        model_weights_sha256 = getattr(result, "model_weights_sha256", None) or None
    data = {
        "attention_file": attention_file,
        "explain_method": getattr(result, "explain_method", None),
        "input_file": None if input_path is None else str(Path(input_path).expanduser().resolve()),
        "predicted_age": _float_or_none(getattr(result, "predicted_age", None)),
        "chronological_age": _float_or_none(getattr(result, "chronological_age", None)),
        "brain_age_gap": _float_or_none(getattr(result, "brain_age_gap", None)),
        "corrected_brain_age_gap": _float_or_none(getattr(result, "corrected_brain_age_gap", None)),
        "sex": str(getattr(result, "sex", "unknown")),
        "model_name": str(getattr(result, "model_name", "")),
        "model_is_demo": bool(getattr(result, "model_is_demo", False)),
        "model_weights_sha256": None if model_weights_sha256 is None else str(model_weights_sha256),
        "input_to_template": None if input_to_template is None
        else np.asarray(input_to_template, dtype=float).reshape(4, 4).tolist(),
    }
    return write_json_atomic(path, data)


def _float_or_none(value: Any) -> Optional[float]:
    if value is None:
        return None
    value = float(value)
    return value if np.isfinite(value) else None


# ------------------------------------------------------------------------------------------
# Montage
# ------------------------------------------------------------------------------------------


def attention_peak(attention: Volume, smoothing_mm: float = 4.0) -> Tuple[int, int, int]:
    """Voxel index (i, j, k) of the attention peak, after Gaussian smoothing of ``smoothing_mm``
    (sigma) so that one bright voxel does not outweigh a bright region."""
    from scipy import ndimage

    array = np.asarray(attention.array, dtype=np.float32)
    if smoothing_mm <= 0:
        return tuple(int(i) for i in np.unravel_index(int(np.argmax(array)), array.shape))  # type: ignore[return-value]
    # Smooth on a grid of about smoothing_mm / 2 (every step-th voxel; fast on 1 mm scans),
    # then take the finest-grid maximum within one coarse voxel of the coarse peak.
    steps = [max(1, int(smoothing_mm / 2 / max(s, 1e-6))) for s in attention.spacing]
    coarse = array[tuple(slice(None, None, k) for k in steps)]
    sigma = [smoothing_mm / (s * k) for s, k in zip(attention.spacing, steps)]
    smooth = ndimage.gaussian_filter(coarse, sigma=sigma, mode="constant")
    centre = np.unravel_index(int(np.argmax(smooth)), smooth.shape)
    box = tuple(slice(max(0, c * k - k), c * k + k + 1) for c, k in zip(centre, steps))
    local = np.unravel_index(int(np.argmax(array[box])), array[box].shape)
    return tuple(int(b.start + i) for b, i in zip(box, local))  # type: ignore[return-value]


def montage_title(result: Any) -> str:
    """'Predicted brain age 63.2 y | age 60.0 y | BAG +3.2 y (bias-corrected +2.1 y)', then
    '| sex unknown' when the prediction is the mean of the female and male ones, and
    '| map: relevance' (or 'paper') when the result records its explanation method."""
    parts = [f"Predicted brain age {float(result.predicted_age):.1f} y"]
    age = getattr(result, "chronological_age", None)
    gap = getattr(result, "brain_age_gap", None)
    if age is not None:
        parts.append(f"age {float(age):.1f} y")
    if gap is not None:
        text = f"BAG {float(gap):+.1f} y"
        corrected = getattr(result, "corrected_brain_age_gap", None)
        if corrected is not None:
            text += f" (bias-corrected {float(corrected):+.1f} y)"
        parts.append(text)
    if getattr(result, "sex_was_unknown", False):
        parts.append("sex unknown (mean of F and M)")
    method = getattr(result, "explain_method", None)
    if method:
        parts.append(f"map: {method}")
    return " | ".join(parts)


#: The map is computed slice by slice (sagittal); for display it is averaged across neighbouring
#: slices with a Gaussian of this sigma (mm) along left-right, so slice-to-slice differences do
#: not show as streaks in the axial and coronal panels. The map's files are not changed.
DISPLAY_SLICE_SIGMA_MM = 3.0


def display_attention(attention_ras: Volume) -> np.ndarray:
    """The map as the montage shows it (RAS array, [0, 1]): averaged across sagittal slices
    (:data:`DISPLAY_SLICE_SIGMA_MM`), and 0 wherever the map itself is 0 (outside the brain)."""
    from scipy import ndimage

    array = np.clip(np.nan_to_num(np.asarray(attention_ras.array, dtype=np.float32)), 0.0, 1.0)
    sigma = DISPLAY_SLICE_SIGMA_MM / max(attention_ras.spacing[0], 1e-6)
    smooth = ndimage.gaussian_filter1d(array, sigma=sigma, axis=0, mode="constant") if sigma > 0.3 else array
    return np.where(array > 0, smooth, 0.0).astype(np.float32)


def montage_brain(attention_ras: Volume, background_ras: Optional[np.ndarray] = None) -> np.ndarray:
    """Where the montage takes the brain to be (RAS array, bool): where the map is non-zero and,
    with an input image, where that image is not background (a skull-stripped input's zero
    background does not count even where the map leaked onto it)."""
    brain = np.asarray(attention_ras.array) > 0
    if background_ras is not None:
        foreground = head_mask(background_ras)
        if (brain & foreground).any():
            brain &= foreground
    return brain


def montage_frame(attention_ras: Volume, display: np.ndarray, brain: np.ndarray) -> Frame:
    """Planes and crop of the montage: the planes go through the centre of the brain's top-decile
    attention region (of ``display``); each panel shows the brain's box plus a small margin."""
    point = top_region_centre(display, brain, attention_ras.spacing)
    return frame_for(attention_ras.shape, attention_ras.spacing, point, brain)


def add_demo_note(fig: Any, y: float = 0.055) -> None:
    """The demo model's disclaimer (:data:`BrainAgeLib.result.DEMO_DISCLAIMER`), in red across the figure."""
    from ..result import DEMO_DISCLAIMER

    fig.text(0.5, y, "DEMO MODEL: " + DEMO_DISCLAIMER, color="#ff5050", fontsize=8.5, ha="center",
             va="center", weight="bold", wrap=True)


def add_colour_bar(fig: Any, rect: Sequence[float], cmap: Any, vmax: float = 1.0, label: str = "attention") -> Any:
    """A vertical colour bar (0 to ``vmax``) at ``rect`` ([left, bottom, width, height], figure
    fractions), white on black."""
    from matplotlib import cm
    from matplotlib.colors import Normalize

    bar = fig.colorbar(cm.ScalarMappable(norm=Normalize(0, vmax), cmap=cmap),
                       cax=fig.add_axes(rect, label="<colorbar>"))
    bar.ax.tick_params(colors="white", labelsize=8)
    bar.set_label(label, color="white", fontsize=9)
    return bar


def overlay_rgba(values: np.ndarray, cmap: Any, transparent: bool, vmax: float = 1.0) -> np.ndarray:
    """'hot' colours of ``values`` (0 to ``vmax``); see-through where low when drawn over an image."""
    scaled = np.clip(np.asarray(values, dtype=np.float32) / max(float(vmax), 1e-6), 0.0, 1.0)
    rgba = cmap(scaled)
    rgba[..., 3] = np.clip(scaled * 1.5, 0, 0.85) if transparent else 1.0
    return rgba


def write_montage(result: Any, path: PathLike, *, volume: Optional[Volume] = None,
                  brain_mask: Optional[np.ndarray] = None, dpi: int = 110) -> Path:
    """PNG: the input (grey) with the attention map (hot, transparent where low) in three planes
    through the centre of the top-decile attention region, each cropped to the brain and drawn
    in mm; title with predicted age and BAG; the demo disclaimer for demo models.

    ``brain_mask`` (bool, on the map's grid) says where the brain is; without it, where the map
    is non-zero and the input is not background (:func:`montage_brain`)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    attention: Volume = result.attention
    att_ras = attention.reoriented("RAS")
    display = display_attention(att_ras)
    background = None
    if volume is not None:
        background = np.asarray(volume.reoriented("RAS").array, dtype=np.float32)
    if brain_mask is not None and np.shape(brain_mask) != attention.shape:
        raise BrainAgeError(f"the brain mask {np.shape(brain_mask)} and the attention map {attention.shape} "
                            "are on different grids")
    if brain_mask is not None and np.any(brain_mask):
        brain = np.asarray(attention.with_array(np.asarray(brain_mask, dtype=np.uint8)).reoriented("RAS").array) > 0
    else:
        brain = montage_brain(att_ras, background)
    frame = montage_frame(att_ras, display, brain)
    if background is not None:
        background = window(background)

    layout = figure_layout(frame, min_width_in=11.0)
    fig = plt.figure(figsize=layout["figsize"], facecolor="black")
    grid = fig.add_gridspec(1, 3, **layout["gridspec"])
    axes = [fig.add_subplot(grid[0, n]) for n in range(3)]
    cmap = matplotlib.colormaps["hot"]
    # the colour scale ends at the brightest displayed value, so a map whose maximum fell in the
    # averaging across slices still shows its bright regions brightly (the bar gives the values)
    vmax = float(display[brain].max(initial=0.0)) or 1.0
    for ax, name in zip(axes, PLANES):
        extent = frame.extent(name)
        if background is not None:
            ax.imshow(frame.plane(background, name), cmap="gray", origin="lower", extent=extent,
                      vmin=0, vmax=1, interpolation="bilinear")
        ax.imshow(overlay_rgba(frame.plane(display, name), cmap, background is not None, vmax), origin="lower",
                  extent=extent, interpolation="bilinear")
        style_panel(ax, name, name)
    add_colour_bar(fig, layout["colorbar"], cmap, vmax=vmax)
    fig.suptitle(montage_title(result), color="white", fontsize=12)
    world = att_ras.voxel_to_world(np.array(frame.point, dtype=float))
    footer = (f"planes through the centre of the top-decile attention region, RAS ({world[0]:.0f}, "
              f"{world[1]:.0f}, {world[2]:.0f}) mm | map averaged across sagittal slices "
              f"(sigma {DISPLAY_SLICE_SIGMA_MM:g} mm) for display")
    model_name = getattr(result, "model_name", "")
    if model_name:
        footer += f" | model {model_name}"
    fig.text(0.01, 0.015, footer, color="0.8", fontsize=7)
    if getattr(result, "model_is_demo", False):
        add_demo_note(fig)
    return save_figure(fig, path, dpi=dpi)


def save_figure(fig: Any, path: PathLike, dpi: int = 110) -> Path:
    """Save a matplotlib figure as PNG atomically (temporary file beside ``path``), then close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path, suffix=".png") as temporary:
            fig.savefig(temporary, dpi=dpi, facecolor=fig.get_facecolor(), format="png")
    finally:
        plt.close(fig)
    return Path(path)
