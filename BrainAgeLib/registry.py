"""Models known by name (``REGISTRY``): the bundled demo model, the authors' published BrainRotViT
(built once from their archive by :mod:`BrainAgeLib.model.published`), and any a user registers
(downloaded once from a URL, checked against its SHA-256).

Light on purpose (no torch): the Slicer panel reads it to list the models and whether each is cached
before BrainAge's heavy dependencies are installed. Loading lives in :mod:`BrainAgeLib.model.checkpoint`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Union

from .resources import cache_dir, resource_path

__all__ = ["ModelEntry", "REGISTRY", "RECIPES", "register_model", "available_models", "is_cached"]

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class ModelEntry:
    """A model known by name: bundled with BrainAge, downloaded once from ``url``, or built once
    by a ``recipe`` (``"published"``: the authors' archive, fetched and imported by
    :mod:`BrainAgeLib.model.published`)."""

    name: str
    filename: str
    description: str = ""
    url: Optional[str] = None
    sha256: Optional[str] = None
    bundled: bool = False
    recipe: Optional[str] = None
    source: str = ""
    trained_on: str = ""

    def local_path(self, cache: Optional[PathLike] = None) -> Path:
        """Where the file is (bundled) or will be cached (downloaded or built; ``cache`` overrides
        ``resources.cache_dir()``)."""
        if self.bundled:
            return resource_path("Models", self.filename)
        return (Path(cache).expanduser() if cache else cache_dir()) / self.filename


#: How registered models that are built rather than downloaded are made.
RECIPES = ("published",)

#: Models known by name. The demo model is trained on synthetic phantoms (not for clinical use).
REGISTRY: Dict[str, ModelEntry] = {
    "demo": ModelEntry(
        name="demo",
        filename="brainage_demo.safetensors",
        description="demo preset trained on synthetic phantoms; for demonstration only, not for clinical use",
        bundled=True,
        source="bundled with BrainAge",
        trained_on="synthetic ageing phantoms",
    ),
    "brainrotvit": ModelEntry(
        name="brainrotvit",
        filename="brainrotvit.safetensors",
        description="BrainRotViT as published by its authors (Jalal et al. 2025), fetched from their "
                    "17-volume 7z archive and imported on first use; for research",
        recipe="published",
        source="github.com/wjalal/BrainRotViT@559af43 best_checkpoints/",
        trained_on="11 public cohorts, >130 sites (paper: 4,086 train / 1,022 validation subjects)",
    ),
}


def register_model(entry: ModelEntry) -> None:
    """Add (or replace) a named model; downloaded entries need both ``url`` and ``sha256``."""
    if entry.recipe is not None and entry.recipe not in RECIPES:
        raise ValueError(f"model {entry.name!r}: unknown recipe {entry.recipe!r} (known: {', '.join(RECIPES)})")
    if not entry.bundled and entry.recipe is None and not (entry.url and entry.sha256):
        raise ValueError(f"model {entry.name!r}: a downloaded model needs both url and sha256")
    REGISTRY[entry.name] = entry


def available_models() -> List[ModelEntry]:
    """Registered models, in registration order."""
    return list(REGISTRY.values())


def is_cached(name: str, cache: Optional[PathLike] = None) -> bool:
    """Whether the registered model ``name`` is ready to load without the network (bundled models: present)."""
    return REGISTRY[name].local_path(cache).is_file()

