"""Read a plain ``pickle.dump`` of tensors and arrays without running code from the file.

The authors of BrainRotViT saved their stage-2 CNN with ``pickle.dump`` of a dict holding the
state dict, the optimizer state and the torch / numpy random-number-generator states. A pickle
can name any importable callable and call it while loading (``os.system`` included), so
``pickle.load`` on a downloaded file is unsafe. :func:`load_restricted_pickle` uses an
unpickler whose ``find_class`` hands out only the few globals such a file needs:

- torch tensors: ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter``, and
  ``torch.storage._load_from_bytes``. The real ``_load_from_bytes`` calls
  ``torch.load(weights_only=False)`` on the embedded storage bytes; here those bytes go through
  ``torch.load(weights_only=True, map_location="cpu")`` instead, so nested files are restricted
  too and CUDA-saved storages land on the CPU;
- ``collections.OrderedDict`` (state dicts);
- numpy arrays, dtypes and scalars (``np.random.get_state()``), under both the numpy 1
  (``numpy.core``) and numpy 2 (``numpy._core``) module names. Object dtypes are refused.

Anything else raises :class:`~BrainAgeLib.errors.CheckpointError` naming the global, before it
is imported or called.
"""
from __future__ import annotations

import collections
import io
import pickle
from pathlib import Path
from typing import Any, Callable, Dict, Tuple, Union

from .errors import CheckpointError


def _load_storage_from_bytes(data: bytes):
    """Stand-in for ``torch.storage._load_from_bytes``: the same bytes, loaded weights-only."""
    import torch

    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError("a tensor storage must be given as bytes")
    try:
        storage = torch.load(io.BytesIO(bytes(data)), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = next((line for line in lines if "GLOBAL" in line), lines[0] if lines else "")
        raise pickle.UnpicklingError(
            f"an embedded tensor storage is not plain data ({reason})"
        ) from None
    if not isinstance(storage, (torch.storage.TypedStorage, torch.storage.UntypedStorage)):
        raise pickle.UnpicklingError(
            f"an embedded tensor storage holds a {type(storage).__name__}, not a storage"
        )
    return storage


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False,
                    backward_hooks=None, metadata=None):
    """``torch._utils._rebuild_tensor_v2`` for storages this module loaded, without hooks."""
    import torch
    from torch._utils import _rebuild_tensor_v2

    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError("a tensor must be rebuilt from a typed tensor storage")
    if backward_hooks:
        raise pickle.UnpicklingError("a tensor with backward hooks (code) cannot be loaded")
    return _rebuild_tensor_v2(storage, storage_offset, size, stride, bool(requires_grad),
                              collections.OrderedDict(), metadata)


def _rebuild_parameter(data, requires_grad, backward_hooks=None):
    import torch

    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("a parameter must be rebuilt from a tensor")
    if backward_hooks:
        raise pickle.UnpicklingError("a parameter with backward hooks (code) cannot be loaded")
    return torch.nn.Parameter(data, bool(requires_grad))


def _numpy_dtype(*args, **kwargs):
    import numpy as np

    dtype = np.dtype(*args, **kwargs)
    if dtype.hasobject:
        raise pickle.UnpicklingError("numpy object arrays can hold code and are not loaded")
    return dtype


def _numpy_globals() -> Dict[Tuple[str, str], Callable[..., Any]]:
    import numpy as np

    try:  # numpy >= 2
        from numpy._core import multiarray
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    found: Dict[Tuple[str, str], Callable[..., Any]] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): _numpy_dtype,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        found[(module, "_reconstruct")] = multiarray._reconstruct
        found[(module, "scalar")] = multiarray.scalar
    return found


def allowed_globals() -> Dict[Tuple[str, str], Callable[..., Any]]:
    """The (module, name) pairs a restricted pickle may use, and what each resolves to."""
    found: Dict[Tuple[str, str], Callable[..., Any]] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch.storage", "_load_from_bytes"): _load_storage_from_bytes,
    }
    found.update(_numpy_globals())
    return found


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a global outside the allow-list (carries ``module`` and ``name``)."""

    def __init__(self, module: str, name: str):
        self.module = module
        self.name = name
        super().__init__(f"{module}.{name}")


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only :func:`allowed_globals`, never imports others."""

    def __init__(self, file, **kwargs: Any):
        super().__init__(file, **kwargs)
        self._allowed = allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise RefusedGlobal(module, name) from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not plain data")


def load_restricted_pickle(path: Union[str, Path]) -> Any:
    """Load a ``pickle.dump`` file of tensors, arrays and plain containers, running no code.

    Raises :class:`CheckpointError` naming the file when it is missing, not a pickle,
    truncated, or needs any global outside :func:`allowed_globals` (the error names it).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("file not found", path)
    try:
        with path.open("rb") as handle:
            return RestrictedUnpickler(handle).load()
    except RefusedGlobal as refused:
        raise CheckpointError(
            f"refusing to unpickle: the file needs the global '{refused.module}.{refused.name}', "
            "which is not a tensor, numpy array or plain container (a pickle can run code "
            "through such globals; this file may have been tampered with)",
            path,
        ) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, RuntimeError,
            AttributeError, IndexError, KeyError, MemoryError, OverflowError) as error:
        raise CheckpointError(f"not a readable checkpoint pickle ({error})", path) from None
