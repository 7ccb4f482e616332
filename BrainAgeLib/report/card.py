"""What the reports say about the model: its card (checkpoint metadata) in a few lines, and its
calibration, from a loaded model, a card, a registered name or a checkpoint path."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

from ..conformal import ConformalCalibration


def model_card(model: Any) -> Dict[str, Any]:
    """The card of ``model``: a ``BrainAgeModel`` (its ``metadata``), a card dict, a registered
    name or a ``.safetensors`` path (read without loading the weights), or None (an empty card)."""
    if model is None:
        return {}
    if isinstance(model, dict):
        return model
    if hasattr(model, "metadata"):
        return dict(model.metadata)
    if isinstance(model, (str, os.PathLike)):
        from ..model.checkpoint import read_metadata, resolve_checkpoint

        return read_metadata(resolve_checkpoint(model))
    raise TypeError(f"a report's model is a BrainAgeModel, a card dict, a name or a path, not {type(model).__name__}")


def card_calibration(card: Dict[str, Any]) -> Optional[ConformalCalibration]:
    """The card's reference set (None when the model is not calibrated)."""
    data = card.get("calibration")
    return ConformalCalibration.from_dict(data) if data else None


def card_summary(card: Dict[str, Any]) -> List[Tuple[str, str]]:
    """(label, text) rows: name, intended use, training data, test metrics, bias correction,
    calibration (its cohort, n, ages, date, interval half-widths) and the weights digest."""
    rows: List[Tuple[str, str]] = []
    if not card:
        return [("Model", "not given: no card, no reference set")]
    rows.append(("Model", str(card.get("name") or card.get("preset") or "(unnamed)")
                 + (" (demo: synthetic training data)" if card.get("is_demo") else "")))
    rows.append(("Intended use", str(card.get("intended_use") or "(not stated)")))
    if card.get("preset"):
        rows.append(("Architecture", f"BrainRotViT, preset {card['preset']}"))
    data = card.get("training_data") or {}
    if data:
        ages = data.get("age_range")
        rows.append(("Training data", f"{data.get('n_subjects', '?')} subjects"
                     + (f" ({data.get('n_train')} train / {data.get('n_val')} validation / {data.get('n_test')} test)"
                        if data.get("n_train") is not None else "")
                     + (f", ages {ages[0]:g}-{ages[1]:g}" if ages else "")
                     + (f", from {data['cohort']}" if data.get("cohort") else "")))
    test = (card.get("metrics") or {}).get("test") or {}
    if test.get("mae") is not None:
        rows.append(("Test metrics", f"MAE {test['mae']:.2f} years"
                     + (f", Pearson r {test['pearson_r']:.3f}" if test.get("pearson_r") is not None else "")
                     + (f" on {test['n']} held-out subjects" if test.get("n") else "")))
    correction = card.get("bias_correction")
    if correction:
        rows.append(("Bias correction", f"de Lange & Cole: slope {correction['slope']:+.3f}, intercept "
                     f"{correction['intercept']:+.2f} years (n = {correction.get('n_reference', '?')})"))
    calibration = card_calibration(card)
    if calibration is None:
        rows.append(("Calibration", "none: predictions carry no interval"))
    else:
        s, source = calibration.summary(), calibration.source
        widths = ", ".join("n/a" if w is None else f"+-{w:.1f}" for w in s["half_widths"])
        rows.append(("Calibration", f"{source.get('cohort', 'reference set')}: n = {s['n_reference']}, ages "
                     f"{s['age_range'][0]:g}-{s['age_range'][1]:g}"
                     + (f", {source['date']}" if source.get("date") else "")
                     + f"; {s['level'] * 100:g}% interval half-widths {widths} years by band of predicted age"
                     + f"; gap SD {s['gap_sd']:.2f} years"))
    if card.get("weights_sha256"):
        rows.append(("Weights SHA-256", str(card["weights_sha256"])))
    return rows
