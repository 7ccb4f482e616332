"""`Result`: everything one brain-age prediction reports."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .conformal import EXTREME_GAP_SD, format_interval
from .preprocess.qc import QualityControl
from .volume import Volume

DEMO_DISCLAIMER = (
    "This model is trained on synthetic phantoms, not on real people; "
    "its predictions are for demonstration and testing only and are NOT for clinical use."
)


@dataclass
class Result:
    """One prediction. Ages and gaps in years; ``attention`` lies on the input volume's grid.

    ``brain_age_gap`` (BAG) = predicted - chronological age; ``corrected_brain_age_gap`` removes
    the model's age trend (de Lange & Cole) when the model carries bias-correction coefficients.
    Both are None without a chronological age.

    ``interval`` (low, high) in years holds the chronological age with probability
    ``interval_level`` (split conformal on the model's reference set, ``BrainAgeLib.conformal``);
    None when the model is not calibrated. ``gap_z`` is the corrected BAG (the raw one when the
    model has no bias correction) in SDs of the reference set's gaps; ``extreme_gap`` flags
    ``|gap_z| > 1`` (the paper's extreme ageing).
    """

    predicted_age: float
    chronological_age: Optional[float] = None
    brain_age_gap: Optional[float] = None
    corrected_brain_age_gap: Optional[float] = None
    sex: str = "unknown"
    sex_was_unknown: bool = False
    attention: Optional[Volume] = None
    #: how ``attention`` was made: "paper" (the paper's fused map) or "relevance"
    #: (``BrainAgeLib.explain.methods``); None without a map
    explain_method: Optional[str] = None
    timings: Dict[str, float] = field(default_factory=dict)
    model_name: str = ""
    model_intended_use: str = ""
    model_is_demo: bool = False
    warnings: List[str] = field(default_factory=list)
    #: quality control of the input (``qc.py``): measurements and the flags they raised
    qc: QualityControl = field(default_factory=QualityControl)
    #: the brain mask preprocessing used, uint8 (1 = brain) on the input's grid; not in ``to_dict``
    brain_mask: Optional[Volume] = None
    #: SHA-256 of the model's weights (its card's ``weights_sha256``; empty when unknown)
    model_weights_sha256: str = ""
    #: the precision the ViT ran in: "fp32", "int8", "bf16" or "fp16" ("auto" resolved; see
    #: ``model.precision``); empty when unknown
    precision: str = ""
    #: 4x4 input RAS (mm) -> template RAS (mm) when preprocessing registered to the template
    #: (``Prepared.input_to_template``); used for cohort attention maps. Not in ``to_dict``.
    input_to_template: Optional[np.ndarray] = None
    #: (low, high) years at ``interval_level``; None when the model has no calibration
    interval: Optional[Tuple[float, float]] = None
    interval_level: Optional[float] = None
    #: the (corrected) brain-age gap in SDs of the reference set's gaps; None without age or calibration
    gap_z: Optional[float] = None

    @property
    def extreme_gap(self) -> Optional[bool]:
        """|gap| beyond one reference SD (the paper's extreme ageing); None without ``gap_z``."""
        return None if self.gap_z is None else bool(abs(self.gap_z) > EXTREME_GAP_SD)

    @property
    def interval_text(self) -> str:
        """"67.2 years (90% interval 61.4–73.0)", or "... (no interval: not calibrated)"."""
        return format_interval(self.predicted_age, self.interval, self.interval_level)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-safe summary (no arrays): numbers, strings, booleans, the timings in seconds.

        A demo model's summary also carries ``"disclaimer"`` (:data:`DEMO_DISCLAIMER`), so every
        JSON output of a demo prediction says it is not for clinical use.
        """
        summary: Dict[str, Any] = {
            "predicted_age": _number(self.predicted_age),
            "chronological_age": _number(self.chronological_age),
            "brain_age_gap": _number(self.brain_age_gap),
            "corrected_brain_age_gap": _number(self.corrected_brain_age_gap),
            "interval": None if self.interval is None else [_number(v) for v in self.interval],
            "interval_level": _number(self.interval_level),
            "interval_text": self.interval_text,
            "gap_z": _number(self.gap_z),
            "extreme_gap": self.extreme_gap,
            "sex": self.sex,
            "sex_was_unknown": bool(self.sex_was_unknown),
            "has_attention": self.attention is not None,
            "explain_method": self.explain_method if self.attention is not None else None,
            "timings": {str(k): _number(v) for k, v in self.timings.items()},
            "model_name": self.model_name,
            "model_intended_use": self.model_intended_use,
            "model_is_demo": bool(self.model_is_demo),
            "model_weights_sha256": self.model_weights_sha256,
            "precision": self.precision,
            "warnings": [str(w) for w in self.warnings],
            "qc": self.qc.to_dict(),
        }
        if self.model_is_demo:
            summary["disclaimer"] = DEMO_DISCLAIMER
        return summary

    def summary(self) -> str:
        """A few human-readable lines."""
        lines = [f"Predicted brain age: {self.interval_text}"]
        if self.chronological_age is not None and self.brain_age_gap is not None:
            gap = f"Chronological age: {self.chronological_age:.1f} years; brain-age gap: {self.brain_age_gap:+.1f} years"
            if self.corrected_brain_age_gap is not None:
                gap += f" (bias-corrected: {self.corrected_brain_age_gap:+.1f} years)"
            lines.append(gap)
        if self.gap_z is not None:
            which = "bias-corrected gap" if self.corrected_brain_age_gap is not None else "gap"
            line = f"Gap z: {self.gap_z:+.2f} (the {which} in SDs of the model's reference set)"
            if self.extreme_gap:
                line += f"; beyond {EXTREME_GAP_SD:g} SD: extreme (the paper's criterion)"
            lines.append(line)
        if self.sex_was_unknown:
            lines.append("Sex: unknown (mean of the female and male predictions)")
        else:
            lines.append(f"Sex: {self.sex}")
        model = f"Model: {self.model_name}" if self.model_name else "Model: (unnamed)"
        if self.model_intended_use:
            model += f" ({self.model_intended_use})"
        lines.append(model)
        if self.model_is_demo:
            lines.append(f"NOTE: {DEMO_DISCLAIMER}")
        if self.qc.brain_volume_ml is not None:
            lines.append(f"Brain mask: {self.qc.brain_volume_ml:.0f} ml ({self.qc.skull_strip})")
        lines.extend(f"QC flag: {flag}" for flag in self.qc.flags)
        lines.extend(f"Warning: {w}" for w in self.warnings)
        return "\n".join(lines)


def _number(value: Optional[float]) -> Optional[float]:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
