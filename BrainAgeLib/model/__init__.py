"""The two-stage BrainRotViT network: ViT slice encoder (``encoder``), residual CNN (``regressor``),
both (``brain_age_model``), its checkpoints (``checkpoint`` reads and names them, ``checkpoint_file``
writes them), the authors' files (``import_official``) and their published archive (``published``)."""
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
