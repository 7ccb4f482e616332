"""Where BrainAge's bundled files live (template, demo model, colour table, icons).

The package is used from a source checkout (`pip install -e .`) and from inside a Slicer
extension; in both, ``Resources/`` sits beside the ``BrainAgeLib`` folder. The environment
variable ``BRAINAGE_RESOURCES`` overrides the location.
"""
from __future__ import annotations

import os
from pathlib import Path


def resources_dir() -> Path:
    """The folder holding BrainAge's bundled resources."""
    override = os.environ.get("BRAINAGE_RESOURCES")
    if override:
        return Path(override)
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "Resources", here / "Resources"):
        if candidate.is_dir():
            return candidate
    return here.parent / "Resources"


def resource_path(*parts: str) -> Path:
    """Path of a bundled resource, e.g. ``resource_path("Templates", "mni152_t1_2mm.nii.gz")``."""
    return resources_dir().joinpath(*parts)


def cache_dir() -> Path:
    """Per-user cache for downloaded models (``BRAINAGE_CACHE`` overrides it)."""
    override = os.environ.get("BRAINAGE_CACHE")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "brainage"
