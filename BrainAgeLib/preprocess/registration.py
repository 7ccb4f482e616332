"""Affine registration of a T1 volume to the bundled MNI152 template (SimpleITK).

Used by skull stripping: once the input is aligned with the template, the template's brain
mask is carried back onto the input's own grid. The template is brain only, so the registration
measures Mattes mutual information only inside the template's brain mask grown by a few mm
(the brain and the dark CSF/skull rim around it); the scalp, face and neck of a whole-head
input are outside that region and do not pull on the fit.

Coordinates: BrainAge works in RAS mm; SimpleITK works in LPS mm. Every transform this module
returns is a 4x4 RAS -> RAS world matrix.
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..geometry import (LPS_TO_RAS, array_to_sitk, crop_affine, resample_array, sitk_to_array,
                        volume_to_sitk, voxel_map_between)
from .template import Template, load_template
from ..volume import Volume

# Distance from the top of the scalp to the top of the brain in an adult T1, mm (scalp, skull
# and CSF); only used to place the template before the optimiser starts.
SCALP_THICKNESS_MM = 10.0


@dataclass
class RegistrationResult:
    """Where the input sits relative to the template."""

    input_to_template: np.ndarray   # 4x4, RAS mm of the input -> RAS mm of the template
    metric: float                   # final Mattes mutual information (lower is better)
    iterations: int                 # optimiser iterations at the last level
    seconds: float

    @property
    def template_to_input(self) -> np.ndarray:
        return np.linalg.inv(self.input_to_template)


def ras_matrix_from_sitk(transform: sitk.Transform) -> np.ndarray:
    """4x4 RAS -> RAS matrix of a SimpleITK affine-like transform (LPS -> LPS)."""
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(transform.GetMatrix())
    affine.SetCenter(transform.GetCenter())
    affine.SetTranslation(transform.GetTranslation())
    matrix = np.eye(4)
    matrix[:3, :3] = np.asarray(affine.GetMatrix()).reshape(3, 3)
    center = np.asarray(affine.GetCenter())
    matrix[:3, 3] = np.asarray(affine.GetTranslation()) + center - matrix[:3, :3] @ center
    return LPS_TO_RAS @ matrix @ LPS_TO_RAS


def resample_to_spacing(volume: Volume, spacing_mm: float, order: int = 1) -> Volume:
    """``volume`` on a grid with ``spacing_mm`` voxels covering the same field of view.

    Downsampling is anti-aliased with a Gaussian (sigma = 0.4 x the new spacing per axis).
    The grid keeps the volume's axis directions, so no reorientation happens here.
    """
    spacing = np.asarray(volume.spacing)
    factors = spacing / spacing_mm
    data = np.asarray(volume.array, dtype=np.float32)
    sigmas = np.where(factors < 1, 0.4 * spacing_mm / spacing, 0.0)
    if np.any(sigmas > 0):
        data = ndimage.gaussian_filter(data, sigmas, mode="nearest")
    new_shape = np.maximum(np.round(np.asarray(volume.shape) * factors).astype(int), 1)
    step = np.asarray(volume.shape) / new_shape          # input voxels per output voxel
    start = 0.5 * step - 0.5                              # keep the field of view's edges
    voxel_map = np.eye(4)                                 # new voxel -> old voxel
    voxel_map[[0, 1, 2], [0, 1, 2]] = step
    voxel_map[:3, 3] = start
    data = resample_array(data, voxel_map, new_shape, order=order, mode="nearest")
    affine = volume.affine.copy()
    affine[:3, :3] = volume.affine[:3, :3] * step
    affine[:3, 3] = volume.affine[:3, :3] @ start + volume.affine[:3, 3]
    return Volume(data.astype(np.float32), affine)


def _world_points(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    ijk = np.argwhere(mask)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest face-connected component of a binary mask."""
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def foreground_mask(volume: Volume) -> np.ndarray:
    """The head (or brain) as one filled blob: Otsu threshold, largest component, holes filled."""
    data = np.asarray(volume.array, dtype=np.float32)
    mask = sitk_to_array(sitk.OtsuThreshold(array_to_sitk(data), 0, 1, 128)).astype(bool)
    mask = largest_component(mask)
    return ndimage.binary_fill_holes(mask)


def initial_translation(volume: Volume, template: Template, with_skull: bool) -> np.ndarray:
    """RAS translation (mm) moving the template's brain onto where the input's brain probably is.

    Brain-only input: centre of the foreground. Whole head: left-right and anterior-posterior
    centre of the top 100 mm of the head, and the brain's top ``SCALP_THICKNESS_MM`` below the
    top of the scalp (the neck and face would drag a plain centre of mass down and forward).
    """
    head = _world_points(foreground_mask(volume), volume.affine)
    brain_centre, brain_top = template_brain(template)
    if not with_skull:
        return head.mean(axis=0) - brain_centre
    top = np.percentile(head[:, 2], 99.9)
    upper = head[head[:, 2] > top - 100.0]
    estimate = np.array([
        upper[:, 0].mean(),
        upper[:, 1].mean(),
        top - SCALP_THICKNESS_MM - (brain_top - brain_centre[2]),
    ])
    return estimate - brain_centre


#: What registration derives from a template alone (the same for every input), computed once per
#: process: (id(template), what, parameters) -> (weak reference to the template, value).
_TEMPLATE_DERIVED: Dict[tuple, Tuple["weakref.ref", Any]] = {}


def _derived(template: Template, what: str, compute: Callable[[], Any], *parameters: float) -> Any:
    key = (id(template), what, *parameters)
    hit = _TEMPLATE_DERIVED.get(key)
    if hit is not None and hit[0]() is template:
        return hit[1]
    for stale in [k for k, (ref, _) in _TEMPLATE_DERIVED.items() if ref() is None]:
        del _TEMPLATE_DERIVED[stale]
    value = compute()
    for array in (value if isinstance(value, tuple) else (value,)):
        if isinstance(array, np.ndarray):
            array.setflags(write=False)       # shared by every later registration
    _TEMPLATE_DERIVED[key] = (weakref.ref(template), value)
    return value


def template_brain(template: Template) -> Tuple[np.ndarray, float]:
    """(centre of the template's brain mask, RAS mm; the 99.9th percentile of its S coordinate)."""
    def compute():
        brain = _world_points(template.brain_mask.array > 0, template.brain_mask.affine)
        return brain.mean(axis=0), float(np.percentile(brain[:, 2], 99.9))

    return _derived(template, "brain", compute)


def template_grid(template: Template, spacing_mm: float, mask_margin_mm: float) -> Tuple[Volume, np.ndarray]:
    """(template T1 resampled to the registration grid, its brain mask there grown by the margin)."""
    def compute():
        fixed_volume = resample_to_spacing(template.t1, spacing_mm)
        mask_volume = resample_to_spacing(Volume(template.brain_mask.array.astype(np.float32),
                                                 template.brain_mask.affine), spacing_mm)
        margin_voxels = max(1, int(round(mask_margin_mm / spacing_mm)))
        fixed_volume.array.setflags(write=False)
        return fixed_volume, ndimage.binary_dilation(mask_volume.array > 0.5, iterations=margin_voxels)

    return _derived(template, "grid", compute, float(spacing_mm), float(mask_margin_mm))


def register_to_template(
    volume: Volume,
    template: Optional[Template] = None,
    spacing_mm: float = 3.0,
    with_skull: bool = True,
    transform: str = "affine",
    mask_margin_mm: float = 4.0,
    shrink_factors: Sequence[int] = (4, 2, 1),
    initial_scales: Optional[Sequence[float]] = None,
    iterations: int = 100,
) -> RegistrationResult:
    """Affinely align ``volume`` (any orientation, RAS affine) with the MNI152 ``template``.

    Mattes mutual information (32 bins) measured on every template voxel inside its brain mask
    grown by ``mask_margin_mm``; multi-resolution (``shrink_factors`` of a ``spacing_mm`` grid).
    A similarity transform (rotation, translation, one scale) is fitted first from each of
    ``initial_scales`` (template sizes to start from; default 1.0) and the best by mutual
    information is kept; then, with ``transform="affine"``, a 12-parameter affine is started
    from it at the two finest levels. (Random sampling of half the voxels was tried first: at
    the coarsest level that leaves ~700 samples, and one small synthetic head in five locked
    onto its scalp; with every voxel, twelve of twelve converged from 0.85 and from 1.0 alike.)
    Returns the 4x4 RAS -> RAS map from input world coordinates to template world coordinates.
    """
    started = time.perf_counter()
    template = template or load_template()
    if transform not in ("affine", "similarity"):
        raise ValueError(f"transform must be 'affine' or 'similarity', got {transform!r}")
    if initial_scales is None:
        initial_scales = (1.0,)
    fixed_volume, fixed_mask = template_grid(template, spacing_mm, mask_margin_mm)
    brain_centre_ras = template_brain(template)[0]
    moving_volume = resample_to_spacing(volume, spacing_mm)

    fixed = volume_to_sitk(fixed_volume)
    moving = volume_to_sitk(moving_volume)
    mask_image = array_to_sitk(fixed_mask.astype(np.uint8), reference=fixed)

    translation_ras = initial_translation(moving_volume, template, with_skull)
    lps = LPS_TO_RAS[:3, :3]

    def run(initial: sitk.Transform, levels: Sequence[int]) -> tuple:
        method = sitk.ImageRegistrationMethod()
        method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
        method.SetMetricSamplingStrategy(method.NONE)   # every voxel (see the docstring)
        method.SetMetricFixedMask(mask_image)
        method.SetInterpolator(sitk.sitkLinear)
        method.SetOptimizerAsRegularStepGradientDescent(
            learningRate=2.0, minStep=1e-3, numberOfIterations=iterations,
            relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6,
        )
        method.SetOptimizerScalesFromPhysicalShift()
        method.SetShrinkFactorsPerLevel(list(levels))
        method.SetSmoothingSigmasPerLevel([0.5 * spacing_mm * f if f > 1 else 0.0 for f in levels])
        method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        method.SetInitialTransform(initial, inPlace=True)
        # One work unit: with several, ITK sums the metric's per-thread parts in the order the
        # threads finish, so the same head registered twice ended a little apart (an IXI head's
        # age moved by 0.4 years between runs). One unit gives the same transform every run.
        method.SetNumberOfWorkUnits(1)
        method.Execute(fixed, moving)
        return method.GetMetricValue(), method.GetOptimizerIteration()

    best = None
    for scale in initial_scales:
        # SimpleITK maps fixed (template) points to moving (input) points.
        similarity = sitk.Similarity3DTransform()
        similarity.SetCenter([float(c) for c in lps @ brain_centre_ras])
        similarity.SetTranslation([float(t) for t in lps @ translation_ras])
        similarity.SetScale(float(scale))
        metric, n_iter = run(similarity, shrink_factors)
        if best is None or metric < best[0]:
            best = (metric, n_iter, similarity)
    metric, n_iter, final = best
    if transform == "affine":
        affine = sitk.AffineTransform(3)
        affine.SetMatrix(final.GetMatrix())
        affine.SetCenter(final.GetCenter())
        affine.SetTranslation(final.GetTranslation())
        metric, n_iter = run(affine, list(shrink_factors)[-2:])
        final = affine

    template_to_input = ras_matrix_from_sitk(final)
    return RegistrationResult(
        input_to_template=np.linalg.inv(template_to_input),
        metric=float(metric),
        iterations=int(n_iter),
        seconds=time.perf_counter() - started,
    )


def resample_template_mask(
    template_mask: Volume, reference: Volume, input_to_template: np.ndarray
) -> np.ndarray:
    """The template's brain mask on ``reference``'s voxel grid (float in [0, 1], trilinear).

    Only the reference voxels that land within one template voxel of the mask's bounding box
    can be non-zero, so only that box of the reference grid is interpolated (a whole 1 mm
    head is ~4x larger than the brain's box); the rest stays 0, as the full resampling gives.
    """
    # reference voxel -> reference RAS -> template RAS -> template voxel
    voxel_map = voxel_map_between(template_mask.affine, reference.affine, world_map=input_to_template)
    array = np.asarray(template_mask.array, dtype=np.float32)
    out = np.zeros(reference.shape, dtype=np.float32)
    support = np.argwhere(array > 0)
    if support.size == 0:
        return out
    low, high = support.min(axis=0) - 1.0, support.max(axis=0) + 1.0
    corners = np.array([[x, y, z, 1.0] for x in (low[0], high[0]) for y in (low[1], high[1])
                        for z in (low[2], high[2])])
    in_reference = (corners @ np.linalg.inv(voxel_map).T)[:, :3]
    start = np.clip(np.floor(in_reference.min(axis=0)).astype(int) - 1, 0, reference.shape)
    stop = np.clip(np.ceil(in_reference.max(axis=0)).astype(int) + 2, 0, reference.shape)
    if np.any(stop <= start):
        return out
    box = tuple(slice(a, b) for a, b in zip(start, stop))
    out[box] = resample_array(array, crop_affine(voxel_map, start), stop - start, order=1,
                              mode="constant", cval=0.0)
    return out
