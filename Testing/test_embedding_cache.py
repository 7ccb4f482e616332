"""Asking again about the same scan reuses its slices and ViT outputs (embedding cache)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import BrainAgeLib.preprocess.pipeline as preprocess
from BrainAgeLib.digests import weights_digest
from BrainAgeLib.embedding_cache import EmbeddingCache, default_cache, volume_checksum
from BrainAgeLib.inference import predict
from BrainAgeLib.model import build_model
from BrainAgeLib.volume import Volume


@pytest.fixture(scope="module")
def head() -> Volume:
    from BrainAgeLib.synth.phantoms import make_phantom

    return make_phantom(63.0, "F", seed=5, spacing=3.0, skull=False, with_tissue=False).volume


@pytest.fixture
def counted(monkeypatch):
    """A tiny model whose ViT passes and prepare calls are counted."""
    model = build_model("tiny", seed=0).eval()
    counts = {"vit_images": 0, "prepare": 0}
    model.encoder.vit.patch_embed.register_forward_hook(
        lambda module, inputs, output: counts.__setitem__("vit_images", counts["vit_images"] + inputs[0].shape[0]))
    real_prepare = preprocess.prepare

    def prepare(*args, **kwargs):
        counts["prepare"] += 1
        return real_prepare(*args, **kwargs)

    monkeypatch.setattr(preprocess, "prepare", prepare)
    default_cache().clear()
    yield model, counts
    default_cache().clear()


def test_explanation_after_a_prediction_reuses_slices_and_embeddings(head, counted):
    model, counts = counted
    first = predict(model, head, "F", age=60.0, device="cpu")
    assert counts == {"vit_images": 16, "prepare": 1}  # one ViT pass over the 16 slices
    assert first.attention is None

    again = predict(model, head, "F", age=60.0, explain=True, device="cpu")
    assert counts == {"vit_images": 16, "prepare": 1}  # nothing recomputed
    assert again.timings["cache_hit"] == 1.0 and "prepare" not in again.timings
    assert again.predicted_age == first.predicted_age

    fresh = predict(model, head, "F", age=60.0, explain=True, device="cpu", use_cache=False)
    assert counts == {"vit_images": 32, "prepare": 2}
    assert again.predicted_age == pytest.approx(fresh.predicted_age, abs=1e-5)
    np.testing.assert_allclose(again.attention.array, fresh.attention.array, atol=1e-5)
    assert again.attention.shape == head.shape

    other_sex = predict(model, head, "M", device="cpu")  # only the regressor runs again
    assert counts["vit_images"] == 32 and other_sex.predicted_age != first.predicted_age


def test_another_scan_or_changed_weights_miss(head, counted):
    model, counts = counted
    predict(model, head, "F", device="cpu")
    shifted = Volume(head.array + 1.0, head.affine)
    predict(model, shifted, "F", device="cpu")
    assert counts["prepare"] == 2
    predict(model, Volume(head.array.copy(), head.affine.copy()), "F", device="cpu")  # same scan, a copy
    assert counts["prepare"] == 2
    with torch.no_grad():
        next(model.encoder.parameters()).mul_(1.01)  # e.g. a training step
    predict(model, head, "F", device="cpu")
    assert counts["prepare"] == 3


def test_checksum_covers_voxels_and_geometry(head):
    base = volume_checksum(head)
    assert volume_checksum(Volume(head.array.copy(), head.affine.copy())) == base
    changed = head.array.copy()
    changed[10, 10, 10] += 1.0
    assert volume_checksum(Volume(changed, head.affine)) != base
    shifted = head.affine.copy()
    shifted[0, 3] += 0.5
    assert volume_checksum(Volume(head.array, shifted)) != base


def test_cheap_weights_digest_sees_in_place_updates_and_other_models():
    model = build_model("tiny", seed=0)
    before = weights_digest(model, cheap=True)
    assert weights_digest(model, cheap=True) == before
    with torch.no_grad():
        next(model.parameters()).add_(0.0)  # even a no-op write may have changed the weights
    assert weights_digest(model, cheap=True) != before
    twin = build_model("tiny", seed=0)  # same values, another object: never shares entries
    assert weights_digest(twin, cheap=True) != weights_digest(model, cheap=True)
    with pytest.raises(TypeError):
        weights_digest(model.state_dict(), cheap=True)  # the cheap mode needs the module itself


def test_least_recently_used_entries_leave_first():
    class Prepared:
        slices = np.zeros((16, 32, 32), np.float32)  # 64 KiB
        brain_mask = np.zeros((16, 32, 32), bool)    # 16 KiB

    encoded = (torch.zeros(16, 32), torch.zeros(16, 16, 32), torch.zeros(16, 16))  # 2 KiB + 32 KiB + 1 KiB
    entry_bytes = 16 * 32 * 32 * 5 + 4 * (16 * 32 + 16 * 16 * 32 + 16 * 16)
    cache = EmbeddingCache(capacity_bytes=2 * entry_bytes + 10)
    for key in "abc":
        cache.put(key, Prepared(), encoded)
        if key == "b":
            assert cache.get("a") is not None  # "a" used last: "b" is now the oldest
    assert len(cache) == 2 and cache.get("b") is None and cache.get("a") is not None
    assert EmbeddingCache(capacity_bytes=0).enabled is False
