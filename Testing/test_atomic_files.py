import os

import pytest

from BrainAgeLib.atomic_files import atomic_path, write_bytes_atomic, write_text_atomic


def test_writes_replace_the_destination_and_leave_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    write_text_atomic(target, '{"mae": 3.1}\n')
    assert target.read_text() == '{"mae": 3.1}\n'
    write_bytes_atomic(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
    assert oct(os.stat(target).st_mode & 0o777) != oct(0o600)


def test_a_failed_write_keeps_the_old_file_and_cleans_up(tmp_path):
    target = tmp_path / "map.nii.gz"
    target.write_bytes(b"previous")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temporary:
            assert temporary.name.endswith(".nii.gz") and temporary.parent == tmp_path
            temporary.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.nii.gz"]


def test_fsync_flushes_the_complete_temporary_before_the_move(tmp_path, monkeypatch):
    target = tmp_path / "predictions.csv"
    synced = []
    real_fsync = os.fsync

    def recording_fsync(descriptor):
        synced.append(os.fstat(descriptor).st_size)
        assert not target.exists()  # flushed before os.replace puts it in place
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    write_bytes_atomic(target, b"id,path\n", fsync=True)
    assert synced == [8] and target.read_bytes() == b"id,path\n"
    write_bytes_atomic(target, b"id\n")  # the default does not fsync
    assert synced == [8] and target.read_bytes() == b"id\n"


def test_write_json_atomic_writes_indented_json_with_a_final_newline(tmp_path):
    import json

    from BrainAgeLib.atomic_files import write_json_atomic

    path = write_json_atomic(tmp_path / "result.json", {"age": 63.9, "files": ["a", "b"]})
    text = path.read_text()
    assert json.loads(text) == {"age": 63.9, "files": ["a", "b"]}
    assert text.endswith("}\n") and '\n  "age": 63.9' in text
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]   # no temporary file left


def test_write_json_atomic_writes_null_for_numbers_json_cannot_hold(tmp_path):
    """NaN and Infinity are not JSON; strict readers (jq, JavaScript, Go) reject files holding them."""
    import json

    from BrainAgeLib.atomic_files import write_json_atomic

    data = {"rmse": float("inf"), "r2": float("-inf"), "r": float("nan"), "mae": 2.5,
            "per_decade": [{"mae": float("nan")}, (1.0, float("inf"))], "n": 3, "name": "NaN"}
    text = write_json_atomic(tmp_path / "metrics.json", data).read_text()
    assert "Infinity" not in text and "NaN," not in text
    assert json.loads(text) == {"rmse": None, "r2": None, "r": None, "mae": 2.5,
                                "per_decade": [{"mae": None}, [1.0, None]], "n": 3, "name": "NaN"}
