"""Figures of the explanation method: extra time of --explain, localisation, sanity correlations.

    python scripts/explain_figures.py overhead --presets demo paper --repeats 3 [--device cpu]
    python scripts/explain_figures.py localisation [--model PATH] [--n 6]
    python scripts/explain_figures.py sanity [--model PATH] [--n 3]
    python scripts/explain_figures.py methods [--model PATH] [--n 12]

``overhead`` times ``predict`` without and with ``explain=True`` on the same synthetic
head (1 mm, with skull: the full preprocessing, as a user's scan gets), alternating the two,
and reports medians; then the same through ``brainage predict`` (which also writes the files).
Weights do not change the timing, so presets with random weights stand in for trained models.
``localisation`` and ``sanity`` use the demo model (default: the bundled one) on held-out
phantoms, as ``Testing/test_explain.py`` does, but on more heads. ``localisation`` also scores
the fused map's two factors alone (``explain_components``) and the best map the method's
resolution allows; ``sanity`` also gives the floor of the CNN-head check for this fusion.
``methods`` puts the two explanation methods ("paper", "relevance") side by side on the same
held-out phantoms: localisation ratio, Spearman with the map of the model with its CNN head,
its ViT's last block or last two blocks re-initialised, the same input twice, and Pearson r of
the map (on the input grid, via ``predict``) of the head saved in another voxel orientation
(every ``--orientation-every``-th phantom: it costs four more predictions);
plus, for the record, the relevance rolled out through all blocks (``blocks=None``), which
the library does not use (see ``explain.methods.RELEVANCE_BLOCKS``).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

AGING_REGION_THRESHOLD = 0.3  # as in Testing/test_explain.py


def overhead(args: argparse.Namespace) -> None:
    import torch

    from BrainAgeLib.io import load_volume, save_volume
    from BrainAgeLib.inference import predict
    from BrainAgeLib.model import build_model

    if args.input:
        volume = load_volume(args.input)
        print(f"input: {args.input} {volume.shape} at {volume.spacing[0]:.2f} mm", end="")
    else:
        from BrainAgeLib.synth.phantoms import make_phantom

        volume = make_phantom(67.0, "F", seed=4242, spacing=args.spacing, skull=True, with_tissue=False).volume
        print(f"input: phantom {volume.shape} at {args.spacing} mm with skull", end="")
    print(f"; device {args.device}; torch threads {torch.get_num_threads()}"
          + (f"; {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "head_T1w.nii.gz"
        save_volume(volume, path)
        for preset in args.presets:
            model = build_model(preset, seed=0).eval()
            predict(model, volume, "F", 67.0, explain=True, device=args.device, use_cache=False)  # warm-up
            plain, explained, explain_step = [], [], []
            for _ in range(args.repeats):
                for explain in (False, True):
                    tic = time.perf_counter()
                    result = predict(model, volume, "F", 67.0, explain=explain, device=args.device, use_cache=False)
                    seconds = time.perf_counter() - tic
                    (explained if explain else plain).append(seconds)
                    if explain:
                        explain_step.append(result.timings["explain"])
            p, e = statistics.median(plain), statistics.median(explained)
            print(f"[{preset}] predict: plain {p:.2f} s, explain {e:.2f} s -> +{100 * (e - p) / p:.1f}% "
                  f"(explain step {statistics.median(explain_step):.2f} s = {100 * statistics.median(explain_step) / p:.1f}% "
                  f"of plain); runs {args.repeats}")
            print("    last explained run's timings (s): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in result.timings.items() if "." not in k))
            if args.cli:
                runs = {False: [], True: []}
                for _ in range(args.repeats):
                    for explain in (False, True):
                        command = [sys.executable, "-m", "BrainAgeLib", "predict", str(path), "--preset", preset,
                                   "--sex", "F", "--age", "67", "--device", args.device,
                                   "--out", str(Path(folder) / "out")] + (["--explain"] if explain else [])
                        tic = time.perf_counter()
                        subprocess.run(command, check=True, capture_output=True)
                        runs[explain].append(time.perf_counter() - tic)
                p, e = statistics.median(runs[False]), statistics.median(runs[True])
                print(f"[{preset}] brainage predict (process, files included): plain {p:.2f} s, "
                      f"--explain {e:.2f} s -> +{100 * (e - p) / p:.1f}%")


def _demo_model(path):
    from BrainAgeLib.model.checkpoint import load_model
    from BrainAgeLib.resources import resource_path

    return load_model(path or resource_path("Models", "brainage_demo.safetensors"))


def _phantoms(n: int, spacing: float = 2.0):
    from BrainAgeLib.synth.phantoms import make_phantom

    rng = np.random.default_rng(31337)
    for i in range(n):
        age = float(rng.uniform(65, 88))
        sex = "F" if i % 2 == 0 else "M"
        yield make_phantom(age, sex, seed=90_000 + i, spacing=spacing, skull=bool(i % 3 == 2), with_tissue=False)


def _maps(model, prepared, sex: str, parts=("fused",)):
    from BrainAgeLib.explain.methods import explain_components

    return explain_components(model, prepared, model.embed_explain(prepared.slices, precision="fp32"),
                              1.0 if sex == "F" else 0.0, parts=parts)


def _map(model, prepared, sex: str):
    return _maps(model, prepared, sex)["fused"]


def localisation(args: argparse.Namespace) -> None:
    from BrainAgeLib.explain.methods import MAP_PARTS, localisation_ratio
    from BrainAgeLib.preprocess.pipeline import prepare

    model = _demo_model(args.model)
    ratios = {part: [] for part in MAP_PARTS + ("oracle",)}
    for phantom in _phantoms(args.n):
        prepared = prepare(phantom.volume, model.config)
        maps = _maps(model, prepared, phantom.sex, MAP_PARTS)
        maps = {part: prepared.to_input_grid(value).array for part, value in maps.items()}
        maps["oracle"] = _oracle_map(model, prepared, phantom.aging_map)
        brain = prepared.to_input_grid(prepared.brain_mask.astype(np.float32)).array > 0.5
        regions = phantom.aging_map.array >= AGING_REGION_THRESHOLD
        for part, value in maps.items():
            ratios[part].append(localisation_ratio(value, regions, brain))
        print(f"age {phantom.age:.1f} {phantom.sex} skull={phantom.has_skull}: regions {100 * (regions & brain).sum() / brain.sum():.1f}% "
              f"of brain, localisation ratio {ratios['fused'][-1]:.2f} (CNN relevance alone {ratios['cnn_relevance'][-1]:.2f}, "
              f"ViT attention alone {ratios['vit_attention'][-1]:.2f}, oracle at the map's resolution {ratios['oracle'][-1]:.2f})")
    for part, values in ratios.items():
        label = "localisation ratio" if part == "fused" else f"  {part}"
        print(f"{label}: mean {np.mean(values):.2f}, min {np.min(values):.2f}, max {np.max(values):.2f} (n={len(values)})")


def _oracle_map(model, prepared, aging_map):
    """What the method gives when the relevance of each patch is the true ageing in it (mean of
    the ground-truth ageing map over the patch) and attention is uniform: the best localisation
    possible at the map's resolution with per-slice min-max scaling."""
    import torch
    import torch.nn.functional as F

    from BrainAgeLib.explain.methods import fuse_slice_attention

    side = model.config.image_size // model.config.patch_size
    truth = torch.from_numpy(prepared.to_model_space(aging_map))[:, None]
    mask = torch.from_numpy(prepared.brain_mask)
    per_patch = F.adaptive_avg_pool2d(truth * mask[:, None], (side, side)).reshape(len(truth), -1, 1)
    n = per_patch.shape[1]
    stack = fuse_slice_attention(torch.ones(len(truth), 1), per_patch, torch.full((len(truth), n), 1.0 / n), mask)
    return prepared.to_input_grid(stack.numpy()).array


def sanity(args: argparse.Namespace) -> None:
    """Adebayo et al.'s randomisation test on the fused map and on each of its two factors, plus
    the floor of the CNN-head check for this fusion: the map made with the head's saliency
    replaced by Gaussian noise (no head at all)."""
    import torch
    from scipy.stats import spearmanr

    from BrainAgeLib.explain.methods import MAP_PARTS, fuse_slice_attention, method_inputs
    from BrainAgeLib.preprocess.pipeline import prepare

    model = _demo_model(args.model)
    randomisations = (("randomised CNN head", lambda m: list(m.regressor.modules())),
                      ("randomised ViT last block", lambda m: list(m.encoder.vit.blocks[-1].modules()) + [m.encoder.vit.norm]),
                      ("randomised ViT last 2 blocks", lambda m: list(m.encoder.vit.blocks[-2:].modules()) + [m.encoder.vit.norm]))
    rows = {}
    floor_label = "fused map from a Gaussian-noise saliency (floor of the head check)"
    for phantom in _phantoms(args.n):
        prepared = prepare(phantom.volume, model.config)
        brain = prepared.brain_mask
        rho = lambda a, b: spearmanr(a[brain], b[brain]).statistic  # noqa: E731
        trained = _maps(model, prepared, phantom.sex, MAP_PARTS)
        rows.setdefault("same input twice (fused)", []).append(rho(trained["fused"], _map(model, prepared, phantom.sex)))
        for label, modules in randomisations:
            clone = copy.deepcopy(model)
            torch.manual_seed(99)
            for module in modules(clone):
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
            changed = _maps(clone, prepared, phantom.sex, MAP_PARTS)
            for part in MAP_PARTS:
                rows.setdefault(f"{label}: {part}", []).append(rho(trained[part], changed[part]))
        inputs = method_inputs(model, prepared, model.embed_explain(prepared.slices, precision="fp32"),
                               1.0 if phantom.sex == "F" else 0.0)
        noise = torch.randn(inputs.saliency.shape, generator=torch.Generator().manual_seed(99))
        floor = fuse_slice_attention(noise, inputs.patch_tokens, inputs.cls_attention, inputs.brain_mask, inputs.patch_grid)
        rows.setdefault(floor_label, []).append(rho(trained["fused"], floor.numpy()))
    for label, values in rows.items():
        print(f"Spearman(trained, {label}): mean {np.mean(values):.3f} (range {np.min(values):.3f}-{np.max(values):.3f}, n={len(values)})")


def methods(args: argparse.Namespace) -> None:
    import torch
    from scipy.stats import spearmanr

    from BrainAgeLib.explain.methods import explain_slices, localisation_ratio, relevance_slices
    from BrainAgeLib.inference import predict
    from BrainAgeLib.io import load_volume, save_volume
    from BrainAgeLib.preprocess.pipeline import prepare

    model = _demo_model(args.model)
    variants = {
        "paper": lambda m, prep, enc, sv: explain_slices(m, prep, enc, sv, method="paper"),
        "relevance": lambda m, prep, enc, sv: explain_slices(m, prep, enc, sv, method="relevance"),
        "relevance, all blocks rolled out (not used)": lambda m, prep, enc, sv: relevance_slices(m, prep, enc, sv, blocks=None),
    }
    randomisations = {"CNN head": lambda m: list(m.regressor.modules()),
                      "ViT last block": lambda m: list(m.encoder.vit.blocks[-1].modules()) + [m.encoder.vit.norm],
                      "ViT last 2 blocks": lambda m: list(m.encoder.vit.blocks[-2:].modules()) + [m.encoder.vit.norm]}
    clones = {}
    for label, modules in randomisations.items():
        clone = copy.deepcopy(model)
        torch.manual_seed(99)
        for module in modules(clone):
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        clones[label] = clone
    rows: dict = {}
    seconds: dict = {}
    for index, phantom in enumerate(_phantoms(args.n)):
        prepared = prepare(phantom.volume, model.config)
        sv = 1.0 if phantom.sex == "F" else 0.0
        brain = prepared.brain_mask
        rho = lambda a, b: float(spearmanr(a[brain], b[brain]).statistic)  # noqa: E731
        brain_in = prepared.to_input_grid(brain.astype(np.float32)).array > 0.5
        regions = phantom.aging_map.array >= AGING_REGION_THRESHOLD
        encoded = model.embed_explain(prepared.slices, precision="fp32")
        encoded_clones = {label: c.embed_explain(prepared.slices, precision="fp32") for label, c in clones.items()}
        line = [f"age {phantom.age:.1f} {phantom.sex} skull={phantom.has_skull}:"]
        for name, make in variants.items():
            tic = time.perf_counter()
            trained = make(model, prepared, encoded, sv)
            seconds.setdefault(name, []).append(time.perf_counter() - tic)
            got = rows.setdefault(name, {})
            got.setdefault("localisation ratio", []).append(
                localisation_ratio(prepared.to_input_grid(trained).array, regions, brain_in))
            for label, clone in clones.items():
                got.setdefault(f"Spearman vs {label} re-initialised", []).append(
                    rho(trained, make(clone, prepared, encoded_clones[label], sv)))
            got.setdefault("Spearman, same input twice", []).append(rho(trained, make(model, prepared, encoded, sv)))
            line.append(f"[{name}] " + ", ".join(f"{label} {values[-1]:.3f}" for label, values in got.items()
                                                  if "orientation" not in label))
        if index % args.orientation_every:
            print(" ".join(line), flush=True)
            continue
        with tempfile.TemporaryDirectory() as folder:     # the head in another voxel orientation
            save_volume(phantom.volume.reoriented("PIL"), Path(folder) / "head_PIL.nrrd")
            reread = load_volume(Path(folder) / "head_PIL.nrrd")
            for name in ("paper", "relevance"):
                ref = predict(model, phantom.volume, phantom.sex, explain=name, device="cpu", precision="fp32",
                              use_cache=False).attention
                other = predict(model, reread, phantom.sex, explain=name, device="cpu", precision="fp32",
                                use_cache=False).attention.reoriented("RAS")
                rows[name].setdefault("Pearson r, head saved in another orientation", []).append(
                    float(np.corrcoef(other.array.ravel(), ref.array.ravel())[0, 1]))
                line.append(f"[{name}] orientation r {rows[name]['Pearson r, head saved in another orientation'][-1]:.4f}")
        print(" ".join(line), flush=True)
    print(f"\n{args.n} held-out phantoms (aged 65-88, every third with skull; orientation on every "
          f"{args.orientation_every}th), demo model; mean (min-max)")
    for name, got in rows.items():
        print(f"[{name}] explain step {np.median(seconds[name]):.2f} s median (model space, this CPU)")
        for label, values in got.items():
            print(f"  {label}: {np.mean(values):.3f} ({np.min(values):.3f} to {np.max(values):.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="figure", required=True)
    p = sub.add_parser("overhead")
    p.add_argument("--presets", nargs="+", default=["demo", "paper"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--spacing", type=float, default=1.0)
    p.add_argument("--input", default=None, help="time on this image instead of a synthetic head")
    p.add_argument("--cli", action="store_true", help="also time the brainage predict command")
    p.set_defaults(run=overhead)
    for name, run in (("localisation", localisation), ("sanity", sanity)):
        p = sub.add_parser(name)
        p.add_argument("--model", default=None)
        p.add_argument("--n", type=int, default=6 if name == "localisation" else 3)
        p.set_defaults(run=run)
    p = sub.add_parser("methods")
    p.add_argument("--model", default=None)
    p.add_argument("--n", type=int, default=12)
    p.add_argument("--orientation-every", type=int, default=4, metavar="K",
                   help="run the orientation check (two more predictions per method) on every K-th phantom")
    p.set_defaults(run=methods)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
