"""Embed every subject's slices with the frozen stage-1 encoder and cache them (float16).

A subject's S slices become an [S, D] matrix (the stage-2 pseudo-image). The cache key holds a
hash of the encoder's weights, so embeddings from an older encoder are never reused.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..digests import weights_digest
from .slice_cache import CacheEntry, SliceCache, atomic_save_npy


def encoder_key(encoder: nn.Module) -> str:
    """The embeddings' cache key: ``digests.weights_digest`` of the encoder's weights (the
    SHA-256 over names, shapes, dtypes and bytes a checkpoint card records)."""
    return weights_digest(encoder.state_dict())


@torch.no_grad()
def embed_slices(encoder: nn.Module, slices: np.ndarray, device: str = "cpu", batch_size: int = 64) -> np.ndarray:
    """Embeddings [S, D] (float32) of slices [S, H, W] in [0, 1]."""
    encoder.eval()
    out = []
    for start in range(0, len(slices), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(slices[start:start + batch_size], dtype=np.float32))
        out.append(encoder.embed(batch.to(device)).float().cpu())
    return torch.cat(out).numpy()


def embed_cohort(
    encoder: nn.Module,
    cache: SliceCache,
    entries: Sequence[CacheEntry],
    device: str = "cpu",
    batch_size: int = 64,
    on_subject: Optional[Callable[[], None]] = None,
) -> List[CacheEntry]:
    """Embed and cache every entry not cached yet for this encoder; returns the entries it embedded."""
    key = encoder_key(encoder)
    done = []
    for entry in entries:
        target = cache.embedding_path(entry, key)
        if not target.exists():
            embeddings = embed_slices(encoder, cache.load_slices(entry), device, batch_size)
            atomic_save_npy(target, embeddings.astype(np.float16))
            done.append(entry)
        if on_subject:
            on_subject()
    return done
