"""Where and in which precision the model runs.

- ``resolve_device("auto")`` picks CUDA when available, then Apple's MPS, else the CPU. Asking
  explicitly for ``"cuda"`` on a machine without it is an error (``DeviceUnavailableError``),
  not a silent fallback: a user who names a device should learn that it is missing. "auto" is
  the fallback path, and it is what the Slicer module and the CLI use by default.
- Autocast ("auto" precision): on CUDA the ViT runs in float16 autocast (LayerNorm, softmax
  and reductions stay float32). float16 keeps 10 mantissa bits against bfloat16's 7: on an
  H100 both take the same time, and the embeddings' relative error against fp32 was 5e-4
  (fp16) vs 5e-3 (bf16) for the paper ViT. On the CPU, bfloat16 is several times faster where
  the CPU does it natively (AVX512-BF16 or AMX: 2.7 s vs 7.8 s for the paper ViT over 160
  slices on 16 Xeon cores), but its error reaches the age in a way only a trained model can
  tell: so on the CPU "auto" is decided per checkpoint by ``model.precision.choose_precision``
  (``BrainAgeModel.resolve_precision``): the fastest of int8 (dynamic quantisation of the ViT's
  linear layers) and native bf16 whose recorded age difference from fp32 is within 0.1 years,
  else float32. Here ``autocast_dtype(cpu, "auto")`` stays None (float32). (On CPUs without
  native bf16, like AVX2-only ones, bf16 is several times slower than fp32.) The regressor
  always runs in float32.
- Slices go to the device in batches sized to its free memory, through pinned host memory on CUDA.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager, Optional, Union

import torch

from .errors import BrainAgeError
from .presets import PRECISIONS, ModelConfig  # PRECISIONS re-exported: the names autocast_dtype accepts

DeviceLike = Union[str, torch.device, None]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

#: Slices per ViT batch on the CPU (larger batches gain nothing there and cost memory).
CPU_BATCH_SIZE = 32


class DeviceUnavailableError(BrainAgeError, RuntimeError):
    """The requested device does not exist on this machine (or is not a device name)."""


def resolve_device(device: DeviceLike = "auto") -> torch.device:
    """``"auto"`` (CUDA, else MPS, else CPU), ``"cpu"``, ``"cuda"``/``"cuda:N"`` or ``"mps"`` -> torch.device."""
    if isinstance(device, torch.device):
        name = str(device)
    else:
        name = (device or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "gpu":
        name = "cuda"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            built = torch.version.cuda
            why = "this torch build has no CUDA support" if built is None else (
                f"no CUDA GPU or driver is visible (this torch is built for CUDA {built})")
            raise DeviceUnavailableError(f"device {name!r} was requested, but {why}; use 'auto' or 'cpu'")
        result = torch.device(name)
        if result.index is not None and result.index >= torch.cuda.device_count():
            raise DeviceUnavailableError(
                f"device {name!r} was requested, but only {torch.cuda.device_count()} CUDA device(s) exist")
        return result
    if name == "mps":
        if not _mps_available():
            raise DeviceUnavailableError("device 'mps' was requested, but Apple's MPS backend is not available")
        return torch.device("mps")
    raise DeviceUnavailableError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def autocast_dtype(device: torch.device, precision: str = "auto") -> Optional[torch.dtype]:
    """The autocast dtype for the ViT on ``device``, or None for plain float32 ("auto": float16
    on CUDA, float32 elsewhere)."""
    precision = (precision or "auto").lower()
    if precision not in PRECISIONS:
        raise BrainAgeError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision in ("fp32", "int8", "onnx"):  # int8, onnx: other kernels, float32 tensors (model.precision)
        return None
    if precision != "auto":
        return _DTYPES[precision]
    if device.type == "cuda":
        return torch.float16
    return None  # CPU: see the module's note; MPS: its autocast support varies between torch releases


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> ContextManager:
    """``torch.autocast`` for ``dtype`` on ``device`` (a no-op context for float32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def precision_name(dtype: Optional[torch.dtype]) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def batch_that_fits(device: torch.device, n_items: int, cpu_batch: int, bytes_per_item: float,
                    memory_fraction: float) -> int:
    """Items per batch on ``device``, at most ``n_items``: ``cpu_batch`` on the CPU (and on CUDA
    when its free memory cannot be read); on CUDA as many as fit in ``memory_fraction`` of the
    free memory at ``bytes_per_item`` each."""
    n_items = max(1, int(n_items))
    device = torch.device(device)
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
        except Exception:
            return min(n_items, cpu_batch)
        return int(max(1, min(n_items, (free * memory_fraction) // bytes_per_item)))
    return min(n_items, cpu_batch)


def slice_batch_size(device: torch.device, config: ModelConfig, n_slices: int) -> int:
    """How many slices go through the ViT at once on ``device``.

    On CUDA: as many as fit in half of the free memory, estimating a slice's peak activations
    as a few copies of its MLP hidden state (tokens x 4D); capped at ``n_slices``.
    """
    tokens = (config.image_size // config.patch_size) ** 2 + 1
    per_slice = tokens * config.embed_dim * config.mlp_ratio * 4 * 4  # bytes, generous
    return batch_that_fits(device, n_slices, CPU_BATCH_SIZE, per_slice, 0.5)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a host tensor to ``device``, through pinned memory and a non-blocking copy on CUDA."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
