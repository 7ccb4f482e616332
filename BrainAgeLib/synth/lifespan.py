"""What ageing does to the adult brain, and where: the curves and regions the phantoms follow.

Every curve is a function of age in years, is 0 (or 1 for ratios) at :data:`BASELINE_AGE` and
stands for the *template* (the MNI152 2009a average, built from young adults) being a
20-year-old. The shapes follow published lifespan charts; the exact numbers are round values
chosen to sit inside the ranges those papers report, not fits to their data.

Curves (ratios relative to age 20 unless stated)
------------------------------------------------
- **Lateral + third ventricle volume** grows slowly through mid-life and accelerates after
  about 60, to ~2.6x by 90: ``1 + 0.012 (t-20) + 0.0006 max(0, t-55)^2``.
  Sources: Bethlehem et al. 2022, *Nature* 604:525 ("Brain charts for the human lifespan",
  ventricular volume rises monotonically and steepens in late life); Fjell & Walhovd 2010,
  *Rev. Neurosci.* 21:187 (ventricles the structure with the largest relative change);
  Walhovd et al. 2011, *Neurobiol. Aging* 32:916 (ventricle curves over 18-94 years).
- **Grey-matter loss** (fraction of the template's GM turned into sulcal CSF) is near-linear
  and slightly accelerating: ``0.0026 (t-20) + 0.00002 (t-20)^2``, i.e. ~10% at 50, ~28% at 90.
  Sources: Bethlehem et al. 2022 (GMV declines steadily from its peak in childhood);
  Fjell & Walhovd 2010 (cortical thinning ~0.5%/year from young adulthood).
- **Regional grey-matter loss** is :data:`REGIONAL_GM_FACTOR` times faster in the regions of
  :data:`AGING_REGIONS` (cerebellar vermis, pre/postcentral gyri, temporal lobes, medial
  superior frontal gyrus: the regions BrainRotViT's attention highlighted, Jalal et al. 2025).
  Salat et al. 2004, *Cereb. Cortex* 14:721 report thinning early and strongest in primary
  motor (precentral) cortex and prefrontal cortex; Raz et al. 2005 (*Cereb. Cortex* 15:1676)
  report cerebellar shrinkage, Fjell et al. 2009 (*J. Neurosci.* 29:15223) temporal loss.
- **White-matter volume** follows an inverted U with its peak at :data:`WM_PEAK_AGE` (45)
  and a steeper decline after 60: ``1 - 0.00006 (t-45)^2 - 0.00005 max(0, t-60)^2`` relative
  to the peak. Sources: Walhovd et al. 2011 and Fjell & Walhovd 2010 (WM peaks in the 40s and
  falls in late life); Bethlehem et al. 2022 (WMV peaks around 29 years, declines
  accelerating after 60). The phantoms express it as a GM<->WM exchange at the GM/WM border
  (myelination before the peak, demyelination after) plus periventricular compression.
- **Grey/white contrast** falls linearly, to ~72% of the young value at 90:
  ``1 - 0.004 (t-20)``. Source: Salat et al. 2009, *NeuroImage* 48:21 (GM/WM signal contrast
  declines across the adult age range; WM signal falls and GM signal rises).

Regions (:data:`AGING_REGIONS`) are capsules (a line segment with a radius) and ellipsoids in
MNI152 millimetres; a voxel's regional weight is 1 inside, falling to 0 over a few mm outside.
They are deliberately coarse, defined here without any atlas file; ``Testing/test_synth.py``
checks them against the AAL atlas where Debian's mricron-data provides it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np

BASELINE_AGE = 20.0  # years: the age the MNI152 template stands for
WM_PEAK_AGE = 45.0  # years
REGIONAL_GM_FACTOR = 2.5  # nominal GM loss rate inside AGING_REGIONS relative to elsewhere
AGE_RANGE = (20.0, 90.0)  # years the curves are meant for


def _t(age) -> np.ndarray:
    return np.asarray(age, dtype=np.float64)


def ventricle_growth(age) -> np.ndarray:
    """Ventricle volume at ``age`` (years) relative to age 20 (1.0 at 20, ~2.6 at 90)."""
    t = _t(age)
    return 1.0 + 0.012 * (t - BASELINE_AGE) + 0.0006 * np.maximum(0.0, t - 55.0) ** 2


def gm_loss_fraction(age) -> np.ndarray:
    """Fraction (0-1) of the age-20 grey matter lost by ``age`` (years), brain-wide average."""
    dt = np.maximum(0.0, _t(age) - BASELINE_AGE)
    return 0.0026 * dt + 0.00002 * dt**2


def wm_relative_to_peak(age) -> np.ndarray:
    """White-matter volume at ``age`` (years) relative to its peak at 45 (inverted U)."""
    t = _t(age)
    return 1.0 - 0.00006 * (t - WM_PEAK_AGE) ** 2 - 0.00005 * np.maximum(0.0, t - 60.0) ** 2


def wm_change_fraction(age) -> np.ndarray:
    """Relative WM volume change since age 20 (positive before ~70, negative after)."""
    return wm_relative_to_peak(age) / wm_relative_to_peak(BASELINE_AGE) - 1.0


def contrast_factor(age) -> np.ndarray:
    """Grey/white signal contrast at ``age`` relative to age 20 (1.0 at 20, 0.72 at 90)."""
    return 1.0 - 0.004 * np.maximum(0.0, _t(age) - BASELINE_AGE)


@dataclass(frozen=True)
class Capsule:
    """Points within ``radius`` mm of the segment ``start``-``end`` (MNI mm, RAS).

    ``x_radius`` (mm) flattens the capsule left-right, for thin midline structures.
    """

    start: Tuple[float, float, float]
    end: Tuple[float, float, float]
    radius: float
    x_radius: Optional[float] = None

    def distance(self, xyz: np.ndarray) -> np.ndarray:
        """Signed-ish distance (mm, <= 0 inside) of points ``xyz`` [..., 3] to the surface."""
        a = np.asarray(self.start, dtype=np.float64)
        b = np.asarray(self.end, dtype=np.float64)
        ab = b - a
        s = np.clip(((xyz - a) @ ab) / float(ab @ ab), 0.0, 1.0)
        offset = xyz - (a + s[..., None] * ab)
        if self.x_radius is not None:
            offset = offset * np.array([self.radius / self.x_radius, 1.0, 1.0])
        return np.sqrt(np.sum(offset**2, axis=-1)) - self.radius


# The regions where grey matter is lost faster (see the module docstring), in MNI152 mm.
# Each side's sensorimotor strip runs from its lateral-inferior end up to the vertex.
AGING_REGIONS: Dict[str, Tuple[Capsule, ...]] = {
    "cerebellar_vermis": (
        Capsule((0.0, -44.0, -4.0), (0.0, -70.0, -40.0), radius=12.0, x_radius=7.0),
    ),
    "precentral_gyrus": tuple(
        Capsule((side * 52.0, 4.0, 28.0), (side * 26.0, -20.0, 72.0), radius=11.0) for side in (-1, 1)
    ),
    "postcentral_gyrus": tuple(
        Capsule((side * 58.0, -14.0, 26.0), (side * 26.0, -38.0, 72.0), radius=11.0) for side in (-1, 1)
    ),
    "temporal_lobe": tuple(
        Capsule((side * 44.0, 12.0, -30.0), (side * 56.0, -60.0, 6.0), radius=17.0) for side in (-1, 1)
    ),
    "medial_superior_frontal_gyrus": (
        Capsule((0.0, 64.0, 8.0), (0.0, 28.0, 58.0), radius=12.0, x_radius=14.0),
    ),
}


def region_weight(xyz: np.ndarray, falloff_mm: float = 3.0, regions: Optional[Dict] = None) -> np.ndarray:
    """Weight in [0, 1] of MNI points ``xyz`` [..., 3] (mm): 1 inside any ageing region,
    falling off smoothly (logistic, ``falloff_mm`` scale) outside."""
    regions = AGING_REGIONS if regions is None else regions
    distance = np.full(xyz.shape[:-1], np.inf)
    for shapes in regions.values():
        for shape in shapes:
            distance = np.minimum(distance, shape.distance(xyz))
    return 1.0 / (1.0 + np.exp(np.clip(distance / (falloff_mm / 4.0), -50, 50)))


def region_labels(xyz: np.ndarray, regions: Optional[Dict] = None) -> np.ndarray:
    """Integer label per point: 0 outside, i+1 inside the i-th region of ``AGING_REGIONS``."""
    regions = AGING_REGIONS if regions is None else regions
    labels = np.zeros(xyz.shape[:-1], dtype=np.int16)
    for index, shapes in enumerate(regions.values(), start=1):
        for shape in shapes:
            labels[(shape.distance(xyz) <= 0) & (labels == 0)] = index
    return labels
