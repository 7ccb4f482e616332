"""Model presets: one table of configs, each a plain dataclass (data, not code branches).

``paper`` reproduces BrainRotViT (Jalal et al., 2025, arXiv 2511.15188) exactly: ViT-B/16 at
224 px over 160 sagittal slices, and the residual CNN whose flattened map is 143 x 687 = 98,241
features feeding a 512-unit FC layer. ``demo`` is the small preset of the bundled demo model
(fewer pixels, fewer slices, a smaller ViT, a pooled head); ``tiny`` exists for fast tests.
"""
from __future__ import annotations

import dataclasses
from dataclasses import InitVar, dataclass
from typing import Any, Dict, Optional, Tuple

#: Precision names the ViT may run in (``devices.autocast_dtype``); here, free of torch, so the
#: command line can list them without importing torch.
PRECISIONS: Tuple[str, ...] = ("auto", "fp32", "bf16", "fp16", "int8", "onnx")
#: Brain extraction methods (``PreprocessConfig.skull_strip``): a trained extractor (deepbet, see
#: ``brain_extraction.py``), the template registration of ``template_strip.py``, or none. Inputs
#: that are skull-stripped already are detected and kept with every method.
SKULL_STRIP_METHODS: Tuple[str, ...] = ("deepbet", "template", "none")
#: Names older checkpoints recorded: "auto" (the template method, which fails on most real heads
#: with necks) now predicts with deepbet; the card's training extraction stays "template"
#: (``inference.training_extractor``), so such predictions say that they differ.
LEGACY_SKULL_STRIP = {"auto": "deepbet"}


@dataclass(frozen=True)
class PreprocessConfig:
    """How a T1 volume becomes the stack of sagittal slices the encoder sees."""

    n4_bias_correction: bool = True
    n4_shrink_factor: int = 4            # N4 runs on the image shrunk by this factor (speed)
    n4_grid_mm: Optional[float] = None   # instead: shrink to about this voxel size (mm), whatever the input's
    skull_strip: str = "deepbet"         # one of SKULL_STRIP_METHODS
    registration_spacing_mm: float = 3.0  # grid the template registration runs on
    crop_threshold: float = 0.1          # largest connected component above this (after min-max)
    n_slices: int = 160                  # sagittal slices after resampling the L-R axis (cubic)
    image_size: int = 224                # each slice resized to image_size x image_size
    quantize_8bit: bool = True           # floor(255 x) as the authors' ToPILImage does

    def __post_init__(self) -> None:
        method = LEGACY_SKULL_STRIP.get(self.skull_strip, self.skull_strip)
        if method not in SKULL_STRIP_METHODS:
            raise ValueError(f"skull_strip must be one of {', '.join(SKULL_STRIP_METHODS)}, got {self.skull_strip!r}")
        object.__setattr__(self, "skull_strip", method)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "PreprocessConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of both stages plus the preprocessing that feeds them.

    ``image_size`` (the ViT's input, pixels) and ``n_slices`` (the stage-2 map's height) are
    stored once, in ``preprocess`` (the preprocessing makes the slices): on a config they are
    read-only properties returning ``preprocess.image_size`` / ``preprocess.n_slices``. They
    are still accepted as keywords (``ModelConfig(..., image_size=96, n_slices=64)``,
    ``replace(image_size=32)``, a checkpoint's config dict) and then set the preprocessing's
    values when no ``preprocess`` is given (``replace`` changes its copy); given together with a
    ``preprocess`` that says otherwise, they are an error naming both values. ``to_dict`` still
    writes them beside ``preprocess``, as checkpoints always recorded them.
    """

    name: str
    # Stage 1: ViT slice encoder (timm VisionTransformer)
    image_size: InitVar[Optional[int]] = None    # preprocess.image_size (see the class docstring)
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-6         # timm's default; Hugging Face checkpoints use 1e-12
    in_chans: int = 3
    n_slices: InitVar[Optional[int]] = None      # preprocess.n_slices (see the class docstring)
    n_train_slices: int = 32             # evenly spaced sagittal slices per subject in stage 1
    age_bin_edges: Tuple[float, ...] = (0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100)
    # Stage 2: residual CNN over the [n_slices, embed_dim] pseudo-image
    cnn_channels: Tuple[int, ...] = (8, 4, 1)
    cnn_kernels: Tuple[Tuple[int, int], ...] = ((10, 60), (5, 15), (2, 6))
    head: str = "flatten"                # "flatten" (paper) or "pooled"
    pooled_size: Optional[Tuple[int, int]] = None  # adaptive average pool size for head="pooled"
    hidden_sizes: Tuple[int, ...] = (512, 128)
    dropout: float = 0.3
    preprocess: Optional[PreprocessConfig] = None  # never None on a config: defaults to PreprocessConfig()

    def __post_init__(self, image_size: Optional[int], n_slices: Optional[int]) -> None:
        given = {key: int(value) for key, value in (("image_size", image_size), ("n_slices", n_slices))
                 if value is not None}
        if self.preprocess is None:
            object.__setattr__(self, "preprocess", PreprocessConfig(**given))
            return
        clashes = [f"{key}={value} but preprocess.{key}={getattr(self.preprocess, key)}"
                   for key, value in given.items() if getattr(self.preprocess, key) != value]
        if clashes:
            raise ValueError(f"model config {self.name!r}: {'; '.join(clashes)} (the preprocessing makes the "
                             "slices the model reads, so both must agree; preprocess holds the value)")

    @property
    def n_age_bins(self) -> int:
        return len(self.age_bin_edges) - 1

    @property
    def n_classes(self) -> int:
        """Stage-1 classes: age bin x sex (sex-major: class = sex * n_age_bins + bin)."""
        return 2 * self.n_age_bins

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with ``changes``; ``image_size``/``n_slices`` change the copy's ``preprocess``
        (unless ``changes`` holds a ``preprocess`` too, which must then agree with them), and a
        new ``preprocess`` brings its own sizes. (``dataclasses.replace`` passes the old sizes
        along, so giving it a ``preprocess`` of other sizes is a mismatch: use this.)"""
        sizes = {key: changes[key] for key in ("image_size", "n_slices") if key in changes}
        if "preprocess" not in changes:
            changes["preprocess"] = dataclasses.replace(self.preprocess, **sizes)
        for key in ("image_size", "n_slices"):  # dataclasses.replace would pass the old values
            changes.setdefault(key, getattr(changes["preprocess"], key))
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        """Every setting as plain values, ``image_size`` and ``n_slices`` included (in their old places)."""
        values = dataclasses.asdict(self)
        return {name: getattr(self, name) if name not in values else values[name] for name in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "ModelConfig":
        names = set(cls.__dataclass_fields__)  # the fields and the image_size/n_slices keywords
        values = {k: v for k, v in data.items() if k in names}
        if isinstance(values.get("preprocess"), dict):
            values["preprocess"] = PreprocessConfig.from_dict(values["preprocess"])
        for key in ("age_bin_edges", "cnn_channels", "hidden_sizes"):
            if key in values:
                values[key] = tuple(values[key])
        if "cnn_kernels" in values:
            values["cnn_kernels"] = tuple(tuple(k) for k in values["cnn_kernels"])
        if values.get("pooled_size") is not None:
            values["pooled_size"] = tuple(values["pooled_size"])
        return cls(**values)


# Read-only views of the preprocessing's values; set after @dataclass has made the InitVar
# keywords of __init__ (a property in the class body would become their default).
ModelConfig.image_size = property(lambda self: self.preprocess.image_size,  # type: ignore[assignment]
                                  doc="Pixels of each slice, the ViT's input size: ``preprocess.image_size``.")
ModelConfig.n_slices = property(lambda self: self.preprocess.n_slices,  # type: ignore[assignment]
                                doc="Sagittal slices per volume, the stage-2 map's height: ``preprocess.n_slices``.")


PRESETS: Dict[str, ModelConfig] = {
    "paper": ModelConfig(name="paper"),
    "demo": ModelConfig(
        name="demo",
        patch_size=12,                   # an 8 x 8 patch grid (~22 mm patches): finer attention maps
        embed_dim=192,
        depth=4,
        num_heads=3,
        n_train_slices=32,
        cnn_channels=(8, 4, 1),
        cnn_kernels=((5, 15), (3, 7), (2, 3)),
        head="pooled",
        pooled_size=(8, 16),
        hidden_sizes=(64, 32),
        dropout=0.3,
        # 64 slices (n_slices) of 96 pixels (image_size) of a ~180 mm brain (~2 mm per pixel): the
        # bias field is fitted on an ~8 mm grid, for 1 mm and 2 mm inputs alike
        preprocess=PreprocessConfig(n_slices=64, image_size=96, registration_spacing_mm=4.0, n4_grid_mm=8.0),
    ),
    "tiny": ModelConfig(
        name="tiny",
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        n_train_slices=8,
        cnn_channels=(4, 2, 1),
        cnn_kernels=((3, 5), (2, 3), (2, 2)),
        head="pooled",
        pooled_size=(4, 4),
        hidden_sizes=(16, 8),
        dropout=0.0,
        preprocess=PreprocessConfig(  # 16 slices of 32 pixels
            n4_bias_correction=False, skull_strip="none", n_slices=16, image_size=32
        ),
    ),
}


def get_preset(preset: "str | ModelConfig") -> ModelConfig:
    """Look a preset up by name (a ModelConfig passes through)."""
    if isinstance(preset, ModelConfig):
        return preset
    try:
        return PRESETS[preset]
    except KeyError:
        raise KeyError(f"unknown preset {preset!r}; known presets: {', '.join(PRESETS)}") from None
