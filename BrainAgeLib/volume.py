"""`Volume`: the one in-memory image type that crosses every boundary in BrainAge.

A Volume is a float32 array indexed [I, J, K] together with the 4x4 affine that maps voxel
indices (i, j, k, 1) to RAS world coordinates in millimetres, the convention of NIfTI/nibabel
and of Slicer's IJKToRAS matrix. Orientation and spacing are read from the affine, never assumed.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence, Tuple, Union

import nibabel as nib
import numpy as np


@dataclass(eq=False)
class Volume:
    """A 3D image: ``array`` float32 [I, J, K] and ``affine`` 4x4 voxel -> RAS (mm).

    Integer arrays (labelmaps) keep their integer dtype; every other dtype becomes float32.
    """

    array: np.ndarray
    affine: np.ndarray

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        if self.array.dtype != np.float32 and not np.issubdtype(self.array.dtype, np.integer):
            self.array = self.array.astype(np.float32)
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.array.ndim != 3:
            raise ValueError(f"Volume array must be 3D [I,J,K], got shape {self.array.shape}")
        if self.affine.shape != (4, 4):
            raise ValueError(f"Volume affine must be 4x4, got shape {self.affine.shape}")

    def __repr__(self) -> str:
        """One line: 'Volume(181x217x181, 1 x 1 x 1 mm, RAS, float32, values 0..1)', not the array."""
        shape = "x".join(str(n) for n in self.shape)
        spacing = " x ".join(f"{s:.3g}" for s in self.spacing)
        if self.array.size == 0:
            values = "empty"
        else:
            with warnings.catch_warnings():  # an all-NaN array says nan..nan, quietly
                warnings.simplefilter("ignore", RuntimeWarning)
                low, high = np.nanmin(self.array), np.nanmax(self.array)
            values = f"values {low:.4g}..{high:.4g}"
        return f"Volume({shape}, {spacing} mm, {''.join(self.orientation)}, {self.array.dtype}, {values})"

    @property
    def shape(self) -> Tuple[int, int, int]:
        return tuple(int(n) for n in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> Tuple[float, float, float]:
        """Voxel size along I, J, K in mm (lengths of the affine's columns)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def orientation(self) -> Tuple[str, str, str]:
        """Axis codes, e.g. ('R', 'A', 'S'): the world direction each voxel axis increases toward."""
        return tuple(nib.orientations.aff2axcodes(self.affine))  # type: ignore[return-value]

    def with_array(self, array: np.ndarray) -> "Volume":
        """A new Volume on the same grid holding ``array``."""
        return Volume(array, self.affine.copy())

    def reoriented(self, codes: Union[str, Sequence[str]] = "RAS") -> "Volume":
        """The same image with its voxel axes permuted and flipped to point along ``codes``.

        Exact: voxels are only reordered (no interpolation), and the affine is updated so that
        every voxel keeps its RAS world position in mm. For an oblique scan each voxel axis goes
        to the world axis it is closest to. ``codes`` is e.g. "RAS", "LPS" or ("P", "S", "R").
        """
        target = nib.orientations.axcodes2ornt(tuple(codes))
        current = nib.orientations.io_orientation(self.affine)
        transform = nib.orientations.ornt_transform(current, target)
        array = np.ascontiguousarray(nib.orientations.apply_orientation(self.array, transform))
        affine = self.affine @ nib.orientations.inv_ornt_aff(transform, self.shape)
        return Volume(array, affine)

    def voxel_to_world(self, ijk: np.ndarray) -> np.ndarray:
        """RAS positions (mm) of voxel indices ``ijk``, shape [..., 3] (fractional indices allowed)."""
        return nib.affines.apply_affine(self.affine, np.asarray(ijk, dtype=np.float64))

    def world_to_voxel(self, points_ras: np.ndarray) -> np.ndarray:
        """Continuous voxel indices [..., 3] of RAS points (mm); round them to pick a voxel."""
        inverse = np.linalg.inv(self.affine)
        return nib.affines.apply_affine(inverse, np.asarray(points_ras, dtype=np.float64))
