"""Sharded cohort runs: torchrun with 2 CPU processes (gloo) gives the single-process CSV."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from BrainAgeLib.cohort.batch import run_batch
from BrainAgeLib.cohort.predictions_csv import FILENAME, read_predictions
from BrainAgeLib.parallel import RankContext

from cohort_heads import cohort_folder, write_cohort_csv

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """7 subjects (5 scans + a corrupt file + a missing one) and a tiny checkpoint."""
    files = cohort_folder(tmp_path_factory.mktemp("shard_cohort"))
    heads, bad = files["heads"], files["bad"]
    entries = [(f"s{k}", file, age, sex) for k, (file, age, sex) in enumerate(heads)]
    entries += [("s3", heads[0][0], 80.0, "M"), ("bad", bad["corrupt"], 50.0, "F"),
                ("s4", heads[2][0], 20.0, "unknown"), ("gone", bad["missing"], 60.0, "M")]
    return write_cohort_csv(files["folder"] / "cohort.csv", entries), files["checkpoint"]


def assert_same_predictions(csv_a: Path, csv_b: Path) -> None:
    """Same subjects, order, sexes, ages, errors; predictions equal to 1e-3 years (thread
    counts differ between the runs, so the last bits of the ViT's sums may too)."""
    rows_a, rows_b = read_predictions(csv_a), read_predictions(csv_b)
    assert [r.id for r in rows_a] == [r.id for r in rows_b]
    for a, b in zip(rows_a, rows_b):
        assert (a.path, a.sex, a.chronological_age, a.error, a.model, a.warnings) == \
               (b.path, b.sex, b.chronological_age, b.error, b.model, b.warnings)
        for name in ("predicted_age", "brain_age_gap", "corrected_brain_age_gap"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None) == (y is None)
            if x is not None:
                assert x == pytest.approx(y, abs=1e-3)


def test_each_rank_takes_every_nth_subject():
    subjects = list("abcdefg")
    shards = [RankContext(rank=r, world_size=3).shard_with_indices(subjects) for r in range(3)]
    assert shards == [[(0, "a"), (3, "d"), (6, "g")], [(1, "b"), (4, "e")], [(2, "c"), (5, "f")]]
    assert sorted(i for shard in shards for i, _ in shard) == list(range(7))
    assert [RankContext(rank=r, world_size=3).shard(subjects) for r in range(3)] == \
           [[item for _, item in shard] for shard in shards]


def test_torchrun_two_cpu_processes_equal_one_process(cohort, tmp_path):
    table, checkpoint = cohort
    single = run_batch(table, tmp_path / "single", model=str(checkpoint), device="cpu", workers=0)
    assert (single.n_done, single.n_failed) == (5, 2)

    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "BrainAgeLib", "batch", str(table), "--out", str(tmp_path / "sharded"),
               "--model", str(checkpoint), "--device", "cpu", "--workers", "0", "--no-plots"]
    completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "Done: " in completed.stdout  # rank 0's summary, printed once
    assert completed.stdout.count("Done: ") == 1
    # the whole run's counts, merged over the ranks (issue 20, item 10), not rank 0's own
    assert f"Done: {single.n_done} succeeded, {single.n_failed} failed in" in completed.stdout
    assert not list((tmp_path / "sharded").glob("predictions.part-*"))
    assert_same_predictions(tmp_path / "sharded" / FILENAME, tmp_path / "single" / FILENAME)

    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"Done: 0 succeeded, 0 failed, {len(single.rows)} already finished before" in again.stdout


def test_ranks_by_hand_leave_parts_that_a_plain_run_merges(cohort, tmp_path):
    """Job-array style: ranks without a process group, then one plain run that skips everyone."""
    table, checkpoint = cohort
    out = tmp_path / "array"
    for rank in (1, 0):
        summary = run_batch(table, out, model=str(checkpoint), device="cpu", workers=0, rank=rank, world_size=2)
        assert summary.n_processed == (4 if rank == 0 else 3)
    assert sorted(p.name for p in out.glob("predictions.part-*")) == [
        "predictions.part-0-of-2.csv", "predictions.part-1-of-2.csv"]
    final = run_batch(table, out, model=str(checkpoint), device="cpu", workers=0)
    assert (final.n_skipped, final.n_processed) == (7, 0)
    run_batch(table, tmp_path / "single", model=str(checkpoint), device="cpu", workers=0)
    assert_same_predictions(out / FILENAME, tmp_path / "single" / FILENAME)
    assert not list(out.glob("predictions.part-*"))
