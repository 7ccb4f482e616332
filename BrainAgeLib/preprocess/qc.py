"""Quality control of one prediction's input: measurements made during preprocessing, and one
clear sentence for each that lies outside what the model can read.

``assess`` measures, on the brain mask and the bias-corrected RAS volume:

- the brain-mask volume (ml), against an adult range (``ADULT_BRAIN_ML``); a much smaller one
  (``CHILD_BRAIN_ML``) is said to be a child's or an infant's;
- the sides of the field of view the mask touches (a field of view that cuts the brain);
- the voxel size: slices thicker than ``MAX_VOXEL_MM`` or an anisotropy above ``MAX_ANISOTROPY``;
- T1 contrast: in a T1-weighted brain the deep tissue (mostly white matter) is brighter than the
  outer rind (cortex and CSF); a T2, a FLAIR or an inverted image is darker there.

``age_flags`` adds, at prediction time, the chronological age outside the model's training
ages. A flagged prediction is still made; ``brainage predict --strict-qc`` exits with code 4.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

#: Adult intracranial brain masks (deepbet keeps the CSF around the brain, as a TIV mask):
#: 1.1-1.9 litres in most adults (women smaller than men), the 8 IXI heads 1,150-1,555 ml. A
#: template mask that kept skull and scalp measured 2.1-2.4 litres on them; one that lost the
#: top of the brain 720-946 ml (so the T1-contrast check, not this one, catches most of those).
ADULT_BRAIN_ML: Tuple[float, float] = (900.0, 2000.0)
#: Below this the brain is a child's or an infant's (a newborn's is about 400 ml).
CHILD_BRAIN_ML = 700.0
MAX_VOXEL_MM = 3.0
MAX_ANISOTROPY = 3.0
#: Deep tissue (more than ``DEEP_MM`` inside the mask's edge) over the outer rind (within
#: ``RIND_MM``): T1 heads with a good mask 1.3-1.7 (IXI, Colin27, phantoms); an inverted T1, or
#: a mask that is not the brain (template masks of the IXI heads: 1.05-1.07), less than 1.1.
MIN_T1_CONTRAST = 1.1
DEEP_MM = 15.0
RIND_MM = 5.0
#: Area (mm^2) of brain mask on one face of the field of view that counts as "cut". The
#: inferior face is allowed a brainstem's cross-section.
MAX_BORDER_MM2 = 50.0
MAX_INFERIOR_BORDER_MM2 = 600.0
#: ``QualityControl.skull_strip`` of an input that came skull-stripped (nothing was extracted).
ALREADY_STRIPPED = "already stripped"
#: RAS voxel axes: the face at index 0 and at the last index of each axis.
_SIDES = (("left", "right"), ("posterior", "anterior"), ("inferior", "superior"))


@dataclass
class QualityControl:
    """QC measurements of one input and the flags they raised (empty: nothing to say)."""

    brain_volume_ml: Optional[float] = None
    voxel_size_mm: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    border_sides: Tuple[str, ...] = ()
    t1_contrast: Optional[float] = None
    skull_strip: str = ""
    flags: List[str] = field(default_factory=list)
    #: False for a QualityControl that ``assess`` never filled (nothing was checked)
    measured: bool = False

    @property
    def ok(self) -> bool:
        """Measured, and nothing flagged."""
        return self.measured and not self.flags

    def to_dict(self) -> Dict[str, Any]:
        return {
            "brain_volume_ml": None if self.brain_volume_ml is None else round(float(self.brain_volume_ml), 1),
            "voxel_size_mm": [round(float(s), 4) for s in self.voxel_size_mm],
            "border_sides": list(self.border_sides),
            "t1_contrast": None if self.t1_contrast is None else round(float(self.t1_contrast), 3),
            "skull_strip": self.skull_strip,
            "flags": list(self.flags),
            "measured": bool(self.measured),
        }


def assess(array: np.ndarray, mask: np.ndarray, spacing: Sequence[float], skull_strip: str) -> QualityControl:
    """QC of a RAS-oriented ``array`` (after bias correction) and its brain ``mask`` (same grid)."""
    spacing = tuple(float(s) for s in spacing)
    qc = QualityControl(voxel_size_mm=spacing, skull_strip=skull_strip, measured=True)
    qc.flags.extend(voxel_flags(spacing))
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        qc.flags.append("the brain mask is empty")
        return qc
    qc.brain_volume_ml = mask_volume_ml(mask, spacing)
    qc.flags.extend(volume_flags(qc.brain_volume_ml))
    qc.border_sides = border_sides(mask, spacing)
    if qc.border_sides:
        qc.flags.append(
            f"the brain mask touches the {', '.join(qc.border_sides)} edge of the field of view: the image may "
            "cut off part of the brain (a whole brain lies inside the image with a margin)")
    qc.t1_contrast = t1_contrast(array, mask, spacing)
    if qc.t1_contrast is not None and qc.t1_contrast < MIN_T1_CONTRAST:
        qc.flags.append(
            f"the brain mask may not be the brain, or the image is not T1-weighted: deep tissue inside the mask is "
            f"{qc.t1_contrast:.2f} times as bright as its outer {RIND_MM:g} mm (a T1 with a good mask gives "
            f"{MIN_T1_CONTRAST:g} or more, as white matter is brighter than grey matter and CSF; a T2, FLAIR or "
            "inverted image, or a mask holding skull or missing brain, gives less)")
    return qc


def mask_volume_ml(mask: np.ndarray, spacing: Sequence[float]) -> float:
    """Volume of a boolean mask on a grid of ``spacing`` (mm), in millilitres."""
    return float(np.count_nonzero(mask)) * float(np.prod(spacing)) / 1000.0


def voxel_flags(spacing: Sequence[float]) -> List[str]:
    flags = []
    if max(spacing) > MAX_VOXEL_MM:
        flags.append(f"voxels of {' x '.join(f'{s:g}' for s in spacing)} mm: slices thicker than "
                     f"{MAX_VOXEL_MM:g} mm blur the anatomy the model reads")
    elif max(spacing) / min(spacing) > MAX_ANISOTROPY:
        flags.append(f"voxels of {' x '.join(f'{s:g}' for s in spacing)} mm are more than {MAX_ANISOTROPY:g} "
                     "times longer along one axis than another")
    return flags


def volume_flags(brain_ml: float) -> List[str]:
    low, high = ADULT_BRAIN_ML
    if brain_ml < CHILD_BRAIN_ML:
        return [f"the brain mask is {brain_ml:.0f} ml, far below an adult's ({low:.0f}-{high:.0f} ml): a child's or "
                "an infant's brain, or a failed brain extraction"]
    if brain_ml < low:
        return [f"the brain mask is {brain_ml:.0f} ml, below the adult range {low:.0f}-{high:.0f} ml: part of "
                "the brain may be missing from it"]
    if brain_ml > high:
        return [f"the brain mask is {brain_ml:.0f} ml, above the adult range {low:.0f}-{high:.0f} ml: it may "
                "hold skull, scalp or neck"]
    return []


def border_sides(mask: np.ndarray, spacing: Sequence[float]) -> Tuple[str, ...]:
    """The sides of the field of view on which the mask covers more than the allowed area."""
    sides = []
    for axis, names in enumerate(_SIDES):
        face_mm2 = float(np.prod([s for i, s in enumerate(spacing) if i != axis]))
        for end, name in zip((0, -1), names):
            area = np.count_nonzero(np.take(mask, end, axis=axis)) * face_mm2
            allowed = MAX_INFERIOR_BORDER_MM2 if name == "inferior" else MAX_BORDER_MM2
            if area > allowed:
                sides.append(name)
    return tuple(sides)


def t1_contrast(array: np.ndarray, mask: np.ndarray, spacing: Sequence[float]) -> Optional[float]:
    """Median intensity of the deep brain over that of its outer rind (None: too little of either).

    Measured on a grid of about 2 mm (every n-th voxel) to keep the distance map cheap.
    """
    step = [max(1, int(round(2.0 / s))) for s in spacing]
    view = tuple(slice(None, None, n) for n in step)
    small, values = mask[view], np.asarray(array)[view]
    depth = ndimage.distance_transform_edt(small, sampling=[s * n for s, n in zip(spacing, step)])
    deep, rind = small & (depth > DEEP_MM), small & (depth <= RIND_MM)
    if np.count_nonzero(deep) < 20 or np.count_nonzero(rind) < 20:
        return None
    outer = float(np.median(values[rind]))
    if outer <= 0:
        return None
    return float(np.median(values[deep])) / outer


def age_flags(metadata: Mapping[str, Any], age: Optional[float]) -> List[str]:
    """The chronological age outside the model's training ages (from its card), as a flag."""
    span = (metadata.get("training_data") or {}).get("age_range")
    if age is None or not span or len(span) != 2:
        return []
    low, high = float(span[0]), float(span[1])
    if low <= age <= high:
        return []
    return [f"chronological age {age:g} is outside the training ages {low:g}-{high:g}; expect a larger error"]
