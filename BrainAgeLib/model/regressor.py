"""Stage 2 of BrainRotViT: a residual CNN that reads the stack of slice embeddings and predicts age.

The S slice embeddings of one scan (each D-dimensional) form a one-channel S x D pseudo-image
(paper: 160 x 768). Three blocks, each ``Conv2d`` (stride 1, no padding) -> SiLU ->
``MaxPool2d(2, stride=1)``, plus a residual branch (1x1 conv to match channels, nearest resize
to match size, added). Paper channels 1 -> 8 -> 4 -> 1 with kernels (10, 60), (5, 15), (2, 6)
leave a 143 x 687 map, flattened to 98,241 features. The head: FC 512 -> LayerNorm -> SiLU ->
Dropout -> FC 128 -> LayerNorm -> SiLU -> Dropout -> concatenate sex (M = 0, F = 1) -> FC -> age
in years. ``head="pooled"`` presets average-pool the map to ``pooled_size`` before flattening.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..presets import ModelConfig


class ResidualConvBlock(nn.Module):
    """Conv (valid) -> SiLU -> MaxPool(2, stride 1), plus a 1x1-conv residual resized (nearest) to match."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Tuple[int, int]):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=tuple(kernel_size), stride=1, padding=0)
        self.activation = nn.SiLU()
        self.pool = nn.MaxPool2d(kernel_size=2, stride=1)
        self.projection = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(self.activation(self.conv(x)))
        residual = F.interpolate(self.projection(x), size=y.shape[-2:], mode="nearest")
        return y + residual


class RegressionHead(nn.Module):
    """Flattened features -> two FC/LayerNorm/SiLU/Dropout layers -> [features, sex] -> age (years)."""

    def __init__(self, in_features: int, hidden_sizes: Tuple[int, int], dropout: float):
        super().__init__()
        if len(hidden_sizes) != 2:
            raise ValueError(f"the regression head has exactly two hidden layers, got hidden_sizes={hidden_sizes}")
        first, second = hidden_sizes
        self.fc1 = nn.Linear(in_features, first)
        self.norm1 = nn.LayerNorm(first)
        self.fc2 = nn.Linear(first, second)
        self.norm2 = nn.LayerNorm(second)
        self.out = nn.Linear(second + 1, 1)
        self.activation = nn.SiLU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, features: torch.Tensor, sex: torch.Tensor) -> torch.Tensor:
        h = self.dropout(self.activation(self.norm1(self.fc1(features))))
        h = self.dropout(self.activation(self.norm2(self.fc2(h))))
        h = torch.cat([h, sex.to(h.dtype).reshape(-1, 1)], dim=1)
        return self.out(h).squeeze(1)


def feature_map_size(config: ModelConfig) -> Tuple[int, int]:
    """Height x width of the last block's output for an S x D input (before any pooling)."""
    height, width = config.n_slices, config.embed_dim
    for kernel_h, kernel_w in config.cnn_kernels:
        height, width = height - kernel_h + 1 - 1, width - kernel_w + 1 - 1  # valid conv, then pool(2, stride 1)
    if height < 1 or width < 1:
        raise ValueError(
            f"preset {config.name!r}: kernels {config.cnn_kernels} do not fit a "
            f"{config.n_slices} x {config.embed_dim} embedding map"
        )
    return height, width


def flattened_features(config: ModelConfig) -> int:
    """Number of features the head's first FC layer reads (paper: 143 x 687 = 98,241)."""
    if config.head == "pooled":
        if config.pooled_size is None:
            raise ValueError(f"preset {config.name!r}: head='pooled' needs pooled_size")
        height, width = config.pooled_size
    elif config.head == "flatten":
        height, width = feature_map_size(config)
    else:
        raise ValueError(f"preset {config.name!r}: unknown head {config.head!r} (use 'flatten' or 'pooled')")
    return config.cnn_channels[-1] * height * width


class ResidualCNNRegressor(nn.Module):
    """Embeddings [B, S, D] and sex [B] (M = 0, F = 1) -> predicted age [B] in years."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        channels = (1, *config.cnn_channels)
        if len(config.cnn_kernels) != len(config.cnn_channels):
            raise ValueError(f"preset {config.name!r}: one kernel per CNN block is needed")
        self.blocks = nn.ModuleList(
            ResidualConvBlock(channels[i], channels[i + 1], kernel)
            for i, kernel in enumerate(config.cnn_kernels)
        )
        feature_map_size(config)  # validates that the kernels fit
        self.pool = nn.AdaptiveAvgPool2d(tuple(config.pooled_size)) if config.head == "pooled" else nn.Identity()
        self.head = RegressionHead(flattened_features(config), tuple(config.hidden_sizes), config.dropout)

    def features(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The flattened convolutional features [B, F] the head reads."""
        if embeddings.ndim != 3:
            raise ValueError(f"expected embeddings [B, S, D], got shape {tuple(embeddings.shape)}")
        x = embeddings.unsqueeze(1)
        for block in self.blocks:
            x = block(x)
        return torch.flatten(self.pool(x), start_dim=1)

    def forward(self, embeddings: torch.Tensor, sex: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(embeddings), sex)
