"""The two-stage BrainRotViT model: ViT slice encoder (stage 1) + residual CNN regressor (stage 2).

- ``encoder.SliceEncoder``: timm VisionTransformer over single sagittal slices (``.vit``).
- ``regressor.ResidualCNNRegressor``: reads the [S, D] stack of slice embeddings, plus sex.
- ``brain_age_model.BrainAgeModel``: both stages, ``embed``/``embed_explain``/``regress``.
- ``build_model(preset)``: a model of a preset with fresh random weights.
- ``checkpoint``: safetensors checkpoints (``save_checkpoint``, ``load_model``, the registry).
- ``import_official``: the BrainRotViT authors' checkpoints, with their key maps.
(Running a model on a volume is ``BrainAgeLib.inference``.)
"""
from __future__ import annotations

from .brain_age_model import (
    BrainAgeModel, UNKNOWN_SEX_CODE, build_model, class_index, class_names, default_metadata, sex_codes,
)
from .encoder import SliceEncoder, vit_parameter_count
from .regressor import ResidualCNNRegressor, feature_map_size, flattened_features

__all__ = [
    "BrainAgeModel", "build_model", "SliceEncoder", "ResidualCNNRegressor",
    "class_names", "class_index", "default_metadata", "sex_codes", "UNKNOWN_SEX_CODE",
    "feature_map_size", "flattened_features", "vit_parameter_count",
]
