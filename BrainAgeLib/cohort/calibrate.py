"""Site calibration without retraining: ``brainage calibrate CONTROLS --model M --out M_site.safetensors``.

A model trained elsewhere is usually off by a site-specific amount (scanner, sequence,
population). :func:`calibrate_model` runs the model on the site's own healthy controls (any
cohort table, BIDS folder or image folder with ages; a batch run, resumable like
``brainage batch``), fits the de Lange & Cole bias correction
(:mod:`BrainAgeLib.bias_correction`) and the split-conformal residuals
(:mod:`BrainAgeLib.conformal`) on them, and writes a new checkpoint with the very same weights
(:func:`BrainAgeLib.model.card_rewrite.rewrite_card`: weights digest unchanged) whose card
records the new calibration and the cohort it came from (n, sexes, sites, ages, date), with the
one it replaced under ``calibration_history``.

Too few controls, or ages too close together, give a line that is mostly noise: fewer than
:data:`~BrainAgeLib.bias_correction.MIN_REFERENCE_SUBJECTS` controls with an age, or an age
span under :data:`~BrainAgeLib.bias_correction.MIN_REFERENCE_AGE_RANGE_YEARS` years, are
refused (:class:`CalibrationRefused`, naming the cohort), before the model runs when the table
already shows it, and again after it ran on the controls that succeeded.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from ..bias_correction import (
    MIN_REFERENCE_AGE_RANGE_YEARS, MIN_REFERENCE_SUBJECTS, BiasCorrection, BiasCorrectionRefused,
)
from ..conformal import DEFAULT_LEVEL, ConformalCalibration
from ..errors import BrainAgeError

PathLike = Union[str, "os.PathLike[str]"]


class CalibrationRefused(BrainAgeError, ValueError):
    """The control cohort is too small, or its ages too close, to calibrate on."""


@dataclass
class CalibrationRun:
    """What :func:`calibrate_model` did: the new checkpoint, the fits and the batch run behind them."""

    checkpoint: Path
    work_dir: Path
    bias_correction: BiasCorrection
    calibration: ConformalCalibration
    cohort_summary: Dict[str, Any]
    weights_sha256: str
    n_failed: int = 0
    excluded: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return {"checkpoint": str(self.checkpoint), "work_dir": str(self.work_dir),
                "bias_correction": self.bias_correction.to_dict(), "calibration": self.calibration.summary(),
                "cohort": dict(self.cohort_summary), "weights_sha256": self.weights_sha256,
                "n_failed": self.n_failed, "excluded": list(self.excluded)}


def default_work_dir(out: PathLike) -> Path:
    """Where a calibration keeps its batch run (predictions.csv): beside ``out``, ``<stem>_calibration/``."""
    out = Path(out)
    return out.parent / f"{out.stem}_calibration"


def check_controls(ages: Sequence[Optional[float]], where: str) -> None:
    """Refuse fewer than 20 controls with an age, or an age span under 10 years (``where``
    names the cohort in the message)."""
    known = np.array([a for a in ages if a is not None and np.isfinite(a)], dtype=np.float64)
    if known.size < MIN_REFERENCE_SUBJECTS:
        raise CalibrationRefused(
            f"{where}: {known.size} control subjects with an age, at least {MIN_REFERENCE_SUBJECTS} are needed "
            "to calibrate on (fewer give a bias-correction line and interval widths that are mostly noise)")
    span = float(np.ptp(known))
    if span < MIN_REFERENCE_AGE_RANGE_YEARS:
        raise CalibrationRefused(
            f"{where}: the {known.size} controls' ages span {span:.1f} years ({known.min():g}-{known.max():g}), "
            f"at least {MIN_REFERENCE_AGE_RANGE_YEARS:g} years are needed to fit the gap's age trend")


def fit_site_calibration(chronological_age: Sequence[float], predicted_age: Sequence[float], where: str = "controls",
                         *, level: float = DEFAULT_LEVEL, source: Optional[Dict[str, Any]] = None):
    """The (BiasCorrection, ConformalCalibration) pair fitted on controls' ages and predicted
    ages (years), as :func:`calibrate_model` writes them; :class:`CalibrationRefused` below 20
    controls or a 10-year age span."""
    check_controls(list(chronological_age), where)
    try:
        correction = BiasCorrection.fit_on_reference(chronological_age, predicted_age)
    except BiasCorrectionRefused as error:   # pairs with a missing prediction do not count
        raise CalibrationRefused(f"{where}: {error}") from None
    calibration = ConformalCalibration.fit(chronological_age, predicted_age, correction, level=level, source=source)
    return correction, calibration


def calibrate_model(
    controls: Union[PathLike, Sequence[Any]],
    model: PathLike = "demo",
    out: PathLike = "calibrated.safetensors",
    *,
    work_dir: Optional[PathLike] = None,
    level: float = DEFAULT_LEVEL,
    device: Any = "auto",
    workers: Optional[int] = None,
    progress: Any = None,
    retry_failed: bool = False,
    precision: str = "auto",
) -> CalibrationRun:
    """Calibrate ``model`` (a registered name or a ``.safetensors`` path) on healthy ``controls``
    and write ``out``: the same weights, the new bias correction and prediction intervals.

    ``controls``: a cohort table, BIDS or image folder, or a list of subjects (as
    ``run_batch``); each needs an age. The batch run goes to ``work_dir`` (default
    :func:`default_work_dir`) and resumes like ``brainage batch``. ``level``: the intervals'
    default level. Raises :class:`CalibrationRefused` (too few controls, too narrow ages).
    """
    from ..model.card_rewrite import rewrite_card
    from ..model.checkpoint import load_checkpoint, read_metadata, resolve_checkpoint
    from .batch import cohort_subjects, run_batch

    where = str(controls) if isinstance(controls, (str, os.PathLike)) else "the control cohort"
    subjects = cohort_subjects(controls)
    check_controls([_control_age(subject) for subject in subjects], where)           # before any model runs
    source = resolve_checkpoint(model)
    card = read_metadata(source)
    loaded = load_checkpoint(source)
    work = Path(work_dir) if work_dir is not None else default_work_dir(out)
    summary = run_batch(subjects, work, model=loaded, device=device, workers=workers, progress=progress,
                        retry_failed=retry_failed, precision=precision)
    usable = [r for r in summary.rows if r.ok and r.chronological_age is not None and r.predicted_age is not None]
    check_controls([r.chronological_age for r in usable], f"{where} (after {summary.n_failed_total} failed)"
                   if summary.n_failed_total else where)
    age = np.array([r.chronological_age for r in usable], dtype=np.float64)
    predicted = np.array([r.predicted_age for r in usable], dtype=np.float64)
    sites = sorted({r.site for r in usable if r.site})
    cohort_summary = {
        "cohort": Path(controls).name if isinstance(controls, (str, os.PathLike)) else "controls given in Python",
        "n": int(age.size), "n_female": int(sum(r.sex == "F" for r in usable)),
        "n_male": int(sum(r.sex == "M" for r in usable)), "age_range": [float(age.min()), float(age.max())],
        "sites": sites, "date": date.today().isoformat(), "how": "brainage calibrate (healthy controls)",
        "n_failed": summary.n_failed_total,
    }
    correction, calibration = fit_site_calibration(age, predicted, where, level=level, source=cohort_summary)
    history = list(card.get("calibration_history") or [])
    if card.get("calibration"):
        earlier = dict(card["calibration"])
        earlier.pop("reference", None)     # the earlier reference points stay in the earlier file
        history.append({"calibration": earlier, "bias_correction": card.get("bias_correction")})
    written = rewrite_card(source, out, {
        "bias_correction": correction.to_dict(), "calibration": calibration.to_dict(),
        "calibration_history": history,
    })
    return CalibrationRun(checkpoint=Path(written), work_dir=work, bias_correction=correction,
                          calibration=calibration, cohort_summary=cohort_summary,
                          weights_sha256=str(card.get("weights_sha256") or ""), n_failed=summary.n_failed_total,
                          excluded=list(summary.excluded))


def _control_age(subject: Any) -> Optional[float]:
    """A control's age in years from its cohort entry, or None (empty, not a number)."""
    try:
        value = float(subject.age)
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) else None
