"""From a T1 volume to the stack of sagittal slices the BrainRotViT encoder sees.

``prepare(volume, preset)`` runs these steps, each a small function below, with the settings
of the preset's ``PreprocessConfig`` (a preset is data, not a code branch):

1. ``reorient_to_ras``            voxel axes permuted/flipped to R, A, S (exact, no resampling)
   ``suppress_hot_voxels``        isolated voxels far brighter than the rest of the image (above
                                  ``HOT_VOXEL_FACTOR`` x its 99.99th percentile) take their
                                  neighbourhood's median, so no single voxel sets the scaling;
                                  ordinary scans have none and pass unchanged
2. ``deepbet_strip`` or           the brain mask of a trained extractor (deepbet, the default;
   ``template_strip``             ``brain_extraction.py``) or of the template registration
                                  (``template_strip.py``); an input that is already skull-stripped
                                  is detected and kept
3. ``n4_bias_correction``         SimpleITK N4 fitted to the brain on the image shrunk by
                                  ``n4_shrink_factor`` (or to about ``n4_grid_mm`` voxels, see
                                  ``n4_shrink_for``); the smooth bias field is evaluated back
                                  at full resolution
4. ``minmax``                     intensities scaled to [0, 1]
5. ``crop_to_largest_component``  bounding box of the largest connected component > 0.1
6. ``resample_slices``            left-right axis resampled to ``n_slices`` (cubic spline)
7. ``slice_minmax``               each sagittal slice scaled to [0, 1] on its own
8. ``resize_slices``              each slice quantised to 8 bits (floor of 255 x) and resized to
                                  ``image_size`` x ``image_size`` with PIL's antialiased bilinear
                                  filter, then divided by 255

How the authors do it (github.com/wjalal/BrainRotViT, ``vit_dora_train_feature_cnn_main_mix_roi.py``):
the NIfTI is reoriented to RAS with nibabel (``io_orientation`` / ``apply_orientation``), cropped
with ``calculate_bounding_box_from_volume`` (min-max, > 0.1, ``scipy.ndimage.label``, largest
component, ``find_objects``), resampled with ``scipy.ndimage.zoom(data, (160 / n, 1, 1),
order=3)``, and slice ``i`` is ``data[i, :, :]`` with no transpose or rotation, min-max scaled
and passed through ``ToPILImage() -> Resize((224, 224)) -> RGB -> ToTensor -> Normalize(0.5,
0.5)``. ``ToPILImage`` on a float array computes ``(x * 255).astype(uint8)``. So in
``Prepared.slices[s, h, w]``: ``s`` runs left -> right, the image rows ``h`` run posterior ->
anterior and the columns ``w`` inferior -> superior (a sagittal slice lying on its back, nose
at the bottom). Their inputs were skull-stripped (deepbrain) and then N4-corrected (ANTs,
``N4BiasFieldCorrection -i stripped -o stripped.N4``, ``preproc_scripts/*_preprocess.sh``), and
this pipeline keeps that order: N4 after stripping, fitted to the brain only. (N4 first, on the
whole head, was tried: on a 256 x 256 x 200 mm head with neck it cost 15 s of CPU against 3.5 s
on the brain, and mutual-information registration does not need it.)
Channel replication and the 0.5/0.5 normalisation belong to the model.

``Prepared`` carries the model grid's affine (``Prepared.affine``: model voxel (s, h, w) -> RAS
mm, through the reorientation, the crop box, the slice axis's zoom and the in-plane resize), so
any map in model space [S, H, W] goes back onto the input's own voxel grid (``to_input_grid``)
and any map on the input grid comes into model space (``to_model_space``), both with
``geometry.resample_array``. It also carries the brain mask on the input's grid
(``input_brain_mask``) and the input's quality control (``qc``, see ``qc.py``).
"""
from __future__ import annotations

import threading
import time
import tracemalloc
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from PIL import Image
from scipy import ndimage

from ..errors import InvalidVolumeError
from ..geometry import array_to_sitk, crop_affine, itk_setting, resample_array, scale_and_shift, sitk_to_array, volume_to_sitk
from ..presets import ModelConfig, PreprocessConfig, get_preset
from .qc import ALREADY_STRIPPED, QualityControl, assess, mask_volume_ml
from .template_strip import detect_skull_stripped, template_brain_mask
from ..volume import Volume

PresetLike = Union[str, ModelConfig, PreprocessConfig]

# Plausible brain volumes after skull stripping (ml): a newborn's is ~400, an adult's 1000-1900.
MIN_BRAIN_ML = 250.0
#: Voxel size (mm) of the whole-head bias correction tried when registration fails at first.
BIAS_RETRY_GRID_MM = 8.0
MAX_BRAIN_ML = 3000.0
#: Inside a brain, neighbouring voxels' intensities correlate (1 mm MRI ~0.95, one voxel in four
#: of it ~0.6); in noise they do not (~0). Below this along any axis: not an image of a brain.
MIN_NEIGHBOUR_CORRELATION = 0.2
# Mutual information with the template below which the input is not a head at all (noise gives
# ~0.01, a uniform ball ~0.25, T1 heads 0.6 (Colin27) to 1.2 (synthetic phantoms)).
MIN_MUTUAL_INFORMATION = 0.15
#: A voxel brighter than this many times the image's 99.99th percentile is an outlier (a hot
#: pixel, a reconstruction spike): ordinary T1 scans peak at 1.02-1.6 times it (8 IXI heads,
#: Colin27, phantoms); two infant T1s had one voxel at 19 times it.
HOT_VOXEL_FACTOR = 3.0


def preprocess_config(preset: PresetLike) -> PreprocessConfig:
    """The ``PreprocessConfig`` of a preset name, a ``ModelConfig`` or a ``PreprocessConfig``."""
    if isinstance(preset, PreprocessConfig):
        return preset
    return get_preset(preset).preprocess


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------

def reorient_to_ras(volume: Volume) -> Volume:
    """Voxel axes permuted and flipped so that they increase toward R, A and S (exact)."""
    ras = volume.reoriented("RAS")
    return Volume(np.asarray(ras.array, dtype=np.float32), ras.affine)


def suppress_hot_voxels(volume: Volume) -> Tuple[Volume, int, float]:
    """(volume with its hot voxels replaced, how many there were, the threshold used).

    A hot voxel lies further from 0 than ``HOT_VOXEL_FACTOR`` x the 99.99th percentile of the
    non-zero voxels' magnitudes (a bright spike, or a dark one far below 0, which would set the
    minimum); it takes the median of its 3 x 3 x 3 neighbours that are not hot themselves. With
    no hot voxel the same Volume is returned, untouched.
    """
    array = volume.array
    magnitude = np.abs(array)
    nonzero = magnitude[magnitude > 0]
    if nonzero.size == 0:
        return volume, 0, float("inf")
    threshold = HOT_VOXEL_FACTOR * float(np.percentile(nonzero, 99.99))
    hot = np.argwhere(magnitude > threshold)
    if len(hot) == 0:
        return volume, 0, threshold
    padded = np.pad(array, 1, mode="edge")
    offsets = np.stack(np.meshgrid(*[np.arange(3)] * 3, indexing="ij"), axis=-1).reshape(-1, 3)
    neighbours = padded[tuple((hot[:, None, :] + offsets[None, :, :]).transpose(2, 0, 1))]  # [n, 27]
    neighbours = np.where(np.abs(neighbours) > threshold, np.nan, neighbours)
    replacement = np.nanmedian(np.where(np.isnan(neighbours).all(axis=1, keepdims=True), 0.0, neighbours), axis=1)
    cleaned = array.copy()
    cleaned[tuple(hot.T)] = replacement.astype(np.float32)
    return volume.with_array(cleaned), len(hot), threshold


def n4_shrink_for(config: PreprocessConfig, spacing: Sequence[float]) -> int:
    """N4's shrink factor for an input of ``spacing`` (mm): ``n4_shrink_factor`` voxels, or, with
    ``n4_grid_mm``, the factor that brings the finest axis closest to that voxel size."""
    if config.n4_grid_mm:
        return _shrink_to_grid(config.n4_grid_mm, spacing)
    return max(1, int(config.n4_shrink_factor))


def _shrink_to_grid(grid_mm: float, spacing: Sequence[float]) -> int:
    """The shrink factor that brings the finest axis of ``spacing`` closest to ``grid_mm``."""
    return max(1, int(round(float(grid_mm) / float(min(spacing)))))


#: Threads N4 runs on, whatever the machine or the run: N4's B-spline fit sums per-thread parts,
#: so its field (and, through 8-bit quantisation, the slices and the age) changed with the thread
#: count: an IXI head was 53.866 years in a batch worker (1 thread) and 53.870 from the command
#: line (2). One thread gives the same field everywhere. Two would too (the parts are summed in
#: their own order: the same bits on one core as on two) and make a single prediction's N4 1.8x
#: faster on 2 cores (1 mm head: 2.5 s instead of 4.6), but two batch workers then run four N4
#: threads on two cores and wait on each other: a batch of 8 heads fell from 14.7 to 12.5
#: volumes/minute (``brainage bench --cohort 8``), so cohorts keep the one thread.
N4_THREADS = 1
_ITK_THREADS_LOCK = threading.Lock()


@contextmanager
def _itk_threads(n: int) -> Iterator[None]:
    """SimpleITK filters made inside run on ``n`` threads: ITK's process-wide default (N4's inner
    B-spline fit follows only that), set and restored under a lock, so two threads preparing at
    once (Slicer, a user's pool) take turns instead of undoing each other's setting. Meanwhile
    every other ITK filter of the process also gets ``n`` threads."""
    with _ITK_THREADS_LOCK, itk_setting("GlobalDefaultNumberOfThreads", n):
        yield


def n4_bias_correction(
    volume: Volume,
    shrink_factor: int = 4,
    mask: Optional[np.ndarray] = None,
    iterations: Tuple[int, ...] = (50, 50, 50, 50),
) -> Volume:
    """N4 bias field correction (SimpleITK), fitted on the image shrunk by ``shrink_factor``.

    ``mask`` (bool, on the volume's grid; default: Otsu foreground) says which voxels the
    smooth B-spline field is fitted to; only the mask's bounding box is processed, and the
    field fitted on the shrunk box is evaluated at full resolution (``GetLogBiasFieldAsImage``)
    and divided out. Voxels outside the box are left as they are (0 for a stripped brain).
    SimpleITK's defaults otherwise: 4 fitting levels of at most 50 iterations, 4 control points.
    """
    array = np.asarray(volume.array, dtype=np.float32)
    factor = max(1, int(shrink_factor))
    if mask is None:
        small = sitk.Shrink(volume_to_sitk(volume), [factor] * 3)
        mask = sitk_to_array(sitk.OtsuThreshold(small, 0, 1, 128)) > 0
        mask = np.kron(mask, np.ones((factor,) * 3, dtype=bool))
        mask = np.pad(mask, [(0, max(0, n - m)) for n, m in zip(array.shape, mask.shape)])
        mask = mask[: array.shape[0], : array.shape[1], : array.shape[2]]
    mask = mask & (array > 0)   # N4 works on log intensities
    if np.count_nonzero(mask) < 64 * factor ** 3:
        return volume
    lo = np.maximum(np.argwhere(mask).min(axis=0) - factor, 0)
    hi = np.minimum(np.argwhere(mask).max(axis=0) + factor + 1, array.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    image = volume_to_sitk(Volume(array[box], crop_affine(volume.affine, lo)))
    mask_image = array_to_sitk(mask[box].astype(np.uint8), reference=image)
    small = sitk.Shrink(image, [factor] * 3)
    small_mask = sitk.Shrink(mask_image, [factor] * 3)
    with _itk_threads(N4_THREADS):
        corrector = sitk.N4BiasFieldCorrectionImageFilter()
        corrector.SetMaximumNumberOfIterations(list(iterations))
        corrector.Execute(small, small_mask)
        log_bias = sitk_to_array(corrector.GetLogBiasFieldAsImage(image)).astype(np.float32)
    corrected = array.copy()
    corrected[box] = array[box] * np.exp(-log_bias)
    return Volume(corrected, volume.affine)


def keep_brain(volume: Volume, mask: np.ndarray, method: str) -> Volume:
    """``volume`` with 0 outside ``mask``; refused when the mask cannot be a brain (the QC flags
    narrower ranges). ``method`` names the extraction in the message."""
    brain_ml = mask_volume_ml(mask, volume.spacing)
    if not MIN_BRAIN_ML <= brain_ml <= MAX_BRAIN_ML:
        raise InvalidVolumeError(
            f"skull stripping ({method}) found a brain of {brain_ml:.0f} ml (expected {MIN_BRAIN_ML:.0f}-"
            f"{MAX_BRAIN_ML:.0f} ml): is this a T1-weighted head MRI? If it is skull-stripped "
            "already, say so (skull_stripped=True)"
        )
    return Volume(np.where(mask, volume.array, 0.0).astype(np.float32), volume.affine)


def deepbet_strip(volume: Volume, device: str = "cpu") -> Tuple[Volume, np.ndarray]:
    """Brain only with deepbet's mask: (stripped volume, 0 outside the brain; brain mask)."""
    from .brain_extraction import deepbet_brain_mask

    mask = deepbet_brain_mask(volume, device)
    return keep_brain(volume, mask, "deepbet"), mask


def template_strip(
    volume: Volume, registration_spacing_mm: float = 3.0
) -> Tuple[Volume, np.ndarray, np.ndarray]:
    """Brain only by template registration: (stripped volume with 0 outside the brain, brain
    mask, input->template 4x4).

    A strong intensity bias (a surface coil, 7 T) can keep the registration from matching the
    template; then the registration is tried once more on a bias-corrected copy of the head (N4
    over the whole head on an ~8 mm grid). Only the mask and transform come from that copy: the
    intensities kept are the input's, corrected later on the brain alone as usual.
    """
    result = template_brain_mask(volume, registration_spacing_mm=registration_spacing_mm)
    if result.registration.metric > -MIN_MUTUAL_INFORMATION:
        corrected = n4_bias_correction(volume, _shrink_to_grid(BIAS_RETRY_GRID_MM, volume.spacing))
        retry = template_brain_mask(corrected, registration_spacing_mm=registration_spacing_mm)
        if retry.registration.metric < result.registration.metric:
            result = retry
    if result.registration.metric > -MIN_MUTUAL_INFORMATION:
        raise InvalidVolumeError(
            f"the volume does not match the MNI152 brain template (mutual information "
            f"{-result.registration.metric:.2f}, a T1-weighted head gives 0.5-1.2, also after bias "
            "correction): is this a T1-weighted head MRI?"
        )
    return keep_brain(volume, result.brain_mask, "template"), result.brain_mask, result.registration.input_to_template


def neighbour_correlation(array: np.ndarray, mask: np.ndarray) -> float:
    """The smallest, over the three axes, Pearson correlation of each voxel inside ``mask``
    (eroded by one voxel) with its next neighbour along that axis; 0 for constant intensities."""
    inner = ndimage.binary_erosion(mask, iterations=1)
    lowest = 1.0
    for axis in range(3):
        a, m = np.moveaxis(array, axis, 0), np.moveaxis(inner, axis, 0)
        both = m[:-1] & m[1:]
        x, y = a[:-1][both].astype(np.float64), a[1:][both].astype(np.float64)
        if x.size < 2 or x.std() == 0 or y.std() == 0:
            return 0.0
        lowest = min(lowest, float(np.corrcoef(x, y)[0, 1]))
    return lowest


def check_stripped_brain(volume: Volume, brain: np.ndarray) -> None:
    """Refuse an input taken as skull-stripped already that cannot be a brain: one that is too
    small, or whose intensities have no spatial structure (noise, a uniform blob). Without a
    skull there is no registration to the template, whose mutual information checks other inputs."""
    brain_ml = mask_volume_ml(brain, volume.spacing)
    if brain_ml < MIN_BRAIN_ML:
        raise InvalidVolumeError(
            f"the image's foreground is {brain_ml:.0f} ml, too small for a brain (at least {MIN_BRAIN_ML:.0f} ml); "
            "is the voxel size in the header right, and is this a T1-weighted brain MRI?")
    correlation = neighbour_correlation(np.asarray(volume.array), brain)
    if correlation < MIN_NEIGHBOUR_CORRELATION:
        raise InvalidVolumeError(
            f"the image has no anatomy-like structure inside its foreground (neighbouring voxels correlate "
            f"{correlation:.2f}; an MRI of a brain gives 0.6-0.98): is this a T1-weighted brain MRI?")


def minmax(array: np.ndarray) -> np.ndarray:
    """Intensities scaled linearly to [0, 1] (a constant array becomes all zeros)."""
    low, high = float(array.min()), float(array.max())
    scale = high - low if high > low else 1.0
    return ((array - low) / scale).astype(array.dtype, copy=False)


def crop_to_largest_component(
    array: np.ndarray, threshold: float = 0.1
) -> Tuple[slice, slice, slice]:
    """Bounding box of the largest connected component of ``array > threshold``.

    ``array`` is min-max scaled; 0.1 is the authors' threshold: it drops the dark rim and
    any stray specks so the crop hugs the brain. Connectivity is scipy's default (faces).
    """
    labels, count = ndimage.label(array > threshold)
    if count == 0:
        raise InvalidVolumeError(f"no voxel is brighter than {threshold} of the intensity range")
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    largest = int(np.argmax(sizes))
    box = ndimage.find_objects(labels, max_label=largest)[largest - 1]
    return tuple(box)  # type: ignore[return-value]


def cubic_zoom_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights equal to ``scipy.ndimage.zoom(x, n_out / n_in, order=3)`` on 1-D x.

    Zoom is linear in the data, so its effect on one axis is a matrix; applying it to the
    reshaped volume equals the authors' ``zoom(data, (n_out / n_in, 1, 1), order=3)`` (the
    factor-1 axes are interpolated exactly at the samples) at a fraction of the cost.
    """
    factor = n_out / n_in
    columns = []
    for j in range(n_in):
        impulse = np.zeros(n_in)
        impulse[j] = 1.0
        columns.append(ndimage.zoom(impulse, factor, order=3))
    matrix = np.stack(columns, axis=1)
    if matrix.shape[0] != n_out:
        raise ValueError(f"zoom gave {matrix.shape[0]} samples, expected {n_out}")
    return matrix


def resample_slices(array: np.ndarray, n_slices: int) -> np.ndarray:
    """Axis 0 (left-right) resampled to ``n_slices`` with a cubic spline (float64)."""
    matrix = cubic_zoom_matrix(array.shape[0], n_slices)
    flat = np.asarray(array, dtype=np.float64).reshape(array.shape[0], -1)
    return (matrix @ flat).reshape((n_slices,) + array.shape[1:])


def slice_minmax(slices: np.ndarray) -> np.ndarray:
    """Each slice along axis 0 scaled to [0, 1] on its own (a uniform slice becomes 0)."""
    low = slices.min(axis=(1, 2), keepdims=True)
    span = slices.max(axis=(1, 2), keepdims=True) - low
    return (slices - low) / np.where(span > 0, span, 1.0)


def resize_slices(slices: np.ndarray, image_size: int, quantize_8bit: bool = True) -> np.ndarray:
    """Each [H0, W0] slice in [0, 1] resized to [image_size, image_size] as the authors do.

    With ``quantize_8bit``: torchvision's ``ToPILImage`` (``(x * 255).astype(uint8)``, i.e.
    floor) and ``Resize`` (PIL ``Image.resize`` with the antialiased bilinear filter), then
    ``ToTensor``'s division by 255. Without: the same filter on 32-bit float images.
    """
    out = np.empty((slices.shape[0], image_size, image_size), dtype=np.float32)
    for index, plane in enumerate(slices):
        if quantize_8bit:
            image = Image.fromarray((plane * 255).astype(np.uint8), mode="L")
            resized = image.resize((image_size, image_size), Image.BILINEAR)
            out[index] = np.asarray(resized, dtype=np.float32) / 255.0
        else:
            image = Image.fromarray(plane.astype(np.float32), mode="F")
            out[index] = np.asarray(image.resize((image_size, image_size), Image.BILINEAR))
    return out


# --------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------

@dataclass
class Prepared:
    """The model's input and everything needed to map model space back onto the input.

    Model space is [S, H, W]: S sagittal slices left -> right, rows H posterior -> anterior,
    columns W inferior -> superior (the authors' ``data[i, :, :]`` of the RAS volume).
    """

    slices: np.ndarray                      # float32 [S, H, W] in [0, 1]
    brain_mask: np.ndarray                  # bool [S, H, W]
    input_shape: Tuple[int, int, int]
    input_affine: np.ndarray                # 4x4 voxel -> RAS mm of the input
    input_to_template: Optional[np.ndarray]  # 4x4 RAS mm -> MNI152 RAS mm, None if not registered
    timings: Dict[str, float]               # seconds per step, plus "total"
    skull_stripped_input: bool              # input was already skull-stripped (detected/declared)
    ras_affine: np.ndarray                  # 4x4 voxel -> RAS of the input reoriented to RAS
    ras_shape: Tuple[int, int, int]         # shape of the input reoriented to RAS
    crop_start: Tuple[int, int, int]        # crop box in the RAS-reoriented voxel grid
    crop_shape: Tuple[int, int, int]
    config: PreprocessConfig = field(default_factory=PreprocessConfig)
    qc: QualityControl = field(default_factory=QualityControl)
    input_brain_mask: Optional[np.ndarray] = None   # bool, the brain mask on the input's own grid
    warnings: List[str] = field(default_factory=list)  # what preprocessing changed or doubted
    peak_memory_mb: Dict[str, float] = field(default_factory=dict)  # only under tracemalloc
    cpu_timings: Dict[str, float] = field(default_factory=dict)     # CPU seconds, all threads

    def __repr__(self) -> str:   # the arrays would fill a screen (test failures, the console)
        qc = getattr(self, "qc", None) or QualityControl()
        return (f"Prepared(slices {'x'.join(map(str, self.slices.shape))}, input {'x'.join(map(str, self.input_shape))}, "
                f"brain extraction {qc.skull_strip or 'none'}, {len(qc.flags)} QC flag(s))")

    @property
    def model_shape(self) -> Tuple[int, int, int]:
        return tuple(int(n) for n in self.slices.shape)  # type: ignore[return-value]

    def _model_from_ras_voxel(self) -> Tuple[np.ndarray, np.ndarray]:
        """Per-axis scale and offset: model = scale * (ras_voxel - crop_start) + offset.

        Slices follow ``scipy.ndimage.zoom`` (first and last samples aligned: (S - 1) / (n - 1)
        model slices per input voxel); rows and columns follow PIL's resize (pixel centres:
        (x + 0.5) * size / n - 0.5). The one definition of the model grid; ``affine`` and every
        resampling between the grids are built from it.
        """
        n_slices, height, width = self.model_shape
        n_i, n_j, n_k = self.crop_shape
        scale = np.array([
            (n_slices - 1) / (n_i - 1) if n_i > 1 else 0.0,
            height / n_j,
            width / n_k,
        ])
        offset = np.array([0.0, 0.5 * scale[1] - 0.5, 0.5 * scale[2] - 0.5])
        return scale, offset

    def _model_from_box(self) -> np.ndarray:
        """4x4 voxel map: crop-box voxel (RAS-reoriented input, counted from ``crop_start``) ->
        model voxel (s, h, w)."""
        return scale_and_shift(*self._model_from_ras_voxel())

    def _box_from_model(self) -> np.ndarray:
        """4x4 voxel map: model voxel (s, h, w) -> crop-box voxel; the inverse of
        ``_model_from_box``, written out (1 / scale) so that it is exact per axis."""
        scale, offset = self._model_from_ras_voxel()
        inverse = 1.0 / np.where(scale > 0, scale, 1.0)
        return scale_and_shift(inverse, -offset * inverse)

    @property
    def box_affine(self) -> np.ndarray:
        """4x4 crop-box voxel -> RAS mm (the RAS-reoriented input's affine, moved to the box)."""
        return crop_affine(self.ras_affine, self.crop_start)

    @property
    def affine(self) -> np.ndarray:
        """4x4 model voxel (s, h, w, 1) -> RAS mm: the geometry of ``slices`` (and of any map
        in model space), as a Volume's affine is of its array."""
        return self.box_affine @ self._box_from_model()

    def model_to_world(self, points_shw: np.ndarray) -> np.ndarray:
        """RAS mm of continuous model-space coordinates [..., 3] ordered (s, h, w)."""
        return nib.affines.apply_affine(self.affine, np.asarray(points_shw, dtype=np.float64))

    def world_to_model(self, points_ras: np.ndarray) -> np.ndarray:
        """Continuous model-space coordinates (s, h, w) of RAS points in mm, shape [..., 3]."""
        return nib.affines.apply_affine(np.linalg.inv(self.affine), np.asarray(points_ras, dtype=np.float64))

    def _orientation_to_input(self) -> np.ndarray:
        """nibabel orientation transform from the RAS-reoriented grid back to the input grid."""
        return nib.orientations.ornt_transform(
            nib.orientations.axcodes2ornt(("R", "A", "S")),
            nib.orientations.io_orientation(self.input_affine),
        )

    def brain_mask_volume(self) -> Optional[Volume]:
        """The brain mask on the input's grid as a uint8 Volume (1 = brain), or None."""
        if self.input_brain_mask is None:
            return None
        return Volume(self.input_brain_mask.astype(np.uint8), self.input_affine.copy())

    def to_input_grid(self, model_map: np.ndarray, order: int = 1) -> Volume:
        """A map in model space [S, H, W] on the input volume's own voxel grid.

        Same shape and affine as the input; interpolated with spline ``order`` inside the crop
        box, 0 outside it. For overlays (attention maps) in Slicer or any viewer.
        """
        model_map = np.asarray(model_map, dtype=np.float32)
        if model_map.shape != self.model_shape:
            raise ValueError(f"model map must have shape {self.model_shape}, got {model_map.shape}")
        # each voxel of the crop box at its model coordinate; the rest of the input grid is 0
        box_values = resample_array(model_map, self._model_from_box(), self.crop_shape, order=order,
                                    mode="nearest")
        ras_array = np.zeros(self.ras_shape, dtype=np.float32)
        start = self.crop_start
        ras_array[tuple(slice(a, a + n) for a, n in zip(start, self.crop_shape))] = box_values
        array = nib.orientations.apply_orientation(ras_array, self._orientation_to_input())
        return Volume(np.ascontiguousarray(array, dtype=np.float32), self.input_affine.copy())

    def to_model_space(self, volume_or_array: Union[Volume, np.ndarray], order: int = 1) -> np.ndarray:
        """A map on the input's voxel grid resampled into model space [S, H, W] (float32).

        ``order`` 0 for labels, 1 (trilinear) for maps; no 8-bit quantisation or antialiasing.
        """
        array = volume_or_array.array if isinstance(volume_or_array, Volume) else volume_or_array
        array = np.asarray(array, dtype=np.float32)
        if array.shape != tuple(self.input_shape):
            raise ValueError(f"map must have the input's shape {self.input_shape}, got {array.shape}")
        to_ras = nib.orientations.ornt_transform(
            nib.orientations.io_orientation(self.input_affine),
            nib.orientations.axcodes2ornt(("R", "A", "S")),
        )
        ras = nib.orientations.apply_orientation(array, to_ras)
        box = ras[tuple(slice(a, a + n) for a, n in zip(self.crop_start, self.crop_shape))]
        return self._box_to_model_space(np.ascontiguousarray(box), order)

    def _box_to_model_space(self, box: np.ndarray, order: int) -> np.ndarray:
        """A float32 map on the crop box (RAS-reoriented grid) resampled into model space."""
        return resample_array(box, self._box_from_model(), self.model_shape, order=order,
                              mode="nearest").astype(np.float32)


# --------------------------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------------------------

class _StepRecorder:
    """Seconds (and, when tracemalloc is tracing, peak traced MB) of each named step."""

    def __init__(self) -> None:
        self.seconds: Dict[str, float] = {}
        self.cpu_seconds: Dict[str, float] = {}
        self.peak_mb: Dict[str, float] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        tracing = tracemalloc.is_tracing()
        if tracing:
            tracemalloc.reset_peak()
        started, cpu_started = time.perf_counter(), time.process_time()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
        self.cpu_seconds[name] = self.cpu_seconds.get(name, 0.0) + time.process_time() - cpu_started
        if tracing:
            self.peak_mb[name] = max(self.peak_mb.get(name, 0.0),
                                     tracemalloc.get_traced_memory()[1] / 2 ** 20)


def _decide_skull_stripped(volume: Volume, config: PreprocessConfig,
                           declared: Optional[bool]) -> Tuple[bool, bool]:
    """(the input is skull-stripped already, strip it now).

    Every method detects stripped inputs unless the caller declares it (``skull_stripped``);
    ``"none"`` never strips, but still detects, so that the brain mask is the stripped input's
    foreground.
    """
    stripped = detect_skull_stripped(volume) if declared is None else bool(declared)
    return stripped, (not stripped and config.skull_strip != "none")


def prepare(
    volume: Volume,
    preset: PresetLike = "paper",
    skull_stripped: Optional[bool] = None,
    device: str = "cpu",
) -> Prepared:
    """Run the preprocessing of ``preset`` on a T1 ``volume`` (see the module docstring).

    ``preset``: a preset name ("paper", "demo", "tiny"), a ``ModelConfig`` or a
    ``PreprocessConfig``. ``skull_stripped``: True if the input is already skull-stripped,
    False if it certainly is not, None to detect it. ``device``: where deepbet's networks run
    (a torch device string).
    """
    config = preprocess_config(preset)
    steps = _StepRecorder()
    started, cpu_started = time.perf_counter(), time.process_time()
    warnings: List[str] = []

    with steps.step("reorient_to_ras"):
        ras = reorient_to_ras(volume)
    if min(ras.shape) < 2:
        raise InvalidVolumeError(f"volume of shape {ras.shape} is too thin to preprocess")
    with steps.step("suppress_hot_voxels"):
        ras, n_hot, hot_threshold = suppress_hot_voxels(ras)
    if n_hot:
        warnings.append(
            f"{n_hot} isolated voxel{'s' if n_hot > 1 else ''} further from 0 than {hot_threshold:.6g} "
            f"({HOT_VOXEL_FACTOR:g} times the image's 99.99th percentile) took the median of their neighbours")

    with steps.step("detect_skull_stripped"):
        is_stripped, strip_now = _decide_skull_stripped(ras, config, skull_stripped)
        if is_stripped:
            brain = ndimage.binary_fill_holes(ras.array > ras.array.min())
            check_stripped_brain(ras, brain)

    input_to_template = None
    if strip_now:
        with steps.step("skull_strip"):
            if config.skull_strip == "deepbet":
                ras, brain = deepbet_strip(ras, device)
            else:
                ras, brain, input_to_template = template_strip(ras, config.registration_spacing_mm)

    if config.n4_bias_correction:
        with steps.step("n4_bias_correction"):
            ras = n4_bias_correction(ras, n4_shrink_for(config, ras.spacing),
                                     mask=brain if (is_stripped or strip_now) else None)

    with steps.step("minmax"):
        scaled = minmax(ras.array)
    if not (is_stripped or strip_now):
        brain = scaled > config.crop_threshold   # no skull stripping: the bright foreground
    with steps.step("quality_control"):
        method = ALREADY_STRIPPED if is_stripped else config.skull_strip
        qc = assess(ras.array, brain, ras.spacing, method)
    with steps.step("crop_to_largest_component"):
        box = crop_to_largest_component(scaled, config.crop_threshold)
        # As in the authors' code the crop keeps the unscaled intensities (float64); the
        # per-slice min-max below makes the global scaling irrelevant to the slices.
        cropped = np.asarray(ras.array[box], dtype=np.float64)
        if min(cropped.shape) < 2:
            raise InvalidVolumeError(f"the brain's bounding box {cropped.shape} is too thin")
    with steps.step("resample_slices"):
        resampled = resample_slices(cropped, config.n_slices)
    with steps.step("slice_minmax"):
        normalised = slice_minmax(resampled)
    with steps.step("resize_slices"):
        slices = resize_slices(normalised, config.image_size, config.quantize_8bit)

    prepared = Prepared(
        slices=slices,
        brain_mask=np.zeros(slices.shape, dtype=bool),
        input_shape=volume.shape,
        input_affine=volume.affine.copy(),
        input_to_template=input_to_template,
        timings={},
        skull_stripped_input=is_stripped,
        ras_affine=ras.affine.copy(),
        ras_shape=ras.shape,
        crop_start=tuple(int(s.start) for s in box),
        crop_shape=tuple(int(s.stop - s.start) for s in box),
        config=config,
        qc=qc,
        warnings=warnings,
    )
    with steps.step("brain_mask"):
        prepared.brain_mask = prepared._box_to_model_space(brain[box].astype(np.float32), order=1) > 0.5
        prepared.input_brain_mask = np.ascontiguousarray(
            nib.orientations.apply_orientation(brain, prepared._orientation_to_input()), dtype=bool)
    prepared.timings = dict(steps.seconds, total=time.perf_counter() - started)
    prepared.peak_memory_mb = dict(steps.peak_mb)
    prepared.cpu_timings = dict(steps.cpu_seconds, total=time.process_time() - cpu_started)
    return prepared
