"""Age-bias correction of the brain-age gap (de Lange & Cole, 2020, NeuroImage: Clinical 26:102229).

Brain-age models regress toward the mean of their training ages: young people are predicted
too old and old people too young, so the raw gap BAG = predicted - chronological correlates
with age. The correction fits the linear trend BAG = slope * age + intercept on a reference
set (a validation split of healthy subjects) and subtracts it:

    corrected BAG = BAG - (slope * age + intercept)

The two coefficients travel inside a checkpoint's metadata so every prediction made with a
model is corrected the same way. A cohort's own correction (``brainage evaluate``, the end of a
batch run) is fitted with :meth:`BiasCorrection.fit_on_reference`, which refuses too few
reference subjects or too narrow a span of their ages.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict

import numpy as np

#: The fewest reference subjects, and the narrowest span of their ages (years), that a cohort's
#: own correction is fitted on. The slope's standard error is about SD(gap) / (SD(age) sqrt(n)):
#: with a typical gap SD of 5 years, 20 subjects spread evenly over 10 years (SD(age) 2.9 years)
#: give +-0.39, already as large as the slopes brain-age models usually show (-0.2 to -0.5).
#: Below either limit the fitted line is mostly noise, and "correcting" with it adds error
#: (2 subjects gave slope -4.4, intercept 251, issue 20).
MIN_REFERENCE_SUBJECTS = 20
MIN_REFERENCE_AGE_RANGE_YEARS = 10.0


class BiasCorrectionRefused(ValueError):
    """The reference subjects are too few, or their ages too close, for a trustworthy fit."""


def finite_pairs(chronological_age, predicted_age):
    """The (age, predicted) pairs of a reference set as float arrays, pairs with a non-finite value
    dropped; ValueError when the two differ in length."""
    age = np.asarray(chronological_age, dtype=np.float64).ravel()
    predicted = np.asarray(predicted_age, dtype=np.float64).ravel()
    if age.shape != predicted.shape:
        raise ValueError(f"ages ({age.size}) and predictions ({predicted.size}) differ in length")
    keep = np.isfinite(age) & np.isfinite(predicted)
    return age[keep], predicted[keep]


@dataclass(frozen=True)
class BiasCorrection:
    """Linear trend of BAG on chronological age (years), fitted on a reference set."""

    slope: float
    intercept: float
    n_reference: int = 0

    @classmethod
    def fit(cls, chronological_age, predicted_age) -> "BiasCorrection":
        """Least-squares fit of BAG ~ age on reference subjects (at least two distinct ages; a
        cohort's own correction uses :meth:`fit_on_reference`, which asks for more)."""
        age, predicted = finite_pairs(chronological_age, predicted_age)
        if age.size < 2 or np.ptp(age) == 0:
            raise ValueError("bias correction needs at least two reference subjects of different ages")
        slope, intercept = np.polyfit(age, predicted - age, deg=1)
        return cls(float(slope), float(intercept), int(age.size))

    @classmethod
    def fit_on_reference(cls, chronological_age, predicted_age) -> "BiasCorrection":
        """:meth:`fit`, refused (:class:`BiasCorrectionRefused`) below
        :data:`MIN_REFERENCE_SUBJECTS` subjects or an age span under
        :data:`MIN_REFERENCE_AGE_RANGE_YEARS` (pairs with a non-finite value do not count)."""
        age = np.asarray(chronological_age, dtype=np.float64).ravel()
        predicted = np.asarray(predicted_age, dtype=np.float64).ravel()
        if age.shape == predicted.shape:
            usable = age[np.isfinite(age) & np.isfinite(predicted)]
            if usable.size < MIN_REFERENCE_SUBJECTS:
                raise BiasCorrectionRefused(
                    f"{usable.size} reference subjects, at least "
                    f"{MIN_REFERENCE_SUBJECTS} needed for a trustworthy fit")
            span = float(np.ptp(usable))
            if span < MIN_REFERENCE_AGE_RANGE_YEARS:
                raise BiasCorrectionRefused(
                    f"the {usable.size} reference subjects' ages span {span:.1f} years, "
                    f"at least {MIN_REFERENCE_AGE_RANGE_YEARS:g} years needed for a trustworthy fit")
        return cls.fit(age, predicted)

    def expected_gap(self, chronological_age):
        """The BAG the model shows on average at this age (years)."""
        return self.slope * np.asarray(chronological_age, dtype=np.float64) + self.intercept

    def corrected_gap(self, predicted_age, chronological_age):
        """Bias-corrected BAG (years): raw BAG minus the age trend."""
        predicted = np.asarray(predicted_age, dtype=np.float64)
        age = np.asarray(chronological_age, dtype=np.float64)
        corrected = predicted - age - self.expected_gap(age)
        return float(corrected) if corrected.ndim == 0 else corrected

    def to_dict(self) -> Dict[str, Any]:
        return {"method": "de Lange & Cole 2020 (BAG ~ age)", **asdict(self)}

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "BiasCorrection":
        return cls(float(data["slope"]), float(data["intercept"]), int(data.get("n_reference", 0)))
