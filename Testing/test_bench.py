"""`brainage bench`: every stage timed on one head, against the bare ViT forward in the same run."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from BrainAgeLib.bench import single as bench
from BrainAgeLib.bench.single import run_benchmark
from BrainAgeLib.cli import main
from BrainAgeLib.io import save_volume
from BrainAgeLib.volume import Volume


@pytest.fixture(scope="module")
def small_head(mni_t1_path):
    image = nib.load(mni_t1_path)
    affine = image.affine.copy()
    affine[:3, :3] *= 3
    return Volume(np.asarray(image.dataobj, dtype=np.float32)[::3, ::3, ::3], affine), "MNI152 at 3 mm"


def test_benchmark_times_every_stage_and_the_bare_vit(small_head):
    result = run_benchmark("tiny", device="cpu", head=small_head, repeats=2)
    assert result.preset == "tiny" and result.device == "cpu" and result.head == "MNI152 at 3 mm"
    assert result.input_shape == (66, 78, 63) and result.n_slices == 16 and result.batch_size == 16
    for stage in ("load_s", "prepare_s", "embed_s", "regress_s", "explain_s", "vit_forward_s"):
        assert 0 < getattr(result, stage) < 60, stage
    assert result.end_to_end_s == pytest.approx(
        result.load_s + result.prepare_s + result.embed_s + result.regress_s + result.explain_s)
    assert result.end_to_end_without_explain_s == pytest.approx(result.end_to_end_s - result.explain_s)
    assert result.ratio_end_to_end_over_vit == pytest.approx(result.end_to_end_s / result.vit_forward_s)
    assert result.ratio_end_to_end_over_vit > 1  # the pipeline contains the ViT pass
    assert result.peak_memory_mb > 50 and result.cuda_peak_memory_mb is None
    assert {"resample_slices", "resize_slices"} <= set(result.prepare_steps)
    assert "end to end / bare ViT" in result.table()


def test_bench_cli_prints_one_json_object(small_head, monkeypatch, capsys):
    def small(path):
        save_volume(small_head[0], path)
        return small_head[1]

    monkeypatch.setattr(bench, "write_generated_head", small)
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--no-explain", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    for key in ("load_s", "prepare_s", "embed_s", "regress_s", "vit_forward_s", "peak_memory_mb",
                "ratio_end_to_end_over_vit", "end_to_end_s"):
        assert isinstance(data[key], float) and data[key] > 0, key
    assert data["explain_s"] is None and data["head"] == "MNI152 at 3 mm"


def test_cohort_benchmark_times_sequential_batch_and_commands_on_the_same_heads(monkeypatch, capsys):
    """`brainage bench --cohort N --json`: both modes and the command loop, same predictions."""
    monkeypatch.setenv("PYTHONPATH", str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    code = main(["bench", "--cohort", "2", "--preset", "tiny", "--workers", "1", "--device", "cpu", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_heads"] == 2 and report["preset"] == "tiny" and report["workers"] == 1
    for key in ("volumes_per_minute_sequential", "volumes_per_minute_batch", "volumes_per_minute_sequential_cli"):
        assert report[key] > 0
    assert report["speedup"] == pytest.approx(report["volumes_per_minute_batch"] / report["volumes_per_minute_sequential"])
    assert report["speedup_vs_cli"] == pytest.approx(report["sequential_cli_s"] / report["batch_s"])
    # the same weights give the same ages in-process, in batch mode and through the command
    assert report["max_difference_years"] < 1e-3
    assert report["cli_max_difference_years"] < 1e-3
