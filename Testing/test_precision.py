"""CPU precisions (``BrainAgeLib.model.precision``): int8 agrees with fp32, "auto" follows the
checkpoint's record and this CPU's features, save_checkpoint writes the record when asked."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from BrainAgeLib.model import build_model
from BrainAgeLib.model import precision as precision_module
from BrainAgeLib.model.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from BrainAgeLib.model.precision import (
    RECORD_KEY, choose_precision, cpu_precision_order, int8_encoder, measure_precisions, record_wanted,
)

INT8_CPU = {"avx2": True, "avx512": False, "avx512_bf16": False, "amx_bf16": False, "int8": True, "native_bf16": False}
AMX_CPU = dict(INT8_CPU, avx512=True, amx_bf16=True, native_bf16=True)
OLD_CPU = {key: False for key in INT8_CPU}


@pytest.fixture(scope="module")
def tiny():
    return build_model("tiny", seed=3).eval()


def _inputs(n=2):
    rng = np.random.default_rng(0)
    return [(f"random {i}", rng.random((16, 32, 32), dtype=np.float32), "FM"[i % 2]) for i in range(n)]


needs_int8 = pytest.mark.skipif(not precision_module.cpu_features()["int8"], reason="no x86 int8 kernels here")


@needs_int8
def test_int8_embeddings_and_age_agree_with_fp32(tiny):
    slices = torch.from_numpy(_inputs(1)[0][1])
    with torch.no_grad():
        reference = tiny.embed(slices, precision="fp32")
        quantised = tiny.embed(slices, precision="int8")
        error = float((quantised - reference).norm() / reference.norm())
        assert 0 < error < 0.05  # rounded, but close
        ages = [float(tiny.regress(e, "F")) for e in (reference, quantised)]
    assert abs(ages[0] - ages[1]) < 0.5
    # the float model is untouched and the quantised copy is made once per set of weights
    assert all(type(m) is not torch.ao.nn.quantized.dynamic.Linear for m in tiny.modules())
    assert int8_encoder(tiny) is int8_encoder(tiny)
    explained = tiny.embed_explain(slices, precision="int8")
    assert torch.allclose(explained[0], quantised, atol=1e-6)


@needs_int8
def test_int8_copy_follows_changed_weights():
    model = build_model("tiny", seed=4).eval()
    first = int8_encoder(model)
    with torch.no_grad():
        next(model.encoder.parameters()).add_(0.01)
    assert int8_encoder(model) is not first


def test_cpu_order_by_features():
    assert cpu_precision_order(INT8_CPU) == ["int8", "fp32"]
    assert cpu_precision_order(dict(INT8_CPU, onnx=True)) == ["int8", "onnx", "fp32"]
    assert cpu_precision_order(dict(AMX_CPU, onnx=True)) == ["bf16", "int8", "onnx", "fp32"]
    assert cpu_precision_order(AMX_CPU) == ["bf16", "int8", "fp32"]
    assert cpu_precision_order(dict(INT8_CPU, avx512_bf16=True, native_bf16=True)) == ["int8", "bf16", "fp32"]
    assert cpu_precision_order(dict(INT8_CPU, avx512_bf16=True, native_bf16=True, onnx=True)) == [
        "int8", "bf16", "onnx", "fp32"]
    assert cpu_precision_order(OLD_CPU) == ["fp32"]


def test_auto_picks_the_fastest_agreeing_precision_from_the_record():
    cpu = torch.device("cpu")
    card = {"weights_sha256": "abc", RECORD_KEY: {"weights_sha256": "abc",
                                                  "max_age_difference_years": {"int8": 0.04, "bf16": 0.02}}}
    assert choose_precision(card, cpu, "auto", INT8_CPU) == "int8"
    assert choose_precision(card, cpu, "auto", AMX_CPU) == "bf16"
    assert choose_precision(card, cpu, "auto", OLD_CPU) == "fp32"
    far = {"weights_sha256": "abc", RECORD_KEY: {"weights_sha256": "abc",
                                                 "max_age_difference_years": {"int8": 0.3, "bf16": 0.05}}}
    assert choose_precision(far, cpu, "auto", INT8_CPU) == "fp32"      # int8 too far; bf16 not native
    assert choose_precision(far, cpu, "auto", AMX_CPU) == "bf16"
    onnx = {"weights_sha256": "abc", RECORD_KEY: {"weights_sha256": "abc",
                                                  "max_age_difference_years": {"int8": 0.3, "onnx": 1e-5}}}
    assert choose_precision(onnx, cpu, "auto", dict(INT8_CPU, onnx=True)) == "onnx"  # int8 too far: the next
    assert choose_precision(onnx, cpu, "auto", INT8_CPU) == "fp32"                    # no ONNX Runtime here
    assert choose_precision(dict(far, weights_sha256="other"), cpu, "auto", AMX_CPU) == "fp32"  # stale record
    assert choose_precision({}, cpu, "auto", INT8_CPU) == "fp32"       # no record: fp32, as before
    assert choose_precision(card, cpu, "fp32", INT8_CPU) == "fp32"     # an explicit precision is kept
    assert choose_precision(card, torch.device("cuda"), "auto", INT8_CPU) == "fp16"


def test_auto_orders_by_the_recorded_seconds_on_the_same_kind_of_cpu():
    cpu = torch.device("cpu")
    here = dict(INT8_CPU, onnx=True, avx512=True, avx512_bf16=True, native_bf16=True)
    record = {"weights_sha256": "abc", "cpu": dict(here, onnx=False),
              "max_age_difference_years": {"int8": 0.04, "onnx": 1e-5, "bf16": 0.03},
              "seconds": {"fp32": 10.0, "int8": 6.0, "onnx": 5.0, "bf16": 4.0}}
    card = {"weights_sha256": "abc", RECORD_KEY: record}
    assert choose_precision(card, cpu, "auto", here) == "bf16"          # fastest there, and it agrees
    slow_bf16 = {"weights_sha256": "abc", RECORD_KEY: dict(record, seconds={"fp32": 10.0, "int8": 6.0,
                                                                            "onnx": 5.0, "bf16": 12.0})}
    assert choose_precision(slow_bf16, cpu, "auto", here) == "onnx"
    other_cpu = dict(here, avx512_bf16=False, amx_bf16=True)               # seconds from another CPU: static order
    assert choose_precision(card, cpu, "auto", other_cpu) == "bf16"
    assert choose_precision(card, cpu, "auto", dict(here, avx512=False, avx512_bf16=False,
                                                    native_bf16=False)) == "int8"


def test_measure_precisions_record(tiny):
    record = measure_precisions(tiny, inputs=_inputs(), precisions=["int8"] if precision_module.cpu_features()["int8"] else [])
    assert record["reference"] == "fp32" and len(record["ages"]["fp32"]) == 2
    assert record["inputs"] == ["random 0", "random 1"]
    for value in record["max_age_difference_years"].values():
        assert 0 <= value < 0.5
    with pytest.raises(ValueError, match="unknown CPU precisions"):
        measure_precisions(tiny, inputs=_inputs(1), precisions=["fp8"])


def test_save_checkpoint_writes_the_record_when_asked(tmp_path, monkeypatch, tiny):
    monkeypatch.setenv("BRAINAGE_CACHE", str(tmp_path / "cache"))  # an ONNX graph, if measured, goes here
    monkeypatch.setattr(precision_module, "default_inputs", lambda config, log=None: _inputs())
    plain = read_metadata(save_checkpoint(tiny, tmp_path / "plain.safetensors"))
    assert RECORD_KEY not in plain
    card = read_metadata(save_checkpoint(tiny, tmp_path / "recorded.safetensors", record_precisions=True))
    record = card[RECORD_KEY]
    assert record["weights_sha256"] == card["weights_sha256"] == plain["weights_sha256"]
    loaded = load_checkpoint(tmp_path / "recorded.safetensors")
    expected = choose_precision(card, torch.device("cpu"))
    assert loaded.resolve_precision("auto", "cpu") == expected
    # a record travels with the model's card only while the weights are the ones it measured
    with torch.no_grad():
        next(loaded.regressor.parameters()).add_(1.0)
    assert RECORD_KEY not in read_metadata(save_checkpoint(loaded, tmp_path / "changed.safetensors"))


@pytest.mark.skipif(not precision_module.cpu_features()["onnx"], reason="ONNX Runtime is not installed")
def test_onnx_runtime_agrees_with_fp32_and_caches_its_graph_by_digest(tmp_path, monkeypatch):
    monkeypatch.setenv("BRAINAGE_CACHE", str(tmp_path))
    from BrainAgeLib.model.onnx_encoder import onnx_encoder

    model = build_model("tiny", seed=5).eval()
    slices = torch.from_numpy(_inputs(1)[0][1])
    with torch.no_grad():
        reference = model.embed_explain(slices, precision="fp32")
        ours = model.embed_explain(slices, precision="onnx")
    for a, b in zip(reference, ours):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    graphs = list((tmp_path / "onnx").glob("*.onnx"))
    assert len(graphs) == 1 and onnx_encoder(model).path == graphs[0]
    with torch.no_grad():
        next(model.encoder.parameters()).add_(0.01)
        model.embed(slices, precision="onnx")
    assert len(list((tmp_path / "onnx").glob("*.onnx"))) == 2   # new weights, new graph


def test_record_switch_from_the_environment(monkeypatch):
    monkeypatch.setenv("BRAINAGE_PRECISION_RECORD", "0")
    assert not record_wanted(None) and record_wanted(True)
    monkeypatch.setenv("BRAINAGE_PRECISION_RECORD", "1")
    assert record_wanted(None) and not record_wanted(False)


def test_result_says_which_precision_ran(tiny):
    from BrainAgeLib.inference import predict_prepared
    class _Prepared:  # what predict_prepared reads of a preprocess.Prepared
        slices = _inputs(1)[0][1]
        timings = {}
        warnings = []
        qc = None
        input_to_template = None
        input_brain_mask = None

        def brain_mask_volume(self):
            return None

    from BrainAgeLib.preprocess.qc import QualityControl

    prepared = _Prepared()
    prepared.qc = QualityControl()
    result = predict_prepared(tiny, prepared, "F", device="cpu", precision="fp32")
    assert result.precision == "fp32" and result.to_dict()["precision"] == "fp32"
    auto = predict_prepared(tiny, prepared, "F", device="cpu")
    assert auto.to_dict()["precision"] == tiny.resolve_precision("auto", "cpu") == "fp32"  # no record: fp32
