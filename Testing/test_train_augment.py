"""Stage-1 extras: slice augmentation and soft age-bin targets (BrainAgeLib.train.augment)."""
import math

import numpy as np
import pytest
import torch

from BrainAgeLib.presets import PRESETS
from BrainAgeLib.train.augment import augment_slices, soft_class_targets

EDGES = PRESETS["demo"].age_bin_edges   # 0, 10, ..., 100: 10 bins


def _phantom_slices(n=4, size=48):
    y, x = np.mgrid[:size, :size]
    disc = ((x - size / 2) ** 2 + (y - size / 2) ** 2 < (size / 3) ** 2).astype(np.float32)
    bar = ((abs(x - size / 2) < 3) & (y < size * 0.8)).astype(np.float32)
    return torch.from_numpy(np.stack([0.6 * disc + 0.4 * bar] * n))


def test_augment_keeps_shape_and_range_and_moves_the_content():
    slices = _phantom_slices()
    out = augment_slices(slices, torch.Generator().manual_seed(0))
    assert out.shape == slices.shape and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    # every slice changed, differently, yet stays mostly the same picture
    diffs = (out - slices).abs().mean(dim=(1, 2))
    assert bool((diffs > 1e-3).all())
    assert len(set(np.round(diffs.numpy(), 6))) == len(diffs)
    for a, b in zip(out, slices):
        assert np.corrcoef(a.flatten(), b.flatten())[0, 1] > 0.6


def test_augment_is_reproducible_with_a_seeded_generator():
    slices = _phantom_slices()
    a = augment_slices(slices, torch.Generator().manual_seed(3))
    b = augment_slices(slices, torch.Generator().manual_seed(3))
    c = augment_slices(slices, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_augment_refuses_a_wrong_shape():
    with pytest.raises(ValueError, match=r"\[B, H, W\]"):
        augment_slices(torch.zeros(2, 1, 8, 8))


def test_soft_targets_are_distributions_on_the_subjects_sex():
    labels = torch.tensor([0 * 10 + 2, 1 * 10 + 7])          # M 20-29, F 70-79
    ages = torch.tensor([25.0, 71.0])
    t = soft_class_targets(labels, ages, EDGES, sigma_years=5.0)
    assert t.shape == (2, 20)
    assert torch.allclose(t.sum(1), torch.ones(2), atol=1e-6)
    assert float(t[0, 10:].sum()) == 0.0 and float(t[1, :10].sum()) == 0.0
    assert int(t[0].argmax()) == 2 and int(t[1].argmax()) == 17
    # 25 sits in the middle of its bin: symmetric neighbours; 71 leans towards 60-69
    assert math.isclose(float(t[0, 1]), float(t[0, 3]), rel_tol=1e-5)
    assert float(t[1, 16]) > float(t[1, 18])
    # hand-computed: P(20 < N(25, 5) < 30) = erf(1 / sqrt 2) = 0.6827
    assert float(t[0, 2]) == pytest.approx(0.682689, abs=1e-5)


def test_soft_targets_approach_one_hot_for_a_small_sigma_and_keep_the_tails():
    labels = torch.tensor([3, 19])
    ages = torch.tensor([35.0, 99.0])
    t = soft_class_targets(labels, ages, EDGES, sigma_years=0.01)
    assert float(t[0, 3]) == pytest.approx(1.0) and float(t[1, 19]) == pytest.approx(1.0)
    old = soft_class_targets(torch.tensor([9]), torch.tensor([104.0]), EDGES, sigma_years=5.0)
    assert float(old.sum()) == pytest.approx(1.0) and int(old.argmax()) == 9
    with pytest.raises(ValueError):
        soft_class_targets(labels, ages, EDGES, sigma_years=0.0)


def _toy_volumes(root, ages):
    from BrainAgeLib.model import class_index
    from BrainAgeLib.train.slice_cache import atomic_save_npy
    from BrainAgeLib.train.stage1 import LabelledVolume

    rng = np.random.default_rng(0)
    config = PRESETS["tiny"]
    volumes = []
    for i, age in enumerate(ages):
        slices = np.clip(rng.random((16, 32, 32)) * 0.5 + age / 200, 0, 1).astype(np.float16)
        path = root / f"s{i}.npy"
        atomic_save_npy(path, slices)
        sex = "F" if i % 2 else "M"
        volumes.append(LabelledVolume(str(i), path, class_index(age, sex, config), age))
    return volumes


def _train(tmp_path, name, volumes, **changes):
    from BrainAgeLib.model import build_model
    from BrainAgeLib.train.config import TrainConfig
    from BrainAgeLib.train.distributed import init_distributed
    from BrainAgeLib.train.stage1 import SliceClassificationDataset, train_stage1, training_slice_indices

    torch.manual_seed(0)
    indices = training_slice_indices(16, 8)
    config = TrainConfig(preset="tiny", seed=1, epochs1=2, batch_size1=8, lr1=1e-3, **changes)
    model = build_model("tiny", seed=0)
    result = train_stage1(model.encoder, SliceClassificationDataset(volumes[:6], indices),
                          SliceClassificationDataset(volumes[6:], indices), config, tmp_path / name,
                          init_distributed("cpu"), log=lambda m: None, progress=False)
    return result, torch.cat([p.flatten() for p in model.encoder.parameters()])


def test_stage1_trains_with_augmentation_and_soft_targets(tmp_path):
    volumes = _toy_volumes(tmp_path, [22.0, 35.0, 48.0, 61.0, 74.0, 87.0, 30.0, 70.0])
    plain, plain_weights = _train(tmp_path, "plain", volumes)
    extras, extra_weights = _train(tmp_path, "extras", volumes, augment1=True, label_sigma1=5.0)
    again, again_weights = _train(tmp_path, "again", volumes, augment1=True, label_sigma1=5.0)
    assert len(extras.history) == 2 and np.isfinite(extras.best_val_loss)
    assert not torch.equal(plain_weights, extra_weights)       # the options change training
    assert torch.equal(extra_weights, again_weights)           # and it stays reproducible


def test_soft_targets_need_every_age(tmp_path):
    from BrainAgeLib.train.stage1 import LabelledVolume

    volumes = _toy_volumes(tmp_path, [22.0, 35.0, 48.0, 61.0, 74.0, 87.0, 30.0, 70.0])
    volumes[0] = LabelledVolume(volumes[0].subject_id, volumes[0].slices_path, volumes[0].label)
    with pytest.raises(ValueError, match="age"):
        _train(tmp_path, "noage", volumes, label_sigma1=5.0)
