"""One scan's HTML report (``brainage predict --report``, the Slicer module's *Save report*).

:func:`write_subject_report` writes a single self-contained file from the template
``Resources/Reports/subject.html.j2`` (Jinja2, autoescaped): every picture is a base64 PNG inside
it, nothing is fetched from anywhere, so it opens offline and can be mailed. It shows, in order:
the demo model's disclaimer (first, in red) when the model is the demo; the numbers (predicted
age with its prediction interval, chronological age, BAG, bias-corrected BAG, gap z and the
extreme-ageing flag); the subject against the model's reference set; the QC picture and flags;
the attention montage when the result was explained; the model card's summary; warnings.
"""
from __future__ import annotations

import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from .. import __version__
from ..conformal import EXTREME_GAP_SD, NOT_CALIBRATED
from ..result import DEMO_DISCLAIMER
from .card import card_calibration, card_summary, model_card
from .templates import render

PathLike = Union[str, "os.PathLike[str]"]


def _years(value: Optional[float], signed: bool = False) -> str:
    if value is None or not np.isfinite(value):
        return "not available"
    return f"{value:+.1f} years" if signed else f"{value:.1f} years"


def result_rows(result: Any) -> List[Tuple[str, str]]:
    """The numbers of one prediction as (label, text) rows, as the report shows them."""
    rows = [("Predicted brain age", result.interval_text)]
    if result.chronological_age is None:
        rows.append(("Chronological age", "not given (no brain-age gap)"))
    else:
        rows.append(("Chronological age", _years(result.chronological_age)))
        rows.append(("Brain-age gap (BAG)", _years(result.brain_age_gap, signed=True)))
        rows.append(("Bias-corrected BAG", _years(result.corrected_brain_age_gap, signed=True)
                     if result.corrected_brain_age_gap is not None else "not available (no bias correction)"))
        if result.gap_z is None:
            rows.append(("Gap z", f"not available ({NOT_CALIBRATED})"))
        else:
            rows.append(("Gap z", f"{result.gap_z:+.2f} SD of the reference set's gaps"
                         + (f": beyond {EXTREME_GAP_SD:g} SD, extreme (the paper's criterion)"
                            if result.extreme_gap else f": within {EXTREME_GAP_SD:g} SD")))
    rows.append(("Sex", "unknown (mean of the female and male predictions)" if result.sex_was_unknown else result.sex))
    return rows


def subject_context(result: Any, model: Any = None, *, volume: Any = None, subject: str = "",
                    qc_picture: Optional[PathLike] = None, montage: Optional[PathLike] = None) -> Dict[str, Any]:
    """Everything the subject template shows (pictures as data URIs), see :func:`write_subject_report`."""
    from .figures import png_file_data_uri, reference_figure

    card = model_card(model)
    calibration = card_calibration(card)
    is_demo = bool(result.model_is_demo or card.get("is_demo"))
    reference = None
    if calibration is not None and calibration.n_reference:
        reference = reference_figure(calibration, result.predicted_age, result.chronological_age,
                                     result.interval, result.interval_level)
    qc_uri = png_file_data_uri(qc_picture) if qc_picture else None
    montage_uri = png_file_data_uri(montage) if montage else None
    if volume is not None and (qc_uri is None and result.brain_mask is not None
                               or montage_uri is None and result.attention is not None):
        with tempfile.TemporaryDirectory() as folder:
            if qc_uri is None and result.brain_mask is not None:
                from ..explain.qc_figure import write_result_qc_figure

                qc_uri = png_file_data_uri(write_result_qc_figure(result, volume, folder, subject or "input"))
            if montage_uri is None and result.attention is not None:
                from ..explain.outputs import write_montage

                mask = None if result.brain_mask is None else np.asarray(result.brain_mask.array) > 0
                montage_uri = png_file_data_uri(write_montage(result, Path(folder) / "montage.png", volume=volume,
                                                              brain_mask=mask))
    qc = result.qc
    return {
        "title": f"Brain age report{': ' + subject if subject else ''}",
        "subject": subject,
        "is_demo": is_demo,
        "disclaimer": DEMO_DISCLAIMER,
        "headline": result.interval_text,
        "rows": result_rows(result),
        "extreme": bool(result.extreme_gap),
        "calibrated": calibration is not None,
        "not_calibrated": NOT_CALIBRATED,
        "reference_figure": reference,
        "qc": {"volume_ml": qc.brain_volume_ml, "skull_strip": qc.skull_strip, "flags": list(qc.flags),
               "measured": bool(qc.measured)},
        "qc_figure": qc_uri,
        "explained": result.attention is not None or montage_uri is not None,
        "explain_method": result.explain_method,
        "montage": montage_uri,
        "card": card_summary(card) if card else card_summary({"name": result.model_name,
                                                               "intended_use": result.model_intended_use,
                                                               "is_demo": result.model_is_demo,
                                                               "weights_sha256": result.model_weights_sha256}),
        "warnings": [str(w) for w in result.warnings],
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "version": __version__,
    }


def write_subject_report(result: Any, path: PathLike, model: Any = None, *, volume: Any = None,
                         subject: str = "", qc_picture: Optional[PathLike] = None,
                         montage: Optional[PathLike] = None) -> Path:
    """Write one scan's self-contained HTML report to ``path`` (atomically); returns the path.

    ``result``: the ``Result`` of ``inference.predict``. ``model``: the model that made it (a
    ``BrainAgeModel``, its card dict, a registered name or a checkpoint path): its reference
    set, card summary and calibration; None leaves out the reference plot. ``volume``: the input
    ``Volume``, to draw the QC picture (brain-mask outline, needs ``result.brain_mask``) and,
    for an explained result, the attention montage; or give those PNGs as ``qc_picture`` and
    ``montage``. ``subject``: a name for the title (e.g. the input's file stem).
    """
    from ..atomic_files import write_text_atomic

    context = subject_context(result, model, volume=volume, subject=subject, qc_picture=qc_picture, montage=montage)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, render("subject.html.j2", context))
