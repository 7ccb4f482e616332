"""BrainAgeLib: brain age from a T1-weighted MRI with the two-stage BrainRotViT model.

Slicer-independent: imports no Slicer, Qt or MRML. Heavy parts (torch, timm) are imported
lazily so that ``import BrainAgeLib`` stays fast and works where only I/O is needed.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import BrainAgeError, CheckpointError, CohortError, InvalidVolumeError
from .presets import PRESETS, ModelConfig, PreprocessConfig, get_preset

# Lazy too (nibabel): the Slicer module imports BrainAgeLib.slicer_bridge with only numpy
# present, before it has installed BrainAge's other dependencies.
_LAZY = {
    "Volume": ("volume", "Volume"),
    "load_volume": ("io", "load_volume"),
    "save_volume": ("io", "save_volume"),
    "prepare": ("preprocess.pipeline", "prepare"),
    "Prepared": ("preprocess.pipeline", "Prepared"),
    "build_model": ("model", "build_model"),
    "BrainAgeModel": ("model", "BrainAgeModel"),
    "load_model": ("model.checkpoint", "load_model"),
    "save_checkpoint": ("model.checkpoint", "save_checkpoint"),
    "predict": ("inference", "predict"),
    "predict_prepared": ("inference", "predict_prepared"),
    "Result": ("result", "Result"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "__version__", "BrainAgeError", "CheckpointError", "CohortError", "InvalidVolumeError",
    "PRESETS", "ModelConfig", "PreprocessConfig", "get_preset", *_LAZY,
]
