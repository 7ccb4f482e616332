"""Shared pytest fixtures: real anatomy that ships inside installed packages, made offline.

- ``mni_t1_path``: the MNI152 2009a T1 at 1 mm from nilearn's wheel (brain only, 197x233x189).
- ``colin27_path``: Colin27 ``ch2.nii.gz`` from Debian's mricron-data (whole head); tests that
  need it are skipped where the package is not installed.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# Keep torch on the two cores CI has, and never reach for the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

COLIN27 = Path("/usr/share/mricron/templates/ch2.nii.gz")
COLIN27_BRAIN = Path("/usr/share/mricron/templates/ch2better.nii.gz")


def nilearn_data_file(name: str) -> Path:
    import nilearn  # in the [test] extra; its wheel ships the MNI152 2009a files

    return Path(nilearn.__file__).parent / "datasets" / "data" / name


@pytest.fixture(scope="session")
def mni_t1_path() -> Path:
    return nilearn_data_file("mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")


@pytest.fixture(scope="session")
def mni_gm_path() -> Path:
    return nilearn_data_file("mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")


@pytest.fixture(scope="session")
def mni_wm_path() -> Path:
    return nilearn_data_file("mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")


@pytest.fixture(scope="session")
def colin27_path() -> Path:
    if not COLIN27.exists():
        pytest.skip("Colin27 (Debian package mricron-data) is not installed")
    return COLIN27


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
