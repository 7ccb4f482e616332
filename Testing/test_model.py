"""The two-stage BrainRotViT model: paper sizes, the slice embedding, the regressor, sex handling."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from BrainAgeLib import PRESETS
from BrainAgeLib.errors import BrainAgeError
from BrainAgeLib.model import (
    build_model, class_index, class_names, feature_map_size, flattened_features, vit_parameter_count,
)
from BrainAgeLib.sex import InvalidSexError, parse_sex


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def paper_model():
    return build_model("paper", seed=0)


@pytest.fixture(scope="module")
def tiny_model():
    return build_model("tiny", seed=0).eval()


def tiny_slices(n: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 32, 32, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- paper sizes
def test_paper_vit_is_vit_b16_with_85_8m_parameters(paper_model):
    vit = paper_model.encoder.vit
    assert n_params(paper_model.encoder) == 85_814_036  # ViT-B/16 backbone (85.8M) + 20-class head
    assert vit_parameter_count(paper_model.config) == 85_814_036
    assert vit.patch_embed.proj.weight.shape == (768, 3, 16, 16)
    assert vit.pos_embed.shape == (1, 197, 768)  # CLS + 14 x 14 patches
    assert len(vit.blocks) == 12 and vit.blocks[0].attn.num_heads == 12
    assert vit.head.out_features == 20  # 10 age decades x 2 sexes
    assert vit.norm.eps == pytest.approx(1e-6)


def test_paper_cnn_flattens_143_by_687_and_has_50_4m_parameters(paper_model):
    config = paper_model.config
    assert feature_map_size(config) == (143, 687)
    assert flattened_features(config) == 98_241
    head = paper_model.regressor.head
    assert head.fc1.in_features == 98_241 and head.fc1.out_features == 512
    assert head.fc2.out_features == 128 and head.out.in_features == 129  # 128 features + sex
    assert n_params(paper_model.regressor) == 50_374_296
    convs = [block.conv for block in paper_model.regressor.blocks]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (1, 8, (10, 60)), (8, 4, (5, 15)), (4, 1, (2, 6))]


def test_paper_cnn_runs_on_one_160_by_768_embedding_stack(paper_model):
    embeddings = torch.randn(1, 160, 768)
    with torch.no_grad():
        features = paper_model.regressor.features(embeddings)
        age = paper_model.regressor(embeddings, torch.tensor([1.0]))
    assert features.shape == (1, 98_241)
    assert age.shape == (1,) and torch.isfinite(age).all()


def test_state_dict_keys_follow_the_published_contract(paper_model):
    keys = set(paper_model.state_dict())
    for key in ("encoder.vit.patch_embed.proj.weight", "encoder.vit.cls_token", "encoder.vit.pos_embed",
                "encoder.vit.blocks.11.attn.qkv.weight", "encoder.vit.blocks.11.mlp.fc2.bias",
                "encoder.vit.norm.weight", "encoder.vit.head.weight",
                "regressor.blocks.2.conv.weight", "regressor.blocks.0.projection.weight",
                "regressor.head.fc1.weight", "regressor.head.norm1.weight", "regressor.head.fc2.weight",
                "regressor.head.norm2.bias", "regressor.head.out.weight"):
        assert key in keys, key


@pytest.mark.parametrize("name", ["demo", "tiny"])
def test_vit_parameter_arithmetic_matches_the_small_presets(name):
    config = PRESETS[name]
    model = build_model(name, seed=0)
    assert n_params(model.encoder) == vit_parameter_count(config)
    assert model.regressor.head.fc1.in_features == flattened_features(config)


@pytest.mark.parametrize("name", ["demo", "tiny"])
def test_small_presets_embed_and_regress_with_the_right_shapes(name):
    model = build_model(name, seed=1)
    config = model.config
    slices = torch.rand(config.n_slices, config.image_size, config.image_size)
    embeddings = model.embed(slices, precision="fp32")
    assert embeddings.shape == (config.n_slices, config.embed_dim) and embeddings.dtype == torch.float32
    age = model.regress(embeddings, "F")
    assert age.shape == () and torch.isfinite(age)
    assert model.regress(embeddings.expand(3, -1, -1), ["F", "M", "unknown"]).shape == (3,)


# ---------------------------------------------------------------------------- stage 1
def test_embedding_is_the_mean_of_timm_forward_features_over_all_tokens(tiny_model):
    slices = tiny_slices()
    embeddings = tiny_model.embed(slices, batch_size=5, precision="fp32")
    with torch.no_grad():
        images = tiny_model.encoder.normalize(slices)
        tokens = tiny_model.encoder.vit.forward_features(images)  # [16, 1 + 16, 32]
    assert tokens.shape == (16, 17, 32)
    torch.testing.assert_close(embeddings, tokens.mean(dim=1), rtol=0, atol=1e-6)
    # CLS included: the mean over patch tokens alone is a different vector.
    assert (embeddings - tokens[:, 1:].mean(dim=1)).abs().max() > 1e-3


def test_normalize_replicates_channels_with_mean_and_std_one_half(tiny_model):
    slices = torch.tensor([[[0.0, 0.5], [1.0, 0.25]]])
    images = tiny_model.encoder.normalize(slices)
    assert images.shape == (1, 3, 2, 2)
    expected = torch.tensor([[-1.0, 0.0], [1.0, -0.5]])
    for channel in range(3):
        torch.testing.assert_close(images[0, channel], expected)


def test_numpy_and_torch_slices_give_the_same_embeddings(tiny_model):
    slices = tiny_slices()
    from_torch = tiny_model.embed(slices, precision="fp32")
    from_numpy = tiny_model.embed(slices.numpy(), precision="fp32")
    assert torch.equal(from_torch, from_numpy)


def test_forward_explain_gives_embeddings_tokens_and_the_last_blocks_cls_attention(tiny_model):
    slices = tiny_slices(4)
    encoder = tiny_model.encoder
    captured = {}
    handle = encoder.vit.blocks[-1].attn.qkv.register_forward_hook(lambda m, i, o: captured.update(qkv=o))
    try:
        with torch.no_grad():
            reference = encoder.vit.forward_features(encoder.normalize(slices))
    finally:
        handle.remove()
    with torch.no_grad():
        embeddings, patch_tokens, cls_attention = encoder.forward_explain(slices)
    torch.testing.assert_close(embeddings, reference.mean(dim=1), rtol=0, atol=1e-6)
    torch.testing.assert_close(patch_tokens, reference[:, 1:], rtol=0, atol=1e-6)
    # Independent attention from the qkv projection timm's own (fused) forward computed.
    heads, dim = encoder.vit.blocks[-1].attn.num_heads, 32
    qkv = captured["qkv"].reshape(4, 17, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    weights = ((qkv[0] @ qkv[1].transpose(-2, -1)) * (dim // heads) ** -0.5).softmax(dim=-1)
    torch.testing.assert_close(cls_attention, weights[:, :, 0, 1:].mean(dim=1), rtol=0, atol=1e-6)
    assert cls_attention.shape == (4, 16)
    assert ((cls_attention.sum(dim=1) > 0) & (cls_attention.sum(dim=1) < 1)).all()  # the rest goes to CLS


def reference_last_block_attention(encoder, slices):
    """softmax(q k^T * scale) of the last block, from its own weights on the input it was given."""
    block = encoder.vit.blocks[-1]
    captured = {}
    handle = block.register_forward_pre_hook(lambda m, args: captured.update(x=args[0]))
    try:
        with torch.no_grad():
            encoder.vit.forward_features(encoder.normalize(slices))
    finally:
        handle.remove()
    attn = block.attn
    x = block.norm1(captured["x"])
    b, t, _ = x.shape
    qkv = torch.nn.functional.linear(x, attn.qkv.weight, attn.qkv.bias)
    q, k, _ = qkv.reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    return ((q @ k.transpose(-2, -1)) * attn.head_dim ** -0.5).softmax(dim=-1)


def test_cls_attention_hook_captures_the_last_blocks_softmax_row(tiny_model):
    from BrainAgeLib.model.encoder import cls_attention

    encoder, slices = tiny_model.encoder, tiny_slices(4, seed=3)
    reference = reference_last_block_attention(encoder, slices)
    assert reference.shape == (4, encoder.vit.blocks[-1].attn.num_heads, 17, 17)
    with torch.no_grad(), cls_attention(encoder.vit) as attention:
        encoder.vit.forward_features(encoder.normalize(slices))
    torch.testing.assert_close(attention.row, reference[:, :, 0], rtol=0, atol=1e-6)
    with torch.no_grad():
        _, _, row = encoder.forward_explain(slices)
    torch.testing.assert_close(row, reference[:, :, 0, 1:].mean(dim=1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_explaining_leaves_the_vits_forward_untouched(tiny_model, dtype):
    """The map's attention row is taken beside timm's fused forward, not by changing it: the
    embeddings with a map are bit for bit those without, in float32 and in bf16 (where running
    the last block unfused moved the demo's age by 0.01 years)."""
    from BrainAgeLib.devices import autocast
    from BrainAgeLib.model.encoder import cls_attention

    encoder, slices = tiny_model.encoder, tiny_slices(4, seed=4)
    blocks = encoder.vit.blocks
    before = [block.attn.fused_attn for block in blocks]
    calls = []
    handle = encoder.vit.norm.register_forward_hook(lambda m, i, o: calls.append(o))  # end of forward_features
    try:
        with torch.no_grad(), autocast(torch.device("cpu"), dtype):
            expected = encoder.embed(slices)
            with cls_attention(encoder.vit):
                inside = [block.attn.fused_attn for block in blocks]
                hooked = len(blocks[-1].attn.qkv._forward_hooks)
            explained = encoder.forward_explain(slices)[0]
    finally:
        handle.remove()
    assert inside == before
    assert hooked == 1
    assert not blocks[-1].attn.qkv._forward_hooks  # the hook is gone again
    assert len(calls) == 2  # embed and forward_explain both ran timm's forward_features
    assert torch.equal(explained, expected)
    with pytest.raises(RuntimeError), cls_attention(encoder.vit):
        raise RuntimeError("a failing forward")
    assert not blocks[-1].attn.qkv._forward_hooks
    with pytest.raises(BrainAgeError), cls_attention(encoder.vit) as attention:
        attention.row  # nothing ran yet


def test_stage1_classifier_over_age_decade_by_sex_classes(tiny_model):
    logits = tiny_model.encoder.classify(tiny_slices(3))
    assert logits.shape == (3, 20)
    names = class_names(tiny_model.config)
    assert names[0] == "M 0-10" and names[10] == "F 0-10" and names[16] == "F 60-70"
    assert class_index(67.0, "female", tiny_model.config) == 16
    assert class_index(5.0, "M", tiny_model.config) == 0
    assert class_index(104.0, "F", tiny_model.config) == 19  # beyond the last edge: last bin
    with pytest.raises(BrainAgeError):
        class_index(50.0, "unknown", tiny_model.config)


def test_embed_rejects_slices_of_the_wrong_size(tiny_model):
    with pytest.raises(BrainAgeError, match=r"expects slices \[S, 32, 32\]"):
        tiny_model.embed(torch.rand(16, 64, 64))


# ---------------------------------------------------------------------------- stage 2 and sex
def test_regressor_residual_blocks_match_their_definition(tiny_model):
    block = tiny_model.regressor.blocks[0]
    x = torch.randn(2, 1, 16, 32)
    with torch.no_grad():
        conv_path = torch.nn.functional.max_pool2d(torch.nn.functional.silu(block.conv(x)), 2, stride=1)
        residual = torch.nn.functional.interpolate(block.projection(x), size=conv_path.shape[-2:], mode="nearest")
        torch.testing.assert_close(block(x), conv_path + residual)
    assert conv_path.shape == (2, 4, 16 - 3 + 1 - 1, 32 - 5 + 1 - 1)


def test_unknown_sex_is_the_mean_of_female_and_male_predictions(tiny_model):
    embeddings = tiny_model.embed(tiny_slices(), precision="fp32")
    with torch.no_grad():
        female = tiny_model.regress(embeddings, "F")
        male = tiny_model.regress(embeddings, "male")
        unknown = tiny_model.regress(embeddings, "unknown")
        none = tiny_model.regress(embeddings, None)
    assert female != male
    torch.testing.assert_close(unknown, (female + male) / 2)
    assert torch.equal(unknown, none)


def test_batched_regression_matches_one_subject_at_a_time(tiny_model):
    stacks = torch.stack([tiny_model.embed(tiny_slices(seed=s), precision="fp32") for s in range(3)])
    with torch.no_grad():
        batched = tiny_model.regress(stacks, ["F", "M", "unknown"])
        single = torch.stack([tiny_model.regress(stacks[i], sex) for i, sex in enumerate(["F", "M", "unknown"])])
        codes = tiny_model.regress(stacks, torch.tensor([1.0, 0.0, float("nan")]))
    torch.testing.assert_close(batched, single)
    torch.testing.assert_close(codes, batched)


def test_regress_rejects_bad_shapes_and_codes(tiny_model):
    with pytest.raises(BrainAgeError, match="expects embeddings"):
        tiny_model.regress(torch.zeros(10, 32), "F")
    with pytest.raises(BrainAgeError, match="sex codes"):
        tiny_model.regress(torch.zeros(16, 32), torch.tensor([0.5]))


@pytest.mark.parametrize("value, expected", [
    ("F", "F"), ("f", "F"), ("Female", "F"), (" FEMALE ", "F"),
    ("M", "M"), ("male", "M"), ("MALE", "M"),
    ("unknown", "unknown"), ("Unknown", "unknown"), (None, "unknown"),
])
def test_parse_sex_accepts_the_usual_spellings(value, expected):
    assert parse_sex(value) == expected


@pytest.mark.parametrize("value", ["x", "woman", "", 1, 0.0, "FM"])
def test_parse_sex_rejects_anything_else_clearly(value):
    with pytest.raises(InvalidSexError, match="sex must be F, M, female, male or unknown"):
        parse_sex(value)


def test_build_model_with_a_seed_is_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(7)
    expected_next = torch.rand(1)
    torch.manual_seed(7)
    first = build_model("tiny", seed=3)
    after = torch.rand(1)
    second = build_model("tiny", seed=3)
    assert torch.equal(after, expected_next)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    assert first.metadata["trained"] is False and "random" in first.metadata["intended_use"]


def test_model_metadata_and_bias_correction_property():
    model = build_model("tiny", seed=0)
    assert model.bias_correction is None
    model.metadata["bias_correction"] = {"slope": -0.2, "intercept": 10.0, "n_reference": 50}
    assert model.bias_correction.corrected_gap(70.0, 60.0) == pytest.approx(10.0 - (-0.2 * 60 + 10))
    assert np.isclose(model.bias_correction.slope, -0.2)


def test_image_size_and_n_slices_are_stored_once_in_the_preprocessing():
    import dataclasses

    from BrainAgeLib.presets import ModelConfig, PreprocessConfig

    for config in PRESETS.values():
        assert (config.image_size, config.n_slices) == (config.preprocess.image_size, config.preprocess.n_slices)
        assert "image_size" not in {f.name for f in dataclasses.fields(config)}
        data = config.to_dict()  # checkpoints record both places, as they always did
        assert (data["image_size"], data["n_slices"]) == (config.image_size, config.n_slices)
        assert data["preprocess"]["image_size"] == config.image_size
        assert ModelConfig.from_dict(data) == config
    built = ModelConfig(name="x", image_size=96, n_slices=64)  # keywords set the preprocessing
    assert built.preprocess == PreprocessConfig(image_size=96, n_slices=64)
    smaller = PRESETS["paper"].replace(image_size=32)
    assert smaller.image_size == smaller.preprocess.image_size == 32 and smaller.n_slices == 160
    other = PRESETS["tiny"].replace(preprocess=PreprocessConfig(n_slices=20, image_size=40))
    assert (other.n_slices, other.image_size) == (20, 40)
    assert dataclasses.replace(PRESETS["demo"], dropout=0.1).image_size == 96
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.image_size = 32
    with pytest.raises(ValueError, match=r"image_size=96 but preprocess.image_size=224"):
        ModelConfig(name="x", image_size=96, preprocess=PreprocessConfig())
    with pytest.raises(ValueError, match=r"n_slices=64 but preprocess.n_slices=16"):
        ModelConfig.from_dict({**PRESETS["tiny"].to_dict(), "n_slices": 64})
