"""`brainage import-official`: the authors' DoRA ViT + pickled CNN -> one BrainAge model, same ages.

The authors' side is rebuilt here the way their scripts build it (transformers 4.x
``ViTForImageClassification`` wrapped by peft with DoRA r=8, alpha=16 on query/value and the
classifier in ``modules_to_save``; their ``AgePredictionCNN`` from cnn_mx_bigdo_ch_sw_res.py),
saved in their layout (``torch.save`` of a training dict; ``pickle.dump`` with optimizer and RNG
states), imported, and compared number for number with our model.
"""
from __future__ import annotations

import copy
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

# transformers 4 (the [test] extra pins <5): the authors' checkpoints use its module names
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import ViTConfig, ViTForImageClassification  # noqa: E402

from BrainAgeLib.model.checkpoint import load_model, read_metadata  # noqa: E402
from BrainAgeLib.cli import main as brainage  # noqa: E402
from BrainAgeLib.errors import CheckpointError  # noqa: E402
from BrainAgeLib.model.import_official import (  # noqa: E402
    OFFICIAL_CNN_FILENAME, OFFICIAL_VIT_FILENAME, class_layout, find_official_files, hf_vit_to_timm,
    import_official, merge_dora_weight, merge_peft_state_dict, official_class_labels,
)


# ------------------------------------------------------------------ the authors' side, rebuilt
class ConvBlock(nn.Module):
    """Their ConvBlock (cnn_mx_bigdo_ch_sw_res.py), as written there."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=kernel_size, stride=stride)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=1)
        self.silu = nn.SiLU()
        self.needs_projection = in_channels != out_channels
        if self.needs_projection:
            self.projection = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1)

    def forward(self, x):
        identity = x
        out = self.pool(self.silu(self.conv(x)))
        if self.needs_projection:
            identity = self.projection(identity)
        if identity.shape[2:] != out.shape[2:]:
            identity = nn.functional.interpolate(identity, size=out.shape[2:], mode="nearest")
        if identity.shape == out.shape:
            out = out + identity
        return out


class AgePredictionCNN(nn.Module):
    """Their AgePredictionCNN: fc1 sized from a dry run, LayerNorms named *_bn, sex before fc3."""

    def __init__(self, input_shape):
        super().__init__()
        self.conv_block1 = ConvBlock(1, 8, kernel_size=(10, 60), stride=1)
        self.conv_block2 = ConvBlock(8, 4, kernel_size=(5, 15), stride=1)
        self.conv_block3 = ConvBlock(4, 1, kernel_size=(2, 6), stride=1)
        self.flatten = nn.Flatten()
        self.fc2 = nn.Linear(512, 128)
        self.fc2_bn = nn.LayerNorm(128)
        self.dropout = nn.Dropout(p=0.3)
        self.fc3 = nn.Linear(129, 1)
        self.silu = nn.SiLU()
        with torch.no_grad():
            x = self.conv_block3(self.conv_block2(self.conv_block1(torch.zeros(1, *input_shape))))
        self.fc1 = nn.Linear(x.numel(), 512)
        self.fc1_bn = nn.LayerNorm(512)

    def forward(self, x, sex):
        x = self.flatten(self.conv_block3(self.conv_block2(self.conv_block1(x))))
        x = self.dropout(self.silu(self.fc1_bn(self.fc1(x))))
        x = self.dropout(self.silu(self.fc2_bn(self.fc2(x))))
        x = torch.cat((x, sex.unsqueeze(1)), dim=1)
        return self.fc3(x)


def their_dora_vit(config: ViTConfig, seed: int):
    """Their stage-1 model: ViTForImageClassification + DoRA, adapters given non-zero values."""
    torch.manual_seed(seed)
    model = ViTForImageClassification(config)
    dora_config = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.1, bias="none",
        target_modules=["query", "value"], modules_to_save=["classifier"], use_dora=True,
    )
    model = get_peft_model(model, dora_config)
    with torch.no_grad():  # as if trained: B != 0, magnitudes off the initial norms, head moved
        for name, param in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.normal_(0.0, 0.05)
            elif "lora_magnitude_vector" in name:
                param.mul_(1.0 + 0.2 * torch.rand_like(param))
            elif "modules_to_save" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def save_their_vit(model, path: Path, train_step: bool) -> Path:
    """``torch.save({'epoch', 'model_state_dict', 'optimizer_state_dict'})`` as their save_checkpoint."""
    optimizer = torch.optim.AdamW(filter(lambda p: p.requires_grad, model.parameters()), lr=1e-4)
    if train_step:
        size = model.config.image_size
        model.train()
        logits = model(pixel_values=torch.randn(2, 3, size, size)).logits
        nn.functional.cross_entropy(logits, torch.tensor([0, 3])).backward()
        optimizer.step()
        model.eval()
    torch.save({"epoch": 4, "model_state_dict": model.state_dict(),
                "optimizer_state_dict": optimizer.state_dict()}, path)
    return path


def their_cnn(input_shape, seed: int) -> AgePredictionCNN:
    torch.manual_seed(seed)
    cnn = AgePredictionCNN(input_shape)
    with torch.no_grad():  # LayerNorms away from 1/0 so a swapped mapping would show
        for layer in (cnn.fc1_bn, cnn.fc2_bn):
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.normal_(0.0, 0.1)
        cnn.fc3.bias.fill_(45.0)  # ages around 45 y
    return cnn.eval()


def pickle_their_cnn(cnn: AgePredictionCNN, path: Path, train_step: bool) -> Path:
    """``pickle.dump`` of their training loop's checkpoint dict (weights, Adam, RNG states)."""
    optimizer = torch.optim.Adam(cnn.parameters(), lr=0.0005)
    if train_step:
        h, w = cnn.input_hw
        cnn.train()
        out = cnn(torch.randn(1, 1, h, w), torch.tensor([1.0]))
        ((out.squeeze() - 50.0) ** 2).backward()
        optimizer.step()
        cnn.eval()
    checkpoint = {
        "model_state": cnn.state_dict(),
        "optimizer_state": optimizer.state_dict(),
        "epoch": 37,
        "loss": 2.96,
        "t_rng_st": torch.get_rng_state(),
        "n_rng_st": np.random.get_state(),
        "cuda_rng_st": None,
    }
    with path.open("wb") as handle:
        pickle.dump(checkpoint, handle)
    return path


def their_embeddings(merged_vit, images: torch.Tensor) -> torch.Tensor:
    """Their feature extractor: ``model.vit(x).last_hidden_state.mean(dim=1)`` after merge_and_unload."""
    with torch.no_grad():
        return merged_vit.vit(images).last_hidden_state.mean(dim=1)


def normalized_rgb(slices: torch.Tensor) -> torch.Tensor:
    """Their transform after ToTensor: grey -> RGB, Normalize(0.5, 0.5)."""
    return ((slices - 0.5) / 0.5).unsqueeze(1).expand(-1, 3, -1, -1)


# A small ViT (2 layers, 128 wide, 32 px) whose embeddings the real CNN class can read as a
# 32 x 128 map; fast enough for the whole chain on 32 slices.
def small_vit_config(num_labels: int = 20) -> ViTConfig:
    return ViTConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                     image_size=32, patch_size=8, num_labels=num_labels)


SMALL_VIT = small_vit_config()
SMALL_SLICES = 32


@pytest.fixture(scope="module")
def small_official(tmp_path_factory):
    """Their two files for the small ViT, in the layout of their extracted archive."""
    folder = tmp_path_factory.mktemp("official_small")
    (folder / "model_dumps" / "mix").mkdir(parents=True)
    vit = their_dora_vit(SMALL_VIT, seed=3)
    vit_path = save_their_vit(vit, folder / "model_dumps" / OFFICIAL_VIT_FILENAME, train_step=True)
    cnn = their_cnn((1, SMALL_SLICES, SMALL_VIT.hidden_size), seed=4)
    cnn.input_hw = (SMALL_SLICES, SMALL_VIT.hidden_size)
    cnn_path = pickle_their_cnn(cnn, folder / "model_dumps" / "mix" / OFFICIAL_CNN_FILENAME, train_step=True)
    # their script saves after the step; reload exactly what was written
    vit.load_state_dict(torch.load(vit_path, weights_only=True)["model_state_dict"])
    with cnn_path.open("rb") as handle:  # our own file, written just above
        cnn.load_state_dict(pickle.load(handle)["model_state"])
    return {"folder": folder, "vit_path": vit_path, "cnn_path": cnn_path, "vit": vit, "cnn": cnn}


# ---------------------------------------------------------------------------------- DoRA merge
def test_dora_merge_equals_peft_merge_and_unload(small_official):
    peft_model = small_official["vit"]
    state = torch.load(small_official["vit_path"], weights_only=True)["model_state_dict"]

    merged, report = merge_peft_state_dict(state)
    reference = copy.deepcopy(peft_model).merge_and_unload().state_dict()

    assert report.dora and report.rank == 8 and report.scaling == pytest.approx(2.0)
    assert report.adapter_name == "default"
    assert len(report.merged_modules) == 2 * SMALL_VIT.num_hidden_layers  # query and value per layer
    assert set(merged) == set(reference)
    for key in reference:
        assert torch.allclose(merged[key], reference[key], atol=1e-6, rtol=0), key
    query = "vit.encoder.layer.0.attention.attention.query.weight"
    base = state[f"base_model.model.{query[:-len('.weight')]}.base_layer.weight"]
    assert (merged[query] - base).abs().max() > 1e-3  # the adapters really changed the weight
    assert torch.equal(merged["classifier.weight"],
                       state["base_model.model.classifier.modules_to_save.default.weight"])


def test_dora_formula_by_hand():
    """W' = m (W + s B A) / ||W + s B A|| with one norm per output row."""
    weight = torch.tensor([[3.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    lora_a = torch.tensor([[1.0, 0.0]])  # r = 1
    lora_b = torch.tensor([[0.0], [1.0], [0.0]])
    magnitude = torch.tensor([6.0, 2.0, 1.0])
    merged = merge_dora_weight(weight, lora_a, lora_b, magnitude, scaling=2.0)
    # row 0: [3, 0] norm 3 -> 6/3 * [3, 0]; row 1: [0,1] + 2*[1,0] = [2, 1], norm sqrt5; row 2 unchanged direction
    expected = torch.tensor([[6.0, 0.0], [4 / 5 ** 0.5, 2 / 5 ** 0.5], [1 / 2 ** 0.5, 1 / 2 ** 0.5]])
    assert torch.allclose(merged, expected, atol=1e-6)
    assert torch.allclose(torch.linalg.norm(merged, dim=1), magnitude)


# ------------------------------------------------------------------------------- key mapping
def test_hf_to_timm_mapping_gives_the_same_tokens(small_official):
    from BrainAgeLib.model import SliceEncoder
    from BrainAgeLib.presets import PRESETS

    merged_vit = copy.deepcopy(small_official["vit"]).merge_and_unload().eval()
    config = PRESETS["paper"].replace(image_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2,
                                      mlp_ratio=2.0, layer_norm_eps=1e-12)
    encoder = SliceEncoder(config).eval()
    encoder.vit.load_state_dict(hf_vit_to_timm(merged_vit.state_dict()), strict=True)

    images = normalized_rgb(torch.rand(3, 32, 32))
    with torch.no_grad():
        theirs = merged_vit.vit(images).last_hidden_state
        ours = encoder.tokens(images)
    assert ours.shape == theirs.shape == (3, 17, 128)
    assert (ours - theirs).abs().max() < 1e-5


def test_class_order_is_converted_to_sex_major():
    labels = official_class_labels(20)
    assert labels[:4] == ["000F", "000M", "010F", "010M"] and labels[-1] == "090M"
    edges, order = class_layout(labels)
    assert edges == tuple(float(e) for e in range(0, 101, 10))
    # ours: M 0-10, M 10-20, ..., M 90-100, F 0-10, ..., F 90-100
    assert [labels[i] for i in order[:2]] == ["000M", "010M"]
    assert [labels[i] for i in order[10:12]] == ["000F", "010F"]
    assert official_class_labels(18) is None
    edges, _ = class_layout(["010F", "010M", "020F", "020M"])
    assert edges == (10.0, 20.0, 30.0)
    with pytest.raises(CheckpointError, match="both sexes"):
        class_layout(["010F", "010M", "020F"])


# ------------------------------------------------------------------------ the whole conversion
def test_small_import_reproduces_their_embeddings_classes_and_ages(small_official, tmp_path):
    out = import_official(small_official["vit_path"], small_official["cnn_path"], tmp_path / "small.safetensors",
                          name="official-small")
    model = load_model(out)
    assert model.config.layer_norm_eps == 1e-12
    assert (model.config.embed_dim, model.config.depth, model.config.num_heads) == (128, 2, 2)
    assert model.config.n_slices == SMALL_SLICES and model.config.image_size == 32

    merged_vit = copy.deepcopy(small_official["vit"]).merge_and_unload().eval()
    generator = torch.Generator().manual_seed(11)
    slices = torch.rand(SMALL_SLICES, 32, 32, generator=generator)  # one scan's sagittal slices in [0, 1]

    theirs = their_embeddings(merged_vit, normalized_rgb(slices))
    ours = model.embed(slices, precision="fp32")  # bf16 autocast (the CPU default where supported) is not exact
    assert ours.shape == (SMALL_SLICES, 128)
    assert (ours - theirs).abs().max() < 1e-4

    with torch.no_grad():  # stage-1 classes: same logits, rows moved to sex-major order
        their_logits = merged_vit(pixel_values=normalized_rgb(slices[:4])).logits
        our_logits = model.encoder.classify(slices[:4])
    for sex, their_sex in ((0, "M"), (1, "F")):
        for decade in range(10):
            their_row = 2 * decade + (0 if their_sex == "F" else 1)
            assert torch.allclose(our_logits[:, sex * 10 + decade], their_logits[:, their_row], atol=1e-4)

    cnn = small_official["cnn"]
    for sex_code, sex in ((0.0, "M"), (1.0, "F")):  # the whole chain: slices -> ViT -> CNN -> age
        with torch.no_grad():
            their_age = float(cnn(theirs.unsqueeze(0).unsqueeze(0), torch.tensor([sex_code])))
            our_age = float(model.regress(ours, sex))
        assert our_age == pytest.approx(their_age, abs=1e-3)


def test_metadata_records_where_the_model_came_from(small_official, tmp_path):
    out = import_official(small_official["vit_path"], small_official["cnn_path"], tmp_path / "m.safetensors")
    card = read_metadata(out)
    assert card["name"] == "brainrotvit-official"
    assert card["is_demo"] is False and card["intended_use"] == "research" and card["trained"] is True
    assert "arXiv:2511.15188" in card["citation"]
    files = {entry["role"]: entry for entry in card["source"]["files"]}
    import hashlib

    vit_sha = hashlib.sha256(small_official["vit_path"].read_bytes()).hexdigest()
    assert files["stage-1 ViT"]["sha256"] == vit_sha
    assert files["stage-1 ViT"]["file"] == OFFICIAL_VIT_FILENAME and files["stage-1 ViT"]["epoch"] == 4
    assert "model_state_dict" in files["stage-1 ViT"]["original_format"]
    assert files["stage-2 CNN"]["original_format"].startswith("pickle.dump")
    assert files["stage-2 CNN"]["validation_mae_years"] == pytest.approx(2.96)
    assert card["source"]["conversion"]["lora_scaling"] == pytest.approx(2.0)
    assert card["official_class_labels"][:2] == ["000F", "000M"]
    assert card["age_bin_edges"] == [float(e) for e in range(0, 101, 10)]
    # the model card: the paper's figures, marked as not re-measured; the preprocessing and its differences
    assert card["training_data"]["train_subjects"] == 4086 and card["training_data"]["validation_subjects"] == 1022
    assert len(card["training_data"]["cohorts"]) == card["training_data"]["datasets"] == 11
    paper = card["metrics"]["reported_in_paper"]
    assert paper["validation_mae_years"] == 3.34 and paper["re_measured_here"] is False
    assert paper["external_mae_years_range"] == [3.77, 5.04]
    assert card["metrics"]["validation_mae_years"] == pytest.approx(2.96)  # what the CNN file itself says
    notes = card["preprocessing_notes"]
    assert notes["authors"]["skull_strip"].startswith("deepbrain") and notes["brainage"]["skull_strip"].startswith("deepbet")
    assert "32 sagittal slices" in notes["brainage"]["slices"]  # this small model's slice count
    assert any("skull stripping" in d for d in notes["differences"])
    assert card["preprocessing"]["skull_strip"] == "deepbet" and card["preprocessing"]["n4_bias_correction"] is True


def test_inputs_are_not_modified_and_output_is_complete(small_official, tmp_path):
    before = {p: p.read_bytes() for p in (small_official["vit_path"], small_official["cnn_path"])}
    out = import_official(small_official["vit_path"], small_official["cnn_path"], tmp_path / "sub" / "x.safetensors")
    assert out.is_file() and not list(out.parent.glob(".*.tmp"))
    assert all(path.read_bytes() == data for path, data in before.items())


# ------------------------------------------------- a classifier whose labels are not known
@pytest.fixture(scope="module")
def eighteen_class_official(tmp_path_factory, small_official):
    """The small ViT with 18 classes (as many decade x sex groups as the authors' data held)."""
    folder = tmp_path_factory.mktemp("official_18")
    vit = their_dora_vit(small_vit_config(num_labels=18), seed=7)
    vit_path = save_their_vit(vit, folder / OFFICIAL_VIT_FILENAME, train_step=False)
    return {"vit_path": vit_path, "cnn_path": small_official["cnn_path"], "vit": vit}


def test_an_18_class_vit_imports_with_generic_labels_and_one_warning(eighteen_class_official, tmp_path):
    from BrainAgeLib.model.import_official import UnknownClassLabelsWarning

    with pytest.warns(UnknownClassLabelsWarning) as caught:
        out = import_official(eighteen_class_official["vit_path"], eighteen_class_official["cnn_path"],
                              tmp_path / "m18.safetensors")
    ours = [w for w in caught if issubclass(w.category, UnknownClassLabelsWarning)]
    assert len(ours) == 1 and "18 classes" in str(ours[0].message)
    assert str(eighteen_class_official["vit_path"]) in str(ours[0].message)

    card = read_metadata(out)
    assert card["class_labels_known"] is False
    assert card["official_class_labels"] == [f"class {i}" for i in range(18)]
    assert card["class_names"] == card["stage1_classes"] == card["official_class_labels"]
    model = load_model(out)
    assert model.config.n_classes == 18

    # the rows keep the authors' order: our logits are theirs, column for column
    merged_vit = copy.deepcopy(eighteen_class_official["vit"]).merge_and_unload().eval()
    slices = torch.rand(2, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        theirs = merged_vit(pixel_values=normalized_rgb(slices)).logits
        ours = model.encoder.classify(slices)
    assert (ours - theirs).abs().max() < 1e-4


def test_known_labels_still_name_an_18_class_classifier(eighteen_class_official, tmp_path):
    import warnings

    labels = [f"{decade:03d}{sex}" for decade in range(10, 100, 10) for sex in ("F", "M")]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        out = import_official(eighteen_class_official["vit_path"], eighteen_class_official["cnn_path"],
                              tmp_path / "named.safetensors", class_labels=labels)
    card = read_metadata(out)
    assert card["class_labels_known"] is True
    assert card["age_bin_edges"] == [float(e) for e in range(10, 101, 10)]
    assert card["class_names"][0] == "M 10-20"


def test_cli_imports_an_18_class_vit_and_prints_the_warning_once(eighteen_class_official, tmp_path, capsys):
    out = tmp_path / "cli18.safetensors"
    code = brainage(["import-official", "--vit", str(eighteen_class_official["vit_path"]),
                     "--cnn", str(eighteen_class_official["cnn_path"]), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert err.count("WARNING:") == 1 and "class_labels_known: false" in err
    assert read_metadata(out)["class_labels_known"] is False


# --------------------------------------------------------------------------- folder and CLI
def test_find_official_files_in_extracted_archive(small_official, tmp_path):
    vit, cnn = find_official_files(small_official["folder"])
    assert vit == small_official["vit_path"] and cnn == small_official["cnn_path"]

    (tmp_path / "best_checkpoints.7z.001").write_bytes(b"7z")
    with pytest.raises(CheckpointError, match=r"7z x best_checkpoints\.7z\.001"):
        find_official_files(tmp_path)


def test_find_prefers_the_best_cnn_over_the_last(small_official, tmp_path):
    folder = tmp_path / "archive"
    folder.mkdir()
    for name in (OFFICIAL_VIT_FILENAME, OFFICIAL_CNN_FILENAME,
                 OFFICIAL_CNN_FILENAME.replace("_best_", "_last_")):
        (folder / name).write_bytes(b"x")
    assert find_official_files(folder) == (folder / OFFICIAL_VIT_FILENAME, folder / OFFICIAL_CNN_FILENAME)


def test_cli_imports_from_a_folder(small_official, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    code = brainage(["import-official", str(small_official["folder"]), "--out", str(out), "--name", "from-cli"])
    assert code == 0, capsys.readouterr().err
    assert load_model(out).name == "from-cli"
    assert str(out) in capsys.readouterr().out


def test_cli_with_explicit_files_and_bad_input(small_official, tmp_path, capsys):
    out = tmp_path / "explicit.safetensors"
    code = brainage(["import-official", "--vit", str(small_official["vit_path"]),
                     "--cnn", str(small_official["cnn_path"]), "--out", str(out)])
    assert code == 0 and out.is_file()
    code = brainage(["import-official", "--vit", str(small_official["vit_path"]), "--out", str(out)])
    assert code == 2 and "--cnn" in capsys.readouterr().err


def test_smuggled_code_in_the_cnn_pickle_is_refused(small_official, tmp_path):
    marker = tmp_path / "pwned"

    class Smuggler:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / OFFICIAL_CNN_FILENAME
    with evil.open("wb") as handle:
        pickle.dump({"model_state": {"fc1.weight": torch.zeros(1)}, "epoch": Smuggler()}, handle)
    with pytest.raises(CheckpointError, match="system"):
        import_official(small_official["vit_path"], evil, tmp_path / "never.safetensors")
    assert not marker.exists()
    assert not (tmp_path / "never.safetensors").exists()


def test_a_vit_pth_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned-pth"

    class Smuggler:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "vit.pth"
    torch.save({"model_state_dict": {"x": torch.zeros(1)}, "epoch": Smuggler()}, evil)
    with pytest.raises(CheckpointError, match="weights_only"):
        import_official(evil, tmp_path / "absent.pkl", tmp_path / "never.safetensors")
    assert not marker.exists()


def test_mismatched_vit_and_cnn_are_refused(small_official, tmp_path):
    cnn = their_cnn((1, 40, 160), seed=1)  # built for 160-wide embeddings, not 128
    cnn.input_hw = (40, 160)
    path = pickle_their_cnn(cnn, tmp_path / "other.pkl", train_step=False)
    with pytest.raises(CheckpointError, match="do not belong together"):
        import_official(small_official["vit_path"], path, tmp_path / "never.safetensors")


# ------------------------------------------------------------------- the real paper-size model
@pytest.mark.slow
def test_paper_size_import_matches_their_vit_base_and_98241_feature_cnn(tmp_path):
    """ViT-B/16 (random init, ViTConfig() defaults = google/vit-base-patch16-224) + fc1 in 98,241."""
    vit = their_dora_vit(ViTConfig(num_labels=20), seed=5)
    vit_path = save_their_vit(vit, tmp_path / OFFICIAL_VIT_FILENAME, train_step=False)
    cnn = their_cnn((1, 160, 768), seed=6)
    assert cnn.fc1.in_features == 98_241
    cnn_path = pickle_their_cnn(cnn, tmp_path / OFFICIAL_CNN_FILENAME, train_step=False)

    out = import_official(vit_path, cnn_path, tmp_path / "paper.safetensors")
    model = load_model(out)
    card = read_metadata(out)
    assert card["architecture"].startswith("paper preset")
    assert model.config.layer_norm_eps == 1e-12
    paper_fields = ("image_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "n_slices",
                    "cnn_channels", "cnn_kernels", "hidden_sizes", "head")
    from BrainAgeLib.presets import PRESETS

    assert {f: getattr(model.config, f) for f in paper_fields} == {f: getattr(PRESETS["paper"], f) for f in paper_fields}

    merged_vit = vit.merge_and_unload().eval()
    slices = torch.rand(3, 224, 224, generator=torch.Generator().manual_seed(2))
    theirs = their_embeddings(merged_vit, normalized_rgb(slices))
    ours = model.embed(slices, precision="fp32")  # bf16 autocast (the CPU default where supported) is not exact
    assert ours.shape == (3, 768)
    assert (ours - theirs).abs().max() < 1e-4

    # a 160 x 768 embedding map built from those slices' embeddings, as their CNN reads it
    features = theirs.repeat(54, 1)[:160] + 0.05 * torch.randn(160, 768, generator=torch.Generator().manual_seed(3))
    for sex_code, sex in ((0.0, "M"), (1.0, "F")):
        with torch.no_grad():
            their_age = float(cnn(features[None, None], torch.tensor([sex_code])))
            our_age = float(model.regress(features, sex))
        assert our_age == pytest.approx(their_age, abs=1e-3)
