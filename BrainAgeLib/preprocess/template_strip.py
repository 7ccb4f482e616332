"""Skull stripping without trained weights: template registration plus an intensity refinement.

1. ``register_to_template`` aligns the input with the bundled MNI152 2009a brain (affine).
2. The template's brain mask is carried back onto the input's own voxel grid.
3. The mask's edge is refined on the input's own intensities: voxels well inside the carried
   mask are kept; in a band around its edge (``REFINE_OUTSIDE_MM`` out, ``REFINE_INSIDE_MM``
   in) only voxels brighter than the Otsu threshold between CSF/skull and brain tissue are
   kept; a small opening cuts thin bridges to dura and scalp; the largest component, closed
   and with holes filled, is the brain.

Against Colin27's extracted brain (ch2better) the carried mask alone scores Dice 0.92 and the
refined one 0.96 (0.957 after a 10 degree / 10 mm motion; 0.94 for Colin27 placed in a
256 x 256 x 200 mm field with a synthetic neck, noise and bias, moved by up to 15 degrees and
20 mm). The refinement removes the dark CSF at the brain's surface, as ch2better (and most
brain-extraction tools) do; against masks that keep that CSF (BrainAgeLib.synth.phantoms phantoms'
gm + wm + csf) it lowers the Dice, from 0.97-0.98 to 0.88-0.96.

Inputs that are already skull-stripped are recognised by ``detect_skull_stripped`` (a
constant background touching a brain-sized foreground) and left alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..geometry import array_to_sitk, sitk_to_array
from .registration import (
    RegistrationResult,
    largest_component,
    register_to_template,
    resample_template_mask,
)
from .template import Template, load_template
from ..volume import Volume

REFINE_OUTSIDE_MM = 3.0   # how far outside the carried template mask tissue may be added
REFINE_INSIDE_MM = 5.0    # how far inside it dark voxels (CSF, dura) may be removed
# A skull-stripped adult brain (intracranial content) is about 1.0-1.9 litres; a head with
# scalp, skull and some neck is well over 3 litres.
MAX_BRAIN_VOLUME_ML = 2500.0
MIN_BACKGROUND_SHELL_FRACTION = 0.9


@dataclass
class TemplateBrainMask:
    brain_mask: np.ndarray                   # bool, on the input's voxel grid
    registration: Optional[RegistrationResult]


def _mask_image(mask: np.ndarray, spacing) -> sitk.Image:
    """A binary mask as a uint8 SimpleITK image with the voxel size (mm) the filters measure in."""
    return array_to_sitk(mask.astype(np.uint8), spacing=spacing)


def _radius(radius_mm: float, spacing) -> list:
    """A ball's radius in voxels along each axis (at least 1)."""
    return [max(1, int(round(radius_mm / s))) for s in spacing]


def otsu_threshold(values: np.ndarray, bins: int = 128) -> float:
    """Otsu's threshold of a 1-D sample of intensities."""
    otsu = sitk.OtsuThresholdImageFilter()
    otsu.SetInsideValue(0)
    otsu.SetOutsideValue(1)
    otsu.SetNumberOfHistogramBins(bins)
    otsu.Execute(sitk.GetImageFromArray(np.asarray(values, dtype=np.float32).reshape(1, 1, -1)))
    return float(otsu.GetThreshold())


def detect_skull_stripped(volume: Volume) -> bool:
    """True when ``volume`` looks skull-stripped already.

    Two signs together: (1) the background is one exact constant value (skull-stripping tools
    write 0 outside the brain; a scanner's air has noise) in a shell 2 voxels thick right
    outside the foreground, and (2) the foreground - everything not equal to that value,
    largest component, holes filled - is brain-sized (<= ``MAX_BRAIN_VOLUME_ML``), not head-sized.
    """
    data = np.asarray(volume.array)
    background = data.min()
    foreground = data > background
    if not foreground.any():
        return False
    foreground = ndimage.binary_fill_holes(largest_component(foreground))
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    if foreground.sum() * voxel_ml > MAX_BRAIN_VOLUME_ML:
        return False
    shell = ndimage.binary_dilation(foreground, iterations=2) & ~foreground
    if not shell.any():
        return False
    return bool(np.mean(data[shell] == background) >= MIN_BACKGROUND_SHELL_FRACTION)


def refine_brain_mask(volume: Volume, template_mask: np.ndarray) -> np.ndarray:
    """Fit the edge of a registered template brain mask to the input's own intensities."""
    spacing = volume.spacing
    core = template_mask > 0.5
    if not core.any():
        return core
    # Work inside the mask's bounding box (plus a margin) to keep the morphology cheap.
    margin = [int(np.ceil(REFINE_OUTSIDE_MM / s)) + 3 for s in spacing]
    lo = np.maximum(np.argwhere(core).min(axis=0) - margin, 0)
    hi = np.minimum(np.argwhere(core).max(axis=0) + margin + 1, core.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    core_box = core[box]
    data = np.asarray(volume.array, dtype=np.float32)[box]

    # Signed distance to the carried mask's edge, in mm (negative inside).
    distance = sitk_to_array(sitk.SignedMaurerDistanceMap(
        _mask_image(core_box, spacing), insideIsPositive=False, squaredDistance=False,
        useImageSpacing=True))
    outer = distance <= REFINE_OUTSIDE_MM
    inner = distance <= -REFINE_INSIDE_MM
    threshold = otsu_threshold(data[outer])
    image = _mask_image(inner | (outer & (data > threshold)), spacing)
    image = sitk.BinaryMorphologicalOpening(image, _radius(2.0, spacing), sitk.sitkBall)
    image = sitk.RelabelComponent(sitk.ConnectedComponent(image), sortByObjectSize=True) == 1
    image = sitk.BinaryMorphologicalClosing(image, _radius(2.0, spacing), sitk.sitkBall)
    image = sitk.BinaryFillhole(image)
    mask = sitk_to_array(image).astype(bool)

    full = np.zeros(core.shape, dtype=bool)
    full[box] = mask
    return full


def template_brain_mask(
    volume: Volume,
    template: Optional[Template] = None,
    registration_spacing_mm: float = 3.0,
    refine: bool = True,
) -> TemplateBrainMask:
    """Brain mask of a whole-head T1 ``volume`` on its own grid (see the module docstring)."""
    template = template or load_template()
    registration = register_to_template(
        volume, template, spacing_mm=registration_spacing_mm, with_skull=True
    )
    carried = resample_template_mask(template.brain_mask, volume, registration.input_to_template)
    mask = refine_brain_mask(volume, carried) if refine else carried > 0.5
    return TemplateBrainMask(brain_mask=mask, registration=registration)
