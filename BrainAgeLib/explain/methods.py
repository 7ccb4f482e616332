"""Two explanations of one prediction: the paper's fused attention map ("paper", the default),
and gradient-weighted attention relevance from the predicted age ("relevance").

The paper's map shows where the ViT looked and barely depends on the regression head (on the
demo model, re-initialising the CNN head leaves it correlated 0.93 with the trained map). The
relevance map (:func:`relevance_slices`, after Chefer, Gur & Wolf, ICCV 2021, "Generic
Attention-model Explainability") differentiates the predicted age through the CNN and the ViT
with respect to the attention of the ViT's last block, so re-initialising the head or either
of the last blocks changes it; it answers "which patches moved this age". Both go through the
same masking, upsampling and scaling (:func:`patches_to_slices`). :func:`explain_slices`
chooses by ``method``.

The paper's method

BrainRotViT (Jalal et al., 2025, arXiv 2511.15188) explains one prediction in four steps, all
on the stack of S sagittal slices the model saw (model space):

1. **Guided backprop through the residual CNN.** The predicted age (years) is differentiated
   with respect to the [S, D] matrix of slice embeddings, with every activation of the CNN
   passing back only positive gradients (see :func:`guided_backprop`). The result is an
   [S, D] saliency: which embedding dimensions of which slice pushed the age up.
2. **Saliency onto patches.** For each slice, the dot product of its saliency row with each of
   the N last-layer patch tokens of the ViT (final-normed) gives one relevance per patch; it is
   min-max scaled over that slice's N patches to [0, 1].
3. **Times attention.** The scaled relevance is multiplied by the last block's CLS->patch
   attention (mean over heads), so a patch counts when the CNN cares about what it encodes *and*
   the ViT looked at it.
4. **Masked and upsampled.** The patch-grid map is masked to brain, upsampled bilinearly from
   the patch grid (14 x 14 for ViT-B/16 at 224 px) to the slice size, masked again at full
   resolution and scaled by its maximum over the whole stack, giving [S, H, W] in [0, 1].

Every step is one batched tensor operation over all slices (no Python loop over slices).
:func:`explain_components` also returns the two factors of step 3 on their own (the CNN's
relevance, the ViT's attention), each through step 4, to show which half of the model a
pattern comes from.
``Prepared.to_input_grid`` then maps the [S, H, W] stack back onto the input's voxel grid.

The guided-backprop rule for SiLU. Springenberg et al. defined guided backprop for ReLU: the
gradient passes an activation only where the forward input was positive *and* the incoming
gradient is positive, ``g_in = 1[x > 0] * max(g_out, 0)``. ReLU's derivative ``1[x > 0]`` is
replaced here by SiLU's derivative ``s(x) * (1 + x * (1 - s(x)))`` (s = logistic sigmoid),
which is negative for x < about -1.28; so that only positive gradients travel, the product is
clamped as well::

    g_in = max(0, silu'(x) * max(0, g_out))

For ReLU this is exactly Springenberg's rule; for SiLU it keeps the smooth weighting of the
activation and never lets a negative gradient (from either factor) through.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..devices import batch_that_fits

#: Explanation methods: the paper's fused map, and gradient-weighted attention relevance from the predicted age.
METHODS = ("paper", "relevance")
DEFAULT_METHOD = "paper"

#: Activation modules guided backprop rewrites. Anything else (LayerNorm, pooling, convs,
#: the sex concatenation) backpropagates unchanged, as in the original method.
GUIDED_ACTIVATIONS: Tuple[type, ...] = (nn.SiLU, nn.ReLU, nn.GELU, nn.LeakyReLU, nn.ELU, nn.Mish)


def _guided_hook(module: nn.Module, grad_input: Tuple[Optional[torch.Tensor], ...],
                 grad_output: Tuple[Optional[torch.Tensor], ...]):
    """Backward hook: ``g_in = max(0, act'(x) * max(0, g_out))``.

    ``grad_input`` already holds ``act'(x) * g_out``; where ``g_out <= 0`` the guided value is 0,
    elsewhere it is that product clamped at 0.
    """
    g_in, g_out = grad_input[0], grad_output[0]
    if g_in is None or g_out is None:
        return None
    return (torch.where(g_out > 0, g_in.clamp(min=0), torch.zeros_like(g_in)),)


@contextlib.contextmanager
def guided_backprop(module: nn.Module) -> Iterator[List[nn.Module]]:
    """Inside this context, every activation module in ``module`` backpropagates guided gradients.

    Works with hooks on the existing activation modules (nothing is replaced); the hooks are
    removed on exit, even after an error, so the model afterwards is exactly as before. Yields
    the list of activations it guides. Raises ``ValueError`` if ``module`` has none, since the
    result would silently be a plain gradient.
    """
    activations = [m for m in module.modules() if isinstance(m, GUIDED_ACTIVATIONS)]
    if not activations:
        raise ValueError(
            f"{type(module).__name__} has no activation modules ({', '.join(t.__name__ for t in GUIDED_ACTIVATIONS)}); "
            "guided backprop needs them as modules, not functional calls"
        )
    handles = [m.register_full_backward_hook(_guided_hook) for m in activations]
    try:
        yield activations
    finally:
        for handle in handles:
            handle.remove()


def slice_saliency(regressor: nn.Module, embeddings: torch.Tensor, sex_value: float, *,
                   guided: bool = True) -> torch.Tensor:
    """Guided-backprop saliency of the predicted age w.r.t. the slice embeddings.

    ``embeddings`` [S, D] (one subject), ``sex_value`` 0 = male, 1 = female, 0.5 or NaN = unknown.
    Returns [S, D] float32 on the embeddings' device: d(age in years)/d(embedding) under the
    guided rule (``guided=False``: the plain gradient, what the relevance method propagates).
    The regressor runs in eval mode (no dropout) and its mode is restored afterwards.
    """
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be [S, D] for one subject, got shape {tuple(embeddings.shape)}")
    param = next(regressor.parameters(), None)
    device = param.device if param is not None else embeddings.device
    dtype = param.dtype if param is not None else torch.float32
    x = embeddings.detach().to(device=device, dtype=dtype).unsqueeze(0).requires_grad_(True)
    sex_value = float(sex_value)
    # Unknown sex: the model predicts the mean of the female and male predictions, which for a
    # final layer linear in sex is the prediction at sex = 0.5.
    sex = torch.tensor([0.5 if np.isnan(sex_value) else sex_value], device=device, dtype=dtype)
    was_training = regressor.training
    regressor.eval()
    try:
        rule = guided_backprop(regressor) if guided else contextlib.nullcontext()
        with torch.enable_grad(), rule, warnings.catch_warnings():
            # CUDA: the backward pass runs on autograd's own thread, whose first cuBLAS call
            # warns that it had to set the (already existing) CUDA context; harmless.
            warnings.filterwarnings("ignore", message="Attempting to run cuBLAS, but there was no current CUDA context")
            age = regressor(x, sex)
            (grad,) = torch.autograd.grad(age.sum(), x)
    finally:
        regressor.train(was_training)
    return grad[0].detach().float()


def _as_tensor(array: Any, device: torch.device, dtype=torch.float32) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array.detach().to(device=device, dtype=dtype)
    return torch.as_tensor(np.asarray(array), device=device, dtype=dtype)


def _check_shapes(saliency: torch.Tensor, patch_tokens: torch.Tensor,
                  cls_attention: torch.Tensor, brain_mask: torch.Tensor,
                  patch_grid: Optional[Tuple[int, int]]) -> Tuple[int, int]:
    """Validate the method's inputs against each other; return the patch grid (rows, cols)."""
    n_slices, n_patches, dim = patch_tokens.shape
    if saliency.shape != (n_slices, dim):
        raise ValueError(f"saliency {tuple(saliency.shape)} does not match patch tokens {tuple(patch_tokens.shape)}")
    if cls_attention.shape != (n_slices, n_patches):
        raise ValueError(f"CLS attention {tuple(cls_attention.shape)} does not match patch tokens {tuple(patch_tokens.shape)}")
    if brain_mask.ndim != 3 or brain_mask.shape[0] != n_slices:
        raise ValueError(f"brain mask {tuple(brain_mask.shape)} must be [S={n_slices}, H, W]")
    if patch_grid is None:
        side = int(round(n_patches ** 0.5))
        if side * side != n_patches:
            raise ValueError(f"{n_patches} patches are not a square grid; pass patch_grid")
        patch_grid = (side, side)
    if patch_grid[0] * patch_grid[1] != n_patches:
        raise ValueError(f"patch grid {patch_grid} does not hold {n_patches} patches")
    return patch_grid


def patch_relevance(saliency: torch.Tensor, patch_tokens: torch.Tensor) -> torch.Tensor:
    """Step 2: [S, D] saliency, [S, N, D] patch tokens -> [S, N] relevance, min-max scaled per slice.

    A slice whose patches all get the same relevance is 0 throughout.
    """
    relevance = torch.einsum("snd,sd->sn", patch_tokens.float(), saliency.float())
    low = relevance.amin(dim=1, keepdim=True)
    span = relevance.amax(dim=1, keepdim=True) - low
    return torch.where(span > 0, (relevance - low) / span.clamp(min=1e-12), torch.zeros_like(relevance))


def patches_to_slices(patch_values: torch.Tensor, brain_mask: torch.Tensor,
                      patch_grid: Tuple[int, int]) -> torch.Tensor:
    """Step 4: [S, N] values on the patch grid -> [S, H, W] on the slices, masked to brain and
    scaled by the stack's maximum (so the result lies in [0, 1]; all 0 if nothing is positive)."""
    n_slices = patch_values.shape[0]
    rows, cols = patch_grid
    height, width = int(brain_mask.shape[1]), int(brain_mask.shape[2])
    mask = brain_mask.to(dtype=torch.float32).unsqueeze(1)
    # A patch counts as brain if any of its pixels is; masking on the patch grid first keeps
    # background patches from bleeding into the brain's edge when upsampling.
    patch_mask = F.adaptive_max_pool2d(mask, (rows, cols))
    grid = patch_values.float().reshape(n_slices, 1, rows, cols)
    upsampled = F.interpolate(grid * patch_mask, size=(height, width), mode="bilinear", align_corners=False)
    stack = (upsampled * mask).squeeze(1).clamp(min=0)
    peak = stack.max()
    return stack / peak if peak > 0 else stack


def fuse_slice_attention(saliency: torch.Tensor, patch_tokens: torch.Tensor,
                         cls_attention: torch.Tensor, brain_mask: torch.Tensor,
                         patch_grid: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Steps 2-4 of the method, batched over slices: [S, D], [S, N, D], [S, N], [S, H, W] -> [S, H, W].

    ``brain_mask`` is boolean (or 0/1) on the slice grid. ``patch_grid`` (rows, cols) of the N
    patches defaults to a square grid. The result lies in [0, 1], is 0 outside the brain mask
    and its maximum over the stack is 1 (unless the whole map is 0).
    """
    patch_grid = _check_shapes(saliency, patch_tokens, cls_attention, brain_mask, patch_grid)
    fused = patch_relevance(saliency, patch_tokens) * cls_attention.float()
    return patches_to_slices(fused, brain_mask, patch_grid)


ExplainInputs = Union[torch.Tensor, np.ndarray, Sequence[torch.Tensor]]


def model_patch_grid(model: Any, n_patches: int) -> Optional[Tuple[int, int]]:
    """The (rows, cols) patch grid of ``model``'s ViT from its config, if it holds ``n_patches``."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    side = int(config.image_size) // int(config.patch_size)
    return (side, side) if side * side == n_patches else None


@dataclass(frozen=True)
class MethodInputs:
    """What steps 2-4 work on, for one subject, as tensors on the regressor's device."""

    saliency: torch.Tensor        # [S, D] guided-backprop saliency (step 1)
    patch_tokens: torch.Tensor    # [S, N, D] last-layer patch tokens
    cls_attention: torch.Tensor   # [S, N] last-layer CLS->patch attention, mean over heads
    brain_mask: torch.Tensor      # [S, H, W] bool
    patch_grid: Tuple[int, int]   # (rows, cols) of the N patches


def method_inputs(model: Any, prepared: Any, embeddings: ExplainInputs, sex_value: float, *,
                  patch_tokens: Optional[torch.Tensor] = None,
                  cls_attention: Optional[torch.Tensor] = None,
                  batch_size: Optional[int] = None) -> MethodInputs:
    """Run step 1 (guided backprop) and gather the ViT's tokens and attention; see explain_slices."""
    if isinstance(embeddings, (tuple, list)):
        if len(embeddings) != 3:
            raise ValueError("embeddings must be [S, D] or the (embeddings, patch_tokens, cls_attention) triple")
        embeddings, patch_tokens, cls_attention = embeddings
    regressor = model.regressor
    device = next(regressor.parameters()).device
    embeddings = _as_tensor(embeddings, device)
    if patch_tokens is None or cls_attention is None:
        _, patch_tokens, cls_attention = model.embed_explain(prepared.slices, batch_size=batch_size)
    patch_tokens = _as_tensor(patch_tokens, device)
    cls_attention = _as_tensor(cls_attention, device)
    brain_mask = _as_tensor(prepared.brain_mask, device, dtype=torch.bool)

    patch_grid = model_patch_grid(model, patch_tokens.shape[1])
    saliency = slice_saliency(regressor, embeddings, sex_value)
    patch_grid = _check_shapes(saliency, patch_tokens, cls_attention, brain_mask, patch_grid)
    return MethodInputs(saliency, patch_tokens, cls_attention, brain_mask, patch_grid)


def explain_slices(model: Any, prepared: Any, embeddings: ExplainInputs, sex_value: float, *,
                   patch_tokens: Optional[torch.Tensor] = None,
                   cls_attention: Optional[torch.Tensor] = None,
                   batch_size: Optional[int] = None,
                   method: str = DEFAULT_METHOD) -> np.ndarray:
    """The explanation map of one subject in model space: float32 [S, H, W] in [0, 1].

    ``method`` (:data:`METHODS`): ``"paper"`` (default) the paper's fused attention map,
    ``"relevance"`` the gradient-weighted attention relevance of the last RELEVANCE_BLOCKS block(s)
    (:func:`relevance_slices`; it only reads the embeddings of ``embeddings``, and
    ``batch_size`` is then its own gradient batch).

    ``model`` is a BrainAgeModel (``.encoder``, ``.regressor``, ``.config``); ``prepared`` the
    subject's Prepared (``.slices`` [S, H, W], ``.brain_mask`` [S, H, W]). ``embeddings`` is
    either the [S, D] slice embeddings, or the ``(embeddings, patch_tokens, cls_attention)``
    triple ``model.embed_explain`` returns. Pass the triple (or the two keywords) when the
    encoder already ran that way: otherwise the encoder runs again here to get the patch
    tokens and attention, which doubles the ViT's cost. ``sex_value``: 0 = male, 1 = female,
    0.5 (or NaN) = unknown. Map the result to the input grid with ``prepared.to_input_grid``.
    """
    method = check_method(method)
    if method == "relevance":
        return relevance_slices(model, prepared, embeddings, sex_value, batch_size=batch_size)
    return explain_components(model, prepared, embeddings, sex_value, patch_tokens=patch_tokens,
                              cls_attention=cls_attention, batch_size=batch_size)["fused"]


def explain_components(model: Any, prepared: Any, embeddings: ExplainInputs, sex_value: float, *,
                       patch_tokens: Optional[torch.Tensor] = None,
                       cls_attention: Optional[torch.Tensor] = None,
                       batch_size: Optional[int] = None,
                       parts: Sequence[str] = ("fused",)) -> Dict[str, np.ndarray]:
    """The fused map and, on request, its two factors, each [S, H, W] float32 in [0, 1].

    ``parts`` from: ``"fused"`` (the paper's map, what explain_slices returns), ``"cnn_relevance"``
    (step 2 alone: the CNN's per-slice min-max relevance, as if the ViT attended uniformly) and
    ``"vit_attention"`` (the ViT's last-layer CLS attention alone). Each goes through step 4 the
    same way, so the three can be compared voxel for voxel; they show which half of the model a
    map's pattern comes from. Arguments as for explain_slices.
    """
    unknown = sorted(set(parts) - set(MAP_PARTS))
    if unknown:
        raise ValueError(f"unknown map parts {unknown}; choose from {list(MAP_PARTS)}")
    inputs = method_inputs(model, prepared, embeddings, sex_value, patch_tokens=patch_tokens,
                           cls_attention=cls_attention, batch_size=batch_size)
    maps: Dict[str, np.ndarray] = {}
    with torch.no_grad():
        relevance = patch_relevance(inputs.saliency, inputs.patch_tokens)
        attention = inputs.cls_attention.float()
        factors = {"fused": lambda: relevance * attention, "cnn_relevance": lambda: relevance,
                   "vit_attention": lambda: attention}
        for part in parts:
            stack = patches_to_slices(factors[part](), inputs.brain_mask, inputs.patch_grid)
            maps[part] = stack.cpu().numpy().astype(np.float32, copy=False)
    return maps


#: The maps explain_components can return.
MAP_PARTS = ("fused", "cnn_relevance", "vit_attention")

def check_method(method: Any) -> str:
    """``method`` if it names one of :data:`METHODS`, else ``ValueError``."""
    if method not in METHODS:
        raise ValueError(f"unknown explanation method {method!r}; choose from {', '.join(METHODS)}")
    return str(method)


def explanation_method(explain: Any) -> Optional[str]:
    """What ``predict``'s ``explain`` argument asks for: False/None -> None (no map), True ->
    :data:`DEFAULT_METHOD`, a name from :data:`METHODS` -> itself; anything else ``ValueError``."""
    if explain is None or explain is False:
        return None
    if explain is True:
        return DEFAULT_METHOD
    return check_method(explain)


# ------------------------------------------------------------------------------------------
# Relevance: gradient-weighted attention rollout (Chefer et al. 2021), over RELEVANCE_BLOCKS blocks
# ------------------------------------------------------------------------------------------

#: Slices per gradient pass of the relevance method on the CPU. Each pass keeps every block's
#: activations for the backward pass, so memory grows with the batch, not with the subject.
RELEVANCE_CPU_BATCH = 8


def relevance_batch_size(device: torch.device, config: Any, n_slices: int) -> int:
    """Slices per gradient pass: :data:`RELEVANCE_CPU_BATCH` on the CPU; on CUDA as many as fit in
    a quarter of the free memory, estimating a slice's saved activations per block as its
    attention matrices (heads x T x T, three copies) and its MLP hidden state (T x 4D, a few copies)."""
    tokens = (config.image_size // config.patch_size) ** 2 + 1
    per_block = tokens * (3 * config.num_heads * tokens + config.embed_dim * (2 * config.mlp_ratio + 8))
    return batch_that_fits(device, n_slices, RELEVANCE_CPU_BATCH, 4 * config.depth * per_block, 0.25)


def relevance_rollout(probabilities: Sequence[torch.Tensor], gradients: Sequence[torch.Tensor]) -> torch.Tensor:
    """Chefer et al.'s rule over blocks in forward order: ``R <- R + mean_heads((dA * A)+) @ R``
    from ``R = I``; each ``probabilities``/``gradients`` pair [B, heads, T, T]. Returns R [B, T, T]
    (row i: how much each token contributed, through attention, to token i's output)."""
    batch, _, tokens, _ = probabilities[0].shape
    eye = torch.eye(tokens, device=probabilities[0].device, dtype=torch.float32)
    rollout = eye.expand(batch, tokens, tokens).clone()
    for attention, gradient in zip(probabilities, gradients):
        weighted = (gradient.float() * attention.float()).clamp(min=0).mean(dim=1)
        rollout = rollout + torch.bmm(weighted, rollout)
    return rollout


#: Blocks the relevance method rolls out, counted from the last: 1 = the last block alone.
#: Measured on the demo model (README, "How far to trust a map"): rolling out all blocks, the
#: early blocks' terms dominate and a re-initialised last block leaves the map correlated
#: 0.67-0.75 with the trained one; the last block alone passes every sanity check.
RELEVANCE_BLOCKS = 1


def attention_relevance(encoder: Any, slices: Union[np.ndarray, torch.Tensor], embedding_gradient: torch.Tensor, *,
                        batch_size: Optional[int] = None, blocks: Optional[int] = RELEVANCE_BLOCKS) -> torch.Tensor:
    """Relevance [S, N] of each slice's N patches for its share of the predicted age.

    ``embedding_gradient`` [S, D] is d(age)/d(slice embedding) (the CNN's plain gradient). A
    slice's embedding is the mean over all its tokens of the final-normed last hidden state, so
    the quantity explained is ``<gradient_s, embedding_s>``, differentiated with respect to the
    attention probabilities A of the last ``blocks`` blocks (None: all; the ViT runs in eval mode
    and float32, with autograd on for this pass only, from the input of the first of those
    blocks). Per block, ``mean over heads of (dA * A)+`` is rolled out from the first of them
    to the last (:func:`relevance_rollout`, Chefer et al. 2021); the slice's relevance is the mean
    over all rows (the embedding averages every token) of ``R - I`` restricted to the patch
    columns. The identity is left out: it gives every patch the same 1/T whatever the model, a
    uniform floor (measured: localisation at chance, 1.0, with it). Slices go ``batch_size`` at a
    time (default :func:`relevance_batch_size`), so memory is that of one batch. Every
    ``fused_attn`` flag, hook, ``requires_grad`` and the train/eval mode are restored afterwards,
    even after an error.
    """
    from ..model.encoder import block_attentions

    vit = encoder.vit
    param = next(encoder.parameters())
    device = param.device
    x = torch.from_numpy(np.ascontiguousarray(slices)) if isinstance(slices, np.ndarray) else torch.as_tensor(slices)
    x = x.to(torch.float32)
    gradient = embedding_gradient.detach().to(device=device, dtype=torch.float32)
    if x.ndim != 3 or gradient.shape != (x.shape[0], vit.embed_dim):
        raise ValueError(f"slices {tuple(x.shape)} and embedding gradient {tuple(gradient.shape)} do not match")
    depth = len(vit.blocks)
    first = 0 if blocks is None else depth - max(1, min(int(blocks), depth))
    n = int(x.shape[0])
    step = int(batch_size or relevance_batch_size(device, encoder.config, n))
    start = int(encoder.num_prefix_tokens)
    params = list(encoder.parameters())
    requires = [p.requires_grad for p in params]
    was_training = encoder.training
    pieces: List[torch.Tensor] = []

    def graph_from_here(module: nn.Module, args: Tuple[torch.Tensor, ...]):
        # the blocks before run without a graph (nothing requires grad yet): memory of these only
        return (args[0].detach().requires_grad_(True),) + tuple(args[1:])

    handle = vit.blocks[first].register_forward_pre_hook(graph_from_here)
    try:
        encoder.eval()
        for p in params:                 # gradients w.r.t. the attention only: no weight gradients
            p.requires_grad_(False)
        for low in range(0, n, step):
            with torch.enable_grad(), block_attentions(vit, range(first, depth)) as captured:
                tokens = vit.forward_features(encoder.normalize(x[low:low + step].to(device)))
                score = (tokens.float().mean(dim=1) * gradient[low:low + step]).sum()
                probabilities = [holder.probabilities for holder in captured]
                gradients = torch.autograd.grad(score, probabilities)
            with torch.no_grad():
                rollout = relevance_rollout(probabilities, gradients)
                rollout = rollout - torch.eye(rollout.shape[-1], device=rollout.device)
                pieces.append(rollout.mean(dim=1)[:, start:].detach())
            del captured, tokens, score, probabilities, gradients, rollout
    finally:
        handle.remove()
        for p, flag in zip(params, requires):
            p.requires_grad_(flag)
        encoder.train(was_training)
    return torch.cat(pieces)


def relevance_slices(model: Any, prepared: Any, embeddings: ExplainInputs, sex_value: float, *,
                     batch_size: Optional[int] = None, blocks: Optional[int] = RELEVANCE_BLOCKS) -> np.ndarray:
    """The relevance map of one subject in model space: float32 [S, H, W] in [0, 1].

    1. The CNN's plain gradient d(age)/d(embedding) [S, D] (sex as for the prediction; no
       guided rule: the sign matters here);
    2. :func:`attention_relevance` of the last ``blocks`` ViT blocks (default
       :data:`RELEVANCE_BLOCKS`; None = all, Chefer et al.'s full rollout), batched over slices;
    3. the same masking, upsampling and scaling by the stack's maximum as the paper's map
       (:func:`patches_to_slices`). No per-slice scaling: how much each slice matters is kept.

    ``embeddings`` is the [S, D] slice embeddings or the ``embed_explain`` triple (only its
    embeddings are read: the ViT runs again here, with gradients, batch_size slices at a time).
    """
    if isinstance(embeddings, (tuple, list)):
        embeddings = embeddings[0]
    regressor = model.regressor
    device = next(regressor.parameters()).device
    gradient = slice_saliency(regressor, _as_tensor(embeddings, device), sex_value, guided=False)
    relevance = attention_relevance(model.encoder, prepared.slices, gradient, batch_size=batch_size, blocks=blocks)
    brain_mask = _as_tensor(prepared.brain_mask, relevance.device, dtype=torch.bool)
    n_patches = relevance.shape[1]
    patch_grid = model_patch_grid(model, n_patches)
    if patch_grid is None:
        side = int(round(n_patches ** 0.5))
        if side * side != n_patches:
            raise ValueError(f"{n_patches} patches are not a square grid")
        patch_grid = (side, side)
    if brain_mask.ndim != 3 or brain_mask.shape[0] != relevance.shape[0]:
        raise ValueError(f"brain mask {tuple(brain_mask.shape)} must be [S={relevance.shape[0]}, H, W]")
    with torch.no_grad():
        stack = patches_to_slices(relevance, brain_mask, patch_grid)
    return stack.cpu().numpy().astype(np.float32, copy=False)


def localisation_ratio(attention: np.ndarray, regions: np.ndarray, brain: np.ndarray) -> float:
    """How much more attention falls in ``regions`` than chance: 1 = chance, higher = localised.

    (share of the attention, summed inside ``brain``, that lies in ``regions``) divided by
    (the share of ``brain`` voxels that are in ``regions``). All three arrays on one grid;
    ``regions`` and ``brain`` boolean. Used to validate maps against the ground-truth ageing
    regions of synthetic phantoms.
    """
    attention = np.asarray(attention, dtype=np.float64)
    brain = np.asarray(brain, dtype=bool)
    regions = np.asarray(regions, dtype=bool) & brain
    if attention.shape != brain.shape or regions.shape != brain.shape:
        raise ValueError(f"attention {attention.shape}, regions {regions.shape} and brain {brain.shape} differ")
    inside = np.clip(attention, 0, None) * brain
    total = inside.sum()
    if total <= 0 or not regions.any():
        raise ValueError("no attention inside the brain, or no region voxel inside the brain")
    return float((inside[regions].sum() / total) / (regions.sum() / brain.sum()))
