"""Image geometry, defined once: RAS <-> LPS, Volume <-> SimpleITK, and resampling.

BrainAge's images are :class:`~BrainAgeLib.volume.Volume` s: an [I, J, K] array and the 4x4
affine mapping voxel indices to RAS mm (NIfTI, nibabel, Slicer's IJKToRAS). ITK, and so
SimpleITK, works in LPS mm and indexes its arrays [k, j, i]. Every conversion between the two
goes through this module:

- ``LPS_TO_RAS``: the 4x4 flip of x and y that turns LPS into RAS (and RAS into LPS: it is its
  own inverse).
- ``volume_to_sitk`` / ``sitk_to_volume`` (with ``sitk_affine``, ``array_to_sitk`` and
  ``sitk_to_array`` for the pieces): voxels carried over unchanged, geometry converted exactly.
- ``itk_setting``: one of SimpleITK's process-wide settings changed for a ``with`` block.
- ``resample`` (a Volume onto another grid) and ``resample_array`` (an array through a 4x4 voxel
  map): every interpolation between two voxel grids, with ``scipy.ndimage.affine_transform``.

Following TorchIO, an image always carries its affine; a grid derived from another one (a crop,
a zoom, the model's sagittal slices, ``Prepared.affine``) is another affine, and moving values
between two grids is one voxel map: ``inv(source affine) @ [source RAS <- target RAS] @ target
affine``.

Importing this module needs only numpy; SimpleITK and scipy are imported where they are used.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

import numpy as np

from .volume import Volume

if TYPE_CHECKING:  # pragma: no cover
    import SimpleITK as sitk

#: SimpleITK (ITK) geometry is LPS; BrainAge's is RAS. Negating x and y converts either way.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
LPS_TO_RAS.setflags(write=False)


# --------------------------------------------------------------------------------------------
# Volume <-> SimpleITK
# --------------------------------------------------------------------------------------------

def array_to_sitk(array: np.ndarray, reference: Optional["sitk.Image"] = None,
                  spacing: Optional[Sequence[float]] = None) -> "sitk.Image":
    """A SimpleITK image holding an [I, J, K] ``array`` (SimpleITK's own array order is [k, j, i]).

    Its geometry is ``reference``'s (origin, spacing, direction) when given, else only
    ``spacing`` (mm) is set (origin 0, identity directions: enough for filters that measure
    distances in mm but do not place the image in the world).
    """
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array).T))
    if reference is not None:
        image.CopyInformation(reference)
    elif spacing is not None:
        image.SetSpacing([float(s) for s in spacing])
    return image


def sitk_to_array(image: "sitk.Image") -> np.ndarray:
    """The voxels of a SimpleITK image as an [I, J, K] numpy array (a transposed view)."""
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(image).T


def volume_to_sitk(volume: Volume, dtype=np.float32, orthonormal_directions: bool = True) -> "sitk.Image":
    """A SimpleITK image (LPS geometry) holding ``volume``'s voxels, without resampling.

    ``dtype``: the voxel type SimpleITK gets (None keeps the array's). Spacing is the length of
    each affine column. With ``orthonormal_directions`` the direction matrix is the columns'
    directions made orthonormal (SimpleITK's filters cannot represent shear; for the rigid-body
    affines of real scanners nothing changes); without, the directions are the affine's columns
    divided by the spacing as they are (what a file written from the volume should say).
    """
    array = volume.array if dtype is None else np.asarray(volume.array, dtype=dtype)
    image = array_to_sitk(array)
    spacing = np.asarray(volume.spacing)
    affine_lps = LPS_TO_RAS @ volume.affine
    directions = affine_lps[:3, :3] / spacing
    if orthonormal_directions:
        u, _, vt = np.linalg.svd(volume.affine[:3, :3] / spacing)
        directions = LPS_TO_RAS[:3, :3] @ (u @ vt)
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in affine_lps[:3, 3]])
    image.SetDirection([float(d) for d in directions.ravel()])
    return image


def sitk_affine(image: "sitk.Image") -> np.ndarray:
    """The 4x4 voxel (i, j, k) -> RAS mm affine of a SimpleITK image's first three axes:
    ``LPS_TO_RAS @ [direction * spacing | origin]``, exact."""
    dim = image.GetDimension()
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)[:3, :3]
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)[:3]
    origin = np.asarray(image.GetOrigin(), dtype=np.float64)[:3]
    affine_lps = np.eye(4)
    affine_lps[:3, :3] = direction * spacing  # column c is axis c's direction times its spacing
    affine_lps[:3, 3] = origin
    return LPS_TO_RAS @ affine_lps


def sitk_to_volume(image: "sitk.Image") -> Volume:
    """A 3D SimpleITK image as a :class:`Volume` ([I, J, K], RAS affine), voxels unchanged."""
    return Volume(np.ascontiguousarray(sitk_to_array(image)), sitk_affine(image))


# --------------------------------------------------------------------------------------------
# Resampling
# --------------------------------------------------------------------------------------------

def resample_array(array: np.ndarray, voxel_map: np.ndarray, output_shape: Sequence[int],
                   order: int = 1, mode: str = "constant", cval: float = 0.0) -> np.ndarray:
    """``array`` interpolated at ``voxel_map @ (i, j, k, 1)`` for every voxel of ``output_shape``.

    ``voxel_map`` is the 4x4 map from output voxel indices to (continuous) input voxel indices;
    spline ``order`` (0 nearest, 1 trilinear, 3 cubic), ``mode``/``cval`` as in
    ``scipy.ndimage`` for points outside the input. A map without rotation (diagonal 3x3 part)
    is resampled axis by axis (scipy's zoom-shift path: separable, faster); any other one
    point by point. The output has ``array``'s dtype.
    """
    from scipy import ndimage

    voxel_map = np.asarray(voxel_map, dtype=np.float64)
    linear = voxel_map[:3, :3]
    if np.count_nonzero(linear - np.diag(np.diag(linear))) == 0:
        linear = np.diag(linear).copy()
    return ndimage.affine_transform(
        array, linear, offset=voxel_map[:3, 3], output_shape=tuple(int(n) for n in output_shape),
        order=order, mode=mode, cval=cval,
    )


def resample(volume: Volume, onto_affine: np.ndarray, onto_shape: Sequence[int], order: int = 1,
             world_map: Optional[np.ndarray] = None, mode: str = "constant",
             cval: float = 0.0) -> Volume:
    """``volume`` on the grid (``onto_affine``, ``onto_shape``): a Volume with that geometry.

    ``world_map``: 4x4 from the target grid's RAS mm to ``volume``'s RAS mm (a registration
    between two spaces; None when both grids lie in the same world). Interpolation as in
    :func:`resample_array`; points outside ``volume`` take ``cval`` (``mode="constant"``).
    """
    onto_affine = np.asarray(onto_affine, dtype=np.float64)
    voxel_map = voxel_map_between(volume.affine, onto_affine, world_map)
    array = resample_array(np.asarray(volume.array), voxel_map, onto_shape, order, mode, cval)
    return Volume(array, onto_affine.copy())


def voxel_map_between(source_affine: np.ndarray, target_affine: np.ndarray,
                      world_map: Optional[np.ndarray] = None) -> np.ndarray:
    """4x4 from target voxel indices to source voxel indices: target voxel -> RAS (-> the
    source's RAS through ``world_map``) -> source voxel."""
    inverse = np.linalg.inv(np.asarray(source_affine, dtype=np.float64))
    if world_map is None:
        return inverse @ np.asarray(target_affine, dtype=np.float64)
    return inverse @ np.asarray(world_map, dtype=np.float64) @ np.asarray(target_affine, dtype=np.float64)


def scale_and_shift(scale: Sequence[float], shift: Sequence[float]) -> np.ndarray:
    """4x4 ``x -> scale * x + shift`` per axis (a grid's zoom and offset as one matrix)."""
    matrix = np.eye(4)
    matrix[[0, 1, 2], [0, 1, 2]] = np.asarray(scale, dtype=np.float64)
    matrix[:3, 3] = np.asarray(shift, dtype=np.float64)
    return matrix


@contextlib.contextmanager
def itk_setting(name: str, value: Any) -> Iterator[None]:
    """SimpleITK's process-wide ``ProcessObject`` setting ``name`` (``"GlobalWarningDisplay"``,
    ``"GlobalDefaultNumberOfThreads"``, ...) set to ``value`` inside the block, restored after."""
    import SimpleITK as sitk

    get, put = getattr(sitk.ProcessObject, f"Get{name}"), getattr(sitk.ProcessObject, f"Set{name}")
    before = get()
    put(value)
    try:
        yield
    finally:
        put(before)


def crop_affine(affine: np.ndarray, start: Sequence[float]) -> np.ndarray:
    """The affine (voxel -> RAS mm, or any 4x4 from voxel indices) of the box of a grid whose
    first voxel is ``start``: the same matrix with its voxel index shifted by ``start``."""
    shifted = np.array(affine, dtype=np.float64)
    shifted[:3, 3] = affine[:3, :3] @ np.asarray(start) + affine[:3, 3]
    return shifted


def voxel_volume_mm3(affine: np.ndarray) -> float:
    """Volume (mm^3) of one voxel of a grid: |det| of the affine's 3x3 part."""
    return float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3])))


__all__ = [
    "LPS_TO_RAS", "array_to_sitk", "sitk_to_array", "volume_to_sitk", "sitk_affine", "sitk_to_volume", "itk_setting",
    "resample", "resample_array", "voxel_map_between", "scale_and_shift", "crop_affine",
    "voxel_volume_mm3",
]
