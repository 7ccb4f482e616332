"""From a T1 volume to a ``Result``: prepare -> embed -> regress (-> explain), with everything a
prediction carries besides the age.

The network (``model.BrainAgeModel``: ``embed``, ``embed_explain``, ``regress``) only computes;
this module runs it on a volume, as nnU-Net keeps its predictor apart from its network:

- ``predict(model, volume, sex, age)``: load (a path), prepare, then as below; the same input
  asked again reuses its slices and ViT outputs (``embedding_cache``).
- ``predict_prepared(model, prepared, sex, age)``: from a volume already prepared (batch runs
  prepare in worker processes and predict in the main one).

Both check the age and sex, give the brain-age gap and its bias-corrected form, the prediction
interval and gap z of a calibrated model (``BrainAgeLib.conformal``), the attention
map on the input's grid (``explain``), the input's QC with the model's age flags, and the
warnings: unknown sex, untrained weights, preprocessing's own, and a brain extraction other than
the one the model was trained with.
"""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from .demographics import check_age
from .devices import DeviceLike, resolve_device
from .embedding_cache import default_cache
from .errors import BrainAgeError
from .model.brain_age_model import UNKNOWN_SEX_CODE, BrainAgeModel
from .presets import PreprocessConfig
from .preprocess.qc import ALREADY_STRIPPED, QualityControl, age_flags
from .result import Result
from .sex import SEX_CODES, parse_sex
from .volume import Volume

#: ``progress(fraction in [0, 1], message)``; an exception raised inside it cancels the prediction.
ProgressCallback = Callable[[float, str], None]


def predict(
    model: BrainAgeModel,
    volume: Union[Volume, str, Path],
    sex: Optional[str],
    age: Optional[float] = None,
    explain: Union[bool, str, None] = False,
    device: DeviceLike = "auto",
    progress: Optional[ProgressCallback] = None,
    *,
    precision: str = "auto",
    use_cache: bool = True,
) -> Result:
    """Brain age of one T1 volume (a ``Volume`` or a file path) with ``model``.

    ``sex`` "F"/"M"/"unknown"; ``age`` the chronological age in years (gives the brain-age
    gap); ``explain`` adds the explanation map (a Volume on the input grid): ``"paper"`` (or
    True) the paper's fused attention map, ``"relevance"`` gradient-weighted attention relevance
    from the predicted age (``BrainAgeLib.explain.methods``); the Result records which in
    ``explain_method``. ``progress`` is
    called as ``progress(fraction, message)``; raising inside it cancels. The model stays on
    the chosen device afterwards. ``use_cache``: the same input asked again reuses its
    slices and ViT outputs (``BrainAgeLib.embedding_cache``).
    """
    report = progress or _silent
    explain = resolve_explain_method(explain)
    sex_parsed = parse_sex(sex)
    chronological = check_age(age)
    run = _Run(started=time.perf_counter())

    report(0.0, "Loading volume")
    if not isinstance(volume, Volume):
        from .io import load_volume

        tic = time.perf_counter()
        volume = load_volume(volume)
        run.timings["load"] = time.perf_counter() - tic

    # Same input asked again (explanation after a plain prediction, another sex or age):
    # reuse its preprocessing and ViT outputs (see BrainAgeLib.embedding_cache).
    cache = default_cache() if use_cache else None
    target = resolve_device(device)
    key = (cache.key(volume, model, target, model.resolve_precision(precision, target))
           if cache is not None and cache.enabled else None)
    cached = cache.get(key) if key is not None else None
    if cached is not None:
        report(0.3, "Reusing the slices and embeddings of this volume (cached)")
        run.timings["cache_hit"] = 1.0
        run.encoded = cached.encoded
        return _infer(model, cached.prepared, sex_parsed, chronological, explain, target, report, precision, run)

    report(0.05, "Preparing sagittal slices")
    from .preprocess.pipeline import prepare

    tic = time.perf_counter()
    prepared = prepare(volume, model.config, device=str(target))
    run.timings["prepare"] = time.perf_counter() - tic
    run.cache_key = key
    return _infer(model, prepared, sex_parsed, chronological, explain, target, report, precision, run)


def predict_prepared(model: BrainAgeModel, prepared: Any, sex: Optional[str], age: Optional[float] = None,
                     explain: Union[bool, str, None] = False, device: DeviceLike = "auto",
                     progress: Optional[ProgressCallback] = None, *, precision: str = "auto") -> Result:
    """Like :func:`predict` (the same arguments), from a volume already prepared (``preprocess.prepare``)."""
    return _infer(model, prepared, parse_sex(sex), check_age(age), resolve_explain_method(explain), resolve_device(device),
                  progress or _silent, precision, _Run(started=time.perf_counter()))


class _Run:
    """What one prediction carries between its steps: timings so far, ViT outputs to reuse
    (embeddings, or the ``embed_explain`` triple) and the cache key to store them under."""

    def __init__(self, started: float):
        self.started = started
        self.timings: Dict[str, float] = {}
        self.encoded: Optional[Tuple[torch.Tensor, ...]] = None
        self.cache_key: Optional[str] = None


def _silent(fraction: float, message: str) -> None:
    pass


def resolve_explain_method(explain: Union[bool, str, None]) -> Optional[str]:
    """The explanation method ``explain`` asks for: False/None -> None (no map), True -> "paper",
    "paper" or "relevance" -> itself; ``BrainAgeError`` for anything else."""
    from .explain.methods import explanation_method

    try:
        return explanation_method(explain)
    except ValueError as error:
        raise BrainAgeError(str(error)) from None


def _infer(model: BrainAgeModel, prepared: Any, sex: str, chronological: Optional[float], explain: Optional[str],
           target: torch.device, report: ProgressCallback, precision: str, run: _Run) -> Result:
    timings = dict(run.timings)
    for step, seconds in prepared.timings.items():
        timings[f"prepare.{step}"] = float(seconds)

    if target != model.device:
        model.to(target)
    model.eval()
    embed_end = 0.85 if explain else 0.95
    report(0.3, f"Encoding slices on {target.type}")

    def embed_progress(done: int, total: int) -> None:
        report(0.3 + (embed_end - 0.3) * done / total, f"Encoded {done}/{total} slices")

    tic = time.perf_counter()
    encoded = run.encoded
    if encoded is None and (explain or run.cache_key is not None):
        # One pass gives both; the cache keeps the explanation's inputs for a later ask.
        encoded = model.embed_explain(prepared.slices, precision=precision, progress=embed_progress)
        if run.cache_key is not None:
            default_cache().put(run.cache_key, prepared, encoded)
    if encoded is None:
        embeddings = model.embed(prepared.slices, precision=precision, progress=embed_progress)
    else:
        encoded = tuple(t.to(target) for t in encoded)
        embeddings = encoded[0]
    _synchronize(target)
    timings["embed"] = time.perf_counter() - tic

    report(embed_end, "Regressing age")
    tic = time.perf_counter()
    with torch.no_grad():
        predicted = float(model.regress(embeddings, sex))
    timings["regress"] = time.perf_counter() - tic

    attention = None
    if explain:
        from .explain.methods import explain_slices

        report(0.9, f"Computing the explanation map ({explain})")
        tic = time.perf_counter()
        code = UNKNOWN_SEX_CODE if sex == "unknown" else SEX_CODES[sex]
        # "relevance" reads only the embeddings of the (possibly cached) no-grad triple and runs
        # its own gradient pass through the ViT; nothing of that pass goes into the cache
        slice_map = explain_slices(model, prepared, encoded, code, method=explain)
        attention = prepared.to_input_grid(np.asarray(slice_map, dtype=np.float32))
        if prepared.input_brain_mask is not None:   # interpolation spreads the map past the brain's edge: 0 outside
            attention = attention.with_array(np.where(prepared.input_brain_mask, attention.array, np.float32(0.0)))
        timings["explain"] = time.perf_counter() - tic
    timings["total"] = time.perf_counter() - run.started
    if not math.isfinite(predicted):
        raise BrainAgeError(f"model {model.name!r} produced a non-finite age ({predicted}); the checkpoint may be damaged")
    gap = corrected = None
    if chronological is not None:
        gap = predicted - chronological
        correction = model.bias_correction
        if correction is not None:
            corrected = float(correction.corrected_gap(predicted, chronological))
    calibration = model.calibration
    interval = gap_z = None
    if calibration is not None:
        interval = calibration.interval(predicted)
        gap_z = calibration.gap_z(corrected if corrected is not None else gap)
    warnings: List[str] = []
    if sex == "unknown":
        warnings.append("sex unknown: the prediction is the mean of the female and male predictions")
    if not model.metadata.get("trained", True):
        warnings.append(f"model {model.name!r} has random, untrained weights: its prediction means nothing")
    warnings.extend(prepared.warnings)
    warnings.extend(extractor_warnings(model.metadata, prepared.qc))
    qc = copy.deepcopy(prepared.qc)
    qc.flags.extend(age_flags(model.metadata, chronological))
    report(1.0, "Done")
    return Result(
        predicted_age=predicted,
        chronological_age=chronological,
        brain_age_gap=gap,
        corrected_brain_age_gap=corrected,
        sex=sex,
        sex_was_unknown=sex == "unknown",
        attention=attention,
        explain_method=explain if attention is not None else None,
        timings=timings,
        model_name=model.name,
        model_intended_use=str(model.metadata.get("intended_use", "")),
        model_is_demo=bool(model.metadata.get("is_demo", False)),
        warnings=warnings,
        qc=qc,
        brain_mask=prepared.brain_mask_volume(),
        model_weights_sha256=str(model.metadata.get("weights_sha256") or ""),
        precision=model.resolve_precision(precision, target),
        input_to_template=prepared.input_to_template,
        interval=interval,
        interval_level=calibration.level if interval is not None else None,
        gap_z=gap_z,
    )


def training_extractor(metadata: Dict[str, Any]) -> Optional[str]:
    """The brain extraction the model's training inputs went through, from its card: the
    card's ``training_data.skull_strip``, else its preprocessing's (None when unknown)."""
    recorded = (metadata.get("training_data") or {}).get("skull_strip")
    if recorded:
        return str(recorded)
    recorded = (metadata.get("preprocessing") or {}).get("skull_strip")
    if recorded == "auto":        # cards written before deepbet: the template method with detection
        return "template"
    return PreprocessConfig.from_dict({"skull_strip": recorded}).skull_strip if recorded else None


def extractor_warnings(metadata: Dict[str, Any], qc: Optional[QualityControl]) -> List[str]:
    """A warning when this input's brain extraction is not the one the model was trained with."""
    trained = training_extractor(metadata)
    used = getattr(qc, "skull_strip", "")
    if not trained or not used or used == ALREADY_STRIPPED or used == trained:
        return []
    return [f"the model's training inputs were skull-stripped with {trained!r}; this input with {used!r}"]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
