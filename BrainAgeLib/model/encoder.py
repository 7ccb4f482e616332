"""Stage 1 of BrainRotViT: the Vision Transformer that turns each sagittal slice into a vector.

The encoder is timm's ``VisionTransformer`` (paper preset: ViT-B/16 at 224 px), held as
``SliceEncoder.vit`` so its state-dict keys are ``vit.<timm keys>``. During stage-1 training the
ViT is a classifier of age-bin x sex classes (``vit.head`` on the CLS token); afterwards it is
frozen and a slice's *embedding* is the mean of the final-normed last hidden state over all
tokens, CLS included (the authors average Hugging Face's ``last_hidden_state`` over dim 1).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from timm.layers import LayerNorm
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..errors import BrainAgeError
from ..presets import ModelConfig

#: timm architectures whose ImageNet weights fit a config, keyed by (embed_dim, num_heads, patch_size).
PRETRAINED_VIT_NAMES: Dict[Tuple[int, int, int], str] = {
    (768, 12, 16): "vit_base_patch16_224.augreg2_in21k_ft_in1k",
    (384, 6, 16): "vit_small_patch16_224.augreg_in21k_ft_in1k",
    (192, 3, 16): "vit_tiny_patch16_224.augreg_in21k_ft_in1k",
}

# Slices are replicated to RGB and normalised like the authors' torchvision pipeline.
PIXEL_MEAN = 0.5
PIXEL_STD = 0.5


class SliceEncoder(nn.Module):
    """ViT over single sagittal slices: embeddings [B, D], stage-1 logits [B, n_classes].

    Inputs to :meth:`embed`, :meth:`classify` and :meth:`forward_explain` are either normalised
    images [B, in_chans, H, W] (the output of :meth:`normalize`) or raw slices [B, H, W] with
    intensities in [0, 1], which are normalised first.
    """

    def __init__(self, config: ModelConfig, pretrained: bool = False):
        super().__init__()
        self.config = config
        self.vit = VisionTransformer(
            img_size=config.image_size,
            patch_size=config.patch_size,
            in_chans=config.in_chans,
            num_classes=config.n_classes,
            global_pool="token",
            embed_dim=config.embed_dim,
            depth=config.depth,
            num_heads=config.num_heads,
            mlp_ratio=config.mlp_ratio,
            qkv_bias=True,
            norm_layer=functools.partial(LayerNorm, eps=config.layer_norm_eps),
        )
        if pretrained:
            self.load_imagenet_weights()

    # ------------------------------------------------------------------ inputs
    def normalize(self, slices: torch.Tensor) -> torch.Tensor:
        """Slices [B, H, W] in [0, 1] -> images [B, in_chans, H, W], mean 0.5 / std 0.5 per channel."""
        if slices.ndim != 3:
            raise ValueError(f"expected slices [B, H, W], got shape {tuple(slices.shape)}")
        x = (slices.float() - PIXEL_MEAN) / PIXEL_STD
        return x.unsqueeze(1).expand(-1, self.config.in_chans, -1, -1)

    def _images(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(x) if x.ndim == 3 else x

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens (the CLS token)."""
        return int(self.vit.num_prefix_tokens)

    # ------------------------------------------------------------------ outputs
    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Final-normed last hidden state [B, 1 + N, D] (CLS first, then N patch tokens)."""
        return self.vit.forward_features(self._images(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Slice embeddings [B, D]: mean over ALL tokens (CLS + patches) of the last hidden state.

        Averaging every token, not just CLS, is what the paper's feature extractor does; it
        makes the embedding a summary of the whole slice rather than of the classifier's token.
        """
        return self.tokens(x).mean(dim=1)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Stage-1 logits [B, n_classes] over age-bin x sex classes (sex-major), from the CLS token."""
        return self.vit.forward_head(self.tokens(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Stage-1 classifier logits (what stage-1 training optimises)."""
        return self.classify(x)

    def forward_explain(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embeddings plus what the attention maps need, in one pass.

        Returns ``(embeddings [B, D], patch_tokens [B, N, D], cls_attention [B, N])``: the patch
        tokens of the final-normed last hidden state, and the last block's attention from the CLS
        token to each patch, averaged over heads (rows of the softmax, so over all 1 + N keys they
        sum to 1). The ViT runs its own ``forward_features`` untouched (the fused attention
        kernel everywhere), so the embeddings are bit for bit those of :meth:`embed`, in every
        precision; :func:`cls_attention` says how the attention row is taken.
        """
        with cls_attention(self.vit) as attention:
            tokens = self.vit.forward_features(self._images(x))
        start = self.num_prefix_tokens
        return tokens.mean(dim=1), tokens[:, start:], attention.row[:, :, start:].mean(dim=1)

    # ------------------------------------------------------------------ weights
    def load_imagenet_weights(self) -> None:
        """Initialise from timm's pretrained ImageNet ViT of the same width (needs the internet once).

        Blocks beyond this config's depth are dropped and the position embeddings are resampled
        to this image size; the classifier head stays freshly initialised.
        """
        import timm

        cfg = self.config
        name = PRETRAINED_VIT_NAMES.get((cfg.embed_dim, cfg.num_heads, cfg.patch_size))
        if name is None:
            raise BrainAgeError(
                f"no pretrained timm ViT matches embed_dim={cfg.embed_dim}, num_heads={cfg.num_heads}, "
                f"patch_size={cfg.patch_size}; known: {sorted(PRETRAINED_VIT_NAMES.values())}"
            )
        try:
            source = timm.create_model(name, pretrained=True, num_classes=0, img_size=cfg.image_size)
        except Exception as error:  # network, hub cache or version problems all mean the same here
            raise BrainAgeError(
                f"could not load timm's pretrained ImageNet weights {name!r} ({type(error).__name__}: "
                f"{error}). They are downloaded once from the Hugging Face hub; on an offline machine "
                "copy the hub cache (~/.cache/huggingface/hub) from a connected one, or train "
                "without pretrained=True."
            ) from error
        ours = self.vit.state_dict()
        taken = {
            key: value for key, value in source.state_dict().items()
            if key in ours and ours[key].shape == value.shape
        }
        missing = sorted(k for k in ours if k not in taken and not k.startswith("head."))
        if missing:
            raise BrainAgeError(f"pretrained {name!r} lacks {len(missing)} tensors this ViT needs, e.g. {missing[:3]}")
        self.vit.load_state_dict(taken, strict=False)


class _CapturedAttention:
    """Holder :func:`block_attentions` fills: one block's ``probabilities`` [B, heads, T, T] once the ViT ran."""

    def __init__(self) -> None:
        self._probabilities: Optional[torch.Tensor] = None

    @property
    def probabilities(self) -> torch.Tensor:
        if self._probabilities is None:
            raise BrainAgeError("the ViT's attention block did not compute its attention matrix")
        return self._probabilities

    def keep(self, module: nn.Module, inputs: Tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if self._probabilities is None:  # a checkpointed forward may rerun the block; keep the first
            self._probabilities = inputs[0]


@contextlib.contextmanager
def block_attentions(vit: VisionTransformer, blocks: Optional[Sequence[int]] = None) -> Iterator[List[_CapturedAttention]]:
    """While open, the chosen blocks (default: all) compute their attention explicitly and hand it over.

    timm's own mechanism (as ``timm.utils.AttentionExtract`` with hooks): each chosen block's
    ``Attention`` gets ``fused_attn = False``, so instead of the fused SDPA kernel it runs its
    unfused branch, whose softmax probabilities pass through ``attn.attn_drop``; a forward hook
    there keeps that module's input (the probabilities before dropout, the same tensor in eval
    mode). Yields one holder per chosen block, in block order; under ``torch.enable_grad`` the
    kept tensors are part of the autograd graph, so gradients with respect to them can be taken
    (the relevance explanation does). Other blocks keep the fused kernel. (The paper's map needs
    only the last block's CLS row, which :func:`cls_attention` takes without unfusing anything.)
    On exit, even after an error, the hooks are removed and every ``fused_attn`` restored, so
    :meth:`SliceEncoder.embed` outside this context is untouched. The unfused branch is the arithmetic the fused kernel
    stands for, rounded differently: embeddings differ by float rounding (~5e-7 on the demo model).
    Not for concurrent use of one ViT from several threads (the flags are the modules').
    """
    indices = range(len(vit.blocks)) if blocks is None else [int(i) for i in blocks]
    modules = [vit.blocks[i].attn for i in indices]
    captured = [_CapturedAttention() for _ in modules]
    flags = [attn.fused_attn for attn in modules]
    handles = []
    try:
        for attn, holder in zip(modules, captured):
            handles.append(attn.attn_drop.register_forward_hook(holder.keep))
            attn.fused_attn = False
        yield captured
    finally:
        for attn, flag in zip(modules, flags):
            attn.fused_attn = flag
        for handle in handles:
            handle.remove()


class _CapturedRow:
    """Holder :func:`cls_attention` fills: ``row`` [B, heads, T], the CLS token's attention, once the ViT ran."""

    def __init__(self, attn: nn.Module) -> None:
        self.attn = attn
        self._row: Optional[torch.Tensor] = None

    @property
    def row(self) -> torch.Tensor:
        if self._row is None:
            raise BrainAgeError("the ViT's last attention block did not run")
        return self._row

    def keep(self, module: nn.Module, inputs: Tuple[torch.Tensor, ...], qkv: torch.Tensor) -> None:
        if self._row is not None:  # a checkpointed forward may rerun the block; keep the first
            return
        attn = self.attn
        b, t, _ = qkv.shape
        q, k, _ = qkv.float().reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(q[:, :, :1]), attn.k_norm(k)
        self._row = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)[:, :, 0]


@contextlib.contextmanager
def cls_attention(vit: VisionTransformer) -> Iterator[_CapturedRow]:
    """While open, the ViT's last block hands over its CLS token's attention row (what the
    paper's map needs), without changing how the ViT computes.

    A forward hook on the last block's ``attn.qkv`` keeps softmax(q_CLS k^T * scale) per head,
    in float32, from the projections the block itself made; the block goes on with its fused
    attention kernel, so the tokens (and embeddings) are exactly those of a forward without the
    hook. (Running the block's unfused branch instead, as :func:`block_attentions` does, is the
    same arithmetic rounded differently: 5e-7 in float32, but 3e-3 in the embeddings and 0.01
    years in the demo's age in bf16.) The hook is removed on exit, even after an error.
    """
    attn = vit.blocks[-1].attn
    holder = _CapturedRow(attn)
    handle = attn.qkv.register_forward_hook(holder.keep)
    try:
        yield holder
    finally:
        handle.remove()


def vit_parameter_count(config: ModelConfig) -> int:
    """Parameters of the ViT of ``config`` (including its stage-1 head), without building it."""
    d, n = config.embed_dim, (config.image_size // config.patch_size) ** 2
    hidden = int(d * config.mlp_ratio)
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * hidden + hidden) + (hidden * d + d)
    patch = config.in_chans * config.patch_size ** 2 * d + d
    return patch + d + (n + 1) * d + config.depth * block + 2 * d + d * config.n_classes + config.n_classes

