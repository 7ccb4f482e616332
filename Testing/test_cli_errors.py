"""What every `brainage` command does with a destination it cannot write, bad options and
system errors: one line on stderr naming the folder or file, a non-zero exit status, and no
work started (so nothing is left half-written)."""
from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from BrainAgeLib.cli import batch as batch_command
from BrainAgeLib.cli import evaluate as evaluate_command
from BrainAgeLib.cli import main

from cohort_heads import write_bad_inputs, write_cohort_csv, write_heads


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    return write_heads(tmp_path_factory.mktemp("heads"))


@pytest.fixture()
def a_file(tmp_path) -> Path:
    """A plain file: an output folder below it can never be created, not even by root."""
    path = tmp_path / "a_file"
    path.write_text("not a folder\n")
    return path


@pytest.fixture()
def predictions_csv(tmp_path) -> Path:
    path = tmp_path / "predictions.csv"
    path.write_text("age,predicted_age,sex\n30,33,F\n50,48,M\n70,71,F\n")
    return path


def one_error_line(captured, command: str) -> str:
    lines = [line for line in captured.err.splitlines() if line.startswith(f"brainage {command}: error:")]
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def explanation_folder(folder: Path) -> Path:
    """One subject's map and sidecar, as `brainage predict --explain` leaves them."""
    import numpy as np

    from BrainAgeLib.explain.outputs import write_sidecar
    from BrainAgeLib.io import save_volume
    from BrainAgeLib.result import Result
    from BrainAgeLib.volume import Volume

    folder.mkdir(parents=True, exist_ok=True)
    attention = Volume(np.random.default_rng(0).random((20, 24, 20)).astype(np.float32), np.diag([4.0, 4.0, 4.0, 1.0]))
    save_volume(attention, folder / "s_attention.nii.gz")
    write_sidecar(Result(predicted_age=40.0, chronological_age=38.0, attention=attention), folder / "s_attention.json",
                  attention_file="s_attention.nii.gz")
    return folder


def commands_writing_to(out: Path, heads, predictions_csv: Path, tmp_path: Path):
    """(command name, argv) for each command that writes a folder, all aimed at ``out``."""
    cohort = write_cohort_csv(tmp_path / "cohort.csv", [(f"s{i}", p, a, s) for i, (p, a, s) in enumerate(heads)])
    head = str(heads[0][0])
    explained = explanation_folder(tmp_path / "explained")
    return [
        ("predict", ["predict", head, "--preset", "tiny", "--out", str(out)]),
        ("batch", ["batch", str(cohort), "--preset", "tiny", "--workers", "0", "--out", str(out)]),
        ("evaluate", ["evaluate", str(predictions_csv), "--out", str(out)]),
        ("synth", ["synth", "--n", "1", "--seed", "1", "--out", str(out)]),
        ("train", ["train", str(cohort), "--preset", "tiny", "--out", str(out)]),
        ("cohort-maps", ["cohort-maps", str(explained), "--out", str(out), "--assume-template-space"]),
    ]


def test_a_folder_that_cannot_be_created_fails_at_once_naming_it(heads, predictions_csv, a_file, tmp_path, capsys):
    out = a_file / "results"
    for command, argv in commands_writing_to(out, heads, predictions_csv, tmp_path):
        assert main(argv) == 2, command
        line = one_error_line(capsys.readouterr(), command)
        assert f"{out}: cannot create the --out folder" in line, line
    assert a_file.read_text() == "not a folder\n"


def test_a_file_given_as_the_output_folder_is_refused(heads, predictions_csv, a_file, tmp_path, capsys):
    for command, argv in commands_writing_to(a_file, heads, predictions_csv, tmp_path):
        assert main(argv) == 2, command
        assert f"{a_file}: --out must be a folder, not a file" in one_error_line(capsys.readouterr(), command)


@pytest.mark.parametrize("exists, message", [(True, "cannot write in the --out folder (Permission denied)"),
                                             (False, "cannot create the --out folder (Permission denied)")])
def test_a_folder_that_refuses_writes_is_reported_before_any_work(exists, message, heads, tmp_path, capsys, monkeypatch):
    """Root ignores permission bits, so the refusal is simulated where the check makes its probe
    file: in the folder, or, for one still to be made, in the nearest folder that exists."""
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    out = tmp_path / "locked" / "results"
    if exists:
        out.mkdir(parents=True)
    cohort = write_cohort_csv(tmp_path / "c.csv", [("s0", heads[0][0], 34.0, "F")])
    for command, argv in [("predict", ["predict", str(heads[0][0])]), ("batch", ["batch", str(cohort), "--workers", "0"])]:
        assert main([*argv, "--preset", "tiny", "--out", str(out)]) == 2, command
        assert f"{out}: {message}" in one_error_line(capsys.readouterr(), command)
        assert (list(out.iterdir()) == []) if exists else not (tmp_path / "locked").exists()


#: Runs ``brainage ARGV`` in a fresh interpreter and says whether torch was imported by then.
_FRESH_CLI = ("import sys; from BrainAgeLib.cli import main; code = main(sys.argv[1:]); "
              "print('torch imported:', 'torch' in sys.modules); sys.exit(code)")


def run_fresh(argv, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _FRESH_CLI, *argv], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def make_bad_input(kind: str, folder: Path, good: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "missing":
        return folder / "missing.nii.gz"
    if kind == "empty":
        (folder / "empty.nii.gz").write_bytes(b"")
        return folder / "empty.nii.gz"
    if kind == "text":
        (folder / "notes.txt").write_text("sub-01,42\n")
        return folder / "notes.txt"
    if kind == "truncated":
        return write_bad_inputs(folder, good)["corrupt"]
    images = folder / "images"  # a folder of NIfTI files, not a DICOM series
    images.mkdir()
    shutil.copy(good, images / good.name)
    return images


@pytest.mark.parametrize("kind, problem", [
    ("missing", "file not found"), ("empty", "the file is empty"), ("text", "unsupported file type '.txt'"),
    ("truncated", "truncated"), ("images", "`brainage batch FOLDER`"),
])
def test_predict_refuses_a_bad_input_before_importing_torch_and_leaves_no_folder(kind, problem, heads, tmp_path):
    source = make_bad_input(kind, tmp_path / "inputs", heads[0][0])
    before = sorted(p.name for p in source.parent.iterdir())
    out = tmp_path / "results" / "sub-01"
    finished = run_fresh(["predict", str(source), "--out", str(out)], tmp_path)
    assert finished.returncode == 2, finished.stderr
    line = one_error_line(SimpleNamespace(err=finished.stderr), "predict")
    assert f"{source}: " in line and problem in line, line
    assert "torch imported: False" in finished.stdout
    assert not (tmp_path / "results").exists()
    assert sorted(p.name for p in source.parent.iterdir()) == before


@pytest.mark.parametrize("command", ["predict", "batch"])
def test_a_model_that_cannot_be_loaded_leaves_no_output_folder(command, heads, tmp_path, capsys):
    cohort = write_cohort_csv(tmp_path / "cohort.csv", [("s0", heads[0][0], 34.0, "F")])
    first = str(heads[0][0]) if command == "predict" else str(cohort)
    out = tmp_path / "results" / "run1"
    missing_model = tmp_path / "no_such_model.safetensors"
    assert main([command, first, "--model", str(missing_model), "--out", str(out)]) == 2
    assert f"{missing_model}: no such model file" in one_error_line(capsys.readouterr(), command)
    assert not (tmp_path / "results").exists()


def test_an_operating_system_error_is_one_line_naming_the_file_with_exit_1(predictions_csv, monkeypatch, capsys):
    def disk_full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/results/metrics.json")

    monkeypatch.setattr(evaluate_command, "run", disk_full)
    assert main(["evaluate", str(predictions_csv)]) == 1
    line = one_error_line(capsys.readouterr(), "evaluate")
    assert line.endswith("/results/metrics.json: No space left on device")


@pytest.mark.parametrize("command", ["predict", "batch", "train"])
def test_an_unusable_device_fails_before_the_output_folder_is_made(command, heads, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no CUDA, on GPU machines too
    cohort = write_cohort_csv(tmp_path / "cohort.csv", [("s0", heads[0][0], 34.0, "F")])
    first = str(heads[0][0]) if command == "predict" else str(cohort)
    out = tmp_path / "out"
    assert main([command, first, "--preset", "tiny", "--device", "cuda", "--out", str(out)]) == 2
    assert "'cuda' was requested" in one_error_line(capsys.readouterr(), command)
    assert not out.exists()


@pytest.mark.parametrize("arguments, message", [
    (["--epochs1", "-3"], "invalid training options: epochs1 must be positive"),
    (["--workers", "0"], "invalid training options: workers must be positive"),
    (["--val-fraction", "0.6", "--test-fraction", "0.6"], "invalid training options: val_fraction + test_fraction"),
])
def test_bad_training_options_exit_2_before_any_work(arguments, message, heads, tmp_path, capsys):
    cohort = write_cohort_csv(tmp_path / "cohort.csv", [("s0", heads[0][0], 34.0, "F")])
    out = tmp_path / "run"
    assert main(["train", str(cohort), "--preset", "tiny", "--out", str(out), *arguments]) == 2
    assert message in one_error_line(capsys.readouterr(), "train")
    assert not out.exists()


def test_an_initial_encoder_that_is_not_a_model_fails_before_preparing_slices(heads, tmp_path, capsys):
    fake = tmp_path / "encoder.safetensors"
    fake.write_bytes(b"\x80\x04\x95 this is a pickle, not safetensors")
    cohort = write_cohort_csv(tmp_path / "cohort.csv", [(f"s{i}", p, a, s) for i, (p, a, s) in enumerate(heads)])
    out = tmp_path / "run"
    assert main(["train", str(cohort), "--preset", "tiny", "--out", str(out), "--init-encoder", str(fake)]) == 2
    assert str(fake) in one_error_line(capsys.readouterr(), "train")
    assert not (out / "cache").exists() or not any((out / "cache").rglob("*.npz"))


def test_batch_exits_3_only_when_every_subject_failed(heads, tmp_path, capsys):
    bad = write_bad_inputs(tmp_path / "bad", heads[0][0])
    all_bad = write_cohort_csv(tmp_path / "all_bad.csv", [(name, path, 40, "F") for name, path in bad.items()])
    assert main(["batch", str(all_bad), "--preset", "tiny", "--workers", "0", "--no-plots",
                 "--out", str(tmp_path / "all_bad")]) == batch_command.EXIT_ALL_FAILED == 3
    capsys.readouterr()
    mixed = write_cohort_csv(tmp_path / "mixed.csv", [("good", heads[0][0], 34.0, "F"), ("corrupt", bad["corrupt"], 40, "F")])
    out = tmp_path / "mixed"
    assert main(["batch", str(mixed), "--preset", "tiny", "--workers", "0", "--no-plots", "--json", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_failed"] == 1 and summary["n_done"] == 1
    assert "corrupt.nii.gz" in (out / "predictions.csv").read_text()


def test_a_preprocessing_error_names_the_input_file(tmp_path, capsys):
    """The image loads (valid NIfTI) but preprocessing finds it is no brain: the message still names the file."""
    import numpy as np

    from BrainAgeLib.io import save_volume
    from BrainAgeLib.volume import Volume

    grid = np.mgrid[:96, :96, :96] - 48
    ball = (grid ** 2).sum(axis=0) < 40 ** 2
    noise = np.random.default_rng(0).random(ball.shape).astype(np.float32) * ball
    path = save_volume(Volume(noise, np.diag([1.5, 1.5, 1.5, 1.0])), tmp_path / "noise_ball.nii.gz")
    assert main(["predict", str(path), "--preset", "demo", "--out", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys.readouterr(), "predict")
    assert str(path) in line and "no anatomy-like structure" in line


def test_nan_voxels_cleaned_at_load_are_listed_in_the_result_warnings(heads, tmp_path, capsys):
    """A few NaN voxels are repaired (set to 0), and the result says so, not only the log."""
    import nibabel as nib
    import numpy as np

    image = nib.load(heads[0][0])
    data = np.asarray(image.dataobj, dtype=np.float32).copy()
    data[10:12, 10:12, 10:12] = np.nan
    speckled = tmp_path / "speckled.nii.gz"
    nib.save(nib.Nifti1Image(data, image.affine), speckled)
    assert main(["predict", str(speckled), "--preset", "tiny", "--json", "--out", str(tmp_path / "p")]) == 0
    warnings = json.loads(capsys.readouterr().out)["warnings"]
    assert any("set 8 NaN/Inf voxels" in w and "speckled.nii.gz" in w for w in warnings), warnings
    cohort = write_cohort_csv(tmp_path / "c.csv", [("s", speckled, 34.0, "F")])
    assert main(["batch", str(cohort), "--preset", "tiny", "--workers", "0", "--no-plots", "--out", str(tmp_path / "b")]) == 0
    assert "set 8 NaN/Inf voxels" in (tmp_path / "b" / "predictions.csv").read_text()
