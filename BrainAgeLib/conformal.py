"""Split-conformal prediction intervals for a predicted brain age, and the gap in units of the
model's spread.

A predicted age alone is not readable: "BAG +6 years" means something only next to how far the
model is usually off. The interval is split-conformal (Vovk; Lei et al. 2018, JASA 113:1094):
on a reference set of healthy subjects the model never trained on (the validation split, or a
site's own controls through ``brainage calibrate``), the absolute residuals
``|predicted - chronological|`` are the scores; for a new scan the ``level`` interval is
``predicted +- q``, where ``q`` is the ``ceil((n + 1) * level)``-th smallest of the ``n``
reference scores. If the new subject is exchangeable with the reference subjects, the interval
holds their chronological age with probability at least ``level`` (and at most
``level + 1 / (n + 1)``).

Brain-age models are off by more at some ages than at others (most at the ends of the training
range), so with enough reference subjects the scores are taken per band of *predicted* age
(Mondrian conformal prediction, Vovk et al. 2005): the band is known for a new scan whether or
not its chronological age is, and the guarantee holds within each band. A band gets at least
:data:`MIN_BAND_SUBJECTS` subjects; fewer reference subjects give one band.

``gap_z`` divides the (bias-corrected) brain-age gap by the SD of the reference set's
(bias-corrected) gaps; the paper (Jalal et al. 2025) calls a gap beyond one SD extreme ageing
(:data:`EXTREME_GAP_SD`).

The reference points themselves (age, predicted age; rounded to 0.01 year) travel in the
checkpoint's ``calibration`` metadata, so a report can draw a subject against them and any other
level can be asked for later.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .bias_correction import finite_pairs

#: The interval's default level (probability of holding the chronological age).
DEFAULT_LEVEL = 0.9
#: The fewest reference subjects per band of predicted age; more bands only when every band
#: has at least this many. A band's coverage, given its n reference subjects, is spread like
#: Beta(k, n + 1 - k) around the level (k = ceil((n + 1) level)): SD sqrt(level (1 - level) / (n + 2)),
#: 4.6% at n = 40 and level 0.9, 5.2% at n = 30. (On the demo's 96 validation phantoms 30 gave
#: three bands and 97.9% coverage on its 96 test phantoms, 40 two bands and 94.8%; one band 95.8%.)
MIN_BAND_SUBJECTS = 40
#: At most this many bands.
MAX_BANDS = 4
#: A gap beyond this many reference SDs is "extreme" (the paper's criterion for extreme ageing).
EXTREME_GAP_SD = 1.0
#: What a prediction without calibration says instead of an interval.
NOT_CALIBRATED = "no interval: not calibrated"
METHOD = "split conformal, |predicted - chronological age| per band of predicted age"


@dataclass(frozen=True)
class ConformalCalibration:
    """A model's reference set and what is derived from it (ages in years).

    ``reference_age``/``reference_predicted``: the reference subjects; ``band_edges``: the inner
    edges between bands of predicted age (empty: one band); ``gap_sd``: SD of the reference
    set's gaps after the bias correction fitted with it (raw gaps when there was none);
    ``level``: the level reports state by default; ``source``: where the reference came from
    (cohort summary, n, ages, date: free JSON).
    """

    reference_age: Tuple[float, ...]
    reference_predicted: Tuple[float, ...]
    band_edges: Tuple[float, ...] = ()
    gap_sd: float = float("nan")
    level: float = DEFAULT_LEVEL
    source: Dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(cls, chronological_age: Sequence[float], predicted_age: Sequence[float], bias_correction: Any = None,
            level: float = DEFAULT_LEVEL, source: Optional[Dict[str, Any]] = None,
            bands: Optional[int] = None) -> "ConformalCalibration":
        """Calibration on reference subjects (pairs with a non-finite value are dropped).

        ``bias_correction`` (a ``BiasCorrection`` fitted on the same subjects, or None) defines the
        gaps whose SD ``gap_sd`` is. ``bands``: how many bands of predicted age (default: as many
        as give each :data:`MIN_BAND_SUBJECTS`, at most :data:`MAX_BANDS`); their edges are
        quantiles of the reference predictions, so the bands hold equal numbers.
        """
        _check_level(level)
        age, predicted = finite_pairs(chronological_age, predicted_age)
        if age.size < 2:
            raise ValueError("conformal calibration needs at least two reference subjects")
        if bands is None:
            bands = max(1, min(MAX_BANDS, age.size // MIN_BAND_SUBJECTS))
        edges: Tuple[float, ...] = ()
        if bands > 1:
            inner = np.quantile(predicted, np.arange(1, bands) / bands)
            edges = tuple(round(float(e), 2) for e in inner)
        gaps = predicted - age
        if bias_correction is not None:
            gaps = np.asarray(bias_correction.corrected_gap(predicted, age), dtype=np.float64)
        order = np.argsort(age, kind="stable")
        return cls(
            reference_age=tuple(round(float(a), 2) for a in age[order]),
            reference_predicted=tuple(round(float(p), 2) for p in predicted[order]),
            band_edges=edges,
            gap_sd=float(np.std(gaps, ddof=1)),
            level=float(level),
            source=dict(source or {}),
        )

    # ------------------------------------------------------------------ using
    @property
    def n_reference(self) -> int:
        return len(self.reference_age)

    def band_of(self, predicted_age: float) -> int:
        """Index of the band of predicted age (years) a prediction falls in."""
        return int(np.searchsorted(np.asarray(self.band_edges, dtype=np.float64), float(predicted_age), side="right"))

    def band_scores(self, band: int) -> np.ndarray:
        """The reference set's absolute residuals (years) in one band, sorted."""
        predicted = np.asarray(self.reference_predicted, dtype=np.float64)
        scores = np.abs(predicted - np.asarray(self.reference_age, dtype=np.float64))
        if self.band_edges:
            bands = np.searchsorted(np.asarray(self.band_edges, dtype=np.float64), predicted, side="right")
            scores = scores[bands == band]
        return np.sort(scores)

    def half_width(self, predicted_age: float, level: Optional[float] = None) -> Optional[float]:
        """``q`` of the interval ``predicted +- q`` (years), or None when the band has too few
        reference subjects for this level (``ceil((n + 1) level) > n``)."""
        level = self.level if level is None else level
        _check_level(level)
        scores = self.band_scores(self.band_of(predicted_age))
        rank = math.ceil((scores.size + 1) * level)
        if scores.size == 0 or rank > scores.size:
            return None
        return float(scores[rank - 1])

    def interval(self, predicted_age: float, level: Optional[float] = None) -> Optional[Tuple[float, float]]:
        """(low, high) in years holding the chronological age with probability ``level``
        (default: the calibration's level), or None when it cannot be given at this level."""
        q = self.half_width(predicted_age, level)
        if q is None:
            return None
        return (float(predicted_age) - q, float(predicted_age) + q)

    def gap_z(self, gap: Optional[float]) -> Optional[float]:
        """A (bias-corrected) gap in units of the reference SD; None without a gap or an SD."""
        if gap is None or not math.isfinite(self.gap_sd) or self.gap_sd <= 0:
            return None
        return float(gap) / self.gap_sd

    def summary(self) -> Dict[str, Any]:
        """A few numbers for cards and reports: n, ages, bands, the level's half-widths, gap SD."""
        ages = np.asarray(self.reference_age, dtype=np.float64)
        widths: List[Optional[float]] = []
        for band in range(len(self.band_edges) + 1):
            scores = self.band_scores(band)
            rank = math.ceil((scores.size + 1) * self.level)
            widths.append(float(scores[rank - 1]) if 0 < rank <= scores.size else None)
        return {"n_reference": self.n_reference, "age_range": [float(ages.min()), float(ages.max())],
                "level": self.level, "band_edges": list(self.band_edges), "half_widths": widths,
                "gap_sd": self.gap_sd}

    # ------------------------------------------------------------------ serialising
    def to_dict(self) -> Dict[str, Any]:
        return {
            "method": METHOD,
            "level": self.level,
            "band_edges": list(self.band_edges),
            "gap_sd": self.gap_sd,
            "reference": {"age": list(self.reference_age), "predicted": list(self.reference_predicted)},
            "source": dict(self.source),
            "summary": self.summary(),
        }

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "ConformalCalibration":
        reference = data.get("reference") or {}
        return cls(
            reference_age=tuple(float(a) for a in reference.get("age", ())),
            reference_predicted=tuple(float(p) for p in reference.get("predicted", ())),
            band_edges=tuple(float(e) for e in data.get("band_edges") or ()),
            gap_sd=float(data.get("gap_sd", float("nan"))),
            level=float(data.get("level", DEFAULT_LEVEL)),
            source=dict(data.get("source") or {}),
        )


def format_interval(predicted_age: float, interval: Optional[Tuple[float, float]], level: Optional[float]) -> str:
    """"67.2 years (90% interval 61.4–73.0)", or "67.2 years (no interval: not calibrated)"."""
    if interval is None or level is None:
        return f"{predicted_age:.1f} years ({NOT_CALIBRATED})"
    return f"{predicted_age:.1f} years ({level * 100:g}% interval {interval[0]:.1f}\u2013{interval[1]:.1f})"


def _check_level(level: float) -> None:
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"an interval's level is a probability in (0, 1), got {level}")
