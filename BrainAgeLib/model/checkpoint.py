"""BrainAge checkpoints: one ``.safetensors`` file holding the weights and a JSON model card.

Format (version 1): the tensors of ``BrainAgeModel.state_dict()`` in float32, and in the
safetensors header's ``__metadata__`` the key ``"brainage"`` whose value is a JSON object with
the format version, preset name and full ``ModelConfig``, the preprocessing, the stage-1 class
names and age bins, the bias-correction coefficients, a training-data summary, metrics, the
intended use, whether it is a demo model, its source, the library version and a SHA-256 digest
of the weights. Nothing is ever unpickled: pickles and PyTorch zip files are refused with a
message, and a file whose tensors do not match the architecture its metadata describes is
refused before any weight is used.

``load_model(name_or_path)`` takes a file path or a registered name: ``"demo"`` is the model
bundled in ``Resources/Models``; ``"brainrotvit"`` is the authors' published model, fetched from
their archive and imported once (:mod:`BrainAgeLib.model.published`); entries with a URL are
downloaded once into ``resources.cache_dir()`` and verified against their SHA-256
(``register_model`` adds entries). Writing checkpoints lives in :mod:`.checkpoint_file`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import torch

from .. import __version__
from ..atomic_files import atomic_path
from ..digests import file_sha256, weights_digest
from ..errors import CheckpointError
from ..presets import ModelConfig
from ..devices import resolve_device
from ..registry import REGISTRY, ModelEntry, available_models, register_model
from .brain_age_model import BrainAgeModel
from .checkpoint_file import FORMAT_VERSION, METADATA_KEY, build_metadata, save_checkpoint

__all__ = [
    "ModelEntry", "REGISTRY", "register_model", "available_models", "load_model", "load_checkpoint",
    "resolve_checkpoint", "remove_cached_model", "read_metadata", "download", "save_checkpoint", "build_metadata",
    "FORMAT_VERSION", "METADATA_KEY",
]

logger = logging.getLogger(__name__)

_MAX_HEADER_BYTES = 100 * 1024 * 1024
_PICKLE_PROTOCOL_BYTE = 0x80
_ZIP_MAGIC = b"PK\x03\x04"
_CHUNK = 1 << 20

PathLike = Union[str, os.PathLike]
#: ``progress(fraction, message)`` of a first-use download and import
Progress = Callable[[float, str], None]


# ---------------------------------------------------------------------------- loading
def load_model(name_or_path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu",
               cache_dir: Optional[PathLike] = None, progress: Optional[Progress] = None) -> "torch.nn.Module":
    """A BrainAgeModel from a registered name (``"demo"``, ``"brainrotvit"``, ...) or a
    ``.safetensors`` path, in eval mode. A registered model not yet in the cache (``cache_dir``,
    else ``$BRAINAGE_CACHE``, else ``~/.cache/brainage``) is downloaded (and built) first, reporting
    to ``progress(fraction, message)`` when given; once cached, no network is used."""
    path = resolve_checkpoint(name_or_path, cache_dir=cache_dir, progress=progress)
    return load_checkpoint(path, device=device)


def resolve_checkpoint(name_or_path: Union[str, os.PathLike], cache_dir: Optional[PathLike] = None,
                       progress: Optional[Progress] = None) -> Path:
    """The local file of a registered model (downloading it once if needed) or of a path."""
    if isinstance(name_or_path, str) and name_or_path in REGISTRY:
        return _registry_file(REGISTRY[name_or_path], cache_dir, progress)
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    if isinstance(name_or_path, str) and os.sep not in name_or_path and not path.suffix:
        raise CheckpointError(
            f"unknown model {name_or_path!r}: neither a registered model ({', '.join(REGISTRY)}) nor an existing file")
    raise CheckpointError("no such model file", path)


def remove_cached_model(name: str, cache_dir: Optional[PathLike] = None) -> List[Path]:
    """Delete a registered model's cached file and whatever its download left; returns what went.

    Bundled models are part of the installation and are refused.
    """
    if name not in REGISTRY:
        raise CheckpointError(f"unknown model {name!r} (registered: {', '.join(REGISTRY)})")
    entry = REGISTRY[name]
    if entry.bundled:
        raise CheckpointError(f"model {name!r} is bundled with BrainAge, not cached; it cannot be removed")
    removed = []
    path = entry.local_path(cache_dir)
    for leftover in [path, *path.parent.glob(f".{path.name}.*")] if path.parent.is_dir() else []:
        if leftover.is_file():
            leftover.unlink()
            removed.append(leftover)
    if entry.recipe == "published":
        from .published import remove_downloads

        removed += remove_downloads(entry.name, cache_dir)
    return removed


def read_metadata(path: PathLike) -> Dict[str, Any]:
    """The JSON model card of a checkpoint, after checking that the file is a sound BrainAge safetensors file."""
    path = Path(path)
    _check_container(path)
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except Exception as error:  # SafetensorError is not importable under a stable name
        raise CheckpointError(f"not a valid safetensors file, truncated or damaged ({error})", path) from None
    if METADATA_KEY not in header:
        raise CheckpointError(
            "a safetensors file without BrainAge metadata (foreign weights?); convert foreign checkpoints "
            "to BrainAge's format first", path)
    try:
        card = json.loads(header[METADATA_KEY])
    except json.JSONDecodeError as error:
        raise CheckpointError(f"the BrainAge metadata is not valid JSON ({error})", path) from None
    if not isinstance(card, dict) or "config" not in card:
        raise CheckpointError("the BrainAge metadata lacks the model config", path)
    version = card.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint format {version!r} is newer than this BrainAge ({__version__}, format {FORMAT_VERSION}) reads; "
            "upgrade BrainAge", path)
    return card


def load_checkpoint(path: PathLike, device: Union[str, torch.device] = "cpu", verify_digest: bool = True) -> "torch.nn.Module":
    """A BrainAgeModel from a BrainAge ``.safetensors`` file (see the module docstring for the checks)."""
    from safetensors import safe_open


    path = Path(path)
    card = read_metadata(path)
    try:
        config = ModelConfig.from_dict(card["config"])
    except (TypeError, ValueError, KeyError) as error:
        raise CheckpointError(f"the model config in the metadata is unusable ({error})", path) from None
    target = resolve_device(device)
    try:
        with torch.device("meta"):
            model = BrainAgeModel(config, metadata=card)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"the model config in the metadata is unusable ({error})", path) from None
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}

    with safe_open(str(path), framework="pt") as handle:
        stored = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        _check_layout(path, config, expected, stored)
        tensors = {key: handle.get_tensor(key) for key in expected}
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise CheckpointError(f"tensor {key!r} has dtype {tensor.dtype}, expected floating point", path)
        # A fresh copy: tensors read from the file sit at offsets set by the header's length, not
        # aligned to 64 bytes, and CPU kernels then take other code paths (other rounding); a
        # copy from torch's allocator is aligned, so the loaded model computes what the saved did.
        tensors[key] = tensor.to(torch.float32, copy=True).contiguous()
    if verify_digest and card.get("weights_sha256"):
        actual = weights_digest(tensors)
        if actual != card["weights_sha256"]:
            raise CheckpointError(
                "the weights do not match the digest recorded when the checkpoint was saved "
                "(the file was modified or damaged); do not use it", path)
    model.load_state_dict(tensors, strict=True, assign=True)
    leftover = [name for name, value in list(model.named_parameters()) + list(model.named_buffers()) if value.is_meta]
    if leftover:
        raise CheckpointError(f"checkpoint leaves tensors unset: {leftover[:5]}", path)
    model.to(target)
    model.eval()
    return model


def _check_container(path: Path) -> None:
    """Refuse missing, empty, pickled, zipped or truncated files before safetensors parses them."""
    if not path.is_file():
        raise CheckpointError("no such model file", path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(9)
    # a safetensors header's length may well start with the byte 0x80 of a pickle (1 file in 32):
    # its JSON header, opening with "{" right after the 8 length bytes, tells them apart
    looks_like_safetensors = (size >= 9 and head[8:9] == b"{"
                              and struct.unpack("<Q", head[:8])[0] <= min(_MAX_HEADER_BYTES, size - 8))
    head = head[:8]
    if looks_like_safetensors:
        return
    if head[:4] == _ZIP_MAGIC:
        raise CheckpointError(
            "a PyTorch zip checkpoint (torch.save), which holds pickled code; BrainAge never unpickles model "
            "files. If it is one of the authors' BrainRotViT checkpoints, convert it with 'brainage import-official'", path)
    if head[:1] and head[0] == _PICKLE_PROTOCOL_BYTE:
        raise CheckpointError(
            "a Python pickle; BrainAge never unpickles model files. If it is one of the authors' BrainRotViT "
            "checkpoints, convert it with 'brainage import-official'", path)
    if size < 8:
        raise CheckpointError(f"truncated: {size} bytes, too short for a safetensors file", path)
    (header_length,) = struct.unpack("<Q", head)
    if header_length > _MAX_HEADER_BYTES or header_length > size - 8:
        raise CheckpointError(
            f"not a safetensors file, or truncated (header claims {header_length} bytes, file has {size})", path)


def _check_layout(path: Path, config: ModelConfig, expected: Dict[str, tuple], stored: Dict[str, tuple]) -> None:
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    wrong = sorted(k for k in set(expected) & set(stored) if expected[k] != stored[k])
    if not (missing or unexpected or wrong):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensors (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        problems.append("shape mismatches: " + "; ".join(
            f"{k} is {list(stored[k])}, expected {list(expected[k])}" for k in wrong[:3]))
    raise CheckpointError(
        f"the weights do not fit the {config.name!r} architecture its metadata describes: " + "; ".join(problems), path)


# ---------------------------------------------------------------------------- registry files
def _registry_file(entry: ModelEntry, cache: Optional[PathLike] = None, progress: Optional[Progress] = None) -> Path:
    path = entry.local_path(cache)
    if entry.bundled:
        if not path.is_file():
            raise CheckpointError(
                f"the bundled {entry.name!r} model is not in this installation yet; "
                "pass the path of a checkpoint instead, or build the demo model first", path)
        if entry.sha256:
            _verify_sha256(path, entry)
        return path
    if entry.recipe == "published":
        if path.is_file():  # built here from verified volumes; load_checkpoint checks its weights digest
            return path
        from .published import install_published_model

        logger.info("model %r is not in the cache yet: fetching and importing it into %s", entry.name, path)
        return install_published_model(path, name=entry.name, cache_dir=cache, progress=progress)
    if path.is_file():
        actual = file_sha256(path)
        if actual == entry.sha256:
            return path
        logger.warning("cached %s has SHA-256 %s, expected %s; downloading it again", path, actual, entry.sha256)
    download(entry, path)
    return path


def _verify_sha256(path: Path, entry: ModelEntry) -> None:
    actual = file_sha256(path)
    if actual != entry.sha256:
        raise CheckpointError(
            f"SHA-256 {actual} differs from the expected {entry.sha256} for model {entry.name!r}: "
            "the file was modified or damaged; do not use it", path)


def download(entry: ModelEntry, destination: Path, timeout_s: float = 60.0) -> Path:
    """Fetch ``entry.url`` into ``destination`` atomically, verifying its SHA-256 before it is kept."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    logger.info("downloading model %r from %s to %s", entry.name, entry.url, destination)
    with atomic_path(destination, suffix=".part") as temporary:
        try:
            with urllib.request.urlopen(entry.url, timeout=timeout_s) as response, open(temporary, "wb") as out:
                for chunk in iter(lambda: response.read(_CHUNK), b""):
                    digest.update(chunk)
                    out.write(chunk)
        except (urllib.error.URLError, OSError, ValueError) as error:
            reason = getattr(error, "reason", error)
            raise CheckpointError(
                f"could not download model {entry.name!r} from {entry.url} ({reason}). On an offline machine, "
                f"download it elsewhere and put it at {destination} (SHA-256 {entry.sha256})") from None
        if digest.hexdigest() != entry.sha256:
            raise CheckpointError(
                f"the file downloaded for model {entry.name!r} from {entry.url} has SHA-256 {digest.hexdigest()}, "
                f"expected {entry.sha256}: tampered or damaged, not kept")
    return destination
