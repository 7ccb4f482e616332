"""CPU precisions of the ViT and the per-checkpoint record of how far each moves the age.

On a CPU the ViT's forward over all slices is nearly the whole cost of a prediction. Besides
float32 two precisions are faster there:

- ``"int8"``: PyTorch's dynamic quantisation of the ViT's ``nn.Linear`` layers
  (``torch.ao.quantization.quantize_dynamic``; weights int8 per tensor, activations quantised
  per batch; attention's softmax, LayerNorm and the patch-embedding convolution stay float32).
  Applied when the model runs, to a copy of the encoder kept beside the model (never written to
  disk; rebuilt when the weights change). It needs fbgemm's AVX2 (or wider) kernels: measured
  on 2 AMD EPYC cores (AVX-512, 2026-12-01) the paper ViT over 160 slices ran ~2.5x faster than
  float32 (README, *Benchmark*). No extra dependency.
- ``"onnx"``: the float32 ViT run by ONNX Runtime (``model.onnx_encoder``; optional, where
  ``onnxruntime`` and ``onnx`` are installed): the same arithmetic, other kernels, ~2x torch's
  fp32 on those EPYC cores; its graph is cached by the weights' digest in the user's cache.
- ``"bf16"``: autocast to bfloat16, several times faster than fp32 only where the CPU has it
  natively (AMX; AVX512-BF16 gains less), several times *slower* without.

Either changes the embeddings by rounding, and how far that moves the age only the trained
weights can tell. :func:`measure_precisions` measures it on inputs available offline (the
bundled sample head, a resampling of it, and generated phantoms when nilearn is installed:
:func:`default_inputs`) and returns the record a checkpoint keeps in its card under :data:`RECORD_KEY`
(``save_checkpoint(..., record_precisions=True)``). :func:`choose_precision` is what
``precision="auto"`` means: on the CPU the fastest precision this CPU does well whose recorded
difference is at most :data:`AGREEMENT_YEARS`, else float32; on CUDA float16, as before.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import os
import platform
import time
import warnings
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

#: The card key of the record (:func:`measure_precisions`).
RECORD_KEY = "cpu_precisions"
#: "auto" takes a faster precision only if it moved no recorded age by more than this (years).
AGREEMENT_YEARS = 0.1
#: The CPU precisions besides the float32 reference that can be recorded and chosen.
FAST_CPU_PRECISIONS: Tuple[str, ...] = ("int8", "onnx", "bf16")


# --------------------------------------------------------------------------------- CPU features
@functools.lru_cache(maxsize=1)
def cpu_features() -> Dict[str, bool]:
    """What this CPU offers the ViT: ``avx2``, ``avx512``, ``avx512_bf16``, ``amx_bf16``
    (from ``/proc/cpuinfo`` on Linux; torch's CPU capability elsewhere), ``native_bf16``
    (either of the two bf16 ones) and ``int8`` (torch has an x86 quantised engine and the CPU
    AVX2 or wider)."""
    flags: set = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    capability = ""
    try:
        capability = str(torch.backends.cpu.get_cpu_capability()).upper()
    except Exception:  # pragma: no cover - older torch
        pass
    avx2 = "avx2" in flags or capability.startswith("AVX2") or capability.startswith("AVX512")
    avx512 = "avx512f" in flags or capability.startswith("AVX512")
    engines = set(getattr(torch.backends.quantized, "supported_engines", ()))
    features = {
        "avx2": avx2,
        "avx512": avx512,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "int8": avx2 and bool(engines & {"x86", "fbgemm"}) and platform.machine().lower() in ("x86_64", "amd64"),
    }
    features["native_bf16"] = features["avx512_bf16"] or features["amx_bf16"]
    from .onnx_encoder import onnx_available

    features["onnx"] = onnx_available()
    return features


def cpu_precision_order(features: Optional[Mapping[str, bool]] = None) -> List[str]:
    """CPU precisions from fastest to slowest on a CPU with ``features`` (default: this one's),
    float32 last. With AMX bf16 leads (2.9x fp32 on 16 Xeon cores, above int8's ~2.5x); with
    AVX512-BF16 alone int8 leads, then bf16, then ONNX Runtime's fp32 (2 EPYC cores at low load,
    paper ViT: 2.4x, 2.0x, 1.0x; under load ONNX Runtime gains, README);
    without native bf16, bf16 is left out (slower than fp32); without AVX2, int8 too; "onnx"
    only where ONNX Runtime is installed."""
    features = cpu_features() if features is None else features
    order: List[str] = []
    if features.get("amx_bf16"):
        order.append("bf16")
    if features.get("int8"):
        order.append("int8")
    if features.get("native_bf16") and "bf16" not in order:
        order.append("bf16")
    if features.get("onnx"):
        order.append("onnx")
    return order + ["fp32"]


def choose_precision(metadata: Mapping[str, Any], device: torch.device, precision: str = "auto",
                     features: Optional[Mapping[str, bool]] = None) -> str:
    """The precision a model with card ``metadata`` runs its ViT in on ``device``.

    An explicit ``precision`` is kept. "auto": float16 on CUDA; float32 on MPS; on the CPU the
    first of :func:`cpu_precision_order` whose recorded age difference (the card's
    :data:`RECORD_KEY`, measured for these weights) is at most :data:`AGREEMENT_YEARS`, else fp32.
    When the record was measured on a CPU with the same features as this one, its seconds order
    the candidates instead (fastest first; one no faster than fp32 there is left out): which of
    int8, ONNX Runtime and bf16 is fastest differs between CPUs and models (README, *Benchmark*).
    """
    precision = (precision or "auto").lower()
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        return "fp16"
    if device.type != "cpu":
        return "fp32"
    differences = recorded_differences(metadata)
    features = cpu_features() if features is None else features
    for name in _by_recorded_speed(cpu_precision_order(features), metadata, features):
        if name == "fp32":
            break
        difference = differences.get(name)
        if difference is not None and difference <= AGREEMENT_YEARS:
            return name
    return "fp32"


#: The CPU flags a record's seconds are comparable under (not what is installed, like onnx).
_CPU_FLAGS = ("avx2", "avx512", "avx512_bf16", "amx_bf16")


def _by_recorded_speed(order: List[str], metadata: Mapping[str, Any], features: Mapping[str, bool]) -> List[str]:
    record = metadata.get(RECORD_KEY) if metadata else None
    if not isinstance(record, Mapping) or not recorded_differences(metadata):
        return order
    seconds, cpu = record.get("seconds") or {}, record.get("cpu") or {}
    same_cpu = bool(cpu) and all(bool(cpu.get(flag)) == bool(features.get(flag)) for flag in _CPU_FLAGS)
    if not same_cpu or not all(isinstance(seconds.get(name), (int, float)) for name in order):
        return order
    faster = [name for name in order if name != "fp32" and seconds[name] < seconds["fp32"]]
    return sorted(faster, key=lambda name: seconds[name]) + ["fp32"]


def recorded_differences(metadata: Mapping[str, Any]) -> Dict[str, float]:
    """``{precision: max age difference vs fp32 (years)}`` from a card's record, empty when there
    is none or it was measured for other weights than the card's ``weights_sha256``."""
    record = metadata.get(RECORD_KEY) if metadata else None
    if not isinstance(record, Mapping):
        return {}
    ours = metadata.get("weights_sha256")
    if ours and record.get("weights_sha256") and record["weights_sha256"] != ours:
        return {}
    found = {}
    for name, value in (record.get("max_age_difference_years") or {}).items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if np.isfinite(number):
            found[str(name)] = number
    return found


# --------------------------------------------------------------------------------- int8
def quantize_int8(module: nn.Module) -> nn.Module:
    """A copy of ``module`` (on the CPU, eval mode) whose ``nn.Linear`` layers are dynamically
    quantised to int8; ``module`` itself is untouched."""
    from torch.ao.quantization import quantize_dynamic

    engines = getattr(torch.backends.quantized, "supported_engines", ())
    if torch.backends.quantized.engine not in ("x86", "fbgemm"):
        for engine in ("x86", "fbgemm"):
            if engine in engines:
                torch.backends.quantized.engine = engine
                break
    source = copy.deepcopy(module).to("cpu").eval()
    with _quiet():
        return quantize_dynamic(source, {nn.Linear}, dtype=torch.qint8)


def int8_encoder(model: nn.Module) -> nn.Module:
    """``model.encoder`` with its ViT's linear layers in int8 (:func:`quantize_int8`), made once
    per set of weights and kept on the model (an in-place change of the float weights, as a
    training step makes, makes a new one)."""
    key = _weights_key(model.encoder)
    cached = getattr(model, "_int8_encoder_cache", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    encoder = quantize_int8(model.encoder)
    object.__setattr__(model, "_int8_encoder_cache", (key, encoder))  # not a submodule: no state_dict entry
    return encoder


def _weights_key(module: nn.Module) -> str:
    from ..digests import weights_digest

    return weights_digest(module, cheap=True)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():  # torch.ao.quantization warns of its future move to torchao
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        yield


# --------------------------------------------------------------------------------- the record
#: ``0`` (or off/false/no) turns the record off where a checkpoint writer leaves it to the environment.
RECORD_VARIABLE = "BRAINAGE_PRECISION_RECORD"


def record_wanted(record: Optional[bool] = None) -> bool:
    """Whether to measure the record: ``record`` when given, else the environment's
    :data:`RECORD_VARIABLE` (on unless it says 0/off/false/no)."""
    if record is not None:
        return bool(record)
    return os.environ.get(RECORD_VARIABLE, "1").strip().lower() not in ("0", "off", "false", "no")

#: The bundled sample head (``brainage demo``'s) and its sex.
SAMPLE_HEAD = ("Samples", "sample_phantom_F67.nii.gz")
SAMPLE_SEX = "F"

#: One input of the measurement: (description, slices [S, H, W] in [0, 1], sex "F"/"M").
PrecisionInput = Tuple[str, np.ndarray, str]


#: Generated phantoms in a checkpoint's precision record: many for a small ViT (seconds each),
#: two for a ViT-B-sized one (each input costs the paper ViT about two minutes over its
#: precisions on 2 cores). With one phantom the demo's record said bf16 moves its age by 0.030
#: years; 21 other phantoms showed 0.103.
RECORD_PHANTOMS = {"small": 8, "large": 2}
#: ViTs with more parameters than this count as large for :data:`RECORD_PHANTOMS`.
LARGE_VIT_PARAMETERS = 30_000_000


def record_phantoms(config: Any) -> int:
    """How many generated phantoms :func:`default_inputs` adds for a model of ``config``."""
    from .encoder import vit_parameter_count

    return RECORD_PHANTOMS["large" if vit_parameter_count(config) > LARGE_VIT_PARAMETERS else "small"]


def default_inputs(config: Any, log: Callable[[str], None] = lambda message: None,
                   phantoms: Optional[int] = None) -> List[PrecisionInput]:
    """Prepared slices of inputs available offline: the bundled sample head, the same head
    resampled to 1.3 mm, and (with nilearn) ``phantoms`` generated heads (default
    :func:`record_phantoms`) with ages spread over 25-85 years, alternating sex, voxel size
    (1 or 1.5 mm) and skull."""
    from ..geometry import resample
    from ..io import load_volume
    from ..preprocess.pipeline import prepare
    from ..resources import resource_path
    from ..synth.phantoms import SynthError, make_phantom
    from ..volume import Volume

    volume, sex = load_volume(resource_path(*SAMPLE_HEAD)), SAMPLE_SEX
    spacing = np.asarray(volume.spacing, dtype=np.float64)
    zoom = 1.3 / spacing
    shape = tuple(int(np.ceil(n / z)) for n, z in zip(volume.shape, zoom))
    affine = volume.affine.copy()
    affine[:3, :3] = affine[:3, :3] * zoom[np.newaxis, :]
    heads: List[Tuple[str, Volume, str]] = [
        ("sample head", volume, sex),
        ("sample head resampled to 1.3 mm", resample(volume, affine, shape, order=3), sex),
    ]
    count = record_phantoms(config) if phantoms is None else int(phantoms)
    for i in range(count):
        age = 25.0 + 60.0 * i / max(1, count - 1)
        phantom_sex, voxel, skull, seed = ("M", "F")[i % 2], (1.0, 1.5)[(i // 2) % 2], i % 3 != 2, 900_000 + i
        try:
            head = make_phantom(age, phantom_sex, seed=seed, spacing=voxel, skull=skull, with_tissue=False).volume
        except SynthError as error:
            log(f"no generated phantoms ({error})")
            break
        heads.append((f"phantom {age:.0f} y {phantom_sex}, {voxel:g} mm{'' if skull else ', no skull'} (seed {seed})",
                      head, phantom_sex))
    inputs = []
    for name, head, head_sex in heads:
        log(f"preparing {name}")
        inputs.append((name, np.asarray(prepare(head, config).slices, dtype=np.float32), head_sex))
    return inputs


def measure_precisions(model: nn.Module, inputs: Optional[Sequence[PrecisionInput]] = None,
                       precisions: Optional[Sequence[str]] = None,
                       log: Callable[[str], None] = lambda message: None) -> Dict[str, Any]:
    """Each CPU precision's largest age difference from float32 over ``inputs``: the record a
    checkpoint keeps under :data:`RECORD_KEY`.

    ``model``: a BrainAgeModel (measured on a CPU copy when it sits elsewhere). ``inputs``:
    (description, slices, sex) triples, default :func:`default_inputs`. ``precisions``: default
    int8 where this CPU has its kernels, and bf16 where it has bf16 natively (elsewhere bf16 is
    several times slower than fp32 and is left out; a record without it keeps "auto" from
    choosing it). Returns ``{"reference": "fp32", "max_age_difference_years": {p: years},
    "ages": {p: [...]}, "seconds": {p: s}, "inputs": [...], "weights_sha256", "torch_version",
    "cpu": {...}}``; the seconds are the ViT's over all inputs (after a warm-up), which order
    "auto"'s candidates on CPUs with the same features (:func:`choose_precision`).
    """
    from ..digests import weights_digest

    features = cpu_features()
    if precisions is None:
        wanted = {"int8": features["int8"], "onnx": features["onnx"], "bf16": features["native_bf16"]}
        precisions = [p for p in FAST_CPU_PRECISIONS if wanted[p]]
    unknown = [p for p in precisions if p not in FAST_CPU_PRECISIONS]
    if unknown:
        raise ValueError(f"unknown CPU precisions {unknown}; measured are {', '.join(FAST_CPU_PRECISIONS)}")
    if next(model.parameters()).device.type != "cpu":
        model = copy.deepcopy(model).to("cpu")
    was_training = model.training
    model.eval()
    try:
        if inputs is None:
            inputs = default_inputs(model.config, log)
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
        ages: Dict[str, List[float]] = {name: [] for name in ["fp32", *precisions]}
        seconds: Dict[str, float] = {name: 0.0 for name in ages}
        with torch.no_grad():
            for name in ages:  # not timed: the int8 copy, the ONNX export, the first bf16 kernels
                model.embed(inputs[0][1][:2], precision=name)
            for description, slices, sex in inputs:
                for name in ages:
                    log(f"{description}: {name}")
                    tic = time.perf_counter()
                    embeddings = model.embed(slices, precision=name)
                    seconds[name] += time.perf_counter() - tic
                    ages[name].append(float(model.regress(embeddings, sex)))
        reference = np.asarray(ages["fp32"])
        differences = {name: float(np.max(np.abs(np.asarray(ages[name]) - reference))) for name in precisions}
    finally:
        model.train(was_training)
    return {
        "reference": "fp32",
        "max_age_difference_years": differences,
        "ages": ages,
        "seconds": seconds,
        "inputs": [description for description, _, _ in inputs],
        "weights_sha256": weights_digest(tensors),
        "torch_version": torch.__version__,
        "cpu": {k: bool(v) for k, v in features.items()},
        "agreement_years": AGREEMENT_YEARS,
    }
