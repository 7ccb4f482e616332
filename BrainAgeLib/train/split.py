"""Subject-level train / validation / test split, reproducible from a seed.

Rows are grouped by subject id before splitting, so a subject with several scans (sessions,
sites) lands wholly in one split: no subject is ever in two. Ages are stratified: subjects are
sorted by age and the held-out ones are taken at evenly spaced positions of that list (random
offset), then dealt at random to validation and test, so every split covers the whole age range.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SubjectSplit:
    """Subject ids of each split (ids, not rows: every row of a subject follows its id)."""

    train: Tuple[str, ...]
    val: Tuple[str, ...]
    test: Tuple[str, ...]
    seed: int

    def of(self, subject_id: str) -> str:
        """The split a subject id belongs to."""
        for name in SPLITS:
            if subject_id in getattr(self, name):
                return name
        raise KeyError(subject_id)

    def to_dict(self) -> Dict[str, object]:
        return {"seed": self.seed, **{name: list(getattr(self, name)) for name in SPLITS}}

    @classmethod
    def from_dict(cls, data: Dict[str, object]) -> "SubjectSplit":
        return cls(*(tuple(str(i) for i in data[name]) for name in SPLITS), seed=int(data["seed"]))


def split_subjects(
    subject_ids: Sequence[str],
    ages: Sequence[float],
    seed: int,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
) -> SubjectSplit:
    """Split subjects (not rows) into train/val/test, stratified by age (years).

    ``subject_ids`` and ``ages`` are per row; repeated ids are one subject (its mean age is used
    for stratification). With at least three subjects, each split gets at least one.
    """
    if len(subject_ids) != len(ages):
        raise ValueError("subject_ids and ages differ in length")
    by_subject: "OrderedDict[str, List[float]]" = OrderedDict()
    for sid, age in zip(subject_ids, ages):
        by_subject.setdefault(str(sid), []).append(float(age))
    ids = list(by_subject)
    n = len(ids)
    if n < 3:
        raise ValueError(f"need at least 3 subjects to split into train/val/test, got {n}")
    rng = np.random.default_rng(seed)
    mean_age = np.array([np.mean(by_subject[i]) for i in ids])
    # sort by age with random tie-breaking
    order = np.lexsort((rng.random(n), mean_age))
    n_val = max(1, int(round(val_fraction * n))) if val_fraction > 0 else 0
    n_test = max(1, int(round(test_fraction * n))) if test_fraction > 0 else 0
    n_train = n - n_val - n_test
    if n_train < 1:
        raise ValueError(f"{n} subjects leave none to train on with these fractions")
    # systematic sampling over the age-sorted list: evenly spread positions for val and test
    positions = np.arange(n)
    held = rng.permutation(positions)[: n_val + n_test]  # fallback when n is tiny
    if n >= 2 * (n_val + n_test):
        step = n / (n_val + n_test)
        offset = rng.random() * step
        held = np.unique(np.floor(offset + step * np.arange(n_val + n_test)).astype(int))
    held = rng.permutation(held)
    val_pos, test_pos = held[:n_val], held[n_val:n_val + n_test]
    assign = np.zeros(n, dtype=int)
    assign[val_pos] = 1
    assign[test_pos] = 2
    groups = [[], [], []]
    for pos, row in enumerate(order):
        groups[assign[pos]].append(ids[row])
    return SubjectSplit(*(tuple(sorted(g)) for g in groups), seed=seed)
