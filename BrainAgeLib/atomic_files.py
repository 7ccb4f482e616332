"""Atomic file writes: a reader (or a crash) never sees half a file.

Everything is first written to a temporary file in the destination's own folder (same file
system, so ``os.replace`` is atomic), then moved into place; on any failure the temporary file
is removed and an existing destination is left untouched.
"""
from __future__ import annotations

import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

PathLike = Union[str, os.PathLike]


@contextmanager
def atomic_path(path: PathLike, suffix: Optional[str] = None, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``.

    ``suffix`` defaults to the destination's own suffixes (``.nii.gz``, ``.png``...), so
    writers that choose a format by extension keep working on the temporary name.
    ``fsync``: flush the written file to disk before the move, so that after a power loss the
    destination holds either the old or the complete new content.
    """
    path = Path(path)
    if suffix is None:
        suffix = "".join(path.suffixes) or ".tmp"
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(handle)
    _normal_permissions(temporary)
    try:
        yield Path(temporary)
        if fsync:
            _fsync(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: PathLike, data: bytes, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (``fsync``: see :func:`atomic_path`); returns the path."""
    with atomic_path(path, fsync=fsync) as temporary:
        temporary.write_bytes(data)
    return Path(path)


def write_text_atomic(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (``\\n`` line endings); returns the path."""
    with atomic_path(path) as temporary:
        with open(temporary, "w", encoding=encoding, newline="\n") as stream:
            stream.write(text)
    return Path(path)


def write_json_atomic(path: PathLike, data: object) -> Path:
    """Write ``data`` as indented JSON (and a final newline) to ``path`` atomically.

    Non-finite floats (NaN, +-Infinity), which JSON has no words for, are written as null, so
    every reader can parse the file.
    """
    import json

    return write_text_atomic(path, json.dumps(_json_safe(data), indent=2, allow_nan=False) + "\n")


def _json_safe(value: object) -> object:
    """``value`` with every non-finite float inside dicts, lists and tuples replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def _fsync(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _normal_permissions(path: str) -> None:
    """mkstemp creates files 0600; give them the mode a normally created file would have."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
