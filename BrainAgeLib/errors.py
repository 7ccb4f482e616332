"""Exceptions BrainAge raises for problems a user can fix.

Every error names the file (when there is one) and what is wrong with it, so the CLI can
print one line and the Slicer module can show it in a dialog, never a library traceback.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union


class BrainAgeError(Exception):
    """Base class of every error BrainAge raises on purpose."""


class InvalidVolumeError(BrainAgeError, ValueError):
    """An input image cannot be used: unreadable, wrong dimensionality, bad geometry, empty..."""

    def __init__(self, problem: str, path: Optional[Union[str, Path]] = None):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class CheckpointError(BrainAgeError, ValueError):
    """A model file is missing, truncated, tampered with, foreign or unsafe to load."""

    def __init__(self, problem: str, path: Optional[Union[str, Path]] = None):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class ModelDownloadError(CheckpointError):
    """A registered model could not be fetched or built: offline, a damaged or tampered download,
    an archive that cannot be extracted, or a cache folder that cannot be written."""


class CohortError(BrainAgeError, ValueError):
    """A cohort table (CSV/TSV/BIDS) is missing columns or holds unusable rows."""


def message_naming(error: BaseException, path: Union[str, Path]) -> str:
    """``str(error)``, prefixed with ``path`` unless the message names that file already."""
    message = str(error)
    return message if str(path) in message else f"{path}: {message}"
