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
from typing import Any, Dict, List, Optional, Tuple

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


def best_so_far(state: Dict[str, Any]) -> Tuple[Optional[Dict[str, torch.Tensor]], Dict[str, Any], List[Dict[str, Any]]]:
    """(the best epoch's weights, its record, the history of every epoch) in a saved training state."""
    return state.get("best_model"), dict(state["best"]), list(state["history"])


def resume_from(state: Optional[Dict[str, Any]], fresh_best: Dict[str, Any], **into: Any
                ) -> Tuple[int, Optional[Dict[str, torch.Tensor]], Dict[str, Any], List[Dict[str, Any]]]:
    """Where a stage starts: (first epoch, best weights, best record, history) of a saved state,
    after loading each of its entries named in ``into`` (``model=``, ``optimizer=``,
    ``scheduler=``) into that object; (0, None, ``fresh_best``, []) when there is no state."""
    if state is None:
        return 0, None, dict(fresh_best), []
    for key, target in into.items():
        target.load_state_dict(state[key])
    return (int(state["epoch"]) + 1, *best_so_far(state))


def seed_epoch(seed: int, stage: int, epoch: int, rank: int = 0) -> None:
    """Seed torch's global generator (dropout draws from it) from the run's seed, the stage,
    the epoch and the rank, so that an epoch draws the same numbers whether the run went
    through without a stop or resumed before it."""
    torch.manual_seed(((int(seed) * 1_000_003 + int(stage) * 10_007 + int(epoch)) * 131 + int(rank)) % (2 ** 63))


#: TrainConfig fields that change what each stage learns (execution fields such as device,
#: workers or threads do not). Stage 1 also depends on the split, so on the seed and fractions.
STAGE_SETTINGS = {
    "1": ("preset", "seed", "val_fraction", "test_fraction", "epochs1", "batch_size1", "lr1", "weight_decay1",
          "warmup_steps1", "schedule1", "augment1", "label_sigma1", "dora", "dora_r", "dora_alpha",
          "dora_dropout", "init_encoder"),
    "2": ("seed", "epochs2", "batch_size2", "lr2"),
}


def stage_settings(config: Any, stage: str, cohort_digest: str) -> Dict[str, Any]:
    """What stage ``stage`` ("1" or "2") of a run trains with: its TrainConfig fields and a
    digest of the cohort (scans, ages, sexes), as plain JSON values."""
    settings = {name: getattr(config, name) for name in STAGE_SETTINGS[stage]}
    settings["cohort"] = cohort_digest
    return json.loads(json.dumps(settings))


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
        settings = self.data["stages"].get(stage, {}).get("settings")
        self.data["stages"][stage] = {"done": True, **({"settings": settings} if settings else {}), **facts}
        self.save()

    def start(self, stage: str, settings: Dict[str, Any]) -> None:
        """Record that ``stage`` is being trained with ``settings`` (kept when it is marked done)."""
        self.data["stages"][stage] = {"done": False, "settings": settings}
        self.save()

    def settings(self, stage: str) -> Optional[Dict[str, Any]]:
        """The settings ``stage`` was (or is being) trained with; None if never recorded."""
        return self.data["stages"].get(stage, {}).get("settings")

    def reset(self, *stages: str) -> None:
        for stage in stages:
            self.data["stages"].pop(stage, None)
        self.save()

    def facts(self, stage: str) -> Dict[str, Any]:
        return dict(self.data["stages"].get(stage, {}))
