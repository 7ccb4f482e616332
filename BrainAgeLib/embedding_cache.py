"""Cache of a volume's preprocessing and ViT outputs, keyed by the input's checksum.

Asking again about the same scan (the explanation after a plain prediction, another sex or
chronological age, the Slicer module's "Estimate" pressed twice) should not rerun N4, skull
stripping and 160 ViT passes. ``inference.predict`` looks the input up here first: the key
is a BLAKE2b checksum of the voxel array and affine, plus what changes the outputs (the
model's weights, by their cheap in-memory fingerprint ``digests.weights_digest(model,
cheap=True)``, its preprocessing config, the device type and the precision). On a miss it
prepares the volume and runs the ViT once in its explanation mode (embeddings, patch tokens
and last-layer CLS attention, which cost the same pass), and stores all of it; a later call
with ``explain=True`` then only runs the regressor's guided backprop and the map fusion. The
"relevance" explanation needs gradients through the ViT, which the stored no-grad outputs do
not carry: it reads only their embeddings (for the CNN's gradient) and runs its own gradient
pass, whose outputs are never stored, so a cached entry is the same whichever method asked.

The cache lives in memory, least recently used first out, bounded in bytes (default 1 GiB;
``BRAINAGE_EMBEDDING_CACHE_MB`` sets it, 0 turns caching off). Tensors are kept on the CPU.
Batch runs (every input different) do not use it.
"""
from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import numpy as np
import torch

from .digests import weights_digest

#: Default capacity in MiB (``BRAINAGE_EMBEDDING_CACHE_MB`` overrides it).
DEFAULT_CAPACITY_MB = 1024


def volume_checksum(volume: Any) -> str:
    """BLAKE2b checksum of a Volume's voxels (as float32), shape and affine (hex)."""
    array = np.ascontiguousarray(volume.array, dtype=np.float32)
    digest = hashlib.blake2b(digest_size=20)
    digest.update(repr(array.shape).encode())
    digest.update(np.ascontiguousarray(volume.affine, dtype=np.float64).tobytes())
    digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


@dataclass
class CachedEncoding:
    """One volume's Prepared and its ViT outputs (CPU, float32)."""

    prepared: Any                       # preprocess.Prepared
    embeddings: torch.Tensor            # [S, D]
    patch_tokens: torch.Tensor          # [S, N, D]
    cls_attention: torch.Tensor         # [S, N]

    @property
    def encoded(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.embeddings, self.patch_tokens, self.cls_attention

    @property
    def nbytes(self) -> int:
        tensors = sum(t.numel() * t.element_size() for t in (self.embeddings, self.patch_tokens, self.cls_attention))
        arrays = sum(int(getattr(self.prepared, name).nbytes) for name in ("slices", "brain_mask")
                     if getattr(self.prepared, name, None) is not None)
        return tensors + arrays


class EmbeddingCache:
    """Least-recently-used cache of :class:`CachedEncoding`, at most ``capacity_bytes`` in all."""

    def __init__(self, capacity_bytes: int = DEFAULT_CAPACITY_MB * 2**20):
        self.capacity_bytes = int(capacity_bytes)
        self._entries: "OrderedDict[str, CachedEncoding]" = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.capacity_bytes > 0

    @staticmethod
    def key(volume: Any, model: Any, device: torch.device, precision: str) -> str:
        """Cache key of ``volume`` for ``model`` on ``device`` at ``precision``."""
        preprocess = getattr(model.config, "preprocess", None)
        config = repr(sorted(preprocess.to_dict().items())) if preprocess is not None else ""
        parts = (volume_checksum(volume), weights_digest(model, cheap=True), model.config.name, config,
                 torch.device(device).type, str(precision))
        return hashlib.blake2b("|".join(parts).encode(), digest_size=20).hexdigest()

    def get(self, key: str) -> Optional[CachedEncoding]:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: str, prepared: Any, encoded: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        """Store (CPU copies of) ``encoded`` = (embeddings, patch_tokens, cls_attention)."""
        if not self.enabled:
            return
        entry = CachedEncoding(prepared, *(t.detach().to("cpu", torch.float32) for t in encoded))
        size = entry.nbytes
        if size > self.capacity_bytes:
            return
        with self._lock:
            self._entries.pop(key, None)
            self._entries[key] = entry
            while sum(e.nbytes for e in self._entries.values()) > self.capacity_bytes:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


_DEFAULT: Optional[EmbeddingCache] = None


def default_cache() -> EmbeddingCache:
    """The process-wide cache ``inference.predict`` uses."""
    global _DEFAULT
    if _DEFAULT is None:
        megabytes = os.environ.get("BRAINAGE_EMBEDDING_CACHE_MB", "")
        try:
            capacity = float(megabytes) if megabytes.strip() else DEFAULT_CAPACITY_MB
        except ValueError:
            capacity = DEFAULT_CAPACITY_MB
        _DEFAULT = EmbeddingCache(int(max(0.0, capacity) * 2**20))
    return _DEFAULT
