"""Stage-1 training aids beyond the paper's recipe, both off by default (``TrainConfig``).

- ``augment_slices``: a random small in-plane rotation, scaling and shift of each training
  slice (what a slightly different head position or registration would give) and a random gamma
  of its intensities (a different scanner contrast). A ViT trained from random weights on a few
  hundred subjects memorises them within a dozen epochs; these keep it learning for longer.
- ``soft_class_targets``: instead of one-hot age-bin x sex classes, the age part is a Gaussian
  around the subject's exact age integrated over the bins (label-distribution learning, Gao et
  al., 2017, "Deep label distribution learning with label ambiguity"), so a 29-year-old and a
  21-year-old no longer get the same target and the encoder learns age order within and across
  decades. The classes stay the paper's (sex-major: ``sex * n_age_bins + bin``).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

#: Augmentation ranges: rotation (degrees), scaling (fraction), shift (fraction of the slice), gamma (log).
MAX_ROTATION_DEG = 8.0
MAX_SCALE = 0.08
MAX_SHIFT = 0.06
MAX_LOG_GAMMA = 0.3


def augment_slices(slices: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Randomly rotated, scaled, shifted and gamma-adjusted copies of slices [B, H, W] in [0, 1]."""
    if slices.ndim != 3:
        raise ValueError(f"expected slices [B, H, W], got shape {tuple(slices.shape)}")
    n = slices.shape[0]

    def uniform(limit: float) -> torch.Tensor:
        return (torch.rand(n, generator=generator) * 2 - 1) * limit

    angle, scale = uniform(math.radians(MAX_ROTATION_DEG)), 1 + uniform(MAX_SCALE)
    shift_x, shift_y = uniform(MAX_SHIFT), uniform(MAX_SHIFT)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift_x], 1), torch.stack([sin, cos, shift_y], 1)], 1)
    x = slices.float()[:, None]
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    moved = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]
    gamma = torch.exp(uniform(MAX_LOG_GAMMA)).to(moved)[:, None, None]
    return moved.clamp(0, 1) ** gamma


def soft_class_targets(labels: torch.Tensor, ages: torch.Tensor, age_bin_edges: Sequence[float],
                       sigma_years: float) -> torch.Tensor:
    """Class probabilities [B, 2 * n_bins]: the label's sex, age bins weighted by N(age, sigma).

    ``labels`` are the hard classes (``sex * n_bins + bin``; only their sex is used);
    ``ages`` the exact ages. The outer bins take the tails, so every row sums to 1.
    """
    if sigma_years <= 0:
        raise ValueError(f"sigma_years must be positive, got {sigma_years}")
    edges = torch.as_tensor(age_bin_edges, dtype=torch.float64)
    n_bins = len(edges) - 1
    z = (edges[None, :] - ages.double()[:, None]) / sigma_years
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    cdf[:, 0], cdf[:, -1] = 0.0, 1.0
    age_part = (cdf[:, 1:] - cdf[:, :-1]).float()
    sex = torch.div(labels, n_bins, rounding_mode="floor")
    targets = torch.zeros(len(labels), 2, n_bins)             # [B, sex, bin]: class = sex * n_bins + bin
    targets[torch.arange(len(labels)), sex] = age_part
    return targets.reshape(len(labels), 2 * n_bins)
