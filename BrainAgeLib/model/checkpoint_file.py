"""Writing a BrainAge checkpoint: the ``.safetensors`` file of a model's weights and its JSON card.

The format is described in :mod:`BrainAgeLib.model.checkpoint`, which reads these files, knows
models by name and re-exports :func:`save_checkpoint`. Writing lives apart so that the import of
the authors' files (which writes a checkpoint) and the published-model recipe (which runs that
import when ``load_model`` first meets a registered published model) need no part of the loader.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch

from .. import __version__
from ..atomic_files import atomic_path
from ..digests import weights_digest
from ..presets import ModelConfig
from .brain_age_model import class_names

FORMAT_VERSION = 1
METADATA_KEY = "brainage"

PathLike = Union[str, os.PathLike]


def save_checkpoint(model: "torch.nn.Module", path: PathLike, metadata: Optional[Mapping[str, Any]] = None,
                    *, record_precisions: Optional[bool] = False) -> Path:
    """Write ``model`` (a BrainAgeModel) to ``path`` atomically; returns the path.

    ``record_precisions``: measure each CPU precision's largest age difference from fp32
    (``model.precision.measure_precisions``, minutes for the paper preset) and keep it in the
    card under ``cpu_precisions``, which ``precision="auto"`` reads; None: as the environment
    says (``BRAINAGE_PRECISION_RECORD=0`` turns it off, the default is on), what training, the
    authors' import and the published-model download pass. A record measured for other weights
    is dropped, never carried over.

    The card is the model's own ``metadata`` updated by ``metadata``, which may hold name,
    intended_use, is_demo, source, trained, training_data, metrics, bias_correction (a
    BiasCorrection or its dict), calibration (a ConformalCalibration or its dict) and any other JSON-safe entries; the architecture,
    preprocessing, classes, versions and weights digest are filled in here.
    """
    path = Path(path)
    config: ModelConfig = model.config
    tensors = {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in model.state_dict().items()}
    card = build_metadata(config, {**getattr(model, "metadata", {}), **(metadata or {})})
    card["weights_sha256"] = weights_digest(tensors)
    from .precision import RECORD_KEY, measure_precisions, record_wanted

    if record_wanted(record_precisions):
        import logging

        logging.getLogger(__name__).info(
            "measuring how far each CPU precision moves the age (minutes for the paper preset; "
            "BRAINAGE_PRECISION_RECORD=0 skips it)")
        card[RECORD_KEY] = measure_precisions(model)
    if (card.get(RECORD_KEY) or {}).get("weights_sha256") != card["weights_sha256"]:
        card.pop(RECORD_KEY, None)
    # an imported classifier whose labels are unknown keeps its generic names ("class 0", ...)
    generic = card.get("class_labels_known") is False and len(card.get("class_names") or ()) == config.n_classes
    if not generic:
        card["class_names"] = class_names(config)
    header = {METADATA_KEY: json.dumps(card, sort_keys=True, default=_json_default), "format": "pt"}

    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata=header)
    return path


def build_metadata(config: ModelConfig, metadata: Mapping[str, Any]) -> Dict[str, Any]:
    """The JSON model card of a checkpoint (without the weights digest)."""
    card: Dict[str, Any] = {
        "name": config.name,
        "intended_use": "",
        "is_demo": False,
        "trained": True,
        "source": "",
        "training_data": {},
        "metrics": {},
        "bias_correction": None,
        "calibration": None,
    }
    card.update({k: v for k, v in metadata.items() if k not in ("config", "weights_sha256")})
    correction = card.get("bias_correction")
    if correction is not None and hasattr(correction, "to_dict"):
        card["bias_correction"] = correction.to_dict()
    calibration = card.get("calibration")   # a ConformalCalibration (prediction intervals) or its dict
    if calibration is not None and hasattr(calibration, "to_dict"):
        card["calibration"] = calibration.to_dict()
    card.update(
        format_version=FORMAT_VERSION,
        library_version=__version__,
        preset=config.name,
        config=config.to_dict(),
        preprocessing=config.preprocess.to_dict(),
        age_bin_edges=list(config.age_bin_edges),
    )
    return card


def _json_default(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"checkpoint metadata value of type {type(value).__name__} is not JSON-serialisable")
