"""Files that show one explanation: the attention map, its labelmap + colour table, a PNG montage.

``write_explanation_outputs`` is what ``brainage predict --explain`` (and a batch run) call for
each subject. Into ``out_dir`` it writes, for ``stem``:

- ``<stem>_attention.nii.gz`` (or ``.nrrd``): the float32 map on the input's grid, [0, 1];
- ``<stem>_attention_label.nii.gz`` (or ``.nrrd``) and ``<stem>_attention_label.ctbl``: the map
  as an integer labelmap (0 = background, 1..N by attention quantile inside the brain) and the
  Slicer colour table that gives each level its colour and name;
- ``<stem>_attention.png``: the input with the map overlaid in axial, coronal and sagittal
  planes through the attention peak, predicted age and brain-age gap in the title (and the demo
  disclaimer for the demo model);
- ``<stem>_attention.json``: what a cohort map needs later (ages, model, the map's file name
  and, when registration ran, the input -> template transform).

Every file is written atomically (temporary file in the same folder, then ``os.replace``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np

from .atomic_files import atomic_path, write_json_atomic
from .errors import BrainAgeError
from .volume import Volume

PathLike = Union[str, "os.PathLike[str]"]

#: Volume formats for the map and the labelmap; the keys are what ``--explain-format`` accepts.
FORMATS = {"nii.gz": ".nii.gz", "nii": ".nii", "nrrd": ".nrrd"}
SIDECAR_SUFFIX = "_attention.json"
_DEMO_LINE = "DEMO MODEL trained on synthetic phantoms: not for clinical use"


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
                              input_path: Optional[PathLike] = None) -> Dict[str, Path]:
    """Write the explanation files of one ``Result`` (see the module docstring); returns their paths.

    ``volume`` is the input image the map lies on (the montage's background; without it the
    montage shows the map alone). ``input_to_template`` is ``Prepared.input_to_template`` (4x4,
    input RAS mm -> template RAS mm), stored in the sidecar so cohort maps can be made later.
    ``write_map=False`` skips the float map when the caller already wrote it at the same path.
    ``input_path``: the input image's file, stored (absolute) in the sidecar so that cohort maps
    can register a subject whose preprocessing did not (a skull-stripped input).
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
    from .attention_labelmap import attention_labelmap, write_color_table
    from .io import save_volume

    paths = explanation_paths(out_dir, stem, fmt)
    if write_map:
        save_volume(attention, paths["attention"])
    labelmap = attention_labelmap(result, levels) if levels else attention_labelmap(result)
    save_volume(labelmap.volume, paths["labelmap"])
    write_color_table(labelmap.colors, paths["color_table"])
    write_montage(result, paths["montage"], volume=volume)
    if input_to_template is None:
        input_to_template = getattr(result, "input_to_template", None)
    write_sidecar(result, paths["sidecar"], attention_file=paths["attention"].name,
                  input_to_template=input_to_template, input_path=input_path)
    return {key: path for key, path in paths.items()}


# ------------------------------------------------------------------------------------------
# Sidecar
# ------------------------------------------------------------------------------------------


def write_sidecar(result: Any, path: PathLike, *, attention_file: str,
                  input_to_template: Optional[np.ndarray] = None, input_path: Optional[PathLike] = None) -> Path:
    """A small JSON file beside the map: ages (years), sex, model, map file, input file and
    input -> template transform."""
    data = {
        "attention_file": attention_file,
        "input_file": None if input_path is None else str(Path(input_path).expanduser().resolve()),
        "predicted_age": _float_or_none(getattr(result, "predicted_age", None)),
        "chronological_age": _float_or_none(getattr(result, "chronological_age", None)),
        "brain_age_gap": _float_or_none(getattr(result, "brain_age_gap", None)),
        "corrected_brain_age_gap": _float_or_none(getattr(result, "corrected_brain_age_gap", None)),
        "sex": str(getattr(result, "sex", "unknown")),
        "model_name": str(getattr(result, "model_name", "")),
        "model_is_demo": bool(getattr(result, "model_is_demo", False)),
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
    """'Predicted brain age 63.2 y | age 60.0 y | BAG +3.2 y (bias-corrected +2.1 y)'."""
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
    return " | ".join(parts)


def _planes(array: np.ndarray, peak: Tuple[int, int, int]):
    """Axial, coronal, sagittal 2D images of a RAS-ordered array, as (name, image, axis labels).

    Images are arranged for ``imshow(origin="lower")``: axial and coronal in radiological
    convention (patient right on the viewer's left, as Slicer shows them), sagittal with
    anterior to the right.
    """
    i, j, k = peak
    axial = array[::-1, :, k].T        # x: R->L (radiological), y: P->A
    coronal = array[::-1, j, :].T      # x: R->L, y: I->S
    sagittal = array[i, :, :].T        # x: P->A, y: I->S
    return [("axial", axial, ("R", "L")), ("coronal", coronal, ("R", "L")), ("sagittal", sagittal, ("P", "A"))]


def write_montage(result: Any, path: PathLike, *, volume: Optional[Volume] = None,
                  dpi: int = 110) -> Path:
    """PNG: the input (grey) with the attention map (hot, transparent where low) in three planes
    through the attention peak; title with predicted age and BAG; the demo warning for demo models."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib import cm
    from matplotlib.colors import Normalize

    attention: Volume = result.attention
    att_ras = attention.reoriented("RAS")
    spacing = att_ras.spacing
    peak = attention_peak(att_ras)
    att = np.clip(np.asarray(att_ras.array, dtype=np.float32), 0.0, 1.0)
    background = None
    if volume is not None:
        background = np.asarray(volume.reoriented("RAS").array, dtype=np.float32)
        low, high = np.percentile(background, [1, 99.5])
        background = np.clip((background - low) / max(high - low, 1e-6), 0, 1)

    # physical aspect of each plane: (height spacing / width spacing)
    aspects = {"axial": spacing[1] / spacing[0], "coronal": spacing[2] / spacing[0],
               "sagittal": spacing[2] / spacing[1]}
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.6), facecolor="black")
    cmap = matplotlib.colormaps["hot"]
    att_planes = _planes(att, peak)
    bg_planes = _planes(background, peak) if background is not None else [None] * 3
    for ax, (name, image, (left, right)), bg in zip(axes, att_planes, bg_planes):
        ax.set_facecolor("black")
        if bg is not None:
            ax.imshow(bg[1], cmap="gray", origin="lower", aspect=aspects[name], vmin=0, vmax=1,
                      interpolation="bilinear")
        rgba = cmap(Normalize(0, 1)(image))
        rgba[..., 3] = np.clip(image * 1.5, 0, 0.85) if bg is not None else 1.0
        ax.imshow(rgba, origin="lower", aspect=aspects[name], interpolation="bilinear")
        ax.set_title(name, color="white", fontsize=10)
        ax.text(0.02, 0.5, left, color="white", transform=ax.transAxes, fontsize=9, va="center")
        ax.text(0.98, 0.5, right, color="white", transform=ax.transAxes, fontsize=9, va="center", ha="right")
        ax.set_xticks([])
        ax.set_yticks([])
    world = att_ras.voxel_to_world(np.array(peak, dtype=float))
    fig.colorbar(cm.ScalarMappable(norm=Normalize(0, 1), cmap=cmap), ax=list(axes), fraction=0.02,
                 pad=0.01).ax.tick_params(colors="white", labelsize=8)
    title = montage_title(result)
    fig.suptitle(title, color="white", fontsize=12)
    footer = f"attention peak at RAS ({world[0]:.0f}, {world[1]:.0f}, {world[2]:.0f}) mm"
    model_name = getattr(result, "model_name", "")
    if model_name:
        footer += f" | model {model_name}"
    fig.text(0.01, 0.02, footer, color="0.8", fontsize=8)
    if getattr(result, "model_is_demo", False):
        fig.text(0.5, 0.06, _DEMO_LINE, color="#ff5050", fontsize=11, ha="center", weight="bold")
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
