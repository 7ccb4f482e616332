"""`brainage bench`: every stage timed on one head, against the bare ViT forward in the same run.

The figures are checked against what the test sees from outside (its own clock around the call
and around the wrapped stages, the slices the ViT was given, a clock it moves on by hand), not
by redoing the sums and ratios the benchmark computes.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import BrainAgeLib.cohort.batch as batch_module
import BrainAgeLib.explain.methods as explain_methods
import BrainAgeLib.model as model_package
import BrainAgeLib.preprocess.pipeline as pipeline
from BrainAgeLib.bench import cohort as cohort_bench
from BrainAgeLib.bench import single as bench
from BrainAgeLib.bench.single import BenchResult, run_benchmark
from BrainAgeLib.cli import main
from BrainAgeLib.io import save_volume
from BrainAgeLib.presets import get_preset

#: Seconds a stage is slowed down by, on the clock the benchmark reads, in one of its runs.
SLOWDOWN_S = 1000.0


@pytest.fixture(scope="module")
def small_head(mni_3mm):
    return mni_3mm, "MNI152 at 3 mm"


@pytest.fixture
def observed(monkeypatch):
    """Wraps the model the benchmark builds, prepare and explain_slices: records what the stages
    got and how long prepare took, and can slow down (on the benchmark's clock only) the n-th
    embed call (``slow_embed``; 0 is the warm-up) or the n-th bare-ViT pass (``slow_vit``; 1 is
    the first timed one) by SLOWDOWN_S."""
    seen = SimpleNamespace(model=None, prepared=None, prepare_s=None, bare_vit_inputs=[], embed_calls=0,
                           inside=0, offset=0.0, slow_embed=None, slow_vit=None)
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: time.perf_counter() + seen.offset))

    def inside(function):
        def wrapped(*args, **kwargs):
            seen.inside += 1
            try:
                return function(*args, **kwargs)
            finally:
                seen.inside -= 1
        return wrapped

    build = model_package.build_model

    def build_model(*args, **kwargs):
        model = build(*args, **kwargs)
        seen.model = model
        embed_explain, forward_features = model.embed_explain, model.encoder.vit.forward_features

        def counted_embed(*a, **k):
            out = inside(embed_explain)(*a, **k)
            if seen.embed_calls == seen.slow_embed:
                seen.offset += SLOWDOWN_S
            seen.embed_calls += 1
            return out

        def vit_pass(images):
            if not seen.inside:  # the benchmark's own bare pass, batch by batch
                seen.bare_vit_inputs.append(images.detach().clone())
                per_run = -(-seen.prepared.slices.shape[0] // seen.bare_vit_inputs[0].shape[0])
                run, batch = divmod(len(seen.bare_vit_inputs) - 1, per_run)
                if run + 1 == seen.slow_vit and batch == 0:
                    seen.offset += SLOWDOWN_S
            return forward_features(images)

        model.embed_explain, model.encoder.vit.forward_features = counted_embed, vit_pass
        return model

    prepare = pipeline.prepare

    def timed_prepare(*args, **kwargs):
        tic = time.perf_counter()
        seen.prepared = prepare(*args, **kwargs)
        seen.prepare_s = time.perf_counter() - tic
        return seen.prepared

    monkeypatch.setattr(model_package, "build_model", build_model)
    monkeypatch.setattr(pipeline, "prepare", timed_prepare)
    monkeypatch.setattr(explain_methods, "explain_slices", inside(explain_methods.explain_slices))
    return seen


def bare_vit_passes(seen, n_slices):
    """The benchmark's bare-ViT inputs, one tensor per timed run."""
    images = torch.cat(seen.bare_vit_inputs)
    assert images.shape[0] % n_slices == 0
    return list(images.split(n_slices))


def test_benchmark_times_every_stage_and_the_bare_vit(small_head, observed):
    tic = time.perf_counter()
    result = run_benchmark("tiny", device="cpu", head=small_head, repeats=2)
    wall_s = time.perf_counter() - tic
    preset = get_preset("tiny")
    assert result.preset == "tiny" and result.device == "cpu" and result.head == "MNI152 at 3 mm"
    assert result.input_shape == small_head[0].shape
    assert result.n_slices == preset.n_slices == observed.prepared.slices.shape[0]
    stages = ("load_s", "prepare_s", "embed_s", "regress_s", "explain_s", "vit_forward_s")
    for stage in stages:
        assert getattr(result, stage) > 0, stage
    # every stage ran inside this call, the model stages (and the bare ViT) twice each
    assert result.load_s + result.prepare_s + 2 * (result.embed_s + result.regress_s + result.explain_s
                                                   + result.vit_forward_s) < wall_s
    assert max(getattr(result, stage) for stage in stages if stage != "vit_forward_s") \
        <= result.end_to_end_without_explain_s + result.explain_s
    assert result.end_to_end_without_explain_s < result.end_to_end_s < wall_s
    # prepare's time is the time of the prepare call itself, and its steps are prepare's own
    assert observed.prepare_s <= result.prepare_s < observed.prepare_s + 0.5
    assert result.prepare_steps == {k: float(v) for k, v in observed.prepared.timings.items()}
    assert {"resample_slices", "resize_slices"} <= set(result.prepare_steps)
    # the bare ViT ran on the prepared slices, normalised, in batches of at most batch_size
    passes = bare_vit_passes(observed, result.n_slices)
    assert len(passes) == 2
    assert all(images.shape[0] <= result.batch_size for images in observed.bare_vit_inputs)
    expected = observed.model.encoder.normalize(torch.from_numpy(np.ascontiguousarray(observed.prepared.slices)))
    for images in passes:
        assert torch.equal(images, expected)
    assert result.ratio_end_to_end_over_vit > result.ratio_without_explain_over_vit > 1  # the pipeline contains the ViT pass
    assert result.peak_memory_mb > 50 and result.cuda_peak_memory_mb is None
    assert result.torch_threads == torch.get_num_threads()
    table = result.table()
    assert "end to end / bare ViT" in table and f"{result.n_slices} slices" in table


@pytest.mark.parametrize("repeats", [1, 2])
def test_bench_cli_json_keeps_each_stage_fastest_run(small_head, observed, repeats, monkeypatch, capsys):
    """`brainage bench --repeat N --json`: one JSON object with every field of BenchResult; with
    the first timed embed and the second bare-ViT pass slowed down by SLOWDOWN_S on the
    benchmark's clock, two runs report the other run's time, one run the slowed one."""
    def small(path):
        save_volume(small_head[0], path)
        return small_head[1]

    monkeypatch.setattr(bench, "write_generated_head", small)
    observed.slow_embed, observed.slow_vit = 1, 2  # embed call 0 is the warm-up
    command = ["bench", "--preset", "tiny", "--device", "cpu", "--no-explain", "--json", "--repeat", str(repeats),
               "--no-compare"]
    assert main(command) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {f.name for f in dataclasses.fields(BenchResult)}
    for key in ("load_s", "prepare_s", "embed_s", "regress_s", "vit_forward_s", "peak_memory_mb",
                "ratio_end_to_end_over_vit", "end_to_end_s", "build_model_s"):
        assert isinstance(data[key], float) and data[key] > 0, key
    assert data["explain_s"] is None and data["head"] == "MNI152 at 3 mm"
    assert data["input_shape"] == list(small_head[0].shape) and data["cuda_peak_memory_mb"] is None
    assert all(isinstance(v, float) for v in data["prepare_steps"].values()) and data["prepare_steps"]
    assert len(observed.bare_vit_inputs) > 0 and observed.embed_calls == 1 + repeats
    if repeats == 1:
        assert data["embed_s"] >= SLOWDOWN_S  # the slowdown does reach the figure
        assert data["vit_forward_s"] < SLOWDOWN_S
    else:
        assert data["embed_s"] < SLOWDOWN_S   # run 2's, not the first
        assert data["vit_forward_s"] < SLOWDOWN_S  # run 1's, not the last
        assert data["end_to_end_s"] < SLOWDOWN_S


def test_bench_json_compares_the_authors_loop_and_the_cpu_precisions(small_head, monkeypatch, capsys, tmp_path):
    """`brainage bench --json` (compare is on by default): the authors'-style loop, each CPU
    precision's bare ViT and age difference, the fastest agreeing one and the ratios."""
    from BrainAgeLib.model.precision import AGREEMENT_YEARS, cpu_precision_order

    monkeypatch.setenv("BRAINAGE_CACHE", str(tmp_path))  # precision onnx's graph, where installed
    monkeypatch.setattr(bench, "write_generated_head", lambda path: (save_volume(small_head[0], path), "small")[1])
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--no-explain", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["authors_loop_s"] > 0 and data["load_average_1min"] is not None
    assert list(data["precisions"]) == cpu_precision_order()
    assert data["precisions"]["fp32"]["age_difference_years"] == 0
    fastest = data["fastest_precision"]
    assert data["precisions"][fastest]["age_difference_years"] <= AGREEMENT_YEARS
    assert data["fastest_precision_vit_s"] == min(
        row["vit_s"] for row in data["precisions"].values() if row["age_difference_years"] <= AGREEMENT_YEARS)
    assert data["ratio_authors_loop_over_fastest"] == pytest.approx(data["authors_loop_s"] / data["fastest_precision_vit_s"])
    assert data["end_to_end_fastest_s"] == pytest.approx(
        data["end_to_end_s"] - data["embed_s"] + data["fastest_precision_embed_s"])
    assert data["ratio_authors_loop_over_end_to_end_fastest"] == pytest.approx(
        data["authors_loop_s"] / data["end_to_end_fastest_s"])


def test_cohort_benchmark_times_sequential_batch_and_commands_on_the_same_heads(monkeypatch, capsys):
    """`brainage bench --cohort N --json`: both modes and the command loop, same predictions; the
    times agree with the test's own clock around the commands and the batch run."""
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    commands, batches = [], []

    def timed(function, log):
        def wrapped(*args, **kwargs):
            tic = time.perf_counter()
            out = function(*args, **kwargs)
            log.append((tic, time.perf_counter()))
            return out
        return wrapped

    monkeypatch.setattr(cohort_bench, "run_predict_command", timed(cohort_bench.run_predict_command, commands))
    monkeypatch.setattr(batch_module, "run_batch", timed(batch_module.run_batch, batches))
    tic = time.perf_counter()
    code = main(["bench", "--cohort", "2", "--preset", "tiny", "--workers", "1", "--device", "cpu", "--json"])
    wall_s = time.perf_counter() - tic
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_heads"] == 2 and report["preset"] == "tiny" and report["workers"] == 1
    assert len(commands) == 2 and len(batches) == 1  # one command per head, one batch run
    cli_s = commands[-1][1] - commands[0][0]
    batch_s = batches[0][1] - batches[0][0]
    sequential_at_most_s = batches[0][0] - commands[-1][1]  # the sequential calls ran in between
    assert report["sequential_cli_s"] == pytest.approx(cli_s, abs=0.2)
    assert report["batch_s"] == pytest.approx(batch_s, abs=0.2)
    assert 0 < report["sequential_s"] <= sequential_at_most_s
    assert report["sequential_s"] == pytest.approx(sequential_at_most_s, abs=0.5)
    assert report["sequential_cli_s"] + report["sequential_s"] + report["batch_s"] < wall_s
    assert report["volumes_per_minute_batch"] == pytest.approx(60 * 2 / batch_s, rel=0.05)
    assert report["volumes_per_minute_sequential_cli"] == pytest.approx(60 * 2 / cli_s, rel=0.05)
    assert report["speedup"] == pytest.approx(sequential_at_most_s / batch_s, rel=0.1)
    assert report["speedup_vs_cli"] == pytest.approx(cli_s / batch_s, rel=0.05)
    # the same weights give the same ages in-process, in batch mode and through the command
    assert report["max_difference_years"] < 1e-3
    assert report["cli_max_difference_years"] < 1e-3


def test_cohort_scaling_counts_and_rows():
    assert cohort_bench.scaling_counts(1) == [1]
    assert cohort_bench.scaling_counts(2) == [1, 2]
    assert cohort_bench.scaling_counts(12) == [1, 2, 3, 4, 5, 6, 7, 8, 12]
    assert cohort_bench.scaling_counts(64) == [1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 64]
    fields = {f.name for f in dataclasses.fields(cohort_bench.CohortBenchResult)}
    assert "scaling" in fields
    result = cohort_bench.CohortBenchResult(
        preset="tiny", device="cpu", n_heads=2, head_spacing_mm=1.0, explain=False, workers=2, sequential_s=2.0,
        batch_s=1.0, volumes_per_minute_sequential=60.0, volumes_per_minute_batch=120.0, speedup=2.0,
        max_difference_years=0.0, torch_threads=2, cpu_count=2,
        scaling=[{"workers": 1, "seconds": 1.5, "volumes_per_minute": 80.0, "cores_used": 1.2},
                 {"workers": 2, "seconds": 1.0, "volumes_per_minute": 120.0, "cores_used": 1.9}])
    assert result.to_dict()["scaling"][1]["volumes_per_minute"] == 120.0
    assert "batch,  2 workers" in result.table() and "1.90 cores busy" in result.table()
