"""Regenerate one split (validation or test) of the bundled demo model's phantom cohort as a cohort
table: the phantoms the demo was validated or tested on, never trained on.

    python scripts/demo_split_phantoms.py val build/demo_calibration/val [--n 96]

The demo cohort is ``brainage synth --n 640 --seed 2026 --spacing 1.5 2.0 --skull-fraction 0.5``,
split by subject with seed 0 (``scripts/train_demo_model.sh``); the split is recomputed here from
the same seeds (the test ids are checked against ``Resources/Models/brainage_demo_heldout.json``).
``--n`` takes an evenly spaced subset, sorted by age. Writes ``OUT/cohort.csv`` and the images
beside it; rerunning resumes. ``scripts/demo_calibration.py`` and ``scripts/interval_coverage.py``
run the model on these tables.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path
from typing import List

import numpy as np

from BrainAgeLib.atomic_files import write_text_atomic
from BrainAgeLib.synth.phantoms import COHORT_COLUMNS, PhantomSpec, cohort_specs, write_phantom
from BrainAgeLib.train.split import split_subjects

HELDOUT = Path(__file__).resolve().parents[1] / "Resources" / "Models" / "brainage_demo_heldout.json"
N_PHANTOMS, COHORT_SEED, SPLIT_SEED = 640, 2026, 0


def split_specs(split: str, n: int = 0) -> List[PhantomSpec]:
    """The demo cohort's members in ``split`` ("train", "val" or "test"), sorted by age; ``n`` > 0
    keeps that many, evenly spaced over the ages."""
    specs = cohort_specs(N_PHANTOMS, COHORT_SEED, spacing=(1.5, 2.0), skull_fraction=0.5)
    split_ids = split_subjects([s.id for s in specs], [s.age for s in specs], SPLIT_SEED)
    heldout = {row["id"] for row in json.loads(HELDOUT.read_text())}
    if set(split_ids.test) != heldout:
        raise SystemExit("the recomputed test split differs from brainage_demo_heldout.json")
    chosen = sorted((s for s in specs if s.id in set(getattr(split_ids, split))), key=lambda s: (s.age, s.id))
    if 0 < n < len(chosen):
        chosen = [chosen[i] for i in np.linspace(0, len(chosen) - 1, n).round().astype(int)]
    return chosen


def write_split(split: str, out_dir: Path, n: int = 0) -> Path:
    """Write the split's phantoms and ``out_dir/cohort.csv``; returns the table's path."""
    rows = [write_phantom(spec, out_dir) for spec in split_specs(split, n)]
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=COHORT_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path = out_dir / "cohort.csv"
    write_text_atomic(path, table.getvalue())
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("split", choices=("val", "test"))
    parser.add_argument("out", type=Path)
    parser.add_argument("--n", type=int, default=0, help="evenly spaced subset (0: the whole split, 96)")
    args = parser.parse_args()
    print(write_split(args.split, args.out, args.n))


if __name__ == "__main__":
    main()
