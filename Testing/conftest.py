"""Shared pytest fixtures: real anatomy that ships inside installed packages, made offline.

- ``mni_t1_path``: the MNI152 2009a T1 at 1 mm from nilearn's wheel (brain only, 197x233x189);
  read once per session as ``mni_t1``, and at 2 mm (``mni_2mm``, resampled) and 3 mm
  (``mni_3mm``, every third voxel).
- ``colin27_path``: Colin27 ``ch2.nii.gz`` from Debian's mricron-data (whole head), read once
  as ``colin27``; its extracted brain ``ch2better`` (``colin27_brain_path``; on Colin27's grid:
  ``colin27_brain_mask``) and skull-stripped ``ch2bet`` (``colin27_bet_path``). Tests that need
  them are skipped where the package is not installed.

The volumes are shared by every test of the session, so their arrays are read-only.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# Keep torch on the two cores CI has, and never reach for the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Checkpoints written by training and the authors' import skip the CPU precision record
# (minutes of measuring); the tests of the record ask for it explicitly.
os.environ.setdefault("BRAINAGE_PRECISION_RECORD", "0")

COLIN27 = Path("/usr/share/mricron/templates/ch2.nii.gz")
COLIN27_BRAIN = COLIN27.parent / "ch2better.nii.gz"
COLIN27_BET = COLIN27.parent / "ch2bet.nii.gz"


def nilearn_data_file(name: str) -> Path:
    import nilearn  # in the [test] extra; its wheel ships the MNI152 2009a files

    return Path(nilearn.__file__).parent / "datasets" / "data" / name


@pytest.fixture(scope="session")
def mni_t1_path() -> Path:
    return nilearn_data_file("mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")


def read_only(volume):
    """``volume`` with its array made read-only: a session fixture no test may change."""
    volume.array.setflags(write=False)
    return volume


@pytest.fixture(scope="session")
def mni_t1(mni_t1_path):
    from BrainAgeLib.io import load_volume

    return read_only(load_volume(mni_t1_path))


@pytest.fixture(scope="session")
def mni_2mm(mni_t1):
    from BrainAgeLib.preprocess.registration import resample_to_spacing

    return read_only(resample_to_spacing(mni_t1, 2.0))


@pytest.fixture(scope="session")
def mni_3mm(mni_t1):
    """Every third voxel of the 1 mm T1 (66x78x63), the affine scaled to match."""
    from BrainAgeLib.volume import Volume

    affine = mni_t1.affine.copy()
    affine[:3, :3] *= 3
    return read_only(Volume(mni_t1.array[::3, ::3, ::3], affine))


def mricron_file(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"Colin27's {path.name} (Debian package mricron-data) is not installed")
    return path


@pytest.fixture(scope="session")
def colin27_path() -> Path:
    return mricron_file(COLIN27)


@pytest.fixture(scope="session")
def colin27_brain_path() -> Path:
    """ch2better: Colin27's extracted brain (brain tissue only, 0.5 mm)."""
    return mricron_file(COLIN27_BRAIN)


@pytest.fixture(scope="session")
def colin27_bet_path() -> Path:
    """ch2bet: Colin27 skull-stripped (0 outside the brain), 1 mm."""
    return mricron_file(COLIN27_BET)


@pytest.fixture(scope="session")
def colin27(colin27_path):
    """Colin27 at 1 mm (181x217x181, RAS)."""
    from BrainAgeLib.io import load_volume

    return read_only(load_volume(colin27_path))


@pytest.fixture(scope="session")
def colin27_brain_mask(colin27, colin27_brain_path) -> np.ndarray:
    """ch2better's brain on Colin27's 1 mm grid: bool, where its trilinear resampling is > 0.5."""
    from scipy import ndimage

    from BrainAgeLib.io import load_volume

    brain = load_volume(colin27_brain_path)
    voxel_map = np.linalg.inv(brain.affine) @ colin27.affine
    fraction = ndimage.affine_transform((brain.array > 0).astype(np.float32), voxel_map[:3, :3],
                                        offset=voxel_map[:3, 3], output_shape=colin27.shape, order=1)
    mask = fraction > 0.5
    mask.setflags(write=False)
    return mask


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


REAL_T1 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-t1"


@pytest.fixture(scope="session")
def real_heads() -> list:
    """The 8 real IXI T1 heads of ../shared/data/real-t1 as dicts (id, path, age, sex): for
    checking preprocessing on real anatomy, never for training or tuning."""
    import csv

    table = REAL_T1 / "participants.csv"
    if not table.exists():
        pytest.skip(f"the real heads are not here ({REAL_T1} is missing: ../shared beside the checkout)")
    with open(table, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [{"id": r["id"], "path": REAL_T1 / r["path"], "age": float(r["age"]), "sex": r["sex"]} for r in rows]
