"""The attention labelmap: equal-count quantile levels inside the brain, and its colour table."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from BrainAgeLib import Volume
from BrainAgeLib.explain.labelmap import (
    DEFAULT_LEVELS,
    attention_colors,
    attention_labelmap,
    color_table_text,
    read_color_table,
    write_color_table,
)
from BrainAgeLib.errors import BrainAgeError
from BrainAgeLib.result import Result

REPO = Path(__file__).resolve().parents[1]
BUNDLED_COLOR_TABLE = REPO / "Resources" / "ColorTables" / "BrainAgeAttention.ctbl"


def ellipsoid_attention(shape=(40, 48, 36), seed=0):
    """A smooth, continuous attention map on an ellipsoid 'brain' (0 outside), and the mask."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    brain = (grid ** 2).sum(axis=0) < 0.8
    # Two gaussian hot spots plus a little noise: ties are (almost) impossible.
    hot = np.exp(-((grid - np.array([0.3, 0.2, 0.0])[:, None, None, None]) ** 2).sum(0) / 0.05)
    warm = 0.5 * np.exp(-((grid + np.array([0.4, 0.1, 0.2])[:, None, None, None]) ** 2).sum(0) / 0.1)
    field = hot + warm + 0.02 * rng.random(shape)
    field = (field - field[brain].min()) / (field[brain].max() - field[brain].min())
    attention = np.where(brain, np.clip(field, 1e-6, 1.0), 0.0).astype(np.float32)
    affine = np.array([[-2.0, 0, 0, 40], [0, 2.0, 0, -50], [0, 0, 2.5, -30], [0, 0, 0, 1]])
    return Volume(attention, affine), brain


def test_levels_hold_equal_voxel_counts_and_background_is_zero():
    attention, brain = ellipsoid_attention()
    labelmap = attention_labelmap(attention, levels=10)

    labels = labelmap.volume.array
    assert labels.dtype == np.uint8 and labels.shape == attention.shape
    np.testing.assert_array_equal(labelmap.volume.affine, attention.affine)
    assert np.all(labels[~brain] == 0)
    assert np.all(labels[brain] >= 1)

    counts = np.bincount(labels[brain], minlength=11)[1:]
    expected = brain.sum() / 10
    assert counts.sum() == brain.sum()
    assert np.all(np.abs(counts - expected) <= 0.01 * expected), counts

    # Levels are ordered by attention: every voxel of level i attends less than any of level i+1.
    values = attention.array
    for level in range(1, 10):
        assert values[labels == level].max() <= values[labels == level + 1].min()
    assert labelmap.levels == 10 and len(labelmap.thresholds) == 11
    assert labelmap.thresholds[0] == pytest.approx(values[brain].min())
    assert labelmap.thresholds[-1] == pytest.approx(values[brain].max())


def test_the_top_level_holds_the_peak_attention():
    attention, _ = ellipsoid_attention(seed=3)
    labels = attention_labelmap(attention, levels=5).volume.array
    peak = np.unravel_index(np.argmax(attention.array), attention.shape)
    assert labels[peak] == 5


def test_a_result_is_accepted_and_must_hold_an_attention_map():
    attention, _ = ellipsoid_attention()
    result = Result(predicted_age=70.0, attention=attention)
    from_result = attention_labelmap(result, levels=4)
    np.testing.assert_array_equal(from_result.volume.array, attention_labelmap(attention, levels=4).volume.array)

    with pytest.raises(BrainAgeError, match="explain=True"):
        attention_labelmap(Result(predicted_age=70.0), levels=4)


def test_an_explicit_brain_mask_counts_zero_attention_voxels_inside_the_brain():
    attention, brain = ellipsoid_attention()
    values = attention.array.copy()
    values[brain & (values < np.quantile(values[brain], 0.3))] = 0.0  # 30% of the brain at zero
    labels = attention_labelmap(attention.with_array(values), levels=10, brain_mask=brain).volume.array
    assert np.all(labels[brain] >= 1) and np.all(labels[~brain] == 0)
    # Ties at zero share one level, the top of the deciles they span (0-30%): level 3.
    np.testing.assert_array_equal(np.unique(labels[brain & (values == 0)]), [3])
    assert np.bincount(labels[brain]).sum() == brain.sum()


def test_bad_requests_fail_clearly():
    attention, brain = ellipsoid_attention(shape=(20, 20, 20))
    with pytest.raises(ValueError, match="levels"):
        attention_labelmap(attention, levels=0)
    with pytest.raises(ValueError, match="levels"):
        attention_labelmap(attention, levels=300)
    with pytest.raises(ValueError, match="brain_mask"):
        attention_labelmap(attention, brain_mask=brain[:10])
    with pytest.raises(BrainAgeError, match="empty"):
        attention_labelmap(attention.with_array(np.zeros(attention.shape, np.float32)))


def test_colors_follow_a_perceptual_ramp_from_dim_to_bright():
    colors = attention_colors(10)
    assert colors[0] == (0, "Background", (0, 0, 0, 0))
    assert [label for label, _, _ in colors] == list(range(11))
    rgba = np.array([c for _, _, c in colors[1:]], dtype=float)
    luminance = rgba[:, :3] @ np.array([0.2126, 0.7152, 0.0722])
    assert np.all(np.diff(luminance) > 0), luminance       # brighter with attention
    assert np.all(np.diff(rgba[:, 3]) > 0) and rgba[-1, 3] == 255  # more opaque with attention
    assert luminance[0] > 20                                # the lowest level is visible on black
    assert colors[10][1] == "Attention_90-100pct" and colors[1][1] == "Attention_0-10pct"
    assert attention_colors(3)[1][1] == "Attention_0-33p3333pct"


def test_color_table_file_is_slicer_format_and_reads_back(tmp_path):
    colors = attention_colors(6)
    path = write_color_table(colors, tmp_path / "attention.ctbl")

    lines = path.read_text().splitlines()
    assert lines[0] == "# Color table file attention.ctbl"
    assert lines[1] == "# 7 values"
    for line in lines[2:]:
        label, name, *rgba = line.split(" ")
        assert int(label) >= 0 and " " not in name and len(rgba) == 4
        assert all(0 <= int(c) <= 255 for c in rgba)
    assert read_color_table(path) == colors
    assert [p.name for p in tmp_path.iterdir()] == ["attention.ctbl"]  # no temporary file left


def test_names_with_spaces_become_one_token(tmp_path):
    text = color_table_text([(0, "Background", (0, 0, 0, 0)), (1, "high  attention", (255, 0, 0, 255))])
    assert "1 high_attention 255 0 0 255" in text.splitlines()
    with pytest.raises(ValueError, match="0-255"):
        color_table_text([(1, "bad", (300, 0, 0, 255))])
    broken = tmp_path / "broken.ctbl"
    broken.write_text("# Color table file\n1 only_a_name 1 2\n")
    with pytest.raises(BrainAgeError, match="line 2"):
        read_color_table(broken)


def test_bundled_color_table_matches_the_default_levels():
    # Regenerate with: python scripts/make_color_table.py
    assert read_color_table(BUNDLED_COLOR_TABLE) == attention_colors(DEFAULT_LEVELS)


def test_without_matplotlib_the_default_table_comes_from_the_bundled_file(monkeypatch):
    """Inside Slicer matplotlib is not installed: the labelmap's colours are the shipped .ctbl."""
    import sys

    with_matplotlib = attention_colors(DEFAULT_LEVELS)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ModuleNotFoundError
    assert attention_colors(DEFAULT_LEVELS) == with_matplotlib
    with pytest.raises(BrainAgeError, match="needs matplotlib"):
        attention_colors(DEFAULT_LEVELS + 2)
