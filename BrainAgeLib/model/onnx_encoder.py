"""The ViT in ONNX Runtime, float32: precision ``"onnx"`` on the CPU (optional: ``pip install
onnxruntime onnx``, the ``[cpu]`` extra).

The same arithmetic as the float32 ViT (embeddings within ~1e-6 relative), computed by ONNX
Runtime's CPU kernels, which on the 2 AMD EPYC cores this project measures on run the ViT ~2x
faster than torch's (README, *Benchmark*). The graph is exported from the model's own encoder
(``torch.onnx.export``; it yields the embeddings, the patch tokens and the last block's CLS
attention, what ``SliceEncoder.forward_explain`` gives) the first time a model runs in this
precision, and kept in ``resources.cache_dir()/onnx/<weights SHA-256>.onnx``: keyed by the
weights' digest, beside nothing the user owns, never a change to the checkpoint. Explanations by
"relevance" take gradients through the torch ViT, as in every precision.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..atomic_files import atomic_path
from ..errors import BrainAgeError

logger = logging.getLogger(__name__)

#: ONNX opset of the exported graph.
OPSET = 17
#: Bumped whenever what the graph computes changes, so a graph cached by an earlier release is
#: exported again (2: the CLS attention row from the fused forward's own projections).
GRAPH_VERSION = 2


def onnx_available() -> bool:
    """Both ONNX Runtime (to run) and onnx (torch's exporter writes through it) are installed."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))


class _ExplainGraph(nn.Module):
    """What the graph computes: (embeddings [B, D], patch tokens [B, N, D], CLS attention [B, N])."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor):
        return self.encoder.forward_explain(images)


class OnnxEncoder:
    """``embed``/``forward_explain`` of a ``SliceEncoder`` run by an ONNX Runtime session."""

    def __init__(self, encoder: nn.Module, path: Path, threads: Optional[int] = None):
        import onnxruntime as ort

        self.encoder = encoder  # its normalize (and config); the torch weights are not used here
        self.path = path
        options = ort.SessionOptions()
        from ..parallel import available_cores

        # the cores given, fixed for the session's life (batch mode's thread balance moves only
        # torch's threads: with workers busy, ONNX Runtime's share the cores with them)
        options.intra_op_num_threads = int(threads or available_cores())
        options.inter_op_num_threads = 1
        # no spinning: in batch mode idle threads would take the preprocessing workers' cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def _run(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        images = self.encoder.normalize(x) if x.ndim == 3 else x
        array = np.ascontiguousarray(images.detach().to("cpu", torch.float32).numpy())
        return tuple(torch.from_numpy(out) for out in self.session.run(None, {"images": array}))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x)[0]

    def forward_explain(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        embeddings, patches, attention = self._run(x)
        return embeddings, patches, attention


def export_encoder(encoder: nn.Module, path: Path) -> Path:
    """Write ``encoder``'s graph (:class:`_ExplainGraph`, dynamic batch) to ``path`` atomically."""
    import warnings

    config = encoder.config
    source = _ExplainGraph(encoder).eval()
    dummy = torch.rand(2, config.in_chans, config.image_size, config.image_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(source, (dummy,), str(temporary), input_names=["images"],
                          output_names=["embeddings", "patch_tokens", "cls_attention"],
                          dynamic_axes={"images": {0: "n"}, "embeddings": {0: "n"}, "patch_tokens": {0: "n"},
                                        "cls_attention": {0: "n"}},
                          opset_version=OPSET, dynamo=False)
    return path


def onnx_encoder(model: nn.Module, cache: Optional[os.PathLike] = None) -> OnnxEncoder:
    """``model.encoder`` as an :class:`OnnxEncoder`, made once per set of weights and kept on the
    model; its graph file is cached under ``cache`` (default ``resources.cache_dir()/onnx``) by
    the weights' SHA-256 and :data:`GRAPH_VERSION`."""
    if not onnx_available():
        raise BrainAgeError("precision 'onnx' needs ONNX Runtime and onnx: pip install onnxruntime onnx")
    from ..digests import weights_digest
    from ..resources import cache_dir

    key = weights_digest(model.encoder, cheap=True)
    cached = getattr(model, "_onnx_encoder_cache", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    encoder = model.encoder
    if next(encoder.parameters()).device.type != "cpu":
        raise BrainAgeError("precision 'onnx' runs on the CPU only")
    digest = weights_digest(encoder.state_dict())
    folder = Path(cache) if cache is not None else cache_dir() / "onnx"
    path = folder / f"{digest}-graph{GRAPH_VERSION}.onnx"
    if not path.is_file():
        logger.info("exporting the ViT to ONNX (once for these weights): %s", path)
        export_encoder(encoder, path)
    session = OnnxEncoder(encoder, path)
    object.__setattr__(model, "_onnx_encoder_cache", (key, session))
    return session


def session_threads(model: Any) -> Optional[int]:
    """The intra-op threads of a model's ONNX session (None when it has none)."""
    cached = getattr(model, "_onnx_encoder_cache", None)
    return None if cached is None else int(cached[1].session.get_session_options().intra_op_num_threads)
