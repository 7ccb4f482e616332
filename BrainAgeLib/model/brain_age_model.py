"""`BrainAgeModel`: the two BrainRotViT stages together, a plain module with its config.

``embed`` (stage 1, the ViT over every sagittal slice), ``embed_explain`` (the same pass, plus
what the attention map needs) and ``regress`` (stage 2, the residual CNN over the stack of
embeddings, with sex). Running it on a volume (prepare -> embed -> regress -> ``Result``) is
``BrainAgeLib.inference``'s job; reading and writing checkpoints is ``checkpoint``'s.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..bias_correction import BiasCorrection
from ..conformal import ConformalCalibration
from ..devices import DeviceLike, autocast, autocast_dtype, resolve_device, slice_batch_size, to_device
from ..errors import BrainAgeError
from ..presets import ModelConfig, get_preset
from ..sex import SEX_CODES, parse_sex
from .encoder import SliceEncoder
from .regressor import ResidualCNNRegressor

SexLike = Union[str, None, Sequence[Optional[str]], torch.Tensor, np.ndarray]

#: The regressor input for "unknown": with sex entering only the (linear) last layer, the
#: prediction at 0.5 *is* the mean of the female and male predictions.
UNKNOWN_SEX_CODE = 0.5


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
    def calibration(self) -> Optional[ConformalCalibration]:
        """The reference set behind prediction intervals and gap z (None: not calibrated)."""
        data = self.metadata.get("calibration")
        return ConformalCalibration.from_dict(data) if data else None

    @property
    def class_names(self) -> List[str]:
        return class_names(self.config)

    def resolve_precision(self, precision: str = "auto", device: DeviceLike = None) -> str:
        """The precision the ViT runs in on ``device`` (default: the model's): an explicit one
        as given; "auto" as ``model.precision.choose_precision`` decides from this model's card
        (on the CPU the fastest precision whose recorded age difference from fp32 is within
        0.1 years on this CPU, else fp32; fp16 on CUDA)."""
        from .precision import choose_precision

        target = self.device if device is None else resolve_device(device)
        chosen = choose_precision(self.metadata, target, precision)
        autocast_dtype(target, chosen)  # an unknown name fails here
        return chosen

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
        ``batch_size`` at a time (default: sized to the device); ``precision`` "auto" is
        :meth:`resolve_precision`'s choice; "int8" runs the ViT's linear layers quantised, "onnx" the ViT in ONNX Runtime
        (both CPU only; ``model.precision``). ``progress(done, total)`` is called after each batch.
        """
        return self._encode(slices, batch_size, device, precision=precision, progress=progress, explain=False)[0]

    def embed_explain(self, slices: Union[np.ndarray, torch.Tensor], **options: Any) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Like :meth:`embed` (the same keywords), plus what the attention map needs, in the same
        single ViT pass.

        Returns ``(embeddings [S, D], patch_tokens [S, N, D], cls_attention [S, N])``, float32
        (see ``SliceEncoder.forward_explain``).
        """
        return self._encode(slices, explain=True, **options)

    def _encode(self, slices, batch_size: Optional[int] = None, device: DeviceLike = None, *, precision: str = "auto",
                progress: Optional[Callable[[int, int], None]] = None, explain: bool) -> Tuple[torch.Tensor, ...]:
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
        chosen = self.resolve_precision(precision, target)
        encoder = self.encoder
        if chosen == "int8":
            from .precision import int8_encoder

            if target.type != "cpu":
                raise BrainAgeError(f"precision 'int8' runs on the CPU only, not on {target.type}")
            encoder = int8_encoder(self)
        elif chosen == "onnx":
            from .onnx_encoder import onnx_encoder

            if target.type != "cpu":
                raise BrainAgeError(f"precision 'onnx' runs on the CPU only, not on {target.type}")
            encoder = onnx_encoder(self)
        dtype = autocast_dtype(target, chosen)
        step = int(batch_size or slice_batch_size(target, self.config, n))
        pieces: List[Tuple[torch.Tensor, ...]] = []
        was_training = self.encoder.training
        self.encoder.eval()
        try:
            with torch.no_grad(), autocast(target, dtype):
                for start in range(0, n, step):
                    batch = to_device(x[start:start + step], target)
                    if explain:
                        outputs = encoder.forward_explain(batch)
                    else:
                        outputs = (encoder.embed(batch),)
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
