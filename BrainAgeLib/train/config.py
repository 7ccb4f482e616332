"""`TrainConfig`: every knob of a two-stage BrainAge training run, as one dataclass.

The architecture comes from the model preset (``BrainAgeLib.presets``); this config holds only
how to train it. Defaults follow the paper (Jalal et al., 2025): stage 1 is a ViT classifier of
age-bin x sex classes trained with cross-entropy, AdamW at 1e-4 and batch 8 (augmentation and
soft targets, ``train.augment``, are extras, off by default); stage 2 is the
residual CNN on slice embeddings trained with MSE and Adam at 5e-4, best epoch by validation MAE.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional


@dataclass
class TrainConfig:
    """How to train (not what to train: that is the preset)."""

    preset: str = "paper"
    seed: int = 0
    # subject-level split (fractions of subjects; the rest trains)
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    # stage 1: ViT classifier over age-bin x sex on n_train_slices sagittal slices per subject
    epochs1: int = 10
    batch_size1: int = 8                 # global batch (split over DDP ranks)
    lr1: float = 1e-4
    weight_decay1: float = 0.01          # torch AdamW default
    warmup_steps1: int = 0               # linear learning-rate warm-up steps (0: none, as the paper)
    schedule1: str = "constant"          # "constant" (paper) or "cosine" decay after warm-up
    augment1: bool = False               # random small rotation/scale/shift and gamma per slice
    label_sigma1: float = 0.0            # > 0: soft age-bin targets, N(age, this SD in years) over the bins
    dora: bool = False                   # DoRA adapters instead of full fine-tuning
    dora_r: int = 8
    dora_alpha: int = 16
    dora_dropout: float = 0.1
    init_encoder: Optional[str] = None   # start stage 1 from this checkpoint's encoder (None: random)
    # stage 2: residual CNN regressor on [n_slices, embed_dim] embeddings
    epochs2: int = 50
    batch_size2: int = 16
    lr2: float = 5e-4
    # execution
    device: str = "cpu"
    threads: Optional[int] = None        # torch intra-op threads per process (None: torch's default)
    workers: int = 1                     # processes preparing (preprocessing) volumes
    embed_batch_size: int = 64           # slices per forward pass when embedding
    cache_dir: Optional[str] = None      # slice/embedding cache (default: <out>/cache)

    def __post_init__(self) -> None:
        if not 0 <= self.val_fraction < 1 or not 0 <= self.test_fraction < 1:
            raise ValueError("val_fraction and test_fraction must be in [0, 1)")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must leave subjects to train on")
        for name in ("epochs1", "epochs2", "batch_size1", "batch_size2", "workers", "embed_batch_size"):
            if getattr(self, name) < (0 if name.startswith("epochs") else 1):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
