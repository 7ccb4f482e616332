"""Stage 2: train the residual CNN regressor on cached slice embeddings, keep the best epoch.

Each subject is its [S, D] embedding matrix (from the frozen stage-1 encoder) and its sex
(M = 0, F = 1); the target is chronological age in years. MSE loss, Adam (paper: lr 5e-4); the
epoch with the lowest validation MAE is kept.

The network is trained on standardised ages, z = (age - mean) / sd of the training split, and
the scale is then folded into its last (linear) layer: w <- sd * w, b <- sd * b + mean. The saved
regressor therefore outputs years, exactly as the paper's, but Adam's fixed-size steps do not
have to walk an output bias from 0 up to ~50 years first, which takes thousands of steps at
lr 5e-4 and is most of a small cohort's training budget.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from ..parallel import RankContext
from .config import TrainConfig
from .distributed import wrap_for_training
from .resume import best_so_far, load_training_state, resume_from, save_training_state, seed_epoch


@dataclass
class EmbeddingSet:
    """Subjects of one split as stage 2 sees them."""

    ids: List[str]
    embeddings: torch.Tensor  # [N, S, D] float32
    sex: torch.Tensor         # [N] float32, M = 0, F = 1
    age: torch.Tensor         # [N] float32, years

    def dataset(self) -> TensorDataset:
        return TensorDataset(self.embeddings, self.sex, self.age)


@dataclass
class Stage2Result:
    best_epoch: int
    best_val_mae: float
    epochs: int
    history: List[Dict[str, float]]
    seconds: float


@torch.no_grad()
def predict_ages(
    regressor: nn.Module, data: EmbeddingSet, device: str = "cpu", batch_size: int = 64,
    scale: float = 1.0, shift: float = 0.0,
) -> np.ndarray:
    """Predicted ages (years) of every subject in ``data`` (``scale * output + shift``)."""
    regressor.eval()
    out = []
    for start in range(0, len(data.ids), batch_size):
        emb = data.embeddings[start:start + batch_size].to(device)
        sex = data.sex[start:start + batch_size].to(device)
        out.append(regressor(emb, sex).float().cpu())
    ages = torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)
    return ages * scale + shift


def _output_layer(regressor: nn.Module) -> Optional[nn.Linear]:
    linears = [m for m in regressor.modules() if isinstance(m, nn.Linear) and m.out_features == 1]
    return linears[-1] if linears else None


def train_stage2(
    regressor: nn.Module,
    train: EmbeddingSet,
    val: EmbeddingSet,
    config: TrainConfig,
    stage_dir: Path,
    context: RankContext,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> Stage2Result:
    """Train ``regressor``; on return it holds the weights of the epoch with the best validation MAE."""
    from tqdm import tqdm

    device = context.device
    if config.batch_size2 % context.world_size:
        raise ValueError(f"batch_size2={config.batch_size2} is not divisible by {context.world_size} processes")
    regressor.to(device)
    output = _output_layer(regressor)
    shift, scale = 0.0, 1.0
    if output is not None and output.bias is not None:
        shift = float(train.age.mean())
        scale = float(train.age.std()) if len(train.age) > 1 and float(train.age.std()) > 0 else 1.0
    optimizer = torch.optim.Adam(regressor.parameters(), lr=config.lr2)
    dataset = train.dataset()
    sampler = DistributedSampler(dataset, num_replicas=context.world_size, rank=context.rank, shuffle=True, seed=config.seed)
    loader = DataLoader(dataset, batch_size=config.batch_size2 // context.world_size, sampler=sampler)

    state_path = Path(stage_dir) / "training_state.pt"
    start_epoch, best_weights, best, history = resume_from(
        load_training_state(state_path), {"epoch": -1, "val_mae": float("inf")}, model=regressor, optimizer=optimizer)
    if start_epoch and context.is_main:
        log(f"stage 2: resuming after epoch {start_epoch} of {config.epochs2}")

    model = wrap_for_training(regressor, context, device)
    started = time.perf_counter()
    epochs = tqdm(range(start_epoch, config.epochs2), desc="stage 2", disable=not (progress and context.is_main),
                  initial=start_epoch, total=config.epochs2, mininterval=2.0)
    for epoch in epochs:
        model.train()
        sampler.set_epoch(epoch)
        seed_epoch(config.seed, 2, epoch, context.rank)
        loss_sum, batches = 0.0, 0
        for emb, sex, age in loader:
            target = (age.to(device) - shift) / scale
            loss = nn.functional.mse_loss(model(emb.to(device), sex.to(device)), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item()
            batches += 1
        record = {"epoch": epoch, "train_mse": loss_sum / max(batches, 1) * scale ** 2}
        if context.is_main:
            predicted = predict_ages(regressor, val, device, scale=scale, shift=shift)
            record["val_mae"] = float(np.mean(np.abs(predicted - val.age.numpy())))
            if record["val_mae"] < best["val_mae"]:
                best = {"epoch": epoch, "val_mae": record["val_mae"]}
                best_weights = {k: v.detach().cpu().clone() for k, v in regressor.state_dict().items()}
            history.append(record)
            epochs.set_postfix(train_mse=f"{record['train_mse']:.2f}", val_mae=f"{record['val_mae']:.2f}",
                               best=f"{best['val_mae']:.2f}@{best['epoch'] + 1}")
            save_training_state(state_path, {
                "model": regressor.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                "best": best, "history": history, "best_model": best_weights,
            })
        context.barrier()
    if context.enabled:   # every rank takes the best epoch's weights (rank 0 chose them; the file is shared)
        best_weights, best, history = best_so_far(load_training_state(state_path))
    if best_weights is not None:
        regressor.load_state_dict(best_weights)
    if output is not None and output.bias is not None:
        with torch.no_grad():  # fold the age standardisation into the last layer: outputs are years
            output.weight.mul_(scale)
            output.bias.mul_(scale).add_(shift)
    regressor.eval()
    if context.is_main:
        log(f"stage 2: best epoch {int(best['epoch']) + 1}/{config.epochs2}, validation MAE {best['val_mae']:.2f} years")
    return Stage2Result(int(best["epoch"]), float(best["val_mae"]), config.epochs2, history, time.perf_counter() - started)
