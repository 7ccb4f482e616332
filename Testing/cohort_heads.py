"""Small test cohorts for the batch tests: phantom heads, bad inputs, a tiny checkpoint.

Heads are 3 mm phantoms (64 x 75 x 64 voxels, a few seconds each) from ``synth.make_phantom``;
the tiny preset (no N4, no skull stripping, 16 slices of 32 px) keeps inference well under a
second per head, so a cohort can list the same files under many ids to make a longer run.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import nibabel as nib
import numpy as np

HEAD_AGES = ((34.0, "F"), (52.0, "M"), (71.0, "F"))


def write_heads(folder: Path, spacing: float = 3.0) -> List[Tuple[Path, float, str]]:
    """Phantom heads (path, age in years, sex), one per entry of :data:`HEAD_AGES`."""
    from BrainAgeLib.io import save_volume
    from BrainAgeLib.synth.phantoms import make_phantom

    folder.mkdir(parents=True, exist_ok=True)
    heads = []
    for seed, (age, sex) in enumerate(HEAD_AGES):
        phantom = make_phantom(age, sex, seed=seed, spacing=spacing, skull=seed % 2 == 0, with_tissue=False)
        heads.append((save_volume(phantom.volume, folder / f"head{seed}.nii.gz"), age, sex))
    return heads


def write_bad_inputs(folder: Path, a_good_file: Path) -> Dict[str, Path]:
    """A truncated .nii.gz, a 2D image and a path that does not exist."""
    folder.mkdir(parents=True, exist_ok=True)
    corrupt = folder / "corrupt.nii.gz"
    data = a_good_file.read_bytes()
    corrupt.write_bytes(data[: len(data) // 2])
    flat = folder / "flat2d.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((64, 64)).astype(np.float32), np.eye(4)), flat)
    return {"corrupt": corrupt, "flat2d": flat, "missing": folder / "no_such_scan.nii.gz"}


def write_cohort_csv(path: Path, entries: Sequence[Tuple[str, Path, object, str]]) -> Path:
    """A cohort CSV with columns id, path, age, sex (age may be None)."""
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["id", "path", "age", "sex"])
        for subject_id, file, age, sex in entries:
            writer.writerow([subject_id, str(file), "" if age is None else age, sex])
    return path


def cohort_folder(folder: Path) -> Dict[str, object]:
    """Everything a cohort test needs in ``folder``: ``heads`` (write_heads), ``bad``
    (write_bad_inputs) and ``checkpoint`` (tiny_checkpoint)."""
    heads = write_heads(folder / "heads")
    bad = write_bad_inputs(folder / "bad", heads[0][0])
    return {"folder": folder, "heads": heads, "bad": bad, "checkpoint": tiny_checkpoint(folder / "model")}


def tiny_checkpoint(folder: Path) -> Path:
    """A tiny-preset model with seeded random weights, saved as a BrainAge checkpoint."""
    from BrainAgeLib.model import build_model
    from BrainAgeLib.model.checkpoint import save_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    model = build_model("tiny", seed=0)
    return save_checkpoint(model, folder / "tiny.safetensors", {"name": "tiny-test", "trained": True,
                                                    "intended_use": "tests"})

