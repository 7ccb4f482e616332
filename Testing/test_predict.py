"""Prediction on a real head (the MNI152 T1 at 3 mm): Result fields, sex, progress, devices, bf16."""
from __future__ import annotations

import dataclasses
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from BrainAgeLib.model.checkpoint import load_model
from BrainAgeLib.inference import predict
from BrainAgeLib.devices import (
    DeviceUnavailableError, autocast_dtype, resolve_device, slice_batch_size,
)
from BrainAgeLib.errors import BrainAgeError
from BrainAgeLib.model import build_model
from BrainAgeLib.presets import PRESETS
from BrainAgeLib.result import DEMO_DISCLAIMER, Result
from BrainAgeLib.volume import Volume


@pytest.fixture(scope="module")
def tiny_model():
    return build_model("tiny", seed=0)


@pytest.fixture(scope="module")
def female_result(tiny_model, mni_3mm) -> Result:
    return predict(tiny_model, mni_3mm, "F", age=67, device="cpu", precision="fp32")


def test_predict_reports_age_gap_and_timings(female_result):
    r = female_result
    assert np.isfinite(r.predicted_age)
    assert r.chronological_age == 67.0
    assert r.brain_age_gap == pytest.approx(r.predicted_age - 67.0)
    assert r.corrected_brain_age_gap is None  # no bias correction in a fresh model
    assert r.sex == "F" and not r.sex_was_unknown
    assert r.attention is None
    for stage in ("prepare", "embed", "regress", "total"):
        assert r.timings[stage] >= 0
    assert r.timings["total"] >= r.timings["prepare"] + r.timings["embed"]
    assert any("random, untrained weights" in w for w in r.warnings)


def test_predict_equals_embed_then_regress_on_the_prepared_slices(tiny_model, mni_3mm, female_result):
    from BrainAgeLib.preprocess.pipeline import prepare

    prepared = prepare(mni_3mm, tiny_model.config)
    with torch.no_grad():
        age = tiny_model.regress(tiny_model.embed(prepared.slices, precision="fp32"), "female")
    assert age.item() == pytest.approx(female_result.predicted_age, abs=1e-6)


def test_unknown_sex_averages_both_predictions_and_is_flagged(tiny_model, mni_3mm, female_result):
    male = predict(tiny_model, mni_3mm, "M", device="cpu", precision="fp32")
    unknown = predict(tiny_model, mni_3mm, None, device="cpu", precision="fp32")
    assert male.predicted_age != pytest.approx(female_result.predicted_age, abs=1e-6)
    assert unknown.predicted_age == pytest.approx((male.predicted_age + female_result.predicted_age) / 2, abs=1e-5)
    assert unknown.sex == "unknown" and unknown.sex_was_unknown
    assert any("sex unknown" in w for w in unknown.warnings)


def test_bias_corrected_gap_uses_the_models_coefficients(mni_3mm):
    model = build_model("tiny", seed=0)
    model.metadata.update(bias_correction={"slope": -0.3, "intercept": 15.0}, trained=True)
    result = predict(model, mni_3mm, "M", age=70, device="cpu", precision="fp32")
    expected_gap = result.predicted_age - 70
    assert result.brain_age_gap == pytest.approx(expected_gap)
    assert result.corrected_brain_age_gap == pytest.approx(expected_gap - (-0.3 * 70 + 15.0))
    assert not any("untrained" in w for w in result.warnings)


def test_a_file_path_works_like_a_volume(tiny_model, mni_3mm, female_result, tmp_path):
    path = tmp_path / "head.nii.gz"
    nib.save(nib.Nifti1Image(mni_3mm.array, mni_3mm.affine), path)
    result = predict(tiny_model, str(path), "F", age=67, device="cpu", precision="fp32")
    assert result.predicted_age == pytest.approx(female_result.predicted_age, abs=1e-6)
    assert "load" in result.timings


def test_explain_gives_an_attention_volume_on_the_input_grid(tiny_model, mni_3mm, female_result):
    result = predict(tiny_model, mni_3mm, "F", age=67, explain=True, device="cpu", precision="fp32")
    assert result.predicted_age == pytest.approx(female_result.predicted_age, abs=1e-6)
    attention = result.attention
    assert attention.shape == mni_3mm.shape
    np.testing.assert_allclose(attention.affine, mni_3mm.affine)
    values = attention.array
    assert values.min() >= 0 and values.max() <= 1 and values.max() > 0.5
    # The map lies in the brain: the template is zero outside it.
    assert values[mni_3mm.array == 0].mean() < values[mni_3mm.array > 0].mean()
    assert result.timings["explain"] > 0 and result.to_dict()["has_attention"] is True


def test_progress_is_reported_in_order_and_raising_cancels(tiny_model, mni_3mm):
    seen = []
    predict(tiny_model, mni_3mm, "M", device="cpu", progress=lambda f, m: seen.append((f, m)))
    fractions = [f for f, _ in seen]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0 and fractions == sorted(fractions)
    assert any("Encod" in m for _, m in seen)

    class Cancelled(Exception):
        pass

    def cancel_when_encoding(fraction, message):
        if message.startswith("Encod"):
            raise Cancelled

    with pytest.raises(Cancelled):
        predict(tiny_model, mni_3mm, "M", device="cpu", progress=cancel_when_encoding)


@pytest.mark.parametrize("age", [-1, 200, float("nan"), "old"])
def test_impossible_ages_are_refused(tiny_model, mni_3mm, age):
    with pytest.raises(BrainAgeError, match="chronological age"):
        predict(tiny_model, mni_3mm, "F", age=age)


def test_result_to_dict_is_json_and_summary_is_human(female_result):
    data = female_result.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert set(data) >= {"predicted_age", "chronological_age", "brain_age_gap", "corrected_brain_age_gap",
                         "sex", "sex_was_unknown", "timings", "model_name", "model_intended_use",
                         "model_is_demo", "warnings"}
    text = female_result.summary()
    assert f"Predicted brain age: {female_result.predicted_age:.1f} years" in text
    assert "brain-age gap" in text and DEMO_DISCLAIMER not in text
    demo = dataclasses.replace(female_result, model_is_demo=True, warnings=[])
    assert "synthetic phantoms" in demo.summary() and "NOT for clinical use" in demo.summary()
    assert "disclaimer" not in data and demo.to_dict()["disclaimer"] == DEMO_DISCLAIMER


def test_out_of_range_age_is_a_qc_flag(mni_3mm):
    model = build_model("tiny", seed=0)
    model.metadata.update(trained=True, training_data={"age_range": [20, 90]})
    result = predict(model, mni_3mm, "F", age=8, device="cpu")
    assert any("outside the training ages 20-90" in flag for flag in result.qc.flags)
    assert not any("outside the training ages" in flag for flag in predict(model, mni_3mm, "F", age=50).qc.flags)


# ---------------------------------------------------------------------------- devices
def test_auto_device_falls_back_to_the_cpu_without_cuda():
    device = resolve_device("auto")
    if torch.cuda.is_available():
        assert device.type == "cuda"
    else:
        assert device.type in ("cpu", "mps")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == device.type


def test_asking_for_cuda_without_it_is_a_clear_error(tiny_model, mni_3mm, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no CUDA, on GPU machines too
    with pytest.raises(DeviceUnavailableError, match="'cuda' was requested"):
        resolve_device("cuda")
    with pytest.raises(DeviceUnavailableError):
        predict(tiny_model, mni_3mm, "F", device="cuda:0")


def test_unknown_device_names_are_refused():
    with pytest.raises(DeviceUnavailableError, match="unknown device 'tpu'"):
        resolve_device("tpu")


def test_autocast_policy():
    cpu = torch.device("cpu")
    assert autocast_dtype(cpu, "fp32") is None
    assert autocast_dtype(cpu, "bf16") is torch.bfloat16
    assert autocast_dtype(cpu, "auto") is None  # bf16 on the CPU only when asked for
    assert autocast_dtype(torch.device("cuda"), "auto") is torch.float16
    assert autocast_dtype(cpu, "int8") is None  # int8: quantised linear layers, no autocast (model.precision)
    with pytest.raises(BrainAgeError, match="unknown precision"):
        autocast_dtype(cpu, "int4")
    assert slice_batch_size(cpu, PRESETS["paper"], 160) == 32
    assert slice_batch_size(cpu, PRESETS["tiny"], 16) == 16


def test_batch_size_does_not_change_embeddings(tiny_model):
    slices = torch.rand(16, 32, 32, generator=torch.Generator().manual_seed(2))
    one = tiny_model.embed(slices, batch_size=1, precision="fp32")
    all_at_once = tiny_model.embed(slices, batch_size=16, precision="fp32")
    torch.testing.assert_close(one, all_at_once, rtol=0, atol=1e-5)


def demo_sized_slices(mni_3mm: Volume) -> np.ndarray:
    from BrainAgeLib.preprocess.pipeline import prepare

    config = dataclasses.replace(PRESETS["demo"].preprocess, n4_bias_correction=False, skull_strip="none")
    return prepare(mni_3mm, config).slices


def test_bf16_stays_within_a_tenth_of_a_year_of_fp32_on_a_demo_sized_model(mni_3mm):
    """CPU bf16 autocast (when asked for) is only worth having if the age barely moves; checked on the demo preset."""
    slices = demo_sized_slices(mni_3mm)
    model = build_model("demo", seed=0).eval()
    with torch.no_grad():
        fp32 = model.embed(slices, precision="fp32", device="cpu")
        bf16 = model.embed(slices, precision="bf16", device="cpu")
        worst = max(abs(float(model.regress(bf16_stack, sex)) - float(model.regress(fp32_stack, sex)))
                    for fp32_stack, bf16_stack in ((fp32, bf16), (fp32.flip(0), bf16.flip(0))) for sex in ("F", "M"))
    relative = ((bf16 - fp32).norm() / fp32.norm()).item()
    assert 0 < relative < 0.02  # bf16 really ran, and kept ~2 significant digits
    assert 0 < worst < 0.1


def test_auto_precision_is_fp32_on_the_cpu():
    """Nothing records a model's bf16 agreement, so "auto" never picks bf16 on the CPU."""
    model = build_model("tiny", seed=0)
    slices = torch.rand(16, 32, 32, generator=torch.Generator().manual_seed(4))
    assert torch.equal(model.embed(slices, device="cpu"), model.embed(slices, precision="fp32"))
    assert not torch.equal(model.embed(slices, precision="bf16"), model.embed(slices, precision="fp32"))


def test_bf16_agrees_with_fp32_on_the_trained_demo_model(mni_3mm):
    model = load_model("demo")
    slices = demo_sized_slices(mni_3mm)
    with torch.no_grad():
        fp32 = model.regress(model.embed(slices, precision="fp32"), "F").item()
        bf16 = model.regress(model.embed(slices, precision="bf16"), "F").item()
    assert abs(bf16 - fp32) < 0.1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_autocast_agrees_with_cpu_fp32(tiny_model, mni_3mm, female_result):
    model = build_model("tiny", seed=0)
    on_gpu = predict(model, mni_3mm, "F", age=67, device="cuda")
    assert model.device.type == "cuda"
    assert abs(on_gpu.predicted_age - female_result.predicted_age) < 0.1
