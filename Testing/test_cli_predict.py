"""`brainage predict` from the command line: outputs, JSON keys, exit codes."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from BrainAgeLib.cli import main
from BrainAgeLib.inference import predict
from BrainAgeLib.model import build_model
from BrainAgeLib.model.checkpoint import save_checkpoint

RESULT_KEYS = {"predicted_age", "chronological_age", "brain_age_gap", "corrected_brain_age_gap", "sex",
               "sex_was_unknown", "timings", "model_name", "model_intended_use", "model_is_demo", "warnings"}


@pytest.fixture(scope="module")
def head_path(tmp_path_factory, mni_3mm) -> Path:
    """The MNI152 T1 at 3 mm, written as a NIfTI file."""
    path = tmp_path_factory.mktemp("input") / "sub-01_T1w.nii.gz"
    nib.save(nib.Nifti1Image(mni_3mm.array, mni_3mm.affine), path)
    return path


def test_json_output_and_result_file(head_path, tmp_path, capsys):
    out = tmp_path / "results"
    code = main(["predict", str(head_path), "--preset", "tiny", "--sex", "female", "--age", "67",
                 "--out", str(out), "--json", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0
    printed = json.loads(captured.out)
    assert RESULT_KEYS <= set(printed)
    assert printed["model_is_demo"] is False and "disclaimer" not in printed
    assert printed["sex"] == "F" and printed["chronological_age"] == 67.0
    assert printed["brain_age_gap"] == pytest.approx(printed["predicted_age"] - 67.0)
    assert printed["input"] == str(head_path) and printed["model"].startswith("preset:tiny")
    assert {"load", "prepare", "embed", "regress", "total"} <= set(printed["timings"])
    written = out / "sub-01_T1w_brainage.json"
    assert json.loads(written.read_text()) == printed
    assert [p.name for p in out.iterdir()] == ["sub-01_T1w_brainage.json"]  # no temporary files left
    assert "RANDOM, UNTRAINED weights" in captured.err
    assert "%|" not in captured.err  # no progress bar when stderr is not a terminal


def test_human_summary_with_a_saved_checkpoint(head_path, tmp_path, capsys):
    model = build_model("tiny", seed=9)
    checkpoint = save_checkpoint(model, tmp_path / "my_model.safetensors",
                            metadata={"name": "cli-test-model", "intended_use": "CLI tests", "is_demo": True})
    code = main(["predict", str(head_path), "--model", str(checkpoint), "--sex", "M", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 0
    assert "Predicted brain age:" in captured.out and "Sex: M" in captured.out
    assert "Model: cli-test-model (CLI tests)" in captured.out
    assert "synthetic phantoms" in captured.out  # the demo disclaimer
    saved = json.loads((tmp_path / "sub-01_T1w_brainage.json").read_text())
    assert saved["model_name"] == "cli-test-model" and saved["brain_age_gap"] is None
    assert saved["model_is_demo"] is True and "NOT for clinical use" in saved["disclaimer"]
    with torch.no_grad():
        expected = predict(model, head_path, "M", device="cpu").predicted_age
    assert saved["predicted_age"] == pytest.approx(expected, abs=1e-4)


def test_explain_writes_the_attention_map_on_the_input_grid(head_path, tmp_path, capsys):
    code = main(["predict", str(head_path), "--preset", "tiny", "--sex", "F", "--age", "50", "--explain",
                 "--out", str(tmp_path), "--json"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    attention = nib.load(printed["outputs"]["attention"])
    source = nib.load(head_path)
    assert attention.shape == source.shape
    np.testing.assert_allclose(attention.affine, source.affine, atol=1e-5)
    values = np.asarray(attention.dataobj)
    assert 0 <= values.min() and values.max() <= 1 and values.max() > 0
    for key in ("labelmap", "color_table", "montage", "result"):
        assert Path(printed["outputs"][key]).is_file(), key


@pytest.mark.parametrize("arguments, message", [
    (["--sex", "X"], "sex must be F, M"),
    (["--age", "-4"], "chronological age must be between 0 and 130"),
    (["--model", "no_such_model"], "unknown model 'no_such_model'"),
    (["--model", "/nonexistent/model.safetensors"], "no such model file"),
])
def test_bad_options_exit_2_with_one_line(head_path, tmp_path, capsys, arguments, message):
    defaults = ["--preset", "tiny"] if "--model" not in arguments else []
    code = main(["predict", str(head_path), *defaults, *arguments, "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 2
    error_lines = [line for line in captured.err.splitlines() if line.startswith("brainage predict: error:")]
    assert len(error_lines) == 1 and message in error_lines[0]
    assert not list(tmp_path.glob("*_brainage.json"))


def test_a_missing_or_broken_input_exits_2(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "absent.nii.gz"), "--preset", "tiny"]) == 2
    assert "absent.nii.gz: file not found" in capsys.readouterr().err
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not an image at all")
    assert main(["predict", str(broken), "--preset", "tiny", "--out", str(tmp_path)]) == 2
    assert "broken.nii.gz" in capsys.readouterr().err


def test_asking_for_cuda_on_a_cpu_machine_exits_2(head_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU machine, on GPU machines too
    assert main(["predict", str(head_path), "--preset", "tiny", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "'cuda' was requested" in capsys.readouterr().err


def test_model_and_preset_are_mutually_exclusive(head_path):
    with pytest.raises(SystemExit) as info:
        main(["predict", str(head_path), "--model", "demo", "--preset", "tiny"])
    assert info.value.code == 2
