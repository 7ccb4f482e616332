"""The bundled MNI152 template that skull stripping registers every input to.

``Resources/Templates/`` holds a 2 mm copy of the MNI152 ICBM 2009a nonlinear symmetric T1
(brain only, as nilearn ships it) and its brain mask, made by ``scripts/make_template.py``;
the MNI copyright notice is in ``Resources/Templates/LICENSE-MNI152.txt``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import nibabel as nib
import numpy as np

from ..errors import BrainAgeError
from ..resources import resource_path
from ..volume import Volume

T1_FILE = "mni152_2009a_t1_brain_2mm.nii.gz"
BRAIN_MASK_FILE = "mni152_2009a_brain_mask_2mm.nii.gz"


@dataclass(frozen=True)
class Template:
    """A T1 template in RAS mm with its brain mask on the same grid."""

    t1: Volume           # float32, brain only (0 outside the brain)
    brain_mask: Volume   # uint8 0/1

    @property
    def brain_volume_ml(self) -> float:
        """Volume of the brain mask in millilitres (cm^3)."""
        voxel_ml = float(np.prod(self.brain_mask.spacing)) / 1000.0
        return float(np.count_nonzero(self.brain_mask.array)) * voxel_ml


@lru_cache(maxsize=1)
def load_template() -> Template:
    """Load the bundled MNI152 2009a template (cached; read-only arrays)."""
    volumes = []
    for name in (T1_FILE, BRAIN_MASK_FILE):
        path = resource_path("Templates", name)
        if not path.exists():
            raise BrainAgeError(
                f"{path}: bundled MNI152 template is missing; reinstall BrainAge or run "
                "scripts/make_template.py"
            )
        image = nib.load(str(path))
        volumes.append((np.asarray(image.dataobj), image.affine))
    (t1, affine), (mask, mask_affine) = volumes
    if t1.shape != mask.shape or not np.allclose(affine, mask_affine):
        raise BrainAgeError(f"{resource_path('Templates')}: template T1 and brain mask grids differ")
    t1_volume = Volume(t1.astype(np.float32), affine)
    mask_volume = Volume((mask > 0).astype(np.uint8), affine)
    t1_volume.array.setflags(write=False)
    mask_volume.array.setflags(write=False)
    return Template(t1=t1_volume, brain_mask=mask_volume)
