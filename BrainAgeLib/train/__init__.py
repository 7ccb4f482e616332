"""Training the two-stage BrainRotViT model on a labelled cohort (``brainage train``).

- ``config.TrainConfig``: how to train (epochs, learning rates, DoRA, device, workers).
- ``split.split_subjects``: subject-level, age-stratified train/val/test split by seed.
- ``slice_cache.SliceCache``: prepared slices and embeddings cached on disk.
- ``stage1.train_stage1``: the ViT classifier over age-bin x sex (full fine-tuning or DoRA).
- ``embedding.embed_cohort``: frozen-encoder slice embeddings, float16 on disk.
- ``stage2.train_stage2``: the residual CNN regressor, best epoch by validation MAE.
- ``baselines.run_baselines``: training-mean and tissue-volume ridge baselines.
- ``distributed``: torchrun DDP (gloo on CPU, NCCL on CUDA), on a ``parallel.RankContext``.
- ``pipeline.run_training``: all of it, resumable, in one run folder.
"""
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
