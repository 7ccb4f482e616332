"""Age-bias correction of the brain-age gap (de Lange & Cole, 2020, NeuroImage: Clinical 26:102229).

Brain-age models regress toward the mean of their training ages: young people are predicted
too old and old people too young, so the raw gap BAG = predicted - chronological correlates
with age. The correction fits the linear trend BAG = slope * age + intercept on a reference
set (a validation split of healthy subjects) and subtracts it:

    corrected BAG = BAG - (slope * age + intercept)

The two coefficients travel inside a checkpoint's metadata so every prediction made with a
model is corrected the same way.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict

import numpy as np


@dataclass(frozen=True)
class BiasCorrection:
    """Linear trend of BAG on chronological age (years), fitted on a reference set."""

    slope: float
    intercept: float
    n_reference: int = 0

    @classmethod
    def fit(cls, chronological_age, predicted_age) -> "BiasCorrection":
        """Least-squares fit of BAG ~ age on reference subjects (at least two distinct ages)."""
        age = np.asarray(chronological_age, dtype=np.float64).ravel()
        predicted = np.asarray(predicted_age, dtype=np.float64).ravel()
        if age.shape != predicted.shape:
            raise ValueError(f"ages ({age.size}) and predictions ({predicted.size}) differ in length")
        keep = np.isfinite(age) & np.isfinite(predicted)
        age, predicted = age[keep], predicted[keep]
        if age.size < 2 or np.ptp(age) == 0:
            raise ValueError("bias correction needs at least two reference subjects of different ages")
        slope, intercept = np.polyfit(age, predicted - age, deg=1)
        return cls(float(slope), float(intercept), int(age.size))

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
