"""Training state on disk, so an interrupted run resumes from its last finished epoch or stage.

A run folder holds ``run.json`` (the config, the split and which stages are finished) and per
stage a ``training_state.pt``: model and optimizer state dicts plus counters, written with
``torch.save`` after every epoch (atomically) and read back with ``torch.load(weights_only=True)``,
which refuses anything but tensors and plain containers -- no unpickling of arbitrary objects.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from ..atomic_files import atomic_path
from .slice_cache import atomic_write_text


def save_training_state(path: "str | os.PathLike", state: Dict[str, Any]) -> None:
    """torch.save ``state`` (tensors, numbers, strings, lists, dicts) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".pt") as temporary:
        torch.save(state, temporary)


def load_training_state(path: "str | os.PathLike") -> Optional[Dict[str, Any]]:
    """The saved state, or None when there is none yet (loaded with weights_only=True)."""
    path = Path(path)
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


class RunState:
    """``run.json`` of a run folder: which stages are finished, plus free-form facts about them."""

    def __init__(self, run_dir: "str | os.PathLike"):
        self.path = Path(run_dir) / "run.json"
        self.data: Dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.data.setdefault("stages", {})

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data, indent=2, sort_keys=True))

    def is_done(self, stage: str) -> bool:
        return bool(self.data["stages"].get(stage, {}).get("done"))

    def mark_done(self, stage: str, **facts: Any) -> None:
        self.data["stages"][stage] = {"done": True, **facts}
        self.save()

    def reset(self, *stages: str) -> None:
        for stage in stages:
            self.data["stages"].pop(stage, None)
        self.save()

    def facts(self, stage: str) -> Dict[str, Any]:
        return dict(self.data["stages"].get(stage, {}))
