"""The attention map as a labelmap: quantile levels inside the brain and a colour table.

A float attention map (0 outside the brain, [0, 1] inside) is hard to read as an overlay: a few
hot voxels set the colour scale and the rest of the brain looks empty. Quantising it into
``levels`` equal-count bins *inside the brain* gives a map whose labels mean the same thing on
every scan ("label 10 = the 10% of brain voxels the model attended to most"), and that Slicer
shows as a labelmap overlay with a legend.

- Label 0 is background: outside the brain (attention 0, or outside ``brain_mask``).
- Labels 1..N: attention quantiles among brain voxels, 1 the lowest, N the highest. Bins are cut
  at the quantiles of the attention values, so they hold equal voxel counts up to ties.
- Colours come from a perceptual matplotlib colormap (``inferno`` by default), brighter and
  more opaque for higher attention so the lowest levels do not hide the anatomy.

``write_color_table`` writes Slicer's colour table text format (``.ctbl``): header lines
starting with ``#``, then one line per label, ``label name R G B A`` with 0-255 components and
no spaces in the name (Slicer reads the name as one token).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from ..atomic_files import write_text_atomic
from ..errors import BrainAgeError
from ..volume import Volume

#: One colour-table entry: (label value, name without spaces, (R, G, B, A) each 0-255).
ColorEntry = Tuple[int, str, Tuple[int, int, int, int]]

DEFAULT_LEVELS = 10
DEFAULT_COLORMAP = "inferno"
#: the bundled colour table of the default labelmap, under Resources/ColorTables
BUNDLED_COLOR_TABLE = "BrainAgeAttention.ctbl"
MAX_LEVELS = 255  # labels are stored as uint8
# Part of the colormap used for levels 1..N: inferno starts near black, invisible over a T1.
COLORMAP_RANGE = (0.15, 1.0)
# Opacity of the lowest and highest level (0-255); the background is fully transparent.
ALPHA_RANGE = (110, 255)


@dataclass
class AttentionLabelmap:
    """An attention labelmap and its legend.

    ``volume``: uint8 labels [I, J, K] on the attention map's grid (same affine).
    ``colors``: one entry per label 0..N, label 0 = background.
    ``thresholds``: the N+1 attention values that bound the levels (level i holds values in
    [thresholds[i-1], thresholds[i]], the top bin closed).
    """

    volume: Volume
    colors: List[ColorEntry]
    thresholds: np.ndarray

    @property
    def levels(self) -> int:
        return len(self.colors) - 1


def attention_labelmap(
    source: object,
    levels: int = DEFAULT_LEVELS,
    brain_mask: Optional[np.ndarray] = None,
    colormap: str = DEFAULT_COLORMAP,
) -> AttentionLabelmap:
    """Quantise an attention map into ``levels`` equal-count levels inside the brain.

    ``source`` is a :class:`~BrainAgeLib.result.Result` (its ``attention``) or an attention
    :class:`Volume`. ``brain_mask`` (bool [I, J, K]) says where the brain is; by default it is
    where the attention is above 0 (the explanation sets it to 0 outside the brain).
    """
    attention = _attention_volume(source)
    levels = int(levels)
    if not 1 <= levels <= MAX_LEVELS:
        raise ValueError(f"levels must be between 1 and {MAX_LEVELS}, got {levels}")
    values = np.asarray(attention.array, dtype=np.float64)
    finite = np.isfinite(values)
    if brain_mask is None:
        inside = finite & (values > 0)
    else:
        brain_mask = np.asarray(brain_mask, dtype=bool)
        if brain_mask.shape != values.shape:
            raise ValueError(f"brain_mask has shape {brain_mask.shape}, the attention map {values.shape}")
        inside = finite & brain_mask
    if not inside.any():
        raise BrainAgeError("the attention map is empty (no brain voxel with attention above 0)")

    brain_values = values[inside]
    thresholds = np.quantile(brain_values, np.linspace(0.0, 1.0, levels + 1))
    labels = np.zeros(values.shape, dtype=np.uint8)
    # Interior cut points only: values equal to a cut go to the upper bin, the maximum to level N.
    labels[inside] = np.searchsorted(thresholds[1:-1], brain_values, side="right") + 1
    return AttentionLabelmap(
        volume=Volume(labels, attention.affine.copy()),
        colors=attention_colors(levels, colormap),
        thresholds=thresholds,
    )


def attention_colors(levels: int = DEFAULT_LEVELS, colormap: str = DEFAULT_COLORMAP) -> List[ColorEntry]:
    """The colour table of an attention labelmap: background + ``levels`` colormap samples.

    Names say which share of brain voxels a level holds, e.g. ``Attention_90-100pct`` for the
    top decile (percentiles of brain voxels ranked by attention). Without matplotlib (inside
    3D Slicer, which does not install it), the default table is read from the bundled ``.ctbl``
    (``scripts/make_color_table.py`` writes it from this function; a test keeps them equal).
    """
    try:
        from matplotlib import colormaps  # lazy: matplotlib is only needed for colours
    except ModuleNotFoundError:
        if (int(levels), colormap) == (DEFAULT_LEVELS, DEFAULT_COLORMAP):
            from ..resources import resource_path

            return read_color_table(resource_path("ColorTables", BUNDLED_COLOR_TABLE))
        raise BrainAgeError(f"an attention colour table other than the bundled one ({DEFAULT_LEVELS} levels, "
                            f"{DEFAULT_COLORMAP}) needs matplotlib: pip install matplotlib") from None

    cmap = colormaps[colormap]
    levels = int(levels)
    entries: List[ColorEntry] = [(0, "Background", (0, 0, 0, 0))]
    for level in range(1, levels + 1):
        position = 0.0 if levels == 1 else (level - 1) / (levels - 1)
        r, g, b, _ = cmap(COLORMAP_RANGE[0] + position * (COLORMAP_RANGE[1] - COLORMAP_RANGE[0]))
        alpha = ALPHA_RANGE[0] + position * (ALPHA_RANGE[1] - ALPHA_RANGE[0])
        low, high = 100.0 * (level - 1) / levels, 100.0 * level / levels
        name = f"Attention_{_percent(low)}-{_percent(high)}pct"
        entries.append((level, name, (_byte(r), _byte(g), _byte(b), int(round(alpha)))))
    return entries


def color_table_text(colors: Sequence[ColorEntry], title: str = "BrainAge attention") -> str:
    """The ``.ctbl`` text of ``colors`` (Slicer's colour table file format)."""
    lines = [f"# Color table file {title}", f"# {len(colors)} values"]
    for label, name, rgba in colors:
        if len(rgba) != 4 or any(not 0 <= int(c) <= 255 for c in rgba):
            raise ValueError(f"colour of label {label} must be 4 integers 0-255, got {rgba}")
        token = re.sub(r"\s+", "_", str(name).strip()) or f"label_{int(label)}"
        r, g, b, a = (int(c) for c in rgba)
        lines.append(f"{int(label)} {token} {r} {g} {b} {a}")
    return "\n".join(lines) + "\n"


def write_color_table(colors: Sequence[ColorEntry], path: Union[str, os.PathLike]) -> Path:
    """Write ``colors`` as a Slicer colour table (``.ctbl``) to ``path``, atomically."""
    path = Path(path)
    text = color_table_text(colors, title=path.name)
    return write_text_atomic(path, text)


def read_color_table(path: Union[str, os.PathLike]) -> List[ColorEntry]:
    """Read a Slicer colour table (``.ctbl``/``.txt``, discrete ``label name R G B A`` lines)."""
    path = Path(path)
    entries: List[ColorEntry] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split()
        try:
            label, name, *rgba = fields
            values = tuple(int(round(float(c))) for c in rgba)
            if len(values) != 4:
                raise ValueError
            entries.append((int(label), name, values))  # type: ignore[arg-type]
        except ValueError:
            raise BrainAgeError(f"{path}: line {number} is not 'label name R G B A': {line!r}") from None
    return entries


def _attention_volume(source: object) -> Volume:
    if isinstance(source, Volume):
        return source
    attention = getattr(source, "attention", None)
    if attention is None:
        raise BrainAgeError("this result has no attention map; predict with explain=True")
    return attention


def _byte(component: float) -> int:
    return int(round(255 * float(component)))


def _percent(value: float) -> str:
    return f"{value:g}".replace(".", "p")
