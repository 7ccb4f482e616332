"""The restricted unpickler reads the authors' kind of checkpoint pickle and runs no code."""
from __future__ import annotations

import collections
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from BrainAgeLib.errors import CheckpointError
from BrainAgeLib.safe_pickle import load_restricted_pickle


def write_pickle(path: Path, obj) -> Path:
    with path.open("wb") as handle:
        pickle.dump(obj, handle)
    return path


def training_checkpoint_like_theirs() -> dict:
    """What their stage-2 training loop pickles: weights, Adam state, torch and numpy RNG states."""
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4)
    model(torch.randn(3, 6)).sum().backward()
    optimizer.step()
    np.random.seed(7)
    np.random.rand(3)  # advance the numpy RNG so its state is not the seed's
    return {
        "model_state": model.state_dict(),
        "optimizer_state": optimizer.state_dict(),
        "epoch": 41,
        "loss": 3.25,
        "t_rng_st": torch.get_rng_state(),
        "n_rng_st": np.random.get_state(),
        "cuda_rng_st": None,
    }


def test_reads_a_training_checkpoint_with_tensors_optimizer_and_rng_states(tmp_path):
    original = training_checkpoint_like_theirs()
    path = write_pickle(tmp_path / "cnn_best_model_with_metadata.pkl", original)

    loaded = load_restricted_pickle(path)

    assert isinstance(loaded["model_state"], collections.OrderedDict)
    assert list(loaded["model_state"]) == list(original["model_state"])
    for key, tensor in original["model_state"].items():
        assert loaded["model_state"][key].dtype == tensor.dtype
        assert torch.equal(loaded["model_state"][key], tensor)
    adam = loaded["optimizer_state"]["state"][0]
    assert torch.equal(adam["exp_avg"], original["optimizer_state"]["state"][0]["exp_avg"])
    assert loaded["optimizer_state"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert torch.equal(loaded["t_rng_st"], original["t_rng_st"])
    assert loaded["t_rng_st"].dtype == torch.uint8
    name, keys, pos, has_gauss, cached = loaded["n_rng_st"]
    assert name == "MT19937" and keys.dtype == np.uint32 and keys.shape == (624,)
    np.testing.assert_array_equal(keys, original["n_rng_st"][1])
    assert (pos, has_gauss, cached) == tuple(original["n_rng_st"][2:])
    assert (loaded["epoch"], loaded["loss"]) == (41, 3.25)


def test_numpy_scalars_and_views_survive(tmp_path):
    view = torch.arange(20.0).reshape(4, 5)[1:, 2:]  # a strided view into a shared storage
    obj = {"mae": np.float64(2.875), "n": np.int64(12), "view": view, "arr": np.eye(3, dtype=np.float32)}
    loaded = load_restricted_pickle(write_pickle(tmp_path / "scalars.pkl", obj))
    assert loaded["mae"] == 2.875 and isinstance(loaded["mae"], np.float64)
    assert loaded["n"] == 12
    assert torch.equal(loaded["view"], view)
    np.testing.assert_array_equal(loaded["arr"], np.eye(3))


class SmugglesSystemCall:
    """A pickle that, when loaded by plain ``pickle.load``, runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_smuggling_os_system_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    checkpoint = {"model_state": collections.OrderedDict(w=torch.ones(2)), "x": SmugglesSystemCall(marker)}
    path = write_pickle(tmp_path / "evil.pkl", checkpoint)

    with pytest.raises(CheckpointError) as refused:
        load_restricted_pickle(path)

    assert not marker.exists()
    message = str(refused.value)
    assert str(path) in message
    assert ("posix.system" in message) or ("nt.system" in message) or ("os.system" in message)


def test_arbitrary_class_is_refused_and_named(tmp_path):
    path = write_pickle(tmp_path / "foreign.pkl", {"when": __import__("datetime").date(2025, 1, 1)})
    with pytest.raises(CheckpointError, match=r"datetime\.date"):
        load_restricted_pickle(path)


def test_numpy_object_arrays_are_refused(tmp_path):
    path = write_pickle(tmp_path / "objects.pkl", np.array([1, "two"], dtype=object))
    with pytest.raises(CheckpointError, match="object"):
        load_restricted_pickle(path)


def test_storage_bytes_go_through_weights_only_loading(tmp_path):
    """The bytes inside ``_load_from_bytes`` are a nested pickle; it must be restricted too."""
    marker = tmp_path / "pwned-nested"
    nested = pickle.dumps(SmugglesSystemCall(marker), protocol=2)
    evil = (
        b"\x80\x03ctorch.storage\n_load_from_bytes\n"  # PROTO 3, GLOBAL
        + b"B" + len(nested).to_bytes(4, "little") + nested  # BINBYTES: the nested pickle
        + b"\x85R."  # TUPLE1, REDUCE, STOP
    )
    path = tmp_path / "nested.pkl"
    path.write_bytes(evil)
    with pytest.raises(CheckpointError, match="embedded tensor storage"):
        load_restricted_pickle(path)
    assert not marker.exists()


def test_missing_and_truncated_files_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_restricted_pickle(tmp_path / "absent.pkl")
    good = write_pickle(tmp_path / "good.pkl", training_checkpoint_like_theirs())
    cut = tmp_path / "cut.pkl"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError) as error:
        load_restricted_pickle(cut)
    assert str(cut) in str(error.value)


def test_tensors_pickled_on_a_gpu_load_on_the_cpu(tmp_path, monkeypatch):
    """Their checkpoint was pickled from CUDA tensors: each storage's bytes name 'cuda:0'."""
    import torch.serialization

    state = collections.OrderedDict(weight=torch.randn(3, 4), bias=torch.randn(3))
    with monkeypatch.context() as patch:  # what torch.save records for a storage on the first GPU
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        path = write_pickle(tmp_path / "from_gpu.pkl", {"model_state": state})
    assert b"cuda:0" in path.read_bytes()

    loaded = load_restricted_pickle(path)["model_state"]

    assert all(tensor.device.type == "cpu" for tensor in loaded.values())
    assert torch.equal(loaded["weight"], state["weight"]) and torch.equal(loaded["bias"], state["bias"])
