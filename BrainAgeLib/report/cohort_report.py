"""A cohort run's HTML report (``brainage batch --report``): ``OUT/report/index.html``.

One self-contained page from ``Resources/Reports/batch.html.j2``: the demo disclaimer (red,
first) for the demo model; the run's numbers (subjects, failures, MAE, mean gaps); a subject
table (id, sex, age, predicted age with interval, BAG, corrected BAG, gap z, QC flags, error, a
link to the subject's own report) that sorts on a click on any column header (a dozen lines of
inline script, nothing from a CDN); the scatter of predicted against chronological age over the
model's reference set, the Bland-Altman plot, and the corrected gap's distribution by group
and by site when the cohort gives more than one; the model card's summary. Subject reports
(``write_subject_report``) lie in ``OUT/report/subjects/<id>.html`` (:func:`subject_report_path`).
"""
from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from .. import __version__
from ..conformal import EXTREME_GAP_SD
from ..result import DEMO_DISCLAIMER
from .card import card_calibration, card_summary, model_card
from .templates import render

PathLike = Union[str, "os.PathLike[str]"]

REPORT_FOLDER = "report"


def subject_report_path(out_dir: PathLike, subject_id: str) -> Path:
    """Where a batch run writes a subject's report: ``OUT/report/subjects/<id>.html`` (the id
    with characters other than letters, digits, ``-_.`` replaced by ``_``)."""
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(subject_id)).strip(".") or "subject"
    return Path(out_dir) / REPORT_FOLDER / "subjects" / f"{keep}.html"


def _cell(value: Optional[float], signed: bool = False, decimals: int = 1) -> Dict[str, Any]:
    if value is None or not np.isfinite(value):
        return {"text": "", "sort": ""}
    return {"text": f"{value:+.{decimals}f}" if signed else f"{value:.{decimals}f}", "sort": f"{value:.6f}"}


def write_batch_report(out_dir: PathLike, rows: Sequence[Any], model: Any = None, *,
                       groups: Optional[Mapping[str, str]] = None, group_label: str = "group") -> Path:
    """Write ``out_dir/report/index.html`` for a batch run's ``rows`` (``PredictionRow``s, cohort
    order) made by ``model`` (a ``BrainAgeModel``, card, name or path; None: no reference set).
    ``groups``: subject id -> group (e.g. a cohort's diagnosis column), plotted beside the sites.
    Returns the path."""
    from ..atomic_files import write_text_atomic
    from .figures import bland_altman_figure, cohort_scatter_figure, gap_by_group_figure

    out_dir = Path(out_dir)
    index = out_dir / REPORT_FOLDER / "index.html"
    card = model_card(model)
    calibration = card_calibration(card)
    is_demo = bool(card.get("is_demo"))
    groups = dict(groups or {})
    table: List[Dict[str, Any]] = []
    for row in rows:
        report = subject_report_path(out_dir, row.id)
        interval = ""
        if row.interval_low is not None and row.interval_high is not None:
            interval = f"{row.interval_low:.1f}\u2013{row.interval_high:.1f}"
        table.append({
            "id": row.id, "sex": row.sex, "site": row.site, "group": groups.get(row.id, ""),
            "age": _cell(row.chronological_age), "predicted": _cell(row.predicted_age), "interval": interval,
            "bag": _cell(row.brain_age_gap, signed=True), "corrected": _cell(row.corrected_brain_age_gap, signed=True),
            "z": _cell(row.gap_z, signed=True, decimals=2),
            "extreme": row.gap_z is not None and abs(row.gap_z) > EXTREME_GAP_SD,
            "qc_flags": " | ".join(row.qc_flags), "error": row.error,
            "report": os.path.relpath(report, index.parent).replace(os.sep, "/") if report.exists() else "",
        })
    usable = [r for r in rows if r.ok and r.chronological_age is not None and r.predicted_age is not None]
    age = np.array([r.chronological_age for r in usable], dtype=np.float64)
    predicted = np.array([r.predicted_age for r in usable], dtype=np.float64)
    figures: List[Dict[str, str]] = []
    numbers: List[List[str]] = [["Subjects", str(len(rows))], ["Predicted", str(sum(r.ok for r in rows))],
                                ["Failed", str(sum(not r.ok for r in rows))]]
    if usable:
        gap = predicted - age
        numbers += [["With an age", str(len(usable))], ["MAE", f"{np.abs(gap).mean():.2f} years"],
                    ["Mean brain-age gap", f"{gap.mean():+.2f} years (SD {gap.std(ddof=1) if gap.size > 1 else 0:.2f})"]]
        corrected = [r.corrected_brain_age_gap for r in usable if r.corrected_brain_age_gap is not None]
        if corrected:
            numbers.append(["Mean bias-corrected gap", f"{np.mean(corrected):+.2f} years"])
        z = [r.gap_z for r in usable if r.gap_z is not None]
        if z:
            numbers.append([f"|gap z| > {EXTREME_GAP_SD:g} (extreme)", f"{sum(abs(v) > EXTREME_GAP_SD for v in z)} of {len(z)}"])
        inside = [r.interval_low <= r.chronological_age <= r.interval_high for r in usable
                  if r.interval_low is not None and r.interval_high is not None]
        if inside:
            numbers.append(["Ages inside their interval", f"{sum(inside)} of {len(inside)} ({np.mean(inside):.0%}; "
                            f"expected about {usable[0].interval_level or 0.9:.0%} for healthy controls)"])
        figures.append({"id": "scatter", "src": cohort_scatter_figure(age, predicted, calibration),
                        "caption": "Predicted against chronological age: this cohort (blue) over the model's reference "
                                   "set (grey); dashed: predicted = chronological."})
        if len(usable) >= 2:
            figures.append({"id": "bland-altman", "src": bland_altman_figure(age, predicted),
                            "caption": "Bland-Altman: the gap against the mean of the two ages, with the mean gap "
                                       "and the 95% limits of agreement."})
        for label, key in ((group_label, lambda r: groups.get(r.id, "")), ("site", lambda r: r.site or "")):
            by: Dict[str, List[float]] = {}
            for r in usable:
                gap_r = r.corrected_brain_age_gap if r.corrected_brain_age_gap is not None else r.brain_age_gap
                if key(r) and gap_r is not None:
                    by.setdefault(key(r), []).append(gap_r)
            if len(by) >= 2 or (by and label == group_label):
                figures.append({"id": f"gap-by-{label}", "src": gap_by_group_figure(by, label),
                                "caption": f"The bias-corrected brain-age gap by {label}."})
    context = {
        "title": f"Brain age: cohort report ({out_dir.name})",
        "is_demo": is_demo, "disclaimer": DEMO_DISCLAIMER, "numbers": numbers, "rows": table,
        "has_groups": bool(groups), "has_sites": any(r.site for r in rows), "group_label": group_label,
        "figures": figures, "card": card_summary(card) if card else [],
        "calibrated": calibration is not None,
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "version": __version__,
    }
    index.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(index, render("batch.html.j2", context))
