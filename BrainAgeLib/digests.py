"""Content digests: the SHA-256 of a file and the SHA-256 of a model's weights.

One home for both, so that a checkpoint's recorded ``weights_sha256``, a batch run's
``predictions.json``, the registry's download checks and an imported model's provenance all
compute the same thing the same way. Kept apart from ``atomic_files`` (which writes files) and
from ``model/`` (the Slicer module and the CLI hash files without needing a model); torch is
only imported by the weights digest.
"""
from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING, Mapping, Union

if TYPE_CHECKING:  # pragma: no cover
    import torch

PathLike = Union[str, os.PathLike]

#: Bytes read at a time when hashing a file.
CHUNK_BYTES = 1 << 20


def file_sha256(path: PathLike, chunk_bytes: int = CHUNK_BYTES) -> str:
    """Hex SHA-256 of a file's bytes, read ``chunk_bytes`` at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()
