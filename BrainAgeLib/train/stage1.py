"""Stage 1: train the ViT slice encoder as a classifier of age-bin x sex classes.

Each training subject contributes ``n_train_slices`` (paper: 32) evenly spaced sagittal slices,
each labelled with its subject's class ``sex * n_age_bins + age_bin`` (sex M = 0, F = 1; bins
from the preset's ``age_bin_edges``). Cross-entropy, AdamW (paper: lr 1e-4, batch 8). Fine-tuning
is either full or DoRA (Liu et al., 2024) through ``peft``: rank 8, alpha 16, dropout 0.1, on the
query and value projections, with the classifier head fully trainable; the adapters are merged
into the ViT's weights after training (``merge_and_unload``), so the saved encoder is a plain ViT.

timm fuses the query, key and value projections into one ``attn.qkv`` Linear (out = 3 x D, rows
ordered q | k | v). peft can only wrap whole modules, so DoRA targets ``qkv`` and the key rows
are then held fixed: after every optimiser step the key rows of ``lora_B`` are zeroed and the key
entries of the DoRA magnitude vector are restored to their initial value (the key rows' weight
norms). With those, DoRA's update to the key rows, m / ||W + BA|| * (W + BA) - W, is exactly
zero: the adapted projections are query and value, as in the paper.

Optionally (``TrainConfig.augment1``, ``label_sigma1``; off by default, as in the paper) each
training slice is randomly moved and gamma-adjusted and the targets are soft age-bin
distributions around the exact age (``train.augment``). The validation loss stays the plain
cross-entropy against the hard classes, so runs with and without these compare.

The epoch with the lowest validation loss is kept. After every epoch the training state
(weights, optimizer, scheduler, counters) is saved, so a killed run resumes after its last
finished epoch.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from ..parallel import RankContext
from .augment import augment_slices, soft_class_targets
from .config import TrainConfig
from .distributed import wrap_for_training
from .resume import best_so_far, load_training_state, resume_from, save_training_state, seed_epoch


def training_slice_indices(n_slices: int, n_train_slices: int) -> np.ndarray:
    """``n_train_slices`` evenly spaced indices over 0 .. n_slices - 1 (both ends included)."""
    if n_train_slices >= n_slices:
        return np.arange(n_slices)
    return np.round(np.linspace(0, n_slices - 1, n_train_slices)).astype(int)


@dataclass(frozen=True)
class LabelledVolume:
    """One subject as stage 1 sees it: its cached slices file and its class label."""

    subject_id: str
    slices_path: Path
    label: int
    age: float = float("nan")   # exact age (soft targets need it; NaN when unknown)


class SliceClassificationDataset(Dataset):
    """(slice [H, W] float32 in [0, 1], class label, age) over every training slice of every subject."""

    def __init__(self, volumes: Sequence[LabelledVolume], slice_indices: np.ndarray):
        self.volumes = list(volumes)
        self.slice_indices = np.asarray(slice_indices)

    def __len__(self) -> int:
        return len(self.volumes) * len(self.slice_indices)

    def __getitem__(self, index: int):
        volume = self.volumes[index // len(self.slice_indices)]
        s = int(self.slice_indices[index % len(self.slice_indices)])
        slices = np.load(volume.slices_path, mmap_mode="r", allow_pickle=False)
        return torch.from_numpy(np.asarray(slices[s], dtype=np.float32)), volume.label, float(volume.age)


# ---------------------------------------------------------------------- DoRA
def add_dora_adapters(vit: nn.Module, config: TrainConfig) -> nn.Module:
    """Wrap a timm ViT with DoRA adapters on its fused qkv (query/value rows only) + trainable head."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.dora_r,
        lora_alpha=config.dora_alpha,
        lora_dropout=config.dora_dropout,
        target_modules=["qkv"],
        use_dora=True,
        modules_to_save=["head"],
    )
    return get_peft_model(vit, lora)


def _key_row_guards(peft_vit: nn.Module) -> List[tuple]:
    """(lora_B weight, magnitude weight, key-row slice, initial magnitude rows) per adapted qkv."""
    guards = []
    for module in peft_vit.modules():
        if hasattr(module, "lora_B") and hasattr(module, "lora_magnitude_vector") and "default" in module.lora_B:
            dim = module.in_features
            rows = slice(dim, 2 * dim)
            lora_b = module.lora_B["default"].weight
            magnitude = module.lora_magnitude_vector["default"].weight
            guards.append((lora_b, magnitude, rows, magnitude.detach()[rows].clone()))
    return guards


def _hold_key_rows(guards: List[tuple]) -> None:
    with torch.no_grad():
        for lora_b, magnitude, rows, initial in guards:
            lora_b[rows].zero_()
            magnitude[rows].copy_(initial)


# ---------------------------------------------------------------------- training
@dataclass
class Stage1Result:
    best_epoch: int
    best_val_loss: float
    best_val_accuracy: float
    epochs: int
    history: List[Dict[str, float]]
    seconds: float


def _lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine" and total > warmup:
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


@torch.no_grad()
def evaluate_classifier(classifier: nn.Module, dataset: Dataset, device: str, batch_size: int = 64) -> Dict[str, float]:
    """Mean cross-entropy and accuracy over a dataset of (slice, label)."""
    classifier.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for slices, labels, _ in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        logits = classifier(slices.to(device))
        labels = labels.to(device)
        loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(1) == labels).sum())
        count += len(labels)
    return {"val_loss": loss_sum / max(count, 1), "val_accuracy": correct / max(count, 1)}


class _Classifier(nn.Module):
    """normalize -> ViT -> logits, as one module DDP can wrap."""

    def __init__(self, encoder: nn.Module, vit: nn.Module):
        super().__init__()
        self.encoder_normalize = encoder.normalize
        self.vit = vit

    def forward(self, slices: torch.Tensor) -> torch.Tensor:
        return self.vit(self.encoder_normalize(slices))


def train_stage1(
    encoder: nn.Module,
    train_set: Dataset,
    val_set: Dataset,
    config: TrainConfig,
    stage_dir: Path,
    context: RankContext,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> Stage1Result:
    """Train ``encoder.vit`` as the stage-1 classifier; on return it holds the best epoch's weights.

    Resumes from ``stage_dir/training_state.pt`` when present. ``config.batch_size1`` is the
    global batch: with DDP each of the ``world_size`` ranks takes an equal share.
    """
    from tqdm import tqdm

    device = context.device
    stage_dir = Path(stage_dir)
    if config.batch_size1 % context.world_size:
        raise ValueError(f"batch_size1={config.batch_size1} is not divisible by {context.world_size} processes")
    age_bin_edges = encoder.config.age_bin_edges
    if config.label_sigma1 > 0 and any(math.isnan(float(v.age)) for v in getattr(train_set, "volumes", [])):
        raise ValueError("soft stage-1 targets (label_sigma1 > 0) need every training subject's age")
    vit = add_dora_adapters(encoder.vit, config) if config.dora else encoder.vit
    encoder.vit = vit
    classifier = _Classifier(encoder, vit).to(device)
    guards = _key_row_guards(vit) if config.dora else []
    parameters = [p for p in vit.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr1, weight_decay=config.weight_decay1)
    sampler = DistributedSampler(
        train_set, num_replicas=context.world_size, rank=context.rank, shuffle=True, seed=config.seed
    )
    loader = DataLoader(train_set, batch_size=config.batch_size1 // context.world_size, sampler=sampler)
    total_steps = max(1, config.epochs1 * len(loader))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, total_steps, config.warmup_steps1, config.schedule1)
    )

    state_path = stage_dir / "training_state.pt"
    start_epoch, best_weights, best, history = resume_from(
        load_training_state(state_path), {"epoch": -1, "val_loss": float("inf"), "val_accuracy": 0.0},
        model=vit, optimizer=optimizer, scheduler=scheduler)
    if start_epoch and context.is_main:
        log(f"stage 1: resuming after epoch {start_epoch} of {config.epochs1}")

    ddp = wrap_for_training(classifier, context, device)

    started = time.perf_counter()
    for epoch in range(start_epoch, config.epochs1):
        ddp.train()
        sampler.set_epoch(epoch)
        seed_epoch(config.seed, 1, epoch, context.rank)
        loss_sum, batches, epoch_started = 0.0, 0, time.perf_counter()
        bar = tqdm(loader, desc=f"stage 1 epoch {epoch + 1}/{config.epochs1}", disable=not (progress and context.is_main),
                   mininterval=2.0, leave=False)
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch * 101 + context.rank)
        for slices, labels, ages in bar:
            if config.augment1:
                slices = augment_slices(slices, generator)
            targets = (soft_class_targets(labels, ages, age_bin_edges, config.label_sigma1)
                       if config.label_sigma1 > 0 else labels)
            logits = ddp(slices.to(device))
            loss = nn.functional.cross_entropy(logits, targets.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if guards:
                _hold_key_rows(guards)
            loss_sum += loss.item()
            batches += 1
            bar.set_postfix(loss=f"{loss_sum / batches:.3f}")
        record = {"epoch": epoch, "train_loss": loss_sum / max(batches, 1),
                  "train_seconds": time.perf_counter() - epoch_started}
        if context.is_main:
            record.update(evaluate_classifier(classifier, val_set, device))
            improved = record["val_loss"] < best["val_loss"]
            if improved:
                best = {"epoch": epoch, "val_loss": record["val_loss"], "val_accuracy": record["val_accuracy"]}
                best_weights = {k: v.detach().cpu().clone() for k, v in vit.state_dict().items()}
            history.append(record)
            save_training_state(state_path, {
                "model": vit.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch, "best": best,
                "history": history, "best_model": best_weights,
            })
            log(f"stage 1 epoch {epoch + 1}/{config.epochs1}: train loss {record['train_loss']:.4f}, "
                f"val loss {record['val_loss']:.4f}, val accuracy {record['val_accuracy']:.3f} "
                f"({record['train_seconds']:.0f} s)"
                + ("  (best)" if improved else ""))
        context.barrier()

    # every rank takes the best epoch's weights (rank 0 chose them; the file is shared)
    if context.enabled:
        best_weights, best, history = best_so_far(load_training_state(state_path))
    if best_weights is not None:
        vit.load_state_dict(best_weights)
    if config.dora:
        vit = vit.merge_and_unload()
    encoder.vit = vit
    for parameter in encoder.parameters():
        parameter.requires_grad_(False)
    encoder.eval()
    return Stage1Result(int(best["epoch"]), float(best["val_loss"]), float(best["val_accuracy"]),
                        config.epochs1, history, time.perf_counter() - started)
