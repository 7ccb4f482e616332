"""Checkpoints: safetensors + JSON model card; refuse pickles, truncated, tampered and foreign files."""
from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file

from BrainAgeLib import __version__
from BrainAgeLib.bias_correction import BiasCorrection
from BrainAgeLib.digests import file_sha256, weights_digest
from BrainAgeLib.model.checkpoint import (
    REGISTRY, ModelEntry, load_model, read_metadata, register_model, save_checkpoint,
)
from BrainAgeLib.errors import CheckpointError
from BrainAgeLib.model import build_model


@pytest.fixture
def tiny_checkpoint(tmp_path):
    model = build_model("tiny", seed=5)
    path = save_checkpoint(model, tmp_path / "tiny.safetensors", {
        "name": "tiny-test",
        "intended_use": "unit tests",
        "trained": True,
        "bias_correction": BiasCorrection(slope=-0.25, intercept=12.5, n_reference=40),
        "training_data": {"n_subjects": 3, "age_range": [20, 80]},
        "metrics": {"mae_years": 4.2},
        "source": "test_checkpoint.py",
    })
    return model.eval(), path


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BRAINAGE_CACHE", str(tmp_path / "cache"))
    saved = dict(REGISTRY)
    yield
    REGISTRY.clear()
    REGISTRY.update(saved)


@pytest.fixture(autouse=True)
def never_unpickle(monkeypatch):
    """Loading a checkpoint must not reach pickle in any form."""
    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint loader tried to unpickle")
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)


def slices(seed: int = 0) -> torch.Tensor:
    return torch.rand(16, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_save_then_load_gives_bit_identical_predictions(tiny_checkpoint):
    model, path = tiny_checkpoint
    loaded = load_model(str(path))
    assert loaded is not model and not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    for sex in ("F", "M", "unknown"):
        x = slices()
        with torch.no_grad():
            before = model.regress(model.embed(x, precision="fp32"), sex)
            after = loaded.regress(loaded.embed(x, precision="fp32"), sex)
        assert before.item() == after.item()


@pytest.mark.parametrize("name_length", range(1, 9))
def test_loaded_weights_are_aligned_whatever_the_header_length(tmp_path, name_length):
    """The header's length sets where tensors start in the file; CPU kernels on unaligned
    weights round differently, so the loader hands the model 64-byte-aligned copies."""
    model = build_model("tiny", seed=5)
    path = save_checkpoint(model, tmp_path / "tiny.safetensors", {"name": "n" * name_length})
    loaded = load_model(path)
    misaligned = [name for name, value in loaded.state_dict().items() if value.data_ptr() % 64]
    assert misaligned == []
    x = slices()
    with torch.no_grad():
        assert model.eval().regress(model.embed(x, precision="fp32"), "F").item() == \
            loaded.regress(loaded.embed(x, precision="fp32"), "F").item()


def test_the_model_card_travels_inside_the_safetensors_header(tiny_checkpoint):
    _, path = tiny_checkpoint
    card = read_metadata(path)
    assert card["format_version"] == 1 and card["library_version"] == __version__
    assert card["preset"] == "tiny" and card["config"]["embed_dim"] == 32
    assert card["preprocessing"]["n_slices"] == 16 and card["preprocessing"]["image_size"] == 32
    assert card["class_names"][:2] == ["M 0-10", "M 10-20"] and len(card["class_names"]) == 20
    assert card["age_bin_edges"] == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert card["bias_correction"]["slope"] == -0.25 and card["bias_correction"]["n_reference"] == 40
    assert card["training_data"]["age_range"] == [20, 80] and card["metrics"]["mae_years"] == 4.2
    assert card["intended_use"] == "unit tests" and card["is_demo"] is False
    assert len(card["weights_sha256"]) == 64
    loaded = load_model(path)
    assert loaded.name == "tiny-test"
    assert loaded.bias_correction == BiasCorrection(-0.25, 12.5, 40)
    # Raw header: one JSON string under "brainage", as any safetensors reader sees it.
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    assert json.loads(header["__metadata__"]["brainage"])["preset"] == "tiny"


def test_saving_is_atomic_and_leaves_no_temporary_files(tiny_checkpoint, tmp_path):
    model, path = tiny_checkpoint
    save_checkpoint(model, path, {"name": "again"})
    assert sorted(p.name for p in path.parent.iterdir() if p.is_file()) == ["tiny.safetensors"]
    assert read_metadata(path)["name"] == "again"


def test_a_pickle_is_refused_without_being_unpickled(tmp_path):
    path = tmp_path / "model.pkl"
    path.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)  # a protocol-4 pickle's first bytes
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_model(path)


def test_a_pytorch_zip_checkpoint_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"PK\x03\x04" + b"\x00" * 64)
    with pytest.raises(CheckpointError, match="PyTorch zip checkpoint"):
        load_model(path)


@pytest.mark.parametrize("keep", [4, 100, -1000])
def test_a_truncated_file_is_refused(tiny_checkpoint, tmp_path, keep):
    _, path = tiny_checkpoint
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match="truncated") as info:
        load_model(cut)
    assert str(cut) in str(info.value)


def test_tampered_weights_are_refused(tiny_checkpoint):
    _, path = tiny_checkpoint
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # flip a bit inside the last tensor's float32 data
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="do not match the digest"):
        load_model(path)


def write_raw_checkpoint(path, weights, card):
    """A safetensors file of ``weights`` (a module, or a dict of tensors) with ``card`` as its
    BrainAge metadata, written without save_checkpoint's checks: what a damaged or foreign file holds."""
    tensors = weights.state_dict() if hasattr(weights, "state_dict") else weights
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"brainage": json.dumps(card)})
    return path


def test_weights_of_the_wrong_shape_are_refused(tmp_path):
    tiny = build_model("tiny", seed=0)
    tensors = dict(tiny.state_dict(), **{"regressor.head.fc1.weight": torch.zeros(16, 99)})
    card = {"format_version": 1, "preset": "tiny", "config": tiny.config.to_dict(), "name": "bad"}
    path = write_raw_checkpoint(tmp_path / "wrong_shape.safetensors", tensors, card)
    with pytest.raises(CheckpointError, match=r"regressor.head.fc1.weight is \[16, 99\], expected \[16, 16\]"):
        load_model(path)


def test_weights_of_another_preset_are_refused(tmp_path):
    demo_config = build_model("demo", seed=0).config
    tiny = build_model("tiny", seed=0)
    card = {"format_version": 1, "preset": "demo", "config": demo_config.to_dict()}
    path = write_raw_checkpoint(tmp_path / "mismatch.safetensors", tiny, card)
    with pytest.raises(CheckpointError, match="do not fit the 'demo' architecture"):
        load_model(path)


def test_a_config_whose_sizes_disagree_with_its_preprocessing_is_refused(tmp_path):
    tiny = build_model("tiny", seed=0)
    config = tiny.config.to_dict()
    config["image_size"] = 64  # the preprocessing (which holds the value) says 32
    card = {"format_version": 1, "preset": "tiny", "config": config}
    path = write_raw_checkpoint(tmp_path / "sizes.safetensors", tiny, card)
    with pytest.raises(CheckpointError, match=r"image_size=64 but preprocess.image_size=32"):
        load_model(path)


def test_foreign_safetensors_without_brainage_metadata_are_refused(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"vit.embeddings.cls_token": torch.zeros(1, 1, 768)}, str(path))
    with pytest.raises(CheckpointError, match="without BrainAge metadata"):
        load_model(path)


def test_missing_tensors_are_named(tiny_checkpoint, tmp_path):
    model, _ = tiny_checkpoint
    tensors = {k: v for k, v in model.state_dict().items() if not k.startswith("regressor.head.out")}
    card = {"format_version": 1, "preset": "tiny", "config": model.config.to_dict()}
    path = write_raw_checkpoint(tmp_path / "partial.safetensors", tensors, card)
    with pytest.raises(CheckpointError, match=r"2 missing tensors \(e.g. regressor.head.out.bias"):
        load_model(path)


def test_a_newer_format_is_refused_with_advice(tiny_checkpoint, tmp_path):
    model, _ = tiny_checkpoint
    card = {"format_version": 99, "preset": "tiny", "config": model.config.to_dict()}
    path = write_raw_checkpoint(tmp_path / "future.safetensors", model, card)
    with pytest.raises(CheckpointError, match="upgrade BrainAge"):
        load_model(path)


def test_unknown_names_and_missing_files_are_reported(tmp_path):
    with pytest.raises(CheckpointError, match="unknown model 'paper-v9'.*registered model"):
        load_model("paper-v9")
    with pytest.raises(CheckpointError, match="no such model file"):
        load_model(tmp_path / "absent.safetensors")


def test_the_bundled_demo_model_loads_or_says_it_is_missing():
    path = REGISTRY["demo"].local_path()
    if path.exists():
        model = load_model("demo")
        assert model.metadata["is_demo"] is True and model.config.name == "demo"
    else:
        with pytest.raises(CheckpointError, match="bundled 'demo' model is not in this installation yet"):
            load_model("demo")


# ---------------------------------------------------------------------------- registry downloads
def test_the_weights_digest_is_the_one_the_demo_card_records():
    """One weights digest for checkpoints, batch runs and training caches: the bundled demo's
    card still holds exactly the value it was saved with."""
    card = read_metadata(REGISTRY["demo"].local_path())
    assert card["weights_sha256"] == "e91d4b2d2d22e26b1f1633aec52fb8b774da40b6ad94570c825bd2c39824b1bb"
    model = load_model("demo")
    assert weights_digest(model) == weights_digest(model.state_dict()) == card["weights_sha256"]


def test_a_registered_model_is_downloaded_once_and_verified(tiny_checkpoint, tmp_path):
    model, source = tiny_checkpoint
    entry = ModelEntry(name="tiny-remote", filename="tiny_remote.safetensors",
                       url=source.as_uri(), sha256=file_sha256(source))
    register_model(entry)
    loaded = load_model("tiny-remote")
    cached = tmp_path / "cache" / "tiny_remote.safetensors"
    assert cached.is_file() and file_sha256(cached) == entry.sha256
    assert torch.equal(loaded.state_dict()["regressor.head.out.weight"], model.state_dict()["regressor.head.out.weight"])
    source.unlink()  # the second load uses the cache, not the URL
    assert load_model("tiny-remote").name == "tiny-test"


def test_a_download_with_the_wrong_sha256_is_not_kept(tiny_checkpoint, tmp_path):
    _, source = tiny_checkpoint
    register_model(ModelEntry(name="tampered", filename="tampered.safetensors",
                              url=source.as_uri(), sha256="0" * 64))
    with pytest.raises(CheckpointError, match="tampered or damaged, not kept"):
        load_model("tampered")
    assert not any((tmp_path / "cache").iterdir())


def test_an_unreachable_model_says_where_to_put_the_file(tmp_path):
    register_model(ModelEntry(name="offline", filename="offline.safetensors",
                              url=(tmp_path / "nowhere.safetensors").as_uri(), sha256="1" * 64))
    with pytest.raises(CheckpointError) as info:
        load_model("offline")
    message = str(info.value)
    assert "could not download model 'offline'" in message
    assert str(tmp_path / "cache" / "offline.safetensors") in message and "1" * 64 in message


def test_a_downloaded_entry_needs_url_and_sha256():
    with pytest.raises(ValueError, match="url and sha256"):
        register_model(ModelEntry(name="half", filename="half.safetensors", url="https://example.org/x"))
