"""A checkpoint with a new model card and the very same weights: how a model is calibrated
(prediction intervals, bias correction) without retraining.

:func:`rewrite_card` copies the tensors of a BrainAge ``.safetensors`` file byte for byte (no
float conversion, no model in between) and writes them with the card updated by ``changes``.
The weights digest is checked before and after: a file whose weights do not match the digest
its card records is refused, and the new file records the same digest.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Union

from ..atomic_files import atomic_path
from ..digests import weights_digest
from ..errors import CheckpointError
from .checkpoint import read_metadata
from .checkpoint_file import METADATA_KEY

PathLike = Union[str, os.PathLike]


def rewrite_card(source: PathLike, destination: PathLike, changes: Mapping[str, Any]) -> Path:
    """Write ``destination`` (atomically; it may be ``source``) with ``source``'s tensors and its
    card updated by ``changes`` (top-level keys replaced; ``to_dict()`` objects allowed).

    The card's ``weights_sha256``, ``config`` and ``format_version`` cannot be changed here.
    Returns the destination's path.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    source, destination = Path(source), Path(destination)
    card = read_metadata(source)
    with safe_open(str(source), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    digest = weights_digest(tensors)
    if card.get("weights_sha256") and digest != card["weights_sha256"]:
        raise CheckpointError(
            "the weights do not match the digest recorded when the checkpoint was saved "
            "(the file was modified or damaged); not rewriting it", source)
    fixed = {"weights_sha256", "config", "format_version"}
    card.update({key: value for key, value in changes.items() if key not in fixed})
    card["weights_sha256"] = digest
    header = {METADATA_KEY: json.dumps(card, sort_keys=True, default=_to_json), "format": "pt"}
    destination.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(destination) as temporary:
        save_file(tensors, str(temporary), metadata=header)
    return destination


def _to_json(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"checkpoint metadata value of type {type(value).__name__} is not JSON-serialisable")
