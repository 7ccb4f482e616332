"""Convert the authors' published BrainRotViT checkpoints into a BrainAge safetensors model.

The authors (Jalal et al., 2025; github.com/wjalal/BrainRotViT, ``best_checkpoints/``) publish
two files, written by their training script ``vit_dora_train_feature_cnn_main_mix_roi.py``:

- the stage-1 ViT, ``vit_dora_train_checkpoint.pth``: ``torch.save({'epoch', 'model_state_dict',
  'optimizer_state_dict'})`` where the state dict is that of a PEFT model wrapping a Hugging Face
  ``ViTForImageClassification`` (google/vit-base-patch16-224, transformers 4.45 names) with
  DoRA (r=8, lora_alpha=16, dropout 0.1, on ``query`` and ``value``; ``classifier`` in
  ``modules_to_save``). Keys start with ``base_model.model.``; adapted layers hold
  ``base_layer``, ``lora_A.<adapter>``, ``lora_B.<adapter>`` and
  ``lora_magnitude_vector.<adapter>`` entries; the classifier has ``original_module`` (the
  untrained copy) and ``modules_to_save.<adapter>`` (the trained one);
- the stage-2 CNN, ``cnn_mx_bigdo_ch_sw_res_best_model_with_metadata.pkl``: a plain
  ``pickle.dump`` of ``{'model_state', 'optimizer_state', 'epoch', 'loss', 't_rng_st',
  'n_rng_st', 'cuda_rng_st'}`` where ``model_state`` is their ``AgePredictionCNN``
  (``conv_block{1,2,3}.{conv,projection}``, ``fc1``, ``fc1_bn``, ``fc2``, ``fc2_bn``, ``fc3``;
  despite the names, ``fc*_bn`` are LayerNorms) and ``loss`` the validation MAE (years).

Conversion: DoRA is merged into the base weights exactly as ``peft``'s ``merge_and_unload``
does; Hugging Face ViT names are mapped onto timm's (query, key and value concatenated into
``qkv``; LayerNorm eps 1e-12 kept in the config); the CNN is renamed onto our residual CNN;
the stage-1 classifier rows are reordered from their class order (sorted labels ``"000F",
"000M", "010F", ...``: decade-major, F before M) to ours (sex-major, M = 0 then F = 1). Nothing
is unpickled unsafely: the ``.pth`` goes through ``torch.load(weights_only=True)`` and the
``.pkl`` through :mod:`BrainAgeLib.safe_pickle`.
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..digests import file_sha256
from ..errors import CheckpointError
from ..presets import PRESETS, ModelConfig
from .checkpoint_file import save_checkpoint

PathLike = Union[str, Path]

#: File names the authors' scripts write (``model_dumps/`` and ``model_dumps/mix/``).
OFFICIAL_VIT_FILENAME = "vit_dora_train_checkpoint.pth"
OFFICIAL_CNN_MODULE = "cnn_mx_bigdo_ch_sw_res"
OFFICIAL_CNN_FILENAME = f"{OFFICIAL_CNN_MODULE}_best_model_with_metadata.pkl"

#: DoRA settings of the authors' ``LoraConfig`` (the rank is read from the weights).
OFFICIAL_LORA_ALPHA = 16.0

PAPER_CITATION = (
    "Jalal W, Rahman MS, Rahman MM, Rahman A. BrainRotViT: a two-stage vision transformer "
    "and residual CNN for interpretable brain age estimation from T1-weighted MRI. "
    "arXiv:2511.15188 (2025). Code and checkpoints: https://github.com/wjalal/BrainRotViT"
)
DEFAULT_MODEL_NAME = "brainrotvit-official"

_PEFT_PREFIX = "base_model.model."
_SEX_ORDER = ("M", "F")  # our sex code: M = 0, F = 1 (the authors' CNN uses the same)


# --------------------------------------------------------------------------------- DoRA merge
def merge_dora_weight(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Fold one DoRA adapter into a linear weight.

    ``W' = m * (W + s B A) / ||W + s B A||`` with the norm taken per output unit (over the input
    dimension, ``dim=1`` of the ``[out, in]`` weight, as ``peft``'s ``DoraLinearLayer``
    ``get_weight_norm`` does) and ``s = lora_alpha / r``. Computed in float64, returned in
    ``weight``'s dtype. Shapes: weight [out, in], lora_a [r, in], lora_b [out, r], magnitude [out].
    """
    out_features, in_features = weight.shape
    rank = lora_a.shape[0]
    if lora_a.shape != (rank, in_features) or lora_b.shape != (out_features, rank):
        raise ValueError(
            f"DoRA shapes do not fit: weight {tuple(weight.shape)}, lora_A {tuple(lora_a.shape)}, "
            f"lora_B {tuple(lora_b.shape)}"
        )
    if magnitude.reshape(-1).shape[0] != out_features:
        raise ValueError(f"DoRA magnitude has {magnitude.numel()} entries, expected {out_features}")
    w = weight.double() + scaling * (lora_b.double() @ lora_a.double())
    norm = torch.linalg.norm(w, dim=1)
    merged = (magnitude.double().reshape(-1) / norm).unsqueeze(1) * w
    return merged.to(weight.dtype)


@dataclass
class PeftMergeReport:
    """What :func:`merge_peft_state_dict` found and did."""

    adapter_name: Optional[str] = None
    rank: Optional[int] = None
    lora_alpha: float = OFFICIAL_LORA_ALPHA
    merged_modules: List[str] = field(default_factory=list)
    dora: bool = False

    @property
    def scaling(self) -> Optional[float]:
        return None if not self.rank else self.lora_alpha / self.rank


_ADAPTER_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_magnitude_vector)\.(?P<adapter>[^.]+)(?:\.weight)?$"
)


def merge_peft_state_dict(
    state: Mapping[str, torch.Tensor], lora_alpha: float = OFFICIAL_LORA_ALPHA
) -> Tuple[Dict[str, torch.Tensor], PeftMergeReport]:
    """A PEFT (LoRA/DoRA) model's ``state_dict()`` -> the plain base model's state dict, merged.

    Strips ``base_model.model.``, folds each adapter into its ``base_layer`` (DoRA when a
    ``lora_magnitude_vector`` is present, plain LoRA ``W + s B A`` otherwise), keeps the trained
    ``modules_to_save.<adapter>`` copy of wrapped modules and drops their ``original_module``.
    A state dict without PEFT keys passes through unchanged.
    """
    plain = {
        (key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key): value
        for key, value in state.items()
    }
    report = PeftMergeReport(lora_alpha=float(lora_alpha))

    adapters: Dict[str, Dict[str, torch.Tensor]] = {}
    names = set()
    for key, value in plain.items():
        match = _ADAPTER_KEY.match(key)
        if match:
            adapters.setdefault(match["module"], {})[match["kind"]] = value
            names.add(match["adapter"])
    saved_copies = {key for key in plain if ".modules_to_save." in key}
    names.update(re.search(r"\.modules_to_save\.([^.]+)\.", key).group(1) for key in saved_copies)
    if len(names) > 1:
        raise CheckpointError(
            f"the PEFT checkpoint holds several adapters ({', '.join(sorted(names))}); "
            "only single-adapter checkpoints can be merged"
        )
    report.adapter_name = next(iter(names), None)

    merged: Dict[str, torch.Tensor] = {}
    for key, value in plain.items():
        if _ADAPTER_KEY.match(key) or ".original_module." in key:
            continue
        if ".modules_to_save." in key:
            key = re.sub(r"\.modules_to_save\.[^.]+\.", ".", key)
        merged[key.replace(".base_layer.", ".")] = value

    for module, parts in sorted(adapters.items()):
        if "lora_A" not in parts or "lora_B" not in parts:
            raise CheckpointError(f"adapter of {module} lacks lora_A or lora_B")
        weight_key = f"{module}.weight"
        if weight_key not in merged:
            raise CheckpointError(f"adapter of {module} has no base weight {module}.base_layer.weight")
        rank = int(parts["lora_A"].shape[0])
        if report.rank not in (None, rank):
            raise CheckpointError(f"adapters of different ranks ({report.rank} and {rank})")
        report.rank = rank
        scaling = float(lora_alpha) / rank
        if "lora_magnitude_vector" in parts:
            report.dora = True
            merged[weight_key] = merge_dora_weight(
                merged[weight_key], parts["lora_A"], parts["lora_B"], parts["lora_magnitude_vector"], scaling
            )
        else:
            base = merged[weight_key]
            merged[weight_key] = (
                base.double() + scaling * (parts["lora_B"].double() @ parts["lora_A"].double())
            ).to(base.dtype)
        report.merged_modules.append(module)
    return merged, report


# ------------------------------------------------------------------- Hugging Face ViT -> timm
@dataclass(frozen=True)
class VitGeometry:
    """ViT dimensions read from a Hugging Face ``ViTForImageClassification`` state dict."""

    embed_dim: int
    depth: int
    patch_size: int
    image_size: int
    in_chans: int
    mlp_hidden: int
    n_classes: int

    @property
    def mlp_ratio(self) -> float:
        return self.mlp_hidden / self.embed_dim


def vit_geometry(hf_state: Mapping[str, torch.Tensor]) -> VitGeometry:
    """Read embed dim, depth, patch and image size, MLP width and class count from the weights."""
    try:
        patch = hf_state["vit.embeddings.patch_embeddings.projection.weight"]
        positions = hf_state["vit.embeddings.position_embeddings"]
        fc1 = hf_state["vit.encoder.layer.0.intermediate.dense.weight"]
        classifier = hf_state["classifier.weight"]
    except KeyError as missing:
        raise CheckpointError(
            f"not a Hugging Face ViTForImageClassification state dict (no {missing.args[0]})"
        ) from None
    embed_dim, in_chans, patch_size, _ = patch.shape
    grid = math.isqrt(positions.shape[1] - 1)
    if grid * grid != positions.shape[1] - 1:
        raise CheckpointError(f"position embeddings for {positions.shape[1] - 1} patches are not a square grid")
    layers = {int(m.group(1)) for k in hf_state for m in [re.match(r"vit\.encoder\.layer\.(\d+)\.", k)] if m}
    return VitGeometry(
        embed_dim=int(embed_dim), depth=len(layers), patch_size=int(patch_size),
        image_size=int(grid * patch_size), in_chans=int(in_chans), mlp_hidden=int(fc1.shape[0]),
        n_classes=int(classifier.shape[0]),
    )


_HF_BLOCK_NAMES = {
    "layernorm_before": "norm1",
    "attention.output.dense": "attn.proj",
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}


def hf_vit_to_timm(hf_state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename a (merged) Hugging Face ViTForImageClassification state dict to timm's layout.

    query/key/value become one ``qkv`` (rows q, k, v as timm splits them); ``vit.layernorm``
    becomes ``norm``; ``classifier`` becomes ``head`` (rows still in the source's class order).
    """
    geometry = vit_geometry(hf_state)
    used = set()

    def take(key: str) -> torch.Tensor:
        if key not in hf_state:
            raise CheckpointError(f"the ViT checkpoint lacks {key}")
        used.add(key)
        return hf_state[key]

    timm_state: Dict[str, torch.Tensor] = {
        "cls_token": take("vit.embeddings.cls_token"),
        "pos_embed": take("vit.embeddings.position_embeddings"),
        "patch_embed.proj.weight": take("vit.embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": take("vit.embeddings.patch_embeddings.projection.bias"),
        "norm.weight": take("vit.layernorm.weight"),
        "norm.bias": take("vit.layernorm.bias"),
        "head.weight": take("classifier.weight"),
        "head.bias": take("classifier.bias"),
    }
    for n in range(geometry.depth):
        hf = f"vit.encoder.layer.{n}."
        for part in ("weight", "bias"):
            timm_state[f"blocks.{n}.attn.qkv.{part}"] = torch.cat(
                [take(f"{hf}attention.attention.{proj}.{part}") for proj in ("query", "key", "value")]
            )
            for hf_name, timm_name in _HF_BLOCK_NAMES.items():
                timm_state[f"blocks.{n}.{timm_name}.{part}"] = take(f"{hf}{hf_name}.{part}")
    leftover = sorted(k for k in hf_state if k not in used and not k.startswith("vit.pooler."))
    if leftover:
        raise CheckpointError(
            f"the ViT checkpoint holds {len(leftover)} tensors this conversion does not know, "
            f"e.g. {leftover[:3]} (a transformers >= 5 or non-ViT checkpoint?)"
        )
    return {key: value.contiguous() for key, value in timm_state.items()}


# ------------------------------------------------------------------------- their CNN -> ours
_CNN_BLOCK = re.compile(r"^conv_block(\d+)\.(conv|projection)\.(weight|bias)$")
_CNN_HEAD_NAMES = {"fc1": "fc1", "fc1_bn": "norm1", "fc2": "fc2", "fc2_bn": "norm2", "fc3": "out"}


@dataclass(frozen=True)
class CnnGeometry:
    """The residual CNN's shape, read from the authors' AgePredictionCNN state dict."""

    cnn_channels: Tuple[int, ...]
    cnn_kernels: Tuple[Tuple[int, int], ...]
    hidden_sizes: Tuple[int, int]
    flattened_features: int


def official_cnn_to_regressor(cnn_state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename AgePredictionCNN keys onto ours (``regressor.`` prefix not included).

    ``conv_blockK.{conv,projection}`` -> ``blocks.{K-1}.{conv,projection}``; ``fc1``, ``fc1_bn``,
    ``fc2``, ``fc2_bn``, ``fc3`` -> ``head.fc1``, ``head.norm1``, ``head.fc2``, ``head.norm2``,
    ``head.out``.
    """
    mapped: Dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in cnn_state.items():
        block = _CNN_BLOCK.match(key)
        layer, _, part = key.partition(".")
        if block:
            mapped[f"blocks.{int(block[1]) - 1}.{block[2]}.{block[3]}"] = value
        elif layer in _CNN_HEAD_NAMES and part in ("weight", "bias"):
            mapped[f"head.{_CNN_HEAD_NAMES[layer]}.{part}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(
            f"the CNN state dict holds keys AgePredictionCNN does not have: {sorted(unknown)[:5]}"
        )
    n_blocks = len({k.split(".")[1] for k in mapped if k.startswith("blocks.")})
    for i in range(n_blocks):
        if f"blocks.{i}.projection.weight" not in mapped:
            raise CheckpointError(
                f"CNN block {i + 1} has no 1x1 projection (in channels = out channels); "
                "BrainAge's residual CNN always projects"
            )
    return {key: value.contiguous() for key, value in mapped.items()}


def cnn_geometry(regressor_state: Mapping[str, torch.Tensor]) -> CnnGeometry:
    """Channels, kernels and head sizes of a renamed CNN state dict (from :func:`official_cnn_to_regressor`)."""
    try:
        n_blocks = len({k.split(".")[1] for k in regressor_state if k.startswith("blocks.")})
        convs = [regressor_state[f"blocks.{i}.conv.weight"] for i in range(n_blocks)]
        fc1 = regressor_state["head.fc1.weight"]
        fc2 = regressor_state["head.fc2.weight"]
        out = regressor_state["head.out.weight"]
    except KeyError as missing:
        raise CheckpointError(f"the CNN state dict lacks {missing.args[0]}") from None
    if out.shape[1] != fc2.shape[0] + 1:
        raise CheckpointError(
            f"the CNN's last layer reads {out.shape[1]} inputs, expected {fc2.shape[0]} + 1 (sex)"
        )
    return CnnGeometry(
        cnn_channels=tuple(int(w.shape[0]) for w in convs),
        cnn_kernels=tuple((int(w.shape[2]), int(w.shape[3])) for w in convs),
        hidden_sizes=(int(fc1.shape[0]), int(fc2.shape[0])),
        flattened_features=int(fc1.shape[1]),
    )


def infer_n_slices(geometry: CnnGeometry, embed_dim: int) -> int:
    """Number of slices S the CNN was built for, from its flattened size and the embedding width.

    Each block shrinks the map by (k - 1) (valid conv) + 1 (2x2 max-pool, stride 1) per axis.
    """
    width = embed_dim - sum(kw for _, kw in geometry.cnn_kernels)
    channels = geometry.cnn_channels[-1]
    if width < 1 or geometry.flattened_features % (channels * width):
        raise CheckpointError(
            f"the CNN's first FC layer reads {geometry.flattened_features} features, which no "
            f"S x {embed_dim} embedding map gives with kernels {geometry.cnn_kernels}; "
            "the ViT and CNN files do not belong together"
        )
    height = geometry.flattened_features // (channels * width)
    return height + sum(kh for kh, _ in geometry.cnn_kernels)


# --------------------------------------------------------------------------- stage-1 classes
def official_class_labels(n_classes: int) -> Optional[List[str]]:
    """The authors' class labels when their count identifies them, else ``None``.

    Their labels are ``f"{int(age):03d}"[:-1] + "0" + sex`` over the training cohort, sorted;
    20 classes means every decade 0-9 ... 90-99 y with both sexes. Other counts are ambiguous
    (which decades were present is not stored in the checkpoint).
    """
    if n_classes != 20:
        return None
    return [f"{decade:03d}{sex}" for decade in range(0, 100, 10) for sex in ("F", "M")]


def class_layout(labels: Sequence[str]) -> Tuple[Tuple[float, ...], List[int]]:
    """Age-bin edges and the row permutation from the authors' label order to ours.

    Returns ``(age_bin_edges, order)`` with ``our_head = their_head[order]``: our class
    ``sex * n_bins + bin`` (M = 0, F = 1) is their label ``f"{edge:03d}{sex}"``.
    """
    parsed = []
    for label in labels:
        match = re.fullmatch(r"(\d{3})([MF])", str(label).strip())
        if not match:
            raise CheckpointError(f"class label {label!r} is not of the authors' form '040F' (decade + sex)")
        parsed.append((int(match[1]), match[2]))
    decades = sorted({d for d, _ in parsed})
    expected = {(d, s) for d in decades for s in _SEX_ORDER}
    if set(parsed) != expected or len(parsed) != len(expected):
        raise CheckpointError(
            f"class labels {list(labels)} are not every decade x sex once; BrainAge's stage-1 "
            "head needs both sexes for each age bin"
        )
    if decades != list(range(decades[0], decades[-1] + 10, 10)):
        raise CheckpointError(f"class labels skip a decade ({decades}); age bins must be contiguous")
    edges = tuple(float(d) for d in decades) + (float(decades[-1] + 10),)
    position = {label: i for i, label in enumerate(parsed)}
    order = [position[(d, sex)] for sex in _SEX_ORDER for d in decades]
    return edges, order


class UnknownClassLabelsWarning(UserWarning):
    """An imported ViT classifier's class count does not identify the authors' class labels."""


def unknown_class_layout(n_classes: int, path: Optional[PathLike] = None) -> Tuple[List[str], Tuple[float, ...]]:
    """Generic labels ``"class 0"`` ... and placeholder age-bin edges ``0, 1, ..., n/2`` (bin numbers,
    not years) for a classifier whose labels are unknown; its rows keep the authors' order.

    The stage-1 classifier plays no part in ages or attention maps, so such a model predicts as
    well as one with known labels; only stage-1 class names and re-training need the real ones.
    BrainAge's head holds ``2 * n_age_bins`` classes, so an odd count cannot be represented.
    """
    if n_classes < 2 or n_classes % 2:
        raise CheckpointError(
            f"the ViT classifier has {n_classes} classes; BrainAge's stage-1 head holds an even number "
            "(age bins x 2 sexes). Pass the authors' class labels (CLI: --class-labels)", path)
    labels = [f"class {i}" for i in range(n_classes)]
    return labels, tuple(float(i) for i in range(n_classes // 2 + 1))


# ------------------------------------------------------------------------------ file reading
@dataclass
class OfficialCheckpoint:
    """One of the authors' files, loaded: its state dict and what came with it."""

    path: Path
    state: Dict[str, torch.Tensor]
    file_format: str
    epoch: Optional[int] = None
    validation_mae: Optional[float] = None


def _tensor_dict(candidate: Any, what: str, path: Path) -> Dict[str, torch.Tensor]:
    if not isinstance(candidate, Mapping) or not candidate:
        raise CheckpointError(f"{what} is not a state dict", path)
    bad = [k for k, v in candidate.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{what} holds non-tensor entries, e.g. {bad[:3]}", path)
    return {k: v.detach().to("cpu") for k, v in candidate.items()}


def _torch_load_weights_only(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError or zip errors
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"cannot be read by torch.load(weights_only=True): {first}", path
        ) from None


def load_official_vit(path: PathLike) -> OfficialCheckpoint:
    """Read their ViT ``.pth`` (weights-only); accepts the training dict or a bare state dict."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError("ViT checkpoint not found", path)
    payload = _torch_load_weights_only(path)
    epoch = None
    if isinstance(payload, Mapping) and "model_state_dict" in payload:
        epoch = payload.get("epoch")
        payload = payload["model_state_dict"]
        file_format = "torch.save dict with model_state_dict (PEFT-wrapped ViTForImageClassification)"
    else:
        file_format = "torch.save state dict"
    state = _tensor_dict(payload, "the ViT checkpoint's model_state_dict", path)
    return OfficialCheckpoint(path, state, file_format, epoch=_as_int(epoch))


def load_official_cnn(path: PathLike) -> OfficialCheckpoint:
    """Read their CNN ``.pkl`` through the restricted unpickler (a ``.pt``/``.pth`` weights-only)."""
    from ..safe_pickle import load_restricted_pickle

    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError("CNN checkpoint not found", path)
    if path.suffix.lower() in (".pt", ".pth"):
        payload = _torch_load_weights_only(path)
        file_format = "torch.save"
    else:
        payload = load_restricted_pickle(path)
        file_format = "pickle.dump"
    epoch = mae = None
    if isinstance(payload, Mapping) and "model_state" in payload:
        epoch, mae = payload.get("epoch"), payload.get("loss")
        payload = payload["model_state"]
        file_format += " dict with model_state (AgePredictionCNN)"
    else:
        file_format += " state dict"
    state = _tensor_dict(payload, "the CNN checkpoint's model_state", path)
    return OfficialCheckpoint(path, state, file_format, epoch=_as_int(epoch), validation_mae=_as_float(mae))


def _as_int(value: Any) -> Optional[int]:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _as_float(value: Any) -> Optional[float]:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def find_official_files(folder: PathLike) -> Tuple[Path, Path]:
    """Find the ViT ``.pth`` and the CNN ``.pkl`` in a folder holding the extracted archive.

    Searches the folder and its sub-folders. With several candidates it prefers the authors'
    names (``vit_dora_train_checkpoint.pth``; ``*_best_model_with_metadata.pkl`` over ``*_last_*``,
    and ``cnn_mx_bigdo_ch_sw_res`` over other CNN modules).
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CheckpointError("not a folder", folder)
    vits = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in (".pth", ".pt"))
    cnns = sorted(p for p in folder.rglob("*.pkl") if p.is_file())
    if not vits or not cnns:
        archives = sorted(p.name for p in folder.rglob("*.7z*"))
        hint = (
            f" It holds the 7z archive {archives[0]}: extract it first (7z x {archives[0]})."
            if archives else ""
        )
        missing = " or ".join(
            what for what, found in (("ViT .pth", vits), ("CNN .pkl", cnns)) if not found
        ) + " file"
        raise CheckpointError(
            f"holds no {missing} (expected {OFFICIAL_VIT_FILENAME} and {OFFICIAL_CNN_FILENAME}).{hint}",
            folder,
        )
    vit = _pick(vits, [lambda p: p.name == OFFICIAL_VIT_FILENAME, lambda p: "vit" in p.name.lower()],
                "ViT .pth", folder)
    cnn = _pick(
        cnns,
        [lambda p: p.name == OFFICIAL_CNN_FILENAME,
         lambda p: p.name.endswith("_best_model_with_metadata.pkl"),
         lambda p: "best" in p.name.lower()],
        "CNN .pkl", folder,
    )
    return vit, cnn


def _pick(candidates: List[Path], preferences, what: str, folder: Path) -> Path:
    if len(candidates) == 1:
        return candidates[0]
    for prefer in preferences:
        chosen = [p for p in candidates if prefer(p)]
        if len(chosen) == 1:
            return chosen[0]
        if chosen:
            candidates = chosen
    listed = ", ".join(str(p.relative_to(folder)) for p in candidates)
    raise CheckpointError(f"holds several candidate {what} files ({listed}); name them explicitly", folder)


# -------------------------------------------------------------------------------- assembling
#: The cohorts of the authors' training set (their script concatenates these; SALD is left out).
OFFICIAL_TRAINING_COHORTS = (
    "ADNI", "IXI", "ABIDE II", "DLBS", "COBRE", "FCON 1000", "CoRR", "OASIS-1", "Cam-CAN",
    "NIMH (MPRAGE)", "BOLD",
)


@dataclass
class ConvertedOfficialModel:
    """The authors' two files as one BrainAge state dict, its config and its metadata."""

    config: ModelConfig
    state: Dict[str, torch.Tensor]
    metadata: Dict[str, Any]


def convert_official(
    vit: OfficialCheckpoint,
    cnn: OfficialCheckpoint,
    name: Optional[str] = None,
    *,
    lora_alpha: float = OFFICIAL_LORA_ALPHA,
    num_heads: Optional[int] = None,
    class_labels: Optional[Sequence[str]] = None,
) -> ConvertedOfficialModel:
    """Merge, rename and check the loaded files; build the config (LayerNorm eps 1e-12) and metadata.

    ``num_heads`` defaults to embed_dim / 64 (every Hugging Face ViT size: base 768 -> 12);
    ``class_labels`` (the authors' label strings, e.g. "040F") names the stage-1 classes; without
    them a class count that does not identify them (only 20 does: decades 0-90 x F/M) imports
    with generic labels, ``class_labels_known: false`` in the metadata and one
    :class:`UnknownClassLabelsWarning` (the classifier plays no part in ages or maps).
    """
    hf_state, merge = merge_peft_state_dict(vit.state, lora_alpha=lora_alpha)
    geometry = vit_geometry(hf_state)
    timm_state = hf_vit_to_timm(hf_state)
    regressor_state = official_cnn_to_regressor(cnn.state)
    cnn_shape = cnn_geometry(regressor_state)
    n_slices = infer_n_slices(cnn_shape, geometry.embed_dim)

    heads = num_heads or (geometry.embed_dim // 64 if geometry.embed_dim % 64 == 0 else None)
    if not heads or geometry.embed_dim % heads:
        raise CheckpointError(
            f"cannot tell the number of attention heads of a {geometry.embed_dim}-wide ViT; pass num_heads",
            vit.path,
        )
    if class_labels:
        labels = list(class_labels)
        if len(labels) != geometry.n_classes:
            raise CheckpointError(
                f"{len(labels)} class labels given for a classifier with {geometry.n_classes} classes", vit.path
            )
    else:
        labels = official_class_labels(geometry.n_classes)
    labels_known = labels is not None
    if labels_known:
        age_bin_edges, order = class_layout(labels)
        timm_state["head.weight"] = timm_state["head.weight"][order].contiguous()
        timm_state["head.bias"] = timm_state["head.bias"][order].contiguous()
    else:
        labels, age_bin_edges = unknown_class_layout(geometry.n_classes, vit.path)
        warnings.warn(UnknownClassLabelsWarning(
            f"{vit.path}: the ViT classifier has {geometry.n_classes} classes, which does not say which "
            "age decades they stand for (20 would mean 0-9 ... 90-99 y x F/M); imported with generic "
            f"labels 'class 0' ... 'class {geometry.n_classes - 1}' (class_labels_known: false). Ages and "
            "attention maps do not use the stage-1 classifier; pass class_labels (CLI: --class-labels "
            "010F,010M,...) if you know the authors' labels"), stacklevel=2)

    paper = PRESETS["paper"]
    config = paper.replace(
        name=name or DEFAULT_MODEL_NAME,
        image_size=geometry.image_size,
        patch_size=geometry.patch_size,
        embed_dim=geometry.embed_dim,
        depth=geometry.depth,
        num_heads=int(heads),
        mlp_ratio=geometry.mlp_ratio,
        layer_norm_eps=1e-12,  # Hugging Face ViT's LayerNorm eps (timm's default is 1e-6)
        in_chans=geometry.in_chans,
        n_slices=n_slices,
        age_bin_edges=age_bin_edges,
        cnn_channels=cnn_shape.cnn_channels,
        cnn_kernels=cnn_shape.cnn_kernels,
        head="flatten",
        pooled_size=None,
        hidden_sizes=cnn_shape.hidden_sizes,
        preprocess=paper.preprocess.__class__.from_dict(
            {**paper.preprocess.to_dict(), "n_slices": n_slices, "image_size": geometry.image_size}
        ),
    )
    state = {f"encoder.vit.{k}": v for k, v in timm_state.items()}
    state.update({f"regressor.{k}": v for k, v in regressor_state.items()})

    matches_paper = config.replace(name=paper.name, layer_norm_eps=paper.layer_norm_eps,
                                   age_bin_edges=paper.age_bin_edges) == paper
    metadata = _official_metadata(config, vit, cnn, merge, labels, matches_paper, labels_known)
    return ConvertedOfficialModel(config=config, state=state, metadata=metadata)


def _official_metadata(config: ModelConfig, vit: OfficialCheckpoint, cnn: OfficialCheckpoint,
                       merge: PeftMergeReport, labels: Sequence[str], matches_paper: bool,
                       labels_known: bool = True) -> Dict[str, Any]:
    from .. import __version__
    from . import class_names

    def source(role: str, checkpoint: OfficialCheckpoint, **extra: Any) -> Dict[str, Any]:
        entry = {
            "role": role,
            "file": checkpoint.path.name,
            "sha256": file_sha256(checkpoint.path),
            "bytes": checkpoint.path.stat().st_size,
            "original_format": checkpoint.file_format,
            "epoch": checkpoint.epoch,
        }
        entry.update(extra)
        return entry

    return {
        "name": config.name,
        "architecture": "paper preset (ViT-B/16 at 224 px, 160 slices, 98,241-feature CNN head)"
                        if matches_paper else "custom (read from the checkpoint's shapes)",
        "description": (
            "BrainRotViT as published by its authors (stage-1 DoRA-fine-tuned ViT-B/16 and "
            "stage-2 residual CNN), converted to BrainAge's format"
        ),
        "intended_use": "research",
        "is_demo": False,
        "trained": True,
        "citation": PAPER_CITATION,
        "source": {
            "origin": "official BrainRotViT checkpoints (github.com/wjalal/BrainRotViT, best_checkpoints/)",
            "files": [
                source("stage-1 ViT", vit),
                source("stage-2 CNN", cnn, cnn_module=OFFICIAL_CNN_MODULE,
                       validation_mae_years=cnn.validation_mae),
            ],
            "converted_by": f"brainage {__version__} import-official",
            "conversion": {
                "peft_adapter": merge.adapter_name,
                "dora": merge.dora,
                "lora_rank": merge.rank,
                "lora_alpha": merge.lora_alpha,
                "lora_scaling": merge.scaling,
                "merged_modules": len(merge.merged_modules),
                "vit_names": "Hugging Face transformers 4.x ViTForImageClassification -> timm VisionTransformer",
                "layer_norm_eps": config.layer_norm_eps,
                "stage1_class_order": "reordered from the authors' sorted labels to sex-major (M, F)"
                                      if labels_known else "the authors' order, kept (labels unknown)",
            },
        },
        "official_class_labels": list(labels),
        "class_labels_known": labels_known,
        # with unknown labels the age-bin edges are bin numbers, not ages: name the classes plainly
        "stage1_classes": class_names(config) if labels_known else list(labels),
        **({} if labels_known else {"class_names": list(labels)}),
        "sex_encoding": {"M": 0, "F": 1},
        "training_data": {
            "cohorts": list(OFFICIAL_TRAINING_COHORTS),
            **PAPER_TRAINING_DATA,
            "description": "the authors' training cohorts (skull-stripped, N4-corrected T1w), as the "
                           "paper reports them; not re-checked here",
            # the authors stripped with deepbrain's U-Net (prob > 0.5); BrainAge uses deepbet
            "skull_strip": "deepbrain",
        },
        "metrics": {
            **({"validation_mae_years": cnn.validation_mae} if cnn.validation_mae is not None else {}),
            "reported_in_paper": dict(PAPER_METRICS),
        },
        "intended_use_detail": (
            "research: brain age of T1w scans resembling the training cohorts'; not a medical device, "
            "not for clinical decisions"
        ),
        "preprocessing_notes": preprocessing_notes(config),
    }


#: The training data as the paper reports it (Jalal et al. 2025); not re-counted here.
PAPER_TRAINING_DATA = {
    "datasets": 11,
    "sites": ">130",
    "train_subjects": 4086,
    "validation_subjects": 1022,
}

#: The paper's own figures for the published model; this import did not re-measure them.
PAPER_METRICS = {
    "validation_mae_years": 3.34,
    "external_mae_years_range": [3.77, 5.04],
    "external_cohorts": 4,
    "source": "Jalal et al. 2025, arXiv:2511.15188",
    "re_measured_here": False,
}


def preprocessing_notes(config: ModelConfig) -> Dict[str, Any]:
    """How the authors prepared their training scans, how BrainAge prepares an input for this
    model, and where the two differ (recorded in the card so a user can judge the effect)."""
    slices = f"{config.n_slices} sagittal slices (left-right axis resampled with a cubic spline), " \
             f"each min-max scaled, 8-bit quantised and resized to {config.image_size} x {config.image_size}"
    common = {
        "orientation": "RAS",
        "spatial_normalisation": "none (the slices come from the scan in its own space)",
        "crop": "bounding box of the largest connected component above 0.1 after min-max scaling",
        "slices": slices,
    }
    return {
        "authors": {**common, "skull_strip": "deepbrain U-Net (probability > 0.5)",
                    "bias_correction": "ANTs N4BiasFieldCorrection on the skull-stripped image"},
        "brainage": {**common, "skull_strip": "deepbet (an input found already skull-stripped is kept)",
                     "bias_correction": "SimpleITK N4 after skull stripping, fitted to the brain on a "
                                        "shrunk image, the field evaluated at full resolution"},
        "differences": [
            "skull stripping: deepbet here, deepbrain in the authors' training; the masks differ at the "
            "brain surface, which the crop and the slice intensities see",
            "bias correction: SimpleITK's N4 with BrainAge's settings, not ANTs' command-line defaults",
            "BrainAge replaces isolated extremely bright voxels by their neighbourhood's median before "
            "scaling (ordinary scans have none and pass unchanged)",
        ],
    }


def import_official(
    vit_path: PathLike,
    cnn_path: PathLike,
    out_path: PathLike,
    name: Optional[str] = None,
    *,
    lora_alpha: float = OFFICIAL_LORA_ALPHA,
    num_heads: Optional[int] = None,
    class_labels: Optional[Sequence[str]] = None,
    metadata: Optional[Mapping[str, Any]] = None,
    record_precisions: Optional[bool] = None,
) -> Path:
    """Convert the authors' ViT ``.pth`` and CNN ``.pkl`` into a BrainAge safetensors checkpoint.

    ``record_precisions``: as ``save_checkpoint``'s (None: on unless ``BRAINAGE_PRECISION_RECORD=0``):
    the card records how far each CPU precision moves the age (what ``precision="auto"`` reads).

    ``metadata``: entries added to the card (a dict value is merged into a dict already there,
    e.g. ``{"source": {"download": ...}}`` keeps the recorded files).
    Neither input is modified; ``out_path`` is written atomically. Returns ``out_path``. The
    result loads with ``BrainAgeLib.load_model(out_path)`` and runs in the CLI (``--model``)
    and in Slicer like any BrainAge model. Raises :class:`CheckpointError` for unreadable,
    unsafe or mismatched files.
    """
    from . import BrainAgeModel

    out_path = Path(out_path).expanduser()
    if out_path.suffix.lower() != ".safetensors":
        raise CheckpointError("the converted model must be a .safetensors file", out_path)
    vit = load_official_vit(vit_path)
    cnn = load_official_cnn(cnn_path)
    converted = convert_official(
        vit, cnn, name, lora_alpha=lora_alpha, num_heads=num_heads, class_labels=class_labels
    )
    for key, value in (metadata or {}).items():
        current = converted.metadata.get(key)
        converted.metadata[key] = {**current, **value} if isinstance(value, Mapping) and isinstance(current, dict) else value
    with torch.device("meta"):  # shapes only: every tensor comes from the converted state
        model = BrainAgeModel(converted.config, metadata=converted.metadata)
    ours = model.state_dict()
    missing = sorted(set(ours) - set(converted.state))
    unexpected = sorted(set(converted.state) - set(ours))
    wrong = sorted(k for k in set(ours) & set(converted.state) if ours[k].shape != converted.state[k].shape)
    if missing or unexpected or wrong:
        details = "; ".join(
            f"{label}: {keys[:3]}" for label, keys in
            (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys
        )
        raise CheckpointError(f"the converted weights do not fit BrainAge's model ({details})", out_path)
    model.load_state_dict(converted.state, strict=True, assign=True)
    unset = [name for name, value in list(model.named_parameters()) + list(model.named_buffers()) if value.is_meta]
    if unset:
        raise CheckpointError(f"the conversion leaves tensors unset: {unset[:3]}", out_path)
    model.eval()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(model, out_path, record_precisions=record_precisions)
