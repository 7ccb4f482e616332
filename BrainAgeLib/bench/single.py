"""Where the time of one prediction goes, measured against the bare ViT forward pass.

``run_benchmark(preset)`` makes a head (a synthetic ageing phantom with skull; an ellipsoid
head where the generator is not available), writes it as NIfTI, and times each stage of a
prediction with random weights of the preset: load, prepare, embed
(the ViT over all sagittal slices, capturing the attention the explanation needs), regress and
explain. In the same run it times the bare ViT forward (``vit.forward_features`` on the
already-normalised slices on the device, same batch size and autocast), so the cost of
everything else shows as ``ratio_end_to_end_over_vit``. One-time start-up (building the model,
the first call into each kernel library) runs in a warm-up before the clock starts.

With ``compare=True`` (``brainage bench``'s default) the same run also times

- the authors'-style loop (``authors_loop_s``): every slice on its own through the same ViT in
  float32, batch 1, after a per-slice transform as their torchvision pipeline does it (8-bit
  PIL image, resize to the ViT's size, to tensor, normalise, three channels), and
- on the CPU, the ViT over all slices in each precision this CPU does well (``precisions``:
  seconds, and the age's difference from fp32 on this head with these weights), the fastest one
  within 0.1 years (``fastest_precision``), its embed stage as ``predict`` runs it and the end to
  end with it; ``ratio_authors_loop_over_fastest`` is the authors' loop over that precision's
  bare ViT, ``ratio_authors_loop_over_end_to_end_fastest`` over its end to end.

The weights are random: agreement here is the rounding's effect on an untrained CNN, not on a
trained model (a checkpoint's own record, ``model.precision``, decides what "auto" runs).
"""
from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch

from ..volume import Volume
from .profile_prepare import peak_rss_mb


@dataclass
class BenchResult:
    """Seconds per stage of one prediction, the bare ViT forward, and peak memory (MB)."""

    preset: str
    device: str
    precision: str
    head: str
    input_shape: Tuple[int, int, int]
    n_slices: int
    batch_size: int
    load_s: float
    prepare_s: float
    embed_s: float
    regress_s: float
    explain_s: Optional[float]
    end_to_end_s: float
    end_to_end_without_explain_s: float
    vit_forward_s: float
    ratio_end_to_end_over_vit: float
    ratio_without_explain_over_vit: float
    peak_memory_mb: float
    cuda_peak_memory_mb: Optional[float] = None
    build_model_s: float = 0.0
    prepare_steps: Dict[str, float] = field(default_factory=dict)
    torch_threads: int = 0
    #: the explanation method timed ("paper" or "relevance"; None with explain off)
    explain_method: Optional[str] = "paper"
    #: peak resident memory of the process during the explain stage (MB; Linux, where the peak
    #: can be reset: None elsewhere), and how far it rose above the memory held just before it
    explain_peak_memory_mb: Optional[float] = None
    explain_added_memory_mb: Optional[float] = None
    #: compare=True: the authors'-style loop (per-slice transform, batch-1 fp32 forward), seconds
    authors_loop_s: Optional[float] = None
    #: compare=True on the CPU: {precision: {"vit_s", "age_difference_years"}} on this head
    precisions: Dict[str, Dict[str, float]] = field(default_factory=dict)
    #: the fastest precision within 0.1 y of fp32 here, its embed stage (as predict runs it with
    #: the explanation's outputs) and the end to end with it
    fastest_precision: Optional[str] = None
    fastest_precision_vit_s: Optional[float] = None
    fastest_precision_embed_s: Optional[float] = None
    end_to_end_fastest_s: Optional[float] = None
    ratio_authors_loop_over_fastest: Optional[float] = None
    ratio_authors_loop_over_end_to_end_fastest: Optional[float] = None
    #: the 1-minute load average at the start (the machine may be shared)
    load_average_1min: Optional[float] = None

    def to_dict(self) -> Dict[str, Any]:
        data = asdict(self)
        data["input_shape"] = list(self.input_shape)
        return data

    def table(self) -> str:
        """Human-readable lines."""
        rows = [
            ("load", self.load_s), ("prepare", self.prepare_s), ("embed (ViT, all slices)", self.embed_s),
            ("regress (CNN)", self.regress_s),
            (f"explain ({self.explain_method})" if self.explain_method else "explain", self.explain_s),
            ("end to end", self.end_to_end_s), ("bare ViT forward", self.vit_forward_s),
        ]
        lines = [
            f"brainage bench: preset {self.preset}, {self.device} ({self.precision}), {self.torch_threads} threads, "
            f"head {self.head} {'x'.join(map(str, self.input_shape))}, {self.n_slices} slices, "
            f"batch {self.batch_size}",
        ]
        lines += [f"  {name:<26}{'n/a' if value is None else f'{value:8.2f} s'}" for name, value in rows]
        lines.append(f"  end to end / bare ViT      {self.ratio_end_to_end_over_vit:8.2f}"
                     f"   (without explain {self.ratio_without_explain_over_vit:.2f})")
        memory = f"  peak memory               {self.peak_memory_mb:8.0f} MB (process RSS)"
        if self.cuda_peak_memory_mb is not None:
            memory += f", {self.cuda_peak_memory_mb:.0f} MB on the GPU"
        lines.append(memory)
        if self.explain_peak_memory_mb is not None:
            lines.append(f"  peak memory in explain    {self.explain_peak_memory_mb:8.0f} MB "
                         f"(+{self.explain_added_memory_mb:.0f} MB over the RSS before it)")
        if self.prepare_steps:
            steps = ", ".join(f"{k} {v:.2f}" for k, v in self.prepare_steps.items() if k != "total")
            lines.append(f"  prepare steps (s): {steps}")
        if self.precisions:
            lines.append("  bare ViT by precision: " + ", ".join(
                f"{name} {row['vit_s']:.2f} s ({row['age_difference_years']:.3f} y from fp32)"
                for name, row in self.precisions.items()))
        if self.authors_loop_s is not None:
            line = f"  authors'-style loop (per-slice transform, batch 1, fp32) {self.authors_loop_s:.2f} s"
            if self.fastest_precision:
                line += (f"; fastest agreeing precision {self.fastest_precision}: bare ViT "
                         f"{self.fastest_precision_vit_s:.2f} s ({self.ratio_authors_loop_over_fastest:.2f}x), "
                         f"end to end {self.end_to_end_fastest_s:.2f} s "
                         f"({self.ratio_authors_loop_over_end_to_end_fastest:.2f}x)")
            lines.append(line)
        if self.load_average_1min is not None:
            lines.append(f"  load average {self.load_average_1min:.2f} at the start")
        return "\n".join(lines)


def generated_head(age: float = 60.0, sex: str = "F", seed: int = 0) -> Tuple[Volume, str]:
    """A whole-head T1 at 1 mm for timing: a synthetic phantom with skull, or an ellipsoid head
    where the phantom generator cannot run (nilearn, which holds its MNI152 template, is not installed)."""
    from ..synth.phantoms import SynthError, ellipsoid_head, make_phantom

    try:
        phantom = make_phantom(age, sex, seed=seed, spacing=1.0, skull=True, with_tissue=False)
    except SynthError as error:
        return ellipsoid_head(1.0), f"ellipsoid head (no phantom generator: {type(error).__name__}: {error})"
    return phantom.volume, f"synthetic phantom ({age:g} y, {sex}, with skull)"


def write_generated_head(path: Path) -> str:
    """Write ``generated_head()`` to ``path`` from a child Python process; returns its description."""
    import subprocess

    code = ("import sys; from pathlib import Path; from BrainAgeLib.bench.single import generated_head; "
            "from BrainAgeLib.io import save_volume; v, name = generated_head(); "
            "save_volume(v, Path(sys.argv[1])); print(name)")
    package_root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env)
    if done.returncode == 0 and path.is_file():
        return done.stdout.strip().splitlines()[-1]
    from ..io import save_volume

    volume, name = generated_head()  # the child failed (odd environment): generate here instead
    save_volume(volume, path)
    return name


def run_benchmark(
    preset: str = "paper",
    device: str = "auto",
    precision: str = "auto",
    explain: bool = True,
    head: Optional[Tuple[Volume, str]] = None,
    log: Callable[[str], None] = lambda message: None,
    repeats: int = 1,
    head_file: Optional[Path] = None,
    explain_method: str = "paper",
    compare: bool = False,
) -> BenchResult:
    """Time one prediction of ``preset`` with random weights on a generated head (see module docstring).

    ``repeats`` > 1 runs the model stages (embed, regress, explain, bare ViT) that many times,
    interleaved, and keeps each one's fastest time: on a shared machine that is the best
    estimate of the cost itself. ``head_file`` times a given T1 file instead of a generated head.
    ``explain_method``: the explanation timed, "paper" or "relevance" (``explain.methods``).
    ``compare``: also the authors'-style loop and the CPU precisions (module docstring).
    """
    from ..devices import autocast, autocast_dtype, precision_name, resolve_device, slice_batch_size, to_device
    from ..explain.methods import explain_slices
    from ..io import load_volume, save_volume
    from ..model import build_model
    from ..preprocess.pipeline import prepare

    target = resolve_device(device)
    load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    folder = tempfile.TemporaryDirectory(prefix="brainage_bench_")
    head_path = Path(folder.name) / "head.nii.gz"
    if head_file is not None:
        head_path, head_name = Path(head_file), Path(head_file).name
    elif head is None:
        log("generating the head (in a child process, so its memory does not count)")
        head_name = write_generated_head(head_path)
    else:
        volume, head_name = head
        save_volume(volume, head_path)
    log("building the model")
    tic = time.perf_counter()
    model = build_model(preset, seed=0).to(target).eval()
    build_s = time.perf_counter() - tic
    config = model.config
    chosen = model.resolve_precision(precision, target)  # "auto" as predict resolves it (random weights: fp32)
    dtype = autocast_dtype(target, chosen)
    batch = slice_batch_size(target, config, config.n_slices)
    if target.type == "cuda":
        torch.cuda.reset_peak_memory_stats(target)

    log("warming up")
    warm = np.random.default_rng(0).random((min(2, config.n_slices), config.image_size, config.image_size), np.float32)
    with torch.no_grad():
        model.embed_explain(warm, precision=precision)
        model.regress(torch.zeros(config.n_slices, config.embed_dim, device=target), "F")
    _sync(target)

    log("timing load")
    with folder:
        tic = time.perf_counter()
        loaded = load_volume(head_path)
        load_s = time.perf_counter() - tic

    log("timing prepare")
    tic = time.perf_counter()
    prepared = prepare(loaded, config)
    prepare_s = time.perf_counter() - tic

    forward = model.encoder.vit.forward_features
    if chosen == "int8":  # the bare pass in the precision the embed stage ran in
        from ..model.precision import int8_encoder

        forward = int8_encoder(model).vit.forward_features
    elif chosen == "onnx":
        from ..model.onnx_encoder import onnx_encoder

        forward = onnx_encoder(model).embed
    with torch.no_grad():
        images = to_device(torch.from_numpy(np.ascontiguousarray(prepared.slices)), target)
        images = model.encoder.normalize(images).contiguous()
    embed_s = regress_s = vit_s = math.inf
    explain_s = math.inf if explain else None
    explain_peak = explain_added = None
    for attempt in range(max(1, int(repeats))):
        log(f"timing embed, regress{', explain' if explain else ''} and the bare ViT ({attempt + 1}/{repeats})")
        tic = time.perf_counter()
        encoded = model.embed_explain(prepared.slices, batch_size=batch, precision=precision)
        _sync(target)
        embed_s = min(embed_s, time.perf_counter() - tic)

        tic = time.perf_counter()
        with torch.no_grad():
            age = float(model.regress(encoded[0], "F"))
        _sync(target)
        regress_s = min(regress_s, time.perf_counter() - tic)
        if not math.isfinite(age):
            raise RuntimeError(f"the benchmark model produced a non-finite age ({age})")

        if explain:
            before = reset_peak_rss()
            tic = time.perf_counter()
            slice_map = explain_slices(model, prepared, encoded, 1.0, method=explain_method)
            prepared.to_input_grid(np.asarray(slice_map, dtype=np.float32))
            _sync(target)
            explain_s = min(explain_s, time.perf_counter() - tic)
            peak = current_peak_rss()
            if before is not None and peak is not None:
                explain_peak = max(explain_peak or 0.0, peak)
                explain_added = max(explain_added or 0.0, peak - before)
        del encoded

        with torch.no_grad():
            tic = time.perf_counter()
            with autocast(target, dtype):
                for start in range(0, images.shape[0], batch):
                    forward(images[start:start + batch])
            _sync(target)
            vit_s = min(vit_s, time.perf_counter() - tic)

    without_explain = load_s + prepare_s + embed_s + regress_s
    end_to_end = without_explain + (explain_s or 0.0)
    compared: Dict[str, Any] = {}
    if compare:
        log("timing the authors'-style loop and the CPU precisions")
        compared = compare_precisions(model, prepared.slices, target, repeats)
        if compared.get("fastest_precision_embed_s") is not None:
            fastest_end = end_to_end - embed_s + compared["fastest_precision_embed_s"]
            compared["end_to_end_fastest_s"] = fastest_end
            compared["ratio_authors_loop_over_end_to_end_fastest"] = compared["authors_loop_s"] / fastest_end
    return BenchResult(
        preset=config.name,
        device=str(target),
        precision=chosen if chosen in ("int8", "onnx") else precision_name(dtype),
        head=head_name,
        input_shape=tuple(int(n) for n in loaded.shape),
        n_slices=int(prepared.slices.shape[0]),
        batch_size=int(batch),
        load_s=load_s,
        prepare_s=prepare_s,
        embed_s=embed_s,
        regress_s=regress_s,
        explain_s=explain_s,
        end_to_end_s=end_to_end,
        end_to_end_without_explain_s=without_explain,
        vit_forward_s=vit_s,
        ratio_end_to_end_over_vit=end_to_end / vit_s,
        ratio_without_explain_over_vit=without_explain / vit_s,
        peak_memory_mb=peak_rss_mb(),
        cuda_peak_memory_mb=(torch.cuda.max_memory_allocated(target) / 2**20) if target.type == "cuda" else None,
        build_model_s=build_s,
        prepare_steps={k: float(v) for k, v in prepared.timings.items()},
        torch_threads=torch.get_num_threads(),
        explain_method=explain_method if explain else None,
        explain_peak_memory_mb=explain_peak,
        explain_added_memory_mb=explain_added,
        load_average_1min=load_average,
        **compared,
    )


def authors_style_loop(model: Any, slices: np.ndarray, device: torch.device) -> float:
    """Seconds for the authors' kind of inference loop over ``slices`` [S, H, W] in [0, 1]: each
    slice alone through a per-slice transform as their torchvision pipeline has it (8-bit PIL
    image, resize to the ViT's size, to tensor, normalise 0.5/0.5, three channels) and a batch-1
    float32 forward of the same ViT, averaging its last hidden state."""
    from PIL import Image

    vit, size = model.encoder.vit, model.config.image_size
    channels = model.config.in_chans
    tic = time.perf_counter()
    with torch.no_grad():
        for plane in slices:
            image = Image.fromarray(np.floor(np.clip(plane, 0, 1) * 255).astype(np.uint8)).resize(
                (size, size), Image.BILINEAR)
            x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
            x = ((x - 0.5) / 0.5).expand(1, channels, size, size).to(device)
            vit.forward_features(x).mean(dim=1)
    _sync(device)
    return time.perf_counter() - tic


def compare_precisions(model: Any, slices: np.ndarray, device: torch.device, repeats: int) -> Dict[str, Any]:
    """The ``compare`` figures of :func:`run_benchmark` (its field names), from ``repeats``
    interleaved runs (fastest kept): the authors'-style loop and, on the CPU, each precision of
    ``model.precision.cpu_precision_order`` timed over all slices, with its age's difference from
    fp32 on these slices; the fastest within ``AGREEMENT_YEARS``, and its embed stage."""
    from ..model.precision import AGREEMENT_YEARS, cpu_precision_order

    names = cpu_precision_order() if device.type == "cpu" else []
    if names and "fp32" not in names:
        names.append("fp32")
    authors = math.inf
    seconds = {name: math.inf for name in names}
    ages: Dict[str, float] = {}
    with torch.no_grad():
        for name in names:  # the first call makes the int8 copy and warms the kernels: not timed
            model.embed(slices[:2], precision=name)
    for _ in range(max(1, int(repeats))):
        authors = min(authors, authors_style_loop(model, slices, device))
        for name in names:
            with torch.no_grad():
                tic = time.perf_counter()
                embeddings = model.embed(slices, precision=name)
                _sync(device)
                seconds[name] = min(seconds[name], time.perf_counter() - tic)
                ages[name] = float(model.regress(embeddings, "F"))
    out: Dict[str, Any] = {"authors_loop_s": authors}
    if not names:
        return out
    reference = ages["fp32"]
    out["precisions"] = {name: {"vit_s": seconds[name], "age_difference_years": abs(ages[name] - reference)}
                         for name in names}
    agreeing = [name for name in names if abs(ages[name] - reference) <= AGREEMENT_YEARS]
    fastest = min(agreeing, key=lambda name: seconds[name])
    embed_s = math.inf
    for _ in range(max(1, int(repeats))):
        tic = time.perf_counter()
        model.embed_explain(slices, precision=fastest)
        _sync(device)
        embed_s = min(embed_s, time.perf_counter() - tic)
    out.update(fastest_precision=fastest, fastest_precision_vit_s=seconds[fastest],
               fastest_precision_embed_s=embed_s, ratio_authors_loop_over_fastest=authors / seconds[fastest])
    return out


def _status_mb(field: str) -> Optional[float]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def reset_peak_rss() -> Optional[float]:
    """Reset this process's peak-RSS counter (Linux: ``5`` into ``/proc/self/clear_refs``) and
    return the resident memory now (MB); None where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _status_mb("VmRSS")


def current_peak_rss() -> Optional[float]:
    """Peak resident memory since the last :func:`reset_peak_rss` (MB, Linux ``VmHWM``)."""
    return _status_mb("VmHWM")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
