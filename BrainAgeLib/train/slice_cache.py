"""On-disk cache of what each training stage consumes, so every stage can be rerun alone.

- ``slices/``: each subject's prepared sagittal slices [S, H, W] (float16, values in [0, 1]),
  keyed by the input file (resolved path, size, modification time), the preprocessing config
  and the source code of the preprocessing modules (so a changed pipeline never mixes with
  slices prepared by an older one). Preparing a volume (N4, skull stripping, cropping, resampling) is the slowest step of
  training on a CPU; a rerun with the same inputs and preset skips it.
- ``features/``: per subject, the tissue-volume features of the ridge baseline (json).
- ``embeddings/<encoder key>/``: each subject's slice embeddings [S, D] (float16), keyed by the
  slices' key and a hash of the frozen encoder's weights, so retraining stage 1 invalidates them.

Every file is written to a temporary name in its folder and moved into place (``os.replace``),
so an interrupted run never leaves a half-written entry that a rerun would trust.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from ..atomic_files import atomic_path, write_text_atomic
from ..presets import ModelConfig


def _digest(*parts: object) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()


def file_signature(path: "str | os.PathLike") -> Dict[str, object]:
    """What identifies an input file's content cheaply: resolved path, size and mtime (ns)."""
    p = Path(path).resolve()
    stat = p.stat()
    return {"path": str(p), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


#: Modules (dotted, under BrainAgeLib) whose code decides what ``prepare`` outputs, and this one
#: (it derives the cached features); their source is part of the cache key.
PREPROCESSING_MODULES = ("io", "volume", "presets", "geometry", "preprocess.pipeline", "preprocess.template_strip",
                         "preprocess.brain_extraction", "preprocess.qc", "preprocess.registration",
                         "preprocess.template", "train.slice_cache")
#: Packages whose release decides it too (deepbet's networks ship inside its wheel).
PREPROCESSING_PACKAGES = ("deepbet",)


def preprocessing_code_digest() -> str:
    """SHA-1 of the source of :data:`PREPROCESSING_MODULES` and the versions of
    :data:`PREPROCESSING_PACKAGES` (a module missing from the installation is an error: a key
    without it would reuse slices made by other code)."""
    import importlib.metadata

    package = Path(__file__).resolve().parent.parent
    digest = hashlib.sha1()
    for name in PREPROCESSING_MODULES:
        digest.update(name.encode())
        digest.update(package.joinpath(*name.split(".")).with_suffix(".py").read_bytes())
    for name in PREPROCESSING_PACKAGES:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = "not installed"
        digest.update(f"{name}=={version}".encode())
    return digest.hexdigest()


def _safe_name(subject_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(subject_id))[:80]


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """np.save to a temporary file beside ``path``, then move it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".npy") as temporary, open(temporary, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)


@dataclass(frozen=True)
class CacheEntry:
    """Where one subject's cached slices and features live."""

    subject_id: str
    source: str
    key: str
    slices_path: Path
    features_path: Path

    def done(self) -> bool:
        return self.slices_path.exists() and self.features_path.exists()


class SliceCache:
    """Prepared slices, tissue features and embeddings of a cohort, under one folder."""

    def __init__(self, root: "str | os.PathLike", config: ModelConfig):
        self.root = Path(root)
        self.config = config
        self.code_digest = preprocessing_code_digest()

    # ------------------------------------------------------------------ slices
    def entry(self, subject_id: str, path: "str | os.PathLike") -> CacheEntry:
        key = _digest(file_signature(path), self.config.preprocess.to_dict(), self.code_digest)[:20]
        stem = f"{_safe_name(subject_id)}_{key}"
        return CacheEntry(
            str(subject_id), str(path), key,
            self.root / "slices" / f"{stem}.npy",
            self.root / "features" / f"{stem}.json",
        )

    def prepare_all(
        self,
        subjects: Sequence[tuple],
        workers: int = 1,
        progress: Optional[Callable[[int, int], None]] = None,
    ) -> List[CacheEntry]:
        """Prepare every (subject_id, path) whose slices are not cached yet; return all entries.

        Volumes are prepared in a pool of ``workers`` processes (each single-threaded), so
        ``workers`` is the number of CPU cores used.
        """
        entries = [self.entry(sid, path) for sid, path in subjects]
        todo = [e for e in entries if not e.done()]
        if progress:
            progress(len(entries) - len(todo), len(entries))
        if not todo:
            return entries
        config_dict = self.config.to_dict()
        if workers <= 1:
            for count, entry in enumerate(todo, 1):
                prepare_entry(entry, config_dict)
                if progress:
                    progress(len(entries) - len(todo) + count, len(entries))
            return entries
        from ..parallel import worker_pool

        with worker_pool(workers, threads=1) as pool:
            futures = [pool.submit(prepare_entry, entry, config_dict) for entry in todo]
            for count, future in enumerate(as_completed(futures), 1):
                future.result()
                if progress:
                    progress(len(entries) - len(todo) + count, len(entries))
        return entries

    @staticmethod
    def load_slices(entry: CacheEntry) -> np.ndarray:
        """Cached slices [S, H, W] as float32 in [0, 1]."""
        return np.load(entry.slices_path, allow_pickle=False).astype(np.float32)

    @staticmethod
    def load_features(entry: CacheEntry) -> Dict[str, float]:
        return json.loads(entry.features_path.read_text())

    # ------------------------------------------------------------------ embeddings
    def embedding_path(self, entry: CacheEntry, encoder_key: str) -> Path:
        return self.root / "embeddings" / encoder_key[:16] / entry.slices_path.name

    def load_embeddings(self, entry: CacheEntry, encoder_key: str) -> np.ndarray:
        """Cached embeddings [S, D] (float16 on disk)."""
        return np.load(self.embedding_path(entry, encoder_key), allow_pickle=False)


def prepare_entry(entry: CacheEntry, config_dict: Dict[str, object]) -> None:
    """Load one volume, prepare it with the preset's preprocessing, and cache slices + features."""
    from ..io import load_volume
    from ..preprocess.pipeline import prepare
    from .baselines import tissue_features

    config = ModelConfig.from_dict(config_dict)
    volume = load_volume(entry.source)
    prepared = prepare(volume, config)
    slices = np.asarray(prepared.slices, dtype=np.float32)
    expected = (config.n_slices, config.image_size, config.image_size)
    if slices.shape != expected:
        raise ValueError(f"{entry.source}: prepare gave slices {slices.shape}, preset expects {expected}")
    features = tissue_features(slices, brain_volume_ml=prepared_brain_volume_ml(prepared, volume))
    atomic_write_text(entry.features_path, json.dumps(features))
    atomic_save_npy(entry.slices_path, slices.astype(np.float16))


def prepared_brain_volume_ml(prepared, volume) -> Optional[float]:
    """Volume (mL) of the Prepared brain mask, which lies in model space [S, H, W].

    A model-space voxel's volume is that of the model grid's affine (``Prepared.affine``): the
    slice axis is zoomed by (S - 1) / (n - 1), as the slices are, the rows and columns by
    size / n.
    """
    from ..geometry import voxel_volume_mm3

    mask = getattr(prepared, "brain_mask", None)
    affine = getattr(prepared, "affine", None)
    if mask is None or affine is None:
        return None
    return float(np.count_nonzero(mask)) * voxel_volume_mm3(affine) / 1000.0
