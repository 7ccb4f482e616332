"""The prepared-slice cache's key covers all the code and packages that decide the slices."""
from __future__ import annotations

import importlib.metadata

import pytest

from BrainAgeLib.train import slice_cache


def test_the_key_covers_volume_presets_and_deepbets_release(monkeypatch):
    assert {"volume", "presets", "geometry", "preprocess.pipeline", "preprocess.brain_extraction", "train.slice_cache"} <= set(
        slice_cache.PREPROCESSING_MODULES)
    before = slice_cache.preprocessing_code_digest()
    assert slice_cache.preprocessing_code_digest() == before
    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "99.0" if name == "deepbet" else real_version(name))
    assert slice_cache.preprocessing_code_digest() != before


def test_a_missing_module_is_an_error_not_skipped(monkeypatch):
    monkeypatch.setattr(slice_cache, "PREPROCESSING_MODULES", slice_cache.PREPROCESSING_MODULES + ("no_such_module",))
    with pytest.raises(FileNotFoundError):
        slice_cache.preprocessing_code_digest()
