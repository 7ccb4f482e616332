"""Training: the split, both stages on real (tiny, low-resolution) phantoms, resume, and DDP.

Phantoms are made at 4 mm without skull and trained with the ``tiny`` preset (32 px slices,
a 2-layer ViT), so the whole file runs in well under two minutes on two cores.
"""
from __future__ import annotations

import csv
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from BrainAgeLib.train import TrainConfig
from BrainAgeLib.train.split import split_subjects

N_PHANTOMS = 10


# ---------------------------------------------------------------------------- split
def test_split_keeps_every_subject_in_exactly_one_split():
    ids = [f"sub-{i:03d}" for i in range(60) for _ in range(2)]  # two sessions per subject
    ages = [20 + (i // 2) for i in range(120)]
    split = split_subjects(ids, ages, seed=7, val_fraction=0.2, test_fraction=0.2)
    train, val, test = set(split.train), set(split.val), set(split.test)
    assert not (train & val) and not (train & test) and not (val & test)
    assert train | val | test == set(ids)
    assert (len(train), len(val), len(test)) == (36, 12, 12)
    # age-stratified: the held-out splits span the age range, not one end of it
    held_ages = sorted(20 + int(s.split("-")[1]) for s in val | test)
    assert held_ages[0] < 30 and held_ages[-1] > 70
    # reproducible from the seed, different for another seed
    assert split_subjects(ids, ages, seed=7, val_fraction=0.2, test_fraction=0.2) == split
    assert split_subjects(ids, ages, seed=8, val_fraction=0.2, test_fraction=0.2).test != split.test
    assert split.of("sub-005") in ("train", "val", "test")


def test_split_refuses_too_few_subjects():
    with pytest.raises(ValueError, match="at least 3 subjects"):
        split_subjects(["a", "a", "b"], [30, 30, 40], seed=0)


# ---------------------------------------------------------------------------- tiny end-to-end run
@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory) -> Path:
    from BrainAgeLib.synth.phantoms import make_cohort

    out = tmp_path_factory.mktemp("phantoms")
    return make_cohort(N_PHANTOMS, out, seed=11, spacing=4.0, skull_fraction=0.0, progress=False)


def _config(**changes) -> TrainConfig:
    values = dict(preset="tiny", seed=3, epochs1=2, epochs2=4, batch_size1=8, batch_size2=4,
                  val_fraction=0.2, test_fraction=0.2, lr1=1e-3)
    values.update(changes)
    return TrainConfig(**values)


class _Interrupt(Exception):
    pass


def _interrupt_after(marker: str, messages: list):
    def log(message: str) -> None:
        messages.append(message)
        if marker in message:
            raise _Interrupt(message)
    return log


def test_tiny_preset_trains_both_stages_resumes_and_loads(tiny_cohort, tmp_path):
    from BrainAgeLib.model.checkpoint import load_model
    from BrainAgeLib.train.pipeline import run_training

    run_dir = tmp_path / "run"
    messages: list = []
    # 1. interrupted right after stage-1 epoch 1 has been saved
    with pytest.raises(_Interrupt):
        run_training(tiny_cohort, run_dir, _config(), progress=False,
                     log=_interrupt_after("stage 1 epoch 1/2", messages))
    slice_files = sorted((run_dir / "cache" / "slices").glob("*.npy"))
    assert len(slice_files) == N_PHANTOMS
    assert np.load(slice_files[0]).shape == (16, 32, 32) and np.load(slice_files[0]).dtype == np.float16
    prepared_mtimes = {p.name: p.stat().st_mtime_ns for p in slice_files}
    first_epoch = torch.load(run_dir / "stage1" / "training_state.pt", weights_only=True)["history"][0]

    # 2. rerun: slices come from the cache, stage 1 resumes at epoch 2, both stages finish
    messages = []
    result = run_training(tiny_cohort, run_dir, _config(), progress=False, log=messages.append)
    assert any("resuming after epoch 1" in m for m in messages), messages
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "cache" / "slices").glob("*.npy")} == prepared_mtimes
    state = json.loads((run_dir / "run.json").read_text())
    assert all(state["stages"][s]["done"] for s in ("1", "embed", "2"))
    history = state["stages"]["1"]["history"]
    assert len(history) == 2 and history[0] == pytest.approx(first_epoch)

    # embeddings: float16 [S, D] per subject, under the encoder's key
    embedding_files = list((run_dir / "cache" / "embeddings").rglob("*.npy"))
    assert len(embedding_files) == N_PHANTOMS
    assert np.load(embedding_files[0]).shape == (16, 32) and np.load(embedding_files[0]).dtype == np.float16

    # outputs: checkpoint with metadata, predictions for every subject, metrics and baselines
    assert result.checkpoint is not None and result.checkpoint.exists()
    with open(run_dir / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == N_PHANTOMS and {r["split"] for r in rows} == {"train", "val", "test"}
    test_rows = [r for r in rows if r["split"] == "test"]
    mae = np.mean([abs(float(r["predicted_age"]) - float(r["age"])) for r in test_rows])
    assert result.metrics["mae"] == pytest.approx(mae, abs=1e-3)
    assert result.baselines["mean_age_mae"] > 0 and np.isfinite(result.baselines["ridge_mae"])
    model = load_model(result.checkpoint)
    assert model.metadata["trained"] is True
    assert model.metadata["training_data"]["n_subjects"] == N_PHANTOMS
    assert set(model.metadata["bias_correction"]) >= {"slope", "intercept"}
    # prediction intervals fitted on the same validation subjects
    assert model.calibration.n_reference == model.metadata["training_data"]["n_val"]
    # the saved model reproduces the run's predictions from the cached slices
    entry_slices = np.load(slice_files[0]).astype(np.float32)
    with torch.no_grad():
        embeddings = model.embed(entry_slices, precision="fp32")
    assert embeddings.shape == (16, 32)

    # 3. a rerun of a finished run does nothing; naming stage 2 reruns it alone
    messages = []
    run_training(tiny_cohort, run_dir, _config(), progress=False, log=messages.append)
    assert any("nothing to do" in m for m in messages)
    messages = []
    again = run_training(tiny_cohort, run_dir, _config(epochs2=2), stage="2", progress=False, log=messages.append)
    assert not any("stage 1 epoch" in m for m in messages)
    assert json.loads((run_dir / "run.json").read_text())["stages"]["2"]["done"]
    assert again.checkpoint.exists()


def test_training_refuses_a_cohort_without_sex(tmp_path, tiny_cohort):
    from BrainAgeLib.errors import CohortError
    from BrainAgeLib.train.pipeline import run_training

    with open(tiny_cohort, newline="") as handle:
        rows = list(csv.DictReader(handle))
    rows[0]["sex"] = ""
    for row in rows:
        row["path"] = str((tiny_cohort.parent / row["path"]).resolve())
    bad = tmp_path / "cohort.csv"
    with open(bad, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(CohortError, match=rows[0]["id"]):
        run_training(bad, tmp_path / "run", _config(), progress=False, log=lambda m: None)


# ---------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toy_data(root: Path):
    """12 subjects of random 'slices' with learnable labels, and matching embeddings."""
    from BrainAgeLib.train.slice_cache import atomic_save_npy
    from BrainAgeLib.train.stage1 import LabelledVolume

    rng = np.random.default_rng(0)
    volumes = []
    for i in range(12):
        label = i % 4
        slices = np.clip(rng.random((16, 32, 32)) * 0.5 + 0.1 * label, 0, 1).astype(np.float16)
        path = root / f"s{i}.npy"
        atomic_save_npy(path, slices)
        volumes.append(LabelledVolume(str(i), path, label))
    return volumes


def _train_both_stages(rank: int, world_size: int, port: int, root: str, out: str) -> None:
    """One DDP rank (or the single process): 2 stage-1 epochs and 3 stage-2 epochs; rank 0 saves weights."""
    from BrainAgeLib.model import build_model
    from BrainAgeLib.train.distributed import init_distributed, shutdown_distributed
    from BrainAgeLib.train.stage1 import SliceClassificationDataset, train_stage1, training_slice_indices
    from BrainAgeLib.train.stage2 import EmbeddingSet, train_stage2

    torch.set_num_threads(1)
    if world_size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    context = init_distributed("cpu")
    root_path = Path(root)
    volumes = [v for v in _toy_data_index(root_path)]
    indices = training_slice_indices(16, 8)
    train_set = SliceClassificationDataset(volumes[:8], indices)
    val_set = SliceClassificationDataset(volumes[8:], indices)
    config = _config(epochs1=2, epochs2=3, batch_size1=8, batch_size2=4)
    model = build_model("tiny", seed=0)
    train_stage1(model.encoder, train_set, val_set, config, Path(out) / "stage1", context,
                 log=lambda m: None, progress=False)
    generator = torch.Generator().manual_seed(1)
    embeddings = torch.randn(12, 16, 32, generator=generator)
    ages = torch.linspace(20, 90, 12)
    embeddings[:, :4, :] += (ages[:, None, None] - 55) / 20
    data = EmbeddingSet([str(i) for i in range(12)], embeddings, (torch.arange(12) % 2).float(), ages)
    train = EmbeddingSet(data.ids[:8], data.embeddings[:8], data.sex[:8], data.age[:8])
    val = EmbeddingSet(data.ids[8:], data.embeddings[8:], data.sex[8:], data.age[8:])
    train_stage2(model.regressor, train, val, config, Path(out) / "stage2", context, log=lambda m: None, progress=False)
    if context.is_main:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(Path(out) / "weights.safetensors"))
    shutdown_distributed(context)


def _toy_data_index(root: Path):
    from BrainAgeLib.train.stage1 import LabelledVolume

    return [LabelledVolume(str(i), root / f"s{i}.npy", i % 4) for i in range(12)]


def _outputs(weights_file: Path, root: Path):
    """Stage-1 logits on the toy slices and stage-2 ages of toy embeddings, from saved weights."""
    from safetensors.torch import load_file

    from BrainAgeLib.model import build_model

    model = build_model("tiny", seed=0)
    model.load_state_dict(load_file(str(weights_file)))
    model.eval()
    slices = torch.from_numpy(np.stack([np.load(root / f"s{i}.npy")[::4] for i in range(12)]).astype(np.float32))
    with torch.no_grad():
        logits = model.encoder.classify(slices.reshape(-1, 32, 32))
        ages = model.regressor(torch.randn(6, 16, 32, generator=torch.Generator().manual_seed(5)), torch.ones(6))
    return logits, ages


def test_ddp_with_two_cpu_processes_matches_one_process(tmp_path, monkeypatch):
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    from BrainAgeLib.model import build_model

    _toy_data(tmp_path)
    single, double = tmp_path / "one", tmp_path / "two"
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    try:
        _train_both_stages(0, 1, _free_port(), str(tmp_path), str(single))  # world of one, in this process
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_train_both_stages, args=(2, _free_port(), str(tmp_path), str(double)), nprocs=2, join=True)

    one = load_file(str(single / "weights.safetensors"))
    initial = build_model("tiny", seed=0).state_dict()
    moved = max(float((one[k] - initial[k]).abs().max()) for k in one if k.startswith("encoder."))
    assert moved > 1e-3  # training changed the weights ...
    # ... and one process and two give the same model. Compared through its outputs: directions
    # with no gradient at all (the key bias, which softmax ignores) receive Adam steps driven by
    # rounding noise, so raw weights there differ without changing what the model computes.
    logits_one, ages_one = _outputs(single / "weights.safetensors", tmp_path)
    logits_two, ages_two = _outputs(double / "weights.safetensors", tmp_path)
    torch.testing.assert_close(logits_two, logits_one, rtol=1e-3, atol=1e-3)
    spread = float(ages_one.max() - ages_one.min())
    difference = float((ages_two - ages_one).abs().max())
    print(f"ages spread {spread:.4f}, largest one-vs-two-process difference {difference:.2e}")
    assert spread > 0.1                    # the regressor is not constant ...
    assert difference < 1e-3 * spread      # ... and the two runs agree on it to 0.1% of its range


def test_dora_adapts_query_and_value_only_and_merges_into_a_plain_vit(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    from BrainAgeLib.model import build_model
    from BrainAgeLib.parallel import RankContext
    from BrainAgeLib.train.stage1 import SliceClassificationDataset, train_stage1, training_slice_indices

    volumes = _toy_data(tmp_path)
    indices = training_slice_indices(16, 8)
    model = build_model("tiny", seed=0)
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    config = _config(dora=True, epochs1=2, lr1=1e-2)
    result = train_stage1(model.encoder, SliceClassificationDataset(volumes[:8], indices),
                          SliceClassificationDataset(volumes[8:], indices), config, tmp_path / "stage1",
                          RankContext(), log=lambda m: None, progress=False)
    assert isinstance(model.encoder.vit, VisionTransformer)  # adapters merged: plain timm ViT again
    after = model.encoder.state_dict()
    assert set(after) == set(before)
    dim = model.config.embed_dim
    for block in range(model.config.depth):
        key = f"vit.blocks.{block}.attn.qkv.weight"
        change = (after[key] - before[key]).abs()
        assert float(change[:dim].max()) > 1e-4 and float(change[2 * dim:].max()) > 1e-4  # query, value
        assert float(change[dim:2 * dim].max()) < 1e-6                                    # key untouched
        # the base MLP weights are frozen under DoRA
        torch.testing.assert_close(after[f"vit.blocks.{block}.mlp.fc1.weight"], before[f"vit.blocks.{block}.mlp.fc1.weight"])
    assert not torch.equal(after["vit.head.weight"], before["vit.head.weight"])  # classifier trained
    assert len(result.history) == 2
    assert not any(p.requires_grad for p in model.encoder.parameters())  # frozen afterwards


# ---------------------------------------------------------------------------- resuming exactly
def test_a_resumed_stage_2_with_dropout_equals_an_uninterrupted_one(tmp_path):
    """Dropout draws from torch's global generator; each epoch reseeds it (seed, stage, epoch,
    rank), so stopping after epoch 2 and resuming gives the weights of a run that never stopped."""
    import dataclasses

    from BrainAgeLib.model import build_model
    from BrainAgeLib.presets import get_preset
    from BrainAgeLib.train.distributed import init_distributed
    from BrainAgeLib.train.stage2 import EmbeddingSet, train_stage2

    preset = dataclasses.replace(get_preset("tiny"), dropout=0.3)
    generator = torch.Generator().manual_seed(1)
    ages = torch.linspace(20, 90, 12)
    embeddings = torch.randn(12, 16, 32, generator=generator) + ((ages - 55) / 20)[:, None, None]
    data = EmbeddingSet([str(i) for i in range(12)], embeddings, (torch.arange(12) % 2).float(), ages)
    train = EmbeddingSet(data.ids[:8], data.embeddings[:8], data.sex[:8], data.age[:8])
    val = EmbeddingSet(data.ids[8:], data.embeddings[8:], data.sex[8:], data.age[8:])
    context = init_distributed("cpu")

    def trained(folder: Path, epochs: int):
        regressor = build_model(preset, seed=0).regressor
        torch.manual_seed(123)   # whatever the global generator holds before, epochs reseed it
        train_stage2(regressor, train, val, _config(epochs2=epochs, batch_size2=4), folder, context,
                     log=lambda m: None, progress=False)
        return regressor.state_dict()

    trained(tmp_path / "stopped", 2)                   # "interrupted" after its second epoch
    torch.rand(1000)                                   # the process that resumes is in another state
    resumed = trained(tmp_path / "stopped", 5)         # picks up at epoch 3
    straight = trained(tmp_path / "straight", 5)
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in build_model(preset, seed=0).regressor.modules())
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0, msg=name)


def _checkpoint_tensors(path: Path):
    from safetensors.torch import load_file

    return load_file(str(path))


def _same_weights(a: Path, b: Path) -> bool:
    first, second = _checkpoint_tensors(a), _checkpoint_tensors(b)
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_changed_settings_retrain_the_stages_they_affect(tiny_cohort, tmp_path):
    """A run folder reused with other settings never resumes from, or keeps, weights trained
    with the old ones: the result equals a fresh run with the new settings."""
    from BrainAgeLib.train.pipeline import run_training

    run_dir = tmp_path / "run"
    run_training(tiny_cohort, run_dir, _config(), progress=False, log=lambda m: None)

    # another seed: another split, so every stage starts again (old states would leak test subjects)
    messages: list = []
    reused = run_training(tiny_cohort, run_dir, _config(seed=4), progress=False, log=messages.append)
    fresh = run_training(tiny_cohort, tmp_path / "fresh_seed", _config(seed=4), progress=False, log=lambda m: None)
    assert any("splitting again" in m for m in messages) and not any("resuming" in m for m in messages), messages
    assert _same_weights(reused.checkpoint, fresh.checkpoint)

    # a stage-2 option: stage 2 alone is trained again
    messages = []
    reused = run_training(tiny_cohort, run_dir, _config(seed=4, lr2=1e-3), progress=False, log=messages.append)
    assert any("stage 2 of this run folder was trained with other settings (lr2 changed)" in m for m in messages), messages
    assert not any("stage 1 epoch" in m or "nothing to do" in m for m in messages), messages
    fresh = run_training(tiny_cohort, tmp_path / "fresh_lr2", _config(seed=4, lr2=1e-3), progress=False, log=lambda m: None)
    assert _same_weights(reused.checkpoint, fresh.checkpoint)

    # stage 1 named again with a new option, then the rest: stage 2 must not resume its old state
    changed = _config(seed=4, lr2=1e-3, lr1=3e-3)
    run_training(tiny_cohort, run_dir, changed, stage="1", progress=False, log=lambda m: None)
    messages = []
    reused = run_training(tiny_cohort, run_dir, changed, progress=False, log=messages.append)
    assert not any("stage 2: resuming" in m for m in messages), messages
    fresh = run_training(tiny_cohort, tmp_path / "fresh_lr1", changed, progress=False, log=lambda m: None)
    assert _same_weights(reused.checkpoint, fresh.checkpoint)

    # an execution option changes nothing
    messages = []
    run_training(tiny_cohort, run_dir, _config(seed=4, lr2=1e-3, lr1=3e-3, workers=2), progress=False, log=messages.append)
    assert any("nothing to do" in m for m in messages), messages
