"""Draw BrainAge's 128 x 128 icons from the bundled MNI152 template.

A sagittal slice of the template brain (the model reads sagittal slices), an attention hot spot
in the colours of the attention labelmap (inferno), and a clock (age) on a dark rounded tile.
Deterministic: the same inputs give byte-identical PNGs. Run from the repository root:

    python scripts/make_icons.py

Writes Resources/Icons/BrainAge.png (the extension icon) and BrainAge/Resources/Icons/BrainAge.png
(the module icon; the same picture).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from BrainAgeLib.io import load_volume  # noqa: E402

SIZE = 128
TEMPLATE = REPO / "Resources" / "Templates" / "mni152_2009a_t1_brain_2mm.nii.gz"
TARGETS = (REPO / "Resources" / "Icons" / "BrainAge.png", REPO / "BrainAge" / "Resources" / "Icons" / "BrainAge.png")
BACKGROUND = np.array([24, 28, 40], dtype=float)  # dark slate
MARGIN = 10  # px between the tile's edge and the brain


def sagittal_slice() -> np.ndarray:
    """A parasagittal slice (x = +8 mm) as [rows top->bottom = S->I, cols left->right = P->A], 0-1."""
    volume = load_volume(TEMPLATE).reoriented("RAS")
    i = int(round(volume.world_to_voxel(np.array([8.0, 0.0, 0.0]))[0]))
    plane = volume.array[i].T[::-1]  # [K, J] with superior at the top, anterior to the right
    rows, cols = np.nonzero(plane > 0)
    plane = plane[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    return plane / plane.max()


def tile_mask(size: int, radius: float) -> np.ndarray:
    """Anti-aliased alpha (0-1) of a rounded square."""
    centre = (size - 1) / 2
    y, x = np.mgrid[0:size, 0:size].astype(float)
    dx = np.maximum(np.abs(x - centre) - (centre - radius), 0)
    dy = np.maximum(np.abs(y - centre) - (centre - radius), 0)
    return np.clip(radius + 0.5 - np.hypot(dx, dy), 0, 1)


def draw_icon() -> np.ndarray:
    from matplotlib import colormaps

    plane = sagittal_slice()
    scale = (SIZE - 2 * MARGIN) / max(plane.shape)
    brain = np.clip(ndimage.zoom(plane, scale, order=1), 0, 1)
    canvas = np.zeros((SIZE, SIZE))
    top, left = (SIZE - brain.shape[0]) // 2, (SIZE - brain.shape[1]) // 2
    canvas[top:top + brain.shape[0], left:left + brain.shape[1]] = brain
    inside = canvas > 0.05

    rgb = BACKGROUND[None, None, :] * np.ones((SIZE, SIZE, 1))
    grey = (0.25 + 0.75 * canvas)[..., None] * np.array([235.0, 235.0, 240.0])
    rgb[inside] = grey[inside]

    # Attention: a smooth hot spot over the posterior-superior cortex, inside the brain only.
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(float)
    heat = np.exp(-(((x - 0.42 * SIZE) ** 2) / (2 * 14.0 ** 2) + ((y - 0.40 * SIZE) ** 2) / (2 * 12.0 ** 2)))
    heat = np.where(inside, heat, 0.0)
    colours = colormaps["inferno"](0.15 + 0.85 * heat)[..., :3] * 255
    alpha = np.clip(1.6 * heat - 0.25, 0, 0.85)[..., None]
    rgb = (1 - alpha) * rgb + alpha * colours

    # Age: a clock badge in the lower right corner, drawn in the labelmap's brightest colour.
    bright = np.array([252.0, 255.0, 164.0])
    centre = np.array([0.77 * SIZE, 0.77 * SIZE])  # (row, col)
    radius = 0.17 * SIZE
    from_centre = np.hypot(y - centre[0], x - centre[1])
    face = np.clip(radius + 0.5 - from_centre, 0, 1)[..., None]
    rgb = (1 - face) * rgb + face * BACKGROUND
    ring = np.clip(1.6 - np.abs(from_centre - radius + 1.5), 0, 1)[..., None]
    rgb = (1 - ring) * rgb + ring * bright
    for direction, length in ((np.array([-1.0, 0.0]), 0.75 * radius), (np.array([0.5, 0.87]), 0.5 * radius)):
        tip = centre + length * direction
        t = np.clip(((y - centre[0]) * (tip[0] - centre[0]) + (x - centre[1]) * (tip[1] - centre[1])) / length ** 2, 0, 1)
        distance = np.hypot(y - (centre[0] + t * (tip[0] - centre[0])), x - (centre[1] + t * (tip[1] - centre[1])))
        hand = np.clip(1.9 - distance, 0, 1)[..., None]
        rgb = (1 - hand) * rgb + hand * bright

    rgba = np.dstack([rgb, 255 * tile_mask(SIZE, radius=18.0)])
    return np.round(rgba).clip(0, 255).astype(np.uint8)


def main() -> None:
    icon = Image.fromarray(draw_icon(), mode="RGBA")
    for target in TARGETS:
        target.parent.mkdir(parents=True, exist_ok=True)
        icon.save(target, format="PNG", optimize=True)
        print(target.relative_to(REPO))


if __name__ == "__main__":
    main()
