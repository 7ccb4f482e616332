"""What the 3D Slicer module needs, as plain numpy and Python (no Slicer, Qt or MRML here).

The Slicer module (BrainAge/BrainAge.py) stays a thin layer of widgets and MRML nodes; every
conversion and check it relies on lives here, where pytest can reach it:

- Geometry. ``slicer.util.arrayFromVolume`` gives a volume node's voxels indexed [K, J, I]
  (VTK's x-fastest memory order read as a C array), while a :class:`Volume` is [I, J, K]. The
  node's IJKToRAS matrix *is* the Volume's affine (voxel index -> RAS, mm), so the conversion
  is a transpose plus a copy of the matrix. ``volume_from_kji`` / ``kji_from_volume`` do it.
- Colour tables: ``color_table_rows`` turns (label, name, RGBA 0-255) entries into the rows a
  ``vtkMRMLColorTableNode`` takes (``SetColor(index, name, r, g, b, a)`` with 0-1 components).
- The results panel text (``result_text``, with the quality control from ``qc_html``), which
  labelmap the slice views show (``label_layer_node``), widget input checks (``check_inputs``), the pip
  requirements installed on first use (``missing_requirements``, floors, never what Slicer bundles) and what
  no install can fix (``environment_problems``: Python, Slicer's bundled packages, torch). The background
  worker process the module runs, and how it reports and is cancelled, are ``slicer_worker`` and
  ``worker_protocol``.

Importing this module needs only numpy (the Slicer module imports it before BrainAge's other
dependencies are installed); anything heavier is imported inside the function that uses it.
"""
from __future__ import annotations

import hashlib
import html
import importlib.metadata
import math
import os
import sys
import urllib.parse
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .demographics import MAX_AGE_YEARS, check_age
from .errors import BrainAgeError
from .sex import InvalidSexError, parse_sex

if TYPE_CHECKING:  # pragma: no cover
    from .explain.labelmap import ColorEntry
    from .preprocess.qc import QualityControl
    from .result import Result
    from .volume import Volume

#: Devices the module offers ("auto" = CUDA if present, else CPU).
DEVICES = ("auto", "cpu", "cuda")
#: The sex choices of the panel (its parameter node stores one of these; ``parse_sex`` reads them all).
SEX_CHOICES = ("female", "male", "unknown")
#: The explanation methods the panel offers (``explain.methods.METHODS``; kept here so the panel needs no torch).
EXPLAIN_CHOICES = ("paper", "relevance")
#: The panel's model choices, in the order listed (the published model first): label -> the registered
#: model's name, or None for "a file or an https URL" typed in the model location field.
MODEL_CHOICES: Dict[str, Optional[str]] = {
    "BrainRotViT (published by its authors)": "brainrotvit",
    "Demo (synthetic phantoms, not clinical)": "demo",
    "Model file or https URL": None,
}
#: Chronological ages (years) the module accepts: the library's own (``demographics.check_age``), so the
#: panel never offers an age a prediction refuses or refuses one it takes. The panel's 0 means "not given".
AGE_RANGE = (0.0, MAX_AGE_YEARS)

#: Packages installed with ``slicer.util.pip_install`` on first use, as the oldest releases known to
#: work (the floors of pyproject.toml): pip picks the newest release that fits this Slicer's Python,
#: and a package already installed at or above its floor is left alone (another extension may rely on
#: it). torch/torchvision come from the PyTorch extension instead; what Slicer bundles
#: (``SLICER_BUNDLED``) is never installed.
PIP_REQUIREMENTS: Dict[str, str] = {
    "nibabel": "5.0",
    "safetensors": "0.4",
    "timm": "1.0",
    "tqdm": "4.60",
    # brain extraction (BrainAgeLib.preprocess.brain_extraction) and what it imports; pip brings deepbet's
    # other requirement, customtkinter, for deepbet's GUI, which BrainAge never imports.
    "deepbet": "1.0.2",
    "connected-components-3d": "4.1",  # deepbet names no versions: these three are releases CI has run
    "fill_voids": "2.1",
    "pandas": "2.0",
    # Cancel kills the background worker and its children (worker_protocol.kill_process_tree)
    "psutil": "5.9",
}
#: Installed only when the user first saves a report (*Save report*): the report's plots and its template.
REPORT_REQUIREMENTS: Dict[str, str] = {"matplotlib": "3.6", "jinja2": "3.0"}
#: What every Slicer ships in its own Python (with the version BrainAge needs at least): never
#: pip-installed, because replacing any of them breaks Slicer. Missing or older: the Slicer is too old.
SLICER_BUNDLED: Dict[str, str] = {"numpy": "1.23", "scipy": "1.10", "SimpleITK": "2.3", "pillow": "9.0", "vtk": "9.2"}
#: The module each bundled distribution is imported as. Slicer builds some (VTK, SimpleITK) from source,
#: without pip's metadata: then only their presence can be checked, not their version.
BUNDLED_MODULES: Dict[str, str] = {"numpy": "numpy", "scipy": "scipy", "SimpleITK": "SimpleITK", "pillow": "PIL",
                                   "vtk": "vtk"}
#: What BrainAge asks of the torch that PyTorchUtils installs.
TORCH_MINIMUM = "2.1"
TORCH_REQUIREMENT = f">={TORCH_MINIMUM}"
#: The oldest Slicer BrainAge supports, and its Python.
OLDEST_SLICER = "5.10"
MINIMUM_PYTHON = (3, 12)


# --- geometry -------------------------------------------------------------------------------

def volume_from_kji(array_kji: np.ndarray, ijk_to_ras: np.ndarray,
                    parent_to_world: Optional[np.ndarray] = None) -> "Volume":
    """A :class:`Volume` from ``slicer.util.arrayFromVolume`` output and the node's IJKToRAS.

    ``array_kji`` [K, J, I] is copied (the Volume never shares the node's memory), ``ijk_to_ras``
    is the 4x4 voxel index -> RAS (mm) matrix. Voxel (i, j, k) of the Volume is
    ``array_kji[k, j, i]`` and lies at ``ijk_to_ras @ (i, j, k, 1)`` in both.
    ``parent_to_world``: the 4x4 matrix of a linear transform the node sits under
    (``slicer.util.arrayFromTransformMatrix(parent, toWorld=True)``); the Volume is then where
    Slicer shows the node, ``parent_to_world @ ijk_to_ras`` (a user who fixed a scan's
    orientation with a transform gets the model to see the fixed scan).
    """
    from .volume import Volume

    array_kji = np.asarray(array_kji)
    if array_kji.ndim == 4:  # arrayFromVolume of an RGB or vector volume: [K, J, I, components]
        raise ValueError(f"the volume has {array_kji.shape[3]} components per voxel (a colour or vector image); "
                         "BrainAge needs a scalar (grey-value) T1-weighted volume")
    if array_kji.ndim != 3:
        raise ValueError(f"expected a 3D [K,J,I] voxel array, got shape {array_kji.shape}")
    affine = checked_ijk_to_ras(ijk_to_ras)
    if parent_to_world is not None:
        affine = checked_ijk_to_ras(np.asarray(parent_to_world, dtype=np.float64) @ affine)
    return Volume(np.ascontiguousarray(array_kji.transpose(2, 1, 0)), affine)


def kji_from_volume(volume: "Volume") -> Tuple[np.ndarray, np.ndarray]:
    """``(array_kji, ijk_to_ras)`` for ``slicer.util.updateVolumeFromArray`` and SetIJKToRASMatrix.

    The array is a C-contiguous copy indexed [K, J, I], in the Volume's dtype.
    """
    return np.ascontiguousarray(np.asarray(volume.array).transpose(2, 1, 0)), checked_ijk_to_ras(volume.affine)


def checked_ijk_to_ras(matrix: np.ndarray) -> np.ndarray:
    """``matrix`` as a float64 4x4 copy, after checking it is a finite affine (last row 0 0 0 1)."""
    matrix = np.array(matrix, dtype=np.float64)
    if matrix.shape != (4, 4):
        raise ValueError(f"IJKToRAS must be a 4x4 matrix, got shape {matrix.shape}")
    if not np.all(np.isfinite(matrix)):
        raise ValueError("IJKToRAS holds NaN or Inf")
    if not np.allclose(matrix[3], (0.0, 0.0, 0.0, 1.0)):
        raise ValueError(f"IJKToRAS must end with the row 0 0 0 1, got {matrix[3].tolist()}")
    return matrix


def same_grid(a: "Volume", b: "Volume", atol_mm: float = 1e-4) -> bool:
    """True when ``a`` and ``b`` have the same shape and voxel -> RAS mapping (within ``atol_mm``)."""
    return a.shape == b.shape and bool(np.allclose(a.affine, b.affine, atol=atol_mm, rtol=0.0))


# --- colour tables --------------------------------------------------------------------------

def color_table_rows(colors: Sequence["ColorEntry"]) -> Tuple[int, List[Tuple[int, str, float, float, float, float]]]:
    """``(number_of_colors, rows)`` for a ``vtkMRMLColorTableNode``.

    ``rows`` has one ``(index, name, r, g, b, a)`` per index 0..max label, components in 0-1.
    Indices missing from ``colors`` become transparent black, as Slicer's .ctbl reader does.
    """
    by_label = {int(label): (name, rgba) for label, name, rgba in colors}
    if not by_label or min(by_label) < 0:
        raise ValueError("a colour table needs at least one entry and no negative labels")
    count = max(by_label) + 1
    rows = []
    for index in range(count):
        name, rgba = by_label.get(index, (f"unused_{index}", (0, 0, 0, 0)))
        r, g, b, a = (float(c) / 255.0 for c in rgba)
        rows.append((index, str(name), r, g, b, a))
    return count, rows


# --- the results panel ----------------------------------------------------------------------

def result_text(result: "Result") -> str:
    """The results panel as HTML: ages and gaps (years), the prediction interval and gap z
    (``Result.interval_text``, ``gap_z``), the model and what it is meant for,
    the quality control of the input (``qc_html``) and the prediction's warnings.

    The demo model's disclaimer (synthetic training data, not for clinical use) is shown in
    red, first, so nobody reads the numbers without it.
    """
    from .result import DEMO_DISCLAIMER

    rows: List[Tuple[str, str]] = [("Predicted brain age", result.interval_text)]
    if result.chronological_age is None:
        rows.append(("Brain-age gap (BAG)", "enter the chronological age to compute it"))
    else:
        rows.append(("Chronological age", _years(result.chronological_age)))
        rows.append(("Brain-age gap (BAG)", _years(result.brain_age_gap, signed=True)))
        corrected = result.corrected_brain_age_gap
        rows.append(("Bias-corrected BAG",
                     _years(corrected, signed=True) if corrected is not None
                     else "not available (the model has no bias-correction coefficients)"))
        if result.gap_z is not None:
            rows.append(("Gap z (reference SDs)", f"{result.gap_z:+.2f}"
                         + (" — beyond 1 SD: extreme (the paper's criterion)" if result.extreme_gap else "")))
    sex = "unknown (mean of the female and male predictions)" if result.sex_was_unknown else result.sex
    rows.append(("Sex", sex))
    rows.append(("Model", result.model_name or "(unnamed)"))
    rows.append(("Intended use", result.model_intended_use or "(not stated by the model)"))
    total = result.timings.get("total") if result.timings else None
    if total is not None:
        rows.append(("Time", f"{float(total):.1f} s"))

    parts = []
    if result.model_is_demo:
        parts.append(f'<p style="color:#b00000"><b>Demo model: synthetic, not clinical.</b> '
                     f'{html.escape(DEMO_DISCLAIMER)}</p>')
    parts.append("<table>" + "".join(
        f"<tr><td><b>{html.escape(label)}:</b></td><td>{html.escape(value)}</td></tr>" for label, value in rows
    ) + "</table>")
    parts.append(qc_html(result.qc))
    if result.warnings:
        parts.append("<p><b>Warnings:</b></p><ul>" + "".join(
            f"<li>{html.escape(str(w))}</li>" for w in result.warnings) + "</ul>")
    return "\n".join(parts)


#: Colour of a QC flag's line in the results panel (dark amber: a warning, not an error).
QC_FLAG_COLOR = "#a84e00"
#: What the results panel says when quality control raised nothing.
QC_NO_FLAGS = "QC: no flags"
#: How the panel names each ``QualityControl.skull_strip`` method (others are shown as they are).
SKULL_STRIP_NAMES = {
    "deepbet": "deepbet (trained brain extractor)",
    "template": "template registration",
    "none": "none (no skull stripping)",
    "already stripped": "none: the input was already skull-stripped",   # qc.ALREADY_STRIPPED
}
QC_NOT_RUN = "QC: not run (nothing was checked)"


def qc_html(qc: "QualityControl") -> str:
    """The quality-control part of the results panel, as HTML.

    One line with the brain mask's volume (ml, against the adult range of :mod:`BrainAgeLib.preprocess.qc`),
    the method that made it and the voxel size; then each QC flag as its own line in
    ``QC_FLAG_COLOR`` with a warning sign, or ``QC_NO_FLAGS`` when there is none.
    """
    from .preprocess.qc import ADULT_BRAIN_ML

    method = SKULL_STRIP_NAMES.get(qc.skull_strip, qc.skull_strip) or "unknown method"
    if qc.brain_volume_ml is None or not math.isfinite(float(qc.brain_volume_ml)):
        volume = "not measured"
    else:
        volume = (f"{float(qc.brain_volume_ml):.0f} ml (adult range {ADULT_BRAIN_ML[0]:.0f}-{ADULT_BRAIN_ML[1]:.0f} ml), "
                  f"by {method}")
    line = f"<b>Brain mask:</b> {html.escape(volume)}"
    if qc.voxel_size_mm and min(float(s) for s in qc.voxel_size_mm) > 0:
        line += html.escape(f"; voxels {' x '.join(f'{float(s):.3g}' for s in qc.voxel_size_mm)} mm")
    parts = [f"<p>{line}</p>"]
    for flag in qc.flags:
        sentence = str(flag).strip()
        sentence = sentence[:1].upper() + sentence[1:]
        if not sentence.endswith((".", "?", "!")):
            sentence += "."
        parts.append(f'<p style="color:{QC_FLAG_COLOR}"><b>&#9888; QC flag:</b> {html.escape(sentence)}</p>')
    if not getattr(qc, "measured", True):
        parts.append(f'<p style="color:{QC_FLAG_COLOR}"><b>&#9888; {html.escape(QC_NOT_RUN)}</b></p>')
    elif not qc.flags:
        parts.append(f"<p>&#10003; {html.escape(QC_NO_FLAGS)}</p>")
    return "\n".join(parts)


def label_layer_node(show_brain_mask: bool, attention_node, brain_mask_node):
    """The labelmap node the slice views' label layer shows: the brain mask when asked for and
    there is one, else the attention labelmap (None: neither exists, leave the layer alone)."""
    if show_brain_mask and brain_mask_node is not None:
        return brain_mask_node
    return attention_node


def _years(value: Optional[float], signed: bool = False) -> str:
    if value is None or not math.isfinite(float(value)):
        return "not available"
    return f"{float(value):+.1f} years" if signed else f"{float(value):.1f} years"


# --- widget inputs --------------------------------------------------------------------------

def check_inputs(
    volume_shape: Optional[Sequence[int]],
    sex: Optional[str],
    chronological_age: Optional[float],
    model: str,
    device: str,
    cuda_available: Optional[bool] = None,
    attention_output_is_input: bool = False,
    components: int = 1,
) -> List[str]:
    """Problems with the module's inputs, one sentence each; empty when Estimate may run.

    ``volume_shape``: the selected volume's voxel dimensions (None when nothing is selected).
    ``chronological_age``: years, or None when not given. ``model``: a registered name ("demo",
    "brainrotvit"), an http(s) URL or the path of a model file (``model_argument``). ``cuda_available``: None when unknown (torch not imported yet).
    ``attention_output_is_input``: the volume chosen to receive the scalar attention map is the
    input itself (writing the map would replace the scan's voxels). ``components``: scalar components
    per voxel of the selected volume (``vtkImageData.GetNumberOfScalarComponents``): an RGB or vector
    volume is refused, as the model reads one grey value per voxel.
    """
    problems = []
    if attention_output_is_input:
        problems.append("The attention volume output is the input volume: choose another volume or "
                        "'Create new volume', or the scan would be overwritten.")
    if volume_shape is None:
        problems.append("Select an input volume.")
    elif len(volume_shape) != 3 or min(int(n) for n in volume_shape) < 2:
        problems.append(f"The input volume must be 3D; its voxel dimensions are {tuple(volume_shape)}.")
    elif int(components) != 1:
        problems.append(f"The input volume has {int(components)} components per voxel (a colour or vector image); "
                        "BrainAge needs a scalar (grey-value) T1-weighted volume.")
    try:
        parse_sex(sex)
    except InvalidSexError as error:
        problems.append(f"Sex: {error}.")
    if chronological_age is not None:
        try:
            check_age(chronological_age)
        except BrainAgeError:
            problems.append(f"Chronological age must be between {AGE_RANGE[0]:g} and {AGE_RANGE[1]:g} years, "
                            f"got {chronological_age}.")
    from .registry import REGISTRY

    model = (model or "").strip()
    if not model:
        problems.append("Choose a model: a registered one, a model file or a URL.")
    elif model.lower().startswith("http://"):
        problems.append("Model URLs must use https://.")
    elif model not in REGISTRY and not model.lower().startswith("https://") and not os.path.exists(model):
        problems.append(f"Model file not found: {model}")
    if device not in DEVICES:
        problems.append(f"Device must be one of {', '.join(DEVICES)}, got {device!r}.")
    elif device == "cuda" and cuda_available is False:
        problems.append("CUDA was chosen but no CUDA GPU is available here; choose auto or CPU.")
    return problems


def model_argument(choice: str, location: str = "") -> str:
    """The ``model`` argument of the logic for a panel model choice (``MODEL_CHOICES``): the registered
    name, or for the file/URL choice the location typed (``~`` expanded; "" when none)."""
    if choice not in MODEL_CHOICES:
        raise BrainAgeError(f"unknown model choice {choice!r} (choices: {', '.join(MODEL_CHOICES)})")
    name = MODEL_CHOICES[choice]
    if name is not None:
        return name
    location = (location or "").strip()
    return location if location.lower().startswith("https://") else os.path.expanduser(location)


def panel_values(sex: Optional[str], chronological_age: Optional[float], model: str) -> Dict[str, object]:
    """The parameter-node values that show a logic call's inputs in the panel (the inverse of
    ``model_argument``): a console call to ``process`` shows in the GUI."""
    choice = next((label for label, name in MODEL_CHOICES.items() if name == model), None)
    location = ""
    if choice is None:  # a file, a URL, or a model registered by the user: typed in the location field
        choice, location = next(label for label, name in MODEL_CHOICES.items() if name is None), str(model)
    return {"sex": SEX_CHOICES[("F", "M", "unknown").index(parse_sex(sex))],
            "chronologicalAge": 0.0 if chronological_age is None else float(chronological_age),  # 0: not given
            "modelChoice": choice, "modelLocation": location}


def model_needs_download(model: str, cache: Optional[str] = None) -> bool:
    """True for a registered model that is fetched on first use and is not in the cache yet."""
    from .registry import REGISTRY, is_cached

    return model in REGISTRY and not REGISTRY[model].bundled and not is_cached(model, cache)


def model_status_html(model: str, cache: Optional[str] = None) -> str:
    """What the panel says under the model choice: what a registered model is, whether it is downloaded
    (and where, how big), and for the demo its warning in red. Empty for a file or URL."""
    from .registry import REGISTRY

    if model not in REGISTRY:
        return ""
    entry = REGISTRY[model]
    what = html.escape(entry.description)
    if entry.bundled:
        return f'<span style="color:#b00000"><b>Trained on synthetic phantoms, not on real people:</b> {what}.</span>'
    path = entry.local_path(cache)
    if path.is_file():
        return (f"{what}. Downloaded ({path.stat().st_size / 1e6:.0f} MB): {html.escape(str(path))}; "
                "used offline from now on.")
    return (f"{what}. <b>Not downloaded yet.</b> Download fetches it from {html.escape(entry.source)} once "
            f"(the size shows as the download runs), verifies every part and imports it into "
            f"{html.escape(str(path.parent))}; after that it works offline. Offline now? "
            f"<code>brainage models download {html.escape(entry.name)}</code> on a computer with internet, "
            "then copy the file to that folder.")


def forget_library_modules(modules: Optional[Dict[str, object]] = None) -> List[str]:
    """Drop BrainAgeLib and its submodules from ``modules`` (default ``sys.modules``) so the next import
    reads the files again: the module's *Reload* does this before Slicer reloads BrainAge.py.
    Returns the names dropped."""
    modules = sys.modules if modules is None else modules
    package = __name__.split(".")[0]
    names = sorted(name for name in modules if name == package or name.startswith(package + "."))
    for name in names:
        del modules[name]
    return names


def offline_install_message(packages: Sequence[str], error: object) -> str:
    """Why installing ``packages`` failed, and the offline route (a folder of wheels downloaded elsewhere)."""
    specs = " ".join(f'"{spec}"' if ">" in spec or "<" in spec else spec for spec in packages)
    return (f"BrainAge could not install {', '.join(packages)} ({error}). Without internet access, download "
            f"the wheels on another computer (pip download {specs} -d WHEELS, with this Slicer's Python "
            f"{sys.version_info[0]}.{sys.version_info[1]}), copy the WHEELS folder here and run in Slicer's Python "
            f'console: slicer.util.pip_install("--no-index --find-links WHEELS {specs}")')


def selftest_inference_allowed(missing: Sequence[str], torch_is_missing: bool,
                               environ: Optional[Dict[str, str]] = None) -> Tuple[bool, str]:
    """Whether the module's self-test runs the model: when every package is installed already, or when
    ``BRAINAGE_SELFTEST_INSTALL=1`` allows it to install them (never on a build machine by default)."""
    environ = os.environ if environ is None else environ
    if not missing and not torch_is_missing:
        return True, "all packages present"
    if environ.get(SELFTEST_INSTALL_VARIABLE, "") == "1":
        return True, f"{SELFTEST_INSTALL_VARIABLE}=1: missing packages will be installed"
    absent = (["torch"] if torch_is_missing else []) + list(missing)
    return False, (f"inference part skipped: {', '.join(absent)} not installed (set {SELFTEST_INSTALL_VARIABLE}=1 "
                   "to let the self-test install them)")


#: Set to 1 to let the module's self-test install BrainAge's Python packages (off: it installs nothing).
SELFTEST_INSTALL_VARIABLE = "BRAINAGE_SELFTEST_INSTALL"


# --- first-run dependencies -----------------------------------------------------------------

def torch_missing(installed_version: Callable[[str], Optional[str]]) -> bool:
    """True when torch or torchvision is not installed: then PyTorchUtils installs both, as a
    matching pair. (timm needs torchvision; left to pip, installing it could pull a torch that
    replaces the one PyTorchUtils chose for this computer's GPU.)"""
    return any(installed_version(name) is None for name in ("torch", "torchvision"))


def installed_version(name: str) -> Optional[str]:
    """The installed version of the distribution ``name``, or None when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def model_download_path(url: str) -> str:
    """Where the module keeps a model downloaded from ``url``: BrainAge's cache, the file named
    after the URL's last path part behind a digest of the whole URL (two URLs never share a file)."""
    from .resources import cache_dir

    file_name = os.path.basename(urllib.parse.urlparse(url).path) or "model.safetensors"
    return str(cache_dir() / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{file_name}")


def version_tuple(version: str) -> Tuple[int, ...]:
    """The leading numbers of a version string: "2.14.1+cu121" -> (2, 14, 1), "1.0rc1" -> (1, 0)."""
    numbers = []
    for part in str(version).split("."):
        digits = ""
        for char in part:
            if not char.isdigit():
                break
            digits += char
        if not digits:
            break
        numbers.append(int(digits))
        if len(digits) < len(part):
            break
    return tuple(numbers)


def at_least(version: Optional[str], floor: str) -> bool:
    """True when ``version`` is installed (not None) and not older than ``floor``."""
    return version is not None and version_tuple(version) >= version_tuple(floor)


def missing_requirements(installed_version: Callable[[str], Optional[str]] = installed_version,
                         requirements: Optional[Dict[str, str]] = None) -> List[str]:
    """pip specs (``name>=floor``) of the ``PIP_REQUIREMENTS`` (or ``requirements``, e.g.
    ``REPORT_REQUIREMENTS``) not installed, or installed older than their floor; never one of
    ``SLICER_BUNDLED`` or torch.

    ``installed_version(name)`` returns the installed version or None (in Slicer: a wrapper of
    ``importlib.metadata.version``).
    """
    return [f"{name}>={floor}" for name, floor in (PIP_REQUIREMENTS if requirements is None else requirements).items()
            if not at_least(installed_version(name), floor)]


def module_available(name: str) -> bool:
    """True when the top-level module ``name`` can be imported (found without importing it)."""
    import importlib.util

    return importlib.util.find_spec(name) is not None


def environment_problems(installed_version: Callable[[str], Optional[str]] = installed_version,
                         python_version: Sequence[int] = tuple(sys.version_info[:3]),
                         module_available: Callable[[str], bool] = module_available) -> List[str]:
    """What in this Slicer BrainAge cannot fix by installing packages, one sentence each (empty: fine).

    A Python older than ``MINIMUM_PYTHON`` (a Slicer older than ``OLDEST_SLICER``), a package Slicer
    bundles missing or older than BrainAge needs, a torch older than ``TORCH_MINIMUM`` (torch missing is
    not a problem here: the PyTorch extension installs it, see ``torch_missing``).
    """
    problems = []
    if tuple(python_version[:2]) < MINIMUM_PYTHON:
        problems.append(f"BrainAge needs 3D Slicer {OLDEST_SLICER} or later (Python {'.'.join(map(str, MINIMUM_PYTHON))}); "
                        f"this one runs Python {'.'.join(map(str, python_version[:3]))}. Install a newer Slicer.")
    for name, floor in SLICER_BUNDLED.items():
        version = installed_version(name)
        if version is None and module_available(BUNDLED_MODULES[name]):
            continue  # built by Slicer without pip metadata: present, version unknown
        if not at_least(version, floor):
            found = "is missing" if version is None else f"is {version}"
            problems.append(f"BrainAge needs {name} {floor} or later, which Slicer bundles; here it {found}. "
                            f"Install 3D Slicer {OLDEST_SLICER} or later (BrainAge never replaces Slicer's own {name}).")
    torch_version = installed_version("torch")
    if torch_version is not None and not at_least(torch_version, TORCH_MINIMUM):
        problems.append(f"BrainAge needs torch {TORCH_MINIMUM} or later; this Slicer has torch {torch_version}. "
                        "Open the PyTorch Utils module, uninstall torch and install it again (it picks a recent build "
                        "for this computer), then restart Slicer.")
    return problems


# --- the module's self-test input -----------------------------------------------------------

def phantom_head(spacing_mm: float = 2.0, use_template: bool = True) -> "Volume":
    """A synthetic T1-like head made offline, for the Slicer self-test.

    With ``use_template`` and the MNI template available (nilearn), it is BrainAgeLib's ageing
    phantom (70-year-old woman, see :mod:`BrainAgeLib.synth.phantoms`); otherwise a numpy ellipsoid head
    (scalp, skull, CSF, grey and white matter, T1-like intensities) on a grid rotated 8 degrees
    about S, 192 x 224 x 192 mm like the phantoms.
    """
    from .synth.phantoms import ellipsoid_head

    if use_template:
        try:
            from .synth.phantoms import make_phantom

            return make_phantom(age=70.0, sex="F", seed=7, spacing=spacing_mm).volume
        except (ImportError, BrainAgeError):
            pass
    return ellipsoid_head(spacing_mm, rotation_deg=8.0)
