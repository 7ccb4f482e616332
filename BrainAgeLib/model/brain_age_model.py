"""`BrainAgeModel`: the two BrainRotViT stages together, and prediction on one volume.

``embed`` (stage 1, the ViT over every sagittal slice) and ``regress`` (stage 2, the residual
CNN over the stack of embeddings, with sex) are public on their own; ``predict`` runs the whole
chain on a ``Volume``: prepare -> embed -> regress (-> explain) -> ``Result``.
"""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..bias_correction import BiasCorrection
from ..demographics import check_age
from ..devices import (
    CPU_BF16_TOLERANCE_YEARS, DeviceLike, autocast, autocast_dtype, resolve_device, slice_batch_size, to_device,
)
from ..errors import BrainAgeError
from ..presets import ModelConfig, PreprocessConfig, get_preset
from ..preprocess.qc import ALREADY_STRIPPED, QualityControl, age_flags
from ..result import Result
from ..sex import SEX_CODES, parse_sex
from ..volume import Volume
from .encoder import SliceEncoder
from .regressor import ResidualCNNRegressor

#: ``progress(fraction in [0, 1], message)``; an exception raised inside it cancels the prediction.
ProgressCallback = Callable[[float, str], None]

SexLike = Union[str, None, Sequence[Optional[str]], torch.Tensor, np.ndarray]

#: The regressor input for "unknown": with sex entering only the (linear) last layer, the
#: prediction at 0.5 *is* the mean of the female and male predictions.
UNKNOWN_SEX_CODE = 0.5

#: Metadata key: largest |age(bf16) - age(fp32)| in years measured on validation scans.
BF16_AGREEMENT_KEY = "cpu_bf16_max_abs_diff_years"


def class_names(config: ModelConfig) -> List[str]:
    """Stage-1 class names, sex-major: ``class = sex * n_age_bins + bin`` (M = 0, F = 1), e.g. 'F 60-70'."""
    edges = config.age_bin_edges
    bins = [f"{edges[i]:g}-{edges[i + 1]:g}" for i in range(config.n_age_bins)]
    return [f"{sex} {b}" for sex in ("M", "F") for b in bins]


def class_index(age: float, sex: str, config: ModelConfig) -> int:
    """Stage-1 class of a subject: its age bin (ages beyond the edges go to the end bins) and sex."""
    code = parse_sex(sex)
    if code == "unknown":
        raise BrainAgeError("stage-1 classes need a known sex (F or M)")
    bin_index = int(np.clip(np.searchsorted(config.age_bin_edges, age, side="right") - 1, 0, config.n_age_bins - 1))
    return int(SEX_CODES[code]) * config.n_age_bins + bin_index


def default_metadata(config: ModelConfig) -> Dict[str, Any]:
    """Metadata of a freshly built, untrained model."""
    return {
        "name": f"{config.name} (random weights)",
        "preset": config.name,
        "intended_use": "untrained random weights: for testing the software only",
        "is_demo": False,
        "trained": False,
    }


class BrainAgeModel(nn.Module):
    """ViT slice encoder (stage 1) + residual CNN regressor (stage 2), with the metadata of its checkpoint."""

    def __init__(self, config: ModelConfig, metadata: Optional[Dict[str, Any]] = None, pretrained_encoder: bool = False):
        super().__init__()
        self.config = config
        self.metadata: Dict[str, Any] = dict(default_metadata(config) if metadata is None else metadata)
        self.encoder = SliceEncoder(config, pretrained=pretrained_encoder)
        self.regressor = ResidualCNNRegressor(config)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def name(self) -> str:
        return str(self.metadata.get("name") or self.config.name)

    @property
    def bias_correction(self) -> Optional[BiasCorrection]:
        data = self.metadata.get("bias_correction")
        return BiasCorrection.from_dict(data) if data else None

    @property
    def class_names(self) -> List[str]:
        return class_names(self.config)

    @property
    def cpu_bf16_validated(self) -> bool:
        """Whether this model's metadata shows bf16 autocast within 0.1 years of fp32 (see devices)."""
        measured = self.metadata.get(BF16_AGREEMENT_KEY)
        return measured is not None and float(measured) <= CPU_BF16_TOLERANCE_YEARS

    def measure_bf16_agreement(self, slice_stacks: Sequence[Union[np.ndarray, torch.Tensor]],
                               sexes: Optional[Sequence[str]] = None, record: bool = True) -> float:
        """Largest |age(bf16) - age(fp32)| in years over the given subjects' slices, on the CPU.

        Run it on validation scans after training: with ``record`` the value goes into the
        metadata (saved with the checkpoint), and "auto" precision then uses bf16 on CPUs with
        native bf16 only if it is at most 0.1 years.
        """
        sexes = list(sexes) if sexes is not None else ["unknown"] * len(slice_stacks)
        was_training = self.training
        self.eval()
        worst = 0.0
        try:
            with torch.no_grad():
                for slices, sex in zip(slice_stacks, sexes):
                    fp32 = self.regress(self.embed(slices, device="cpu", precision="fp32"), sex)
                    bf16 = self.regress(self.embed(slices, device="cpu", precision="bf16"), sex)
                    worst = max(worst, abs(float(bf16) - float(fp32)))
        finally:
            self.train(was_training)
        if record:
            self.metadata[BF16_AGREEMENT_KEY] = worst
        return worst

    def save(self, path: Union[str, Path], metadata: Optional[Dict[str, Any]] = None) -> Path:
        """Write a safetensors checkpoint (weights + this model's metadata, updated by ``metadata``)."""
        from .checkpoint import save_checkpoint

        merged = dict(self.metadata)
        merged.update(metadata or {})
        return save_checkpoint(self, path, merged)

    # ------------------------------------------------------------------ stage 1
    def embed(
        self,
        slices: Union[np.ndarray, torch.Tensor],
        batch_size: Optional[int] = None,
        device: DeviceLike = None,
        *,
        precision: str = "auto",
        progress: Optional[Callable[[int, int], None]] = None,
    ) -> torch.Tensor:
        """Slice embeddings [S, D] float32, on the model's device, for slices [S, H, W] in [0, 1].

        ``device`` moves the model first (None keeps it where it is). Slices run through the ViT
        ``batch_size`` at a time (default: sized to the device); ``precision`` "auto" uses the
        autocast policy of ``BrainAgeLib.devices``. ``progress(done, total)`` is called after each batch.
        """
        return self._encode(slices, batch_size, device, precision, progress, explain=False)[0]

    def embed_explain(
        self,
        slices: Union[np.ndarray, torch.Tensor],
        batch_size: Optional[int] = None,
        device: DeviceLike = None,
        *,
        precision: str = "auto",
        progress: Optional[Callable[[int, int], None]] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Like :meth:`embed`, plus what the attention map needs, in the same single ViT pass.

        Returns ``(embeddings [S, D], patch_tokens [S, N, D], cls_attention [S, N])``, float32
        (see ``SliceEncoder.forward_explain``).
        """
        return self._encode(slices, batch_size, device, precision, progress, explain=True)

    def _encode(self, slices, batch_size, device, precision, progress, explain: bool) -> Tuple[torch.Tensor, ...]:
        if device is not None:
            target = resolve_device(device)
            if target != self.device:
                self.to(target)
        target = self.device
        x = torch.from_numpy(np.ascontiguousarray(slices)) if isinstance(slices, np.ndarray) else torch.as_tensor(slices)
        size = self.config.image_size
        if x.ndim != 3 or tuple(x.shape[1:]) != (size, size):
            raise BrainAgeError(
                f"model {self.name!r} expects slices [S, {size}, {size}], got shape {tuple(x.shape)}")
        x = x.to(torch.float32)
        n = int(x.shape[0])
        dtype = autocast_dtype(target, precision, cpu_bf16_validated=self.cpu_bf16_validated)
        step = int(batch_size or slice_batch_size(target, self.config, n))
        pieces: List[Tuple[torch.Tensor, ...]] = []
        was_training = self.encoder.training
        self.encoder.eval()
        try:
            with torch.no_grad(), autocast(target, dtype):
                for start in range(0, n, step):
                    batch = to_device(x[start:start + step], target)
                    if explain:
                        outputs = self.encoder.forward_explain(batch)
                    else:
                        outputs = (self.encoder.embed(batch),)
                    pieces.append(tuple(o.float() for o in outputs))
                    if progress is not None:
                        progress(min(start + step, n), n)
        finally:
            self.encoder.train(was_training)
        return tuple(torch.cat(parts) for parts in zip(*pieces))

    # ------------------------------------------------------------------ stage 2
    def regress(self, embeddings: torch.Tensor, sex: SexLike) -> torch.Tensor:
        """Predicted age in years from embeddings [S, D] (-> 0-d tensor) or [B, S, D] (-> [B]).

        ``sex``: "F"/"M"/"unknown" (any spelling ``parse_sex`` accepts) for all, one per subject,
        or a tensor of codes (M = 0, F = 1, NaN = unknown). For an unknown sex the prediction is
        the mean of the female and male predictions. Gradients flow (no ``no_grad`` here), and
        dropout follows the module's train/eval mode.
        """
        embeddings = torch.as_tensor(embeddings)
        single = embeddings.ndim == 2
        if single:
            embeddings = embeddings.unsqueeze(0)
        if embeddings.ndim != 3 or tuple(embeddings.shape[1:]) != (self.config.n_slices, self.config.embed_dim):
            raise BrainAgeError(
                f"model {self.name!r} expects embeddings [S={self.config.n_slices}, D={self.config.embed_dim}] "
                f"or [B, S, D], got shape {tuple(embeddings.shape)}")
        param = next(self.regressor.parameters())
        embeddings = embeddings.to(device=param.device, dtype=param.dtype)
        codes = sex_codes(sex, embeddings.shape[0]).to(param.device)
        unknown = torch.isnan(codes)
        features = self.regressor.features(embeddings)
        if bool(unknown.any()):
            female = self.regressor.head(features, torch.full_like(codes, SEX_CODES["F"]))
            male = self.regressor.head(features, torch.full_like(codes, SEX_CODES["M"]))
            known = self.regressor.head(features, torch.nan_to_num(codes, nan=0.0))
            age = torch.where(unknown, (female + male) / 2, known)
        else:
            age = self.regressor.head(features, codes)
        return age[0] if single else age

    # ------------------------------------------------------------------ whole chain
    def predict(
        self,
        volume: Union[Volume, str, Path],
        sex: Optional[str],
        age: Optional[float] = None,
        explain: bool = False,
        device: DeviceLike = "auto",
        progress: Optional[ProgressCallback] = None,
        *,
        precision: str = "auto",
        use_cache: bool = True,
    ) -> Result:
        """Brain age of one T1 volume (a ``Volume`` or a file path).

        ``sex`` "F"/"M"/"unknown"; ``age`` the chronological age in years (gives the brain-age
        gap); ``explain`` adds the attention map (a Volume on the input grid). ``progress`` is
        called as ``progress(fraction, message)``; raising inside it cancels. The model stays on
        the chosen device afterwards. ``use_cache``: the same input asked again reuses its
        slices and ViT outputs (``BrainAgeLib.embedding_cache``).
        """
        report = progress or (lambda fraction, message: None)
        sex_parsed = parse_sex(sex)
        chronological = check_age(age)
        timings: Dict[str, float] = {}
        started = time.perf_counter()

        report(0.0, "Loading volume")
        if not isinstance(volume, Volume):
            from ..io import load_volume

            tic = time.perf_counter()
            volume = load_volume(volume)
            timings["load"] = time.perf_counter() - tic

        # Same input asked again (explanation after a plain prediction, another sex or age):
        # reuse its preprocessing and ViT outputs (see BrainAgeLib.embedding_cache).
        from ..embedding_cache import default_cache

        cache = default_cache() if use_cache else None
        target = resolve_device(device)
        key = cache.key(volume, self, target, precision) if cache is not None and cache.enabled else None
        cached = cache.get(key) if key is not None else None
        if cached is not None:
            report(0.3, "Reusing the slices and embeddings of this volume (cached)")
            timings["cache_hit"] = 1.0
            return self.predict_prepared(
                cached.prepared, sex_parsed, chronological, explain, target, progress,
                precision=precision, encoded=cached.encoded, timings=timings, started=started)

        report(0.05, "Preparing sagittal slices")
        from ..preprocess.pipeline import prepare

        tic = time.perf_counter()
        prepared = prepare(volume, self.config, device=str(target))
        timings["prepare"] = time.perf_counter() - tic
        return self.predict_prepared(
            prepared, sex_parsed, chronological, explain, target, progress, precision=precision,
            timings=timings, started=started, cache_key=key)

    def predict_prepared(
        self,
        prepared: Any,
        sex: Optional[str],
        age: Optional[float] = None,
        explain: bool = False,
        device: DeviceLike = "auto",
        progress: Optional[ProgressCallback] = None,
        *,
        precision: str = "auto",
        encoded: Optional[Tuple[torch.Tensor, ...]] = None,
        timings: Optional[Dict[str, float]] = None,
        started: Optional[float] = None,
        cache_key: Optional[str] = None,
    ) -> Result:
        """Like :meth:`predict`, from a volume already prepared (``preprocess.prepare``).

        Batch runs prepare volumes in worker processes and call this in the main one.
        ``encoded`` reuses ViT outputs (embeddings, or the ``embed_explain`` triple).
        """
        report = progress or (lambda fraction, message: None)
        sex_parsed = parse_sex(sex)
        chronological = check_age(age)
        timings = dict(timings or {})
        warnings: List[str] = []
        started = time.perf_counter() if started is None else started
        for step, seconds in (getattr(prepared, "timings", None) or {}).items():
            timings[f"prepare.{step}"] = float(seconds)

        target = resolve_device(device)
        if target != self.device:
            self.to(target)
        self.eval()
        embed_end = 0.85 if explain else 0.95
        report(0.3, f"Encoding slices on {target.type}")

        def embed_progress(done: int, total: int) -> None:
            report(0.3 + (embed_end - 0.3) * done / total, f"Encoded {done}/{total} slices")

        tic = time.perf_counter()
        if encoded is None and (explain or cache_key is not None):
            # One pass gives both; the cache keeps the explanation's inputs for a later ask.
            encoded = self.embed_explain(prepared.slices, precision=precision, progress=embed_progress)
            if cache_key is not None:
                from ..embedding_cache import default_cache

                default_cache().put(cache_key, prepared, encoded)
        if encoded is None:
            embeddings = self.embed(prepared.slices, precision=precision, progress=embed_progress)
        else:
            encoded = tuple(t.to(target) for t in encoded) if isinstance(encoded, (tuple, list)) else (encoded.to(target),)
            embeddings = encoded[0]
            if explain and len(encoded) != 3:
                encoded = None  # explain_slices runs the encoder for what it lacks
        _synchronize(target)
        timings["embed"] = time.perf_counter() - tic

        report(embed_end, "Regressing age")
        tic = time.perf_counter()
        with torch.no_grad():
            predicted = float(self.regress(embeddings, sex_parsed))
        timings["regress"] = time.perf_counter() - tic

        attention = None
        if explain:
            report(0.9, "Computing the attention map")
            tic = time.perf_counter()
            explain_slices = _explain_function()
            code = UNKNOWN_SEX_CODE if sex_parsed == "unknown" else SEX_CODES[sex_parsed]
            slice_map = explain_slices(self, prepared, encoded if encoded is not None else embeddings, code)
            attention = prepared.to_input_grid(np.asarray(slice_map, dtype=np.float32))
            inside = getattr(prepared, "input_brain_mask", None)
            if inside is not None:   # interpolation spreads the map past the brain's edge: 0 outside
                attention = attention.with_array(np.where(inside, attention.array, np.float32(0.0)))
            timings["explain"] = time.perf_counter() - tic
        timings["total"] = time.perf_counter() - started
        if not math.isfinite(predicted):
            raise BrainAgeError(f"model {self.name!r} produced a non-finite age ({predicted}); the checkpoint may be damaged")
        gap = corrected = None
        if chronological is not None:
            gap = predicted - chronological
            correction = self.bias_correction
            if correction is not None:
                corrected = float(correction.corrected_gap(predicted, chronological))
        if sex_parsed == "unknown":
            warnings.append("sex unknown: the prediction is the mean of the female and male predictions")
        if not self.metadata.get("trained", True):
            warnings.append(f"model {self.name!r} has random, untrained weights: its prediction means nothing")
        warnings.extend(getattr(prepared, "warnings", None) or [])
        warnings.extend(extractor_warnings(self.metadata, getattr(prepared, "qc", None)))
        qc = copy.deepcopy(getattr(prepared, "qc", None) or QualityControl())
        qc.flags.extend(age_flags(self.metadata, chronological))
        report(1.0, "Done")
        return Result(
            predicted_age=predicted,
            chronological_age=chronological,
            brain_age_gap=gap,
            corrected_brain_age_gap=corrected,
            sex=sex_parsed,
            sex_was_unknown=sex_parsed == "unknown",
            attention=attention,
            timings=timings,
            model_name=self.name,
            model_intended_use=str(self.metadata.get("intended_use", "")),
            model_is_demo=bool(self.metadata.get("is_demo", False)),
            warnings=warnings,
            qc=qc,
            brain_mask=prepared.brain_mask_volume() if hasattr(prepared, "brain_mask_volume") else None,
            model_weights_sha256=str(self.metadata.get("weights_sha256") or ""),
            input_to_template=getattr(prepared, "input_to_template", None),
        )

    def extra_repr(self) -> str:
        return f"preset={self.config.name!r}, name={self.name!r}"


def sex_codes(sex: SexLike, batch: int) -> torch.Tensor:
    """Regressor sex inputs [batch] (M = 0, F = 1, NaN = unknown) from any accepted form."""
    if isinstance(sex, (torch.Tensor, np.ndarray)):
        codes = torch.as_tensor(sex, dtype=torch.float32).reshape(-1)
    elif sex is None or isinstance(sex, str):
        parsed = parse_sex(sex)
        codes = torch.full((batch,), SEX_CODES.get(parsed, float("nan")), dtype=torch.float32)
    else:
        codes = torch.tensor([SEX_CODES.get(parse_sex(s), float("nan")) for s in sex], dtype=torch.float32)
    if codes.numel() == 1 and batch != 1:
        codes = codes.expand(batch).clone()
    if codes.numel() != batch:
        raise BrainAgeError(f"got {codes.numel()} sex values for {batch} subjects")
    bad = ~torch.isnan(codes) & (codes != 0) & (codes != 1)
    if bool(bad.any()):
        raise BrainAgeError(f"sex codes must be 0 (M), 1 (F) or NaN (unknown), got {codes[bad][:3].tolist()}")
    return codes


def build_model(preset: Union[str, ModelConfig], pretrained_encoder: bool = False, seed: Optional[int] = None) -> BrainAgeModel:
    """A BrainAgeModel of ``preset`` (name or ModelConfig) with fresh random weights.

    ``pretrained_encoder`` starts the ViT from timm's ImageNet weights (needs them downloaded);
    ``seed`` makes the random initialisation reproducible.
    """
    config = get_preset(preset)
    if seed is None:
        return BrainAgeModel(config, pretrained_encoder=pretrained_encoder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BrainAgeModel(config, pretrained_encoder=pretrained_encoder)


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


def _explain_function() -> Callable:
    try:
        from ..explain.methods import explain_slices
    except ModuleNotFoundError as error:
        if error.name and error.name.endswith("BrainAgeLib.explain.methods"):
            raise NotImplementedError(
                "attention maps need BrainAgeLib.explain.methods, which this installation does not have yet") from error
        raise
    return explain_slices


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
