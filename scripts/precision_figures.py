"""The CPU precision table of issue 18: the ViT's forward over all slices of a preset in fp32,
PyTorch dynamic int8 (per-tensor and per-channel weights), bf16 autocast, and ONNX Runtime
(fp32 and its dynamic int8), in one run, on the same inputs.

For each variant: the fastest of ``--repeat`` interleaved timings of the ViT over the first
input's slices (batches of 32, as ``embed`` runs them on the CPU), the largest age difference
from fp32 over every input (``model.precision.default_inputs``: the bundled sample head, a
resampling of it, generated phantoms), the process's peak resident memory during
that variant's forward (and how far it rose above the memory held before it), and what the
variant needs installed. ``demo`` uses the bundled trained demo checkpoint; ``paper`` random
weights (seed 0) unless ``--paper-model`` names a trained checkpoint.

    python scripts/precision_figures.py --preset demo --preset paper --repeat 3 --json out.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from BrainAgeLib.bench.single import current_peak_rss, reset_peak_rss
from BrainAgeLib.devices import CPU_BATCH_SIZE
from BrainAgeLib.model import build_model
from BrainAgeLib.model.checkpoint import load_model
from BrainAgeLib.model.precision import default_inputs, quantize_int8, _quiet


def _site_size_mb(package: str) -> float:
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return float("nan")
    total = 0
    for root in spec.submodule_search_locations:
        for folder, _, files in os.walk(root):
            total += sum(os.path.getsize(os.path.join(folder, f)) for f in files)
    return total / 2**20


class _Embed(torch.nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, images):
        return self.encoder.vit.forward_features(images).mean(dim=1)


def torch_variant(encoder, dtype=None):
    def run(images):
        out = []
        with torch.no_grad(), (torch.autocast("cpu", dtype=dtype) if dtype else _null()):
            for start in range(0, images.shape[0], CPU_BATCH_SIZE):
                out.append(encoder.vit.forward_features(images[start:start + CPU_BATCH_SIZE]).mean(dim=1).float())
        return torch.cat(out)
    return run


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


def onnx_variants(encoder, config, folder: Path, log):
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32_file = folder / "vit.onnx"
    dummy = torch.rand(2, config.in_chans, config.image_size, config.image_size)
    tic = time.perf_counter()
    with _quiet():
        torch.onnx.export(_Embed(encoder).eval(), (dummy,), str(fp32_file), input_names=["images"],
                          output_names=["embeddings"], dynamic_axes={"images": {0: "n"}, "embeddings": {0: "n"}},
                          opset_version=17, dynamo=False)
    log(f"ONNX export {time.perf_counter() - tic:.1f} s")
    files = {"onnxruntime fp32": fp32_file}
    files["onnxruntime int8"] = folder / "vit.int8.onnx"
    quantize_dynamic(str(fp32_file), str(files["onnxruntime int8"]), weight_type=QuantType.QInt8)
    files["onnxruntime int8 per-channel"] = folder / "vit.int8pc.onnx"
    quantize_dynamic(str(fp32_file), str(files["onnxruntime int8 per-channel"]), weight_type=QuantType.QInt8,
                     per_channel=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    variants = {}
    for name, path in files.items():
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def run(images, session=session):
            array = images.numpy()
            out = [session.run(None, {"images": array[s:s + CPU_BATCH_SIZE]})[0]
                   for s in range(0, array.shape[0], CPU_BATCH_SIZE)]
            return torch.from_numpy(np.concatenate(out))
        variants[name] = (run, path.stat().st_size / 2**20)
    return variants


def measure(preset: str, repeats: int, paper_model: str, log, n_inputs: int = 0, skip=()) -> dict:
    if preset == "demo":
        model, weights = load_model("demo"), "bundled demo checkpoint (trained on synthetic phantoms)"
    elif paper_model:
        model, weights = load_model(paper_model), f"checkpoint {paper_model}"
    else:
        model, weights = build_model(preset, seed=0).eval(), "random, untrained weights (seed 0)"
    config = model.config
    inputs = default_inputs(config, log)
    if n_inputs:  # the first and the last (the sample head and the last phantom)
        inputs = inputs[:max(1, n_inputs - 1)] + inputs[-1:] if n_inputs > 1 else inputs[:1]
    images = [model.encoder.normalize(torch.from_numpy(slices)).contiguous() for _, slices, _ in inputs]
    encoder = model.encoder.eval()
    fp32_mb = sum(p.numel() * 4 for p in encoder.vit.parameters()) / 2**20
    variants = {"fp32": (torch_variant(encoder), fp32_mb)}
    tic = time.perf_counter()
    variants["torch int8"] = (torch_variant(quantize_int8(encoder)), None)
    log(f"torch int8 quantisation {time.perf_counter() - tic:.1f} s")
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    with _quiet():
        per_channel = quantize_dynamic(copy.deepcopy(encoder), {torch.nn.Linear: per_channel_dynamic_qconfig})
    if "torch int8 per-channel" not in skip:
        variants["torch int8 per-channel"] = (torch_variant(per_channel), None)
    variants["bf16 autocast"] = (torch_variant(encoder, torch.bfloat16), fp32_mb)
    folder = tempfile.TemporaryDirectory(prefix="precision_figures_")
    try:
        variants.update({k: v for k, v in onnx_variants(encoder, config, Path(folder.name), log).items()
                         if k not in skip})
    except ImportError as error:
        log(f"no ONNX Runtime: {error}")
    # ages on every input
    ages, embeddings, errors = {}, {}, {}
    seconds = {name: float("inf") for name in variants}
    peak, added = {}, {}
    for name, (run, _) in variants.items():
        ages[name] = []
        with torch.no_grad():
            for i, (x, (_, _, sex)) in enumerate(zip(images, inputs)):
                before = reset_peak_rss()
                tic = time.perf_counter()
                out = run(x)
                if i == 0:  # the first pass over the first input is a timing too (repeat 0: the only one)
                    seconds[name] = time.perf_counter() - tic
                    high = current_peak_rss()
                    if before is not None and high is not None:
                        peak[name], added[name] = high, high - before
                ages[name].append(float(model.regress(out, sex)))
                if name == "fp32":
                    embeddings[i] = out
                else:
                    errors[name] = max(errors.get(name, 0.0),
                                       float((out - embeddings[i]).norm() / embeddings[i].norm()))
        log(f"{name}: ages {['%.3f' % a for a in ages[name]]}, first pass {seconds[name]:.2f} s")
    # more timings, interleaved, and memory during each variant's forward
    for attempt in range(repeats):
        for name, (run, _) in variants.items():
            before = reset_peak_rss()
            tic = time.perf_counter()
            run(images[0])
            seconds[name] = min(seconds[name], time.perf_counter() - tic)
            high = current_peak_rss()
            if before is not None and high is not None:
                peak[name] = max(peak.get(name, 0.0), high)
                added[name] = max(added.get(name, 0.0), high - before)
        log(f"timing {attempt + 1}/{repeats}: " + ", ".join(f"{k} {v:.2f}" for k, v in seconds.items()))
    reference = np.asarray(ages["fp32"])
    dependency = {
        "fp32": "torch (already needed)", "torch int8": "torch (torch.ao.quantization, deprecated, still in 2.14)",
        "torch int8 per-channel": "torch (torch.ao.quantization)", "bf16 autocast": "torch",
        "onnxruntime fp32": f"onnxruntime {_site_size_mb('onnxruntime'):.0f} MB + onnx {_site_size_mb('onnx'):.0f} MB "
                            "(export) + protobuf, flatbuffers",
    }
    dependency["onnxruntime int8"] = dependency["onnxruntime int8 per-channel"] = dependency["onnxruntime fp32"]
    rows = []
    for name in variants:
        rows.append({
            "variant": name, "vit_s": seconds[name], "speedup_vs_fp32": seconds["fp32"] / seconds[name],
            "max_age_difference_years": float(np.max(np.abs(np.asarray(ages[name]) - reference))),
            "max_embedding_relative_error": errors.get(name, 0.0),
            "peak_rss_mb": peak.get(name), "added_rss_mb": added.get(name), "dependency": dependency[name],
        })
    folder.cleanup()
    return {"preset": preset, "weights": weights, "n_slices": int(images[0].shape[0]),
            "inputs": [d for d, _, _ in inputs], "ages": ages, "rows": rows,
            "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg()}


def table(result: dict) -> str:
    lines = [f"preset {result['preset']} ({result['weights']}), {result['n_slices']} slices, "
             f"{result['torch_threads']} threads, load average {result['load_average'][0]:.2f} at the end",
             "| variant | ViT s | x fp32 | max age diff (y) | embedding rel. error | peak RSS MB (+added) | needs |",
             "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        memory = "n/a" if row["peak_rss_mb"] is None else f"{row['peak_rss_mb']:.0f} (+{row['added_rss_mb']:.0f})"
        lines.append(f"| {row['variant']} | {row['vit_s']:.2f} | {row['speedup_vs_fp32']:.2f} | "
                     f"{row['max_age_difference_years']:.3f} | {row['max_embedding_relative_error']:.1e} | {memory} | "
                     f"{row['dependency']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", action="append", choices=("demo", "paper", "tiny"))
    parser.add_argument("--repeat", type=int, default=3, help="timings after the first pass (0: that one only)")
    parser.add_argument("--inputs", type=int, default=0, help="use only N inputs (the sample head, ..., the phantom)")
    parser.add_argument("--skip", action="append", default=[], help="a variant to leave out")
    parser.add_argument("--paper-model", default="", help="a trained paper-preset checkpoint (default: random weights)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    log = lambda message: print(f"  ... {message}", file=sys.stderr, flush=True)  # noqa: E731
    results = []
    for preset in args.preset or ["demo"]:
        log(f"uptime at start: load average {os.getloadavg()}")
        results.append(measure(preset, args.repeat, args.paper_model, log, args.inputs, set(args.skip)))
        print(table(results[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
