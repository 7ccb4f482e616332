"""`Volume`: the one in-memory image type that crosses every boundary in BrainAge.

A Volume is a float32 array indexed [I, J, K] together with the 4x4 affine that maps voxel
indices (i, j, k, 1) to RAS world coordinates in millimetres, the convention of NIfTI/nibabel
and of Slicer's IJKToRAS matrix. Orientation and spacing are read from the affine, never assumed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import nibabel as nib
import numpy as np


@dataclass
class Volume:
    """A 3D image: ``array`` float32 [I, J, K] and ``affine`` 4x4 voxel -> RAS (mm)."""

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
