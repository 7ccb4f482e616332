"""Training on a labelled cohort (``brainage train``, ``pipeline``): ``config``, ``split``, ``slice_cache``,
``stage1`` (ViT), ``embedding``, ``stage2`` (CNN), ``baselines``, ``resume`` and ``distributed`` (DDP)."""
from __future__ import annotations

from .config import TrainConfig

__all__ = ["TrainConfig", "run_training", "TrainResult", "split_subjects", "SubjectSplit"]


def __getattr__(name: str):
    if name in ("run_training", "TrainResult"):
        from . import pipeline

        return getattr(pipeline, name)
    if name in ("split_subjects", "SubjectSplit"):
        from . import split

        return getattr(split, name)
    raise AttributeError(name)
