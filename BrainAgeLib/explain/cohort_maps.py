"""Cohort attention maps: the mean explanation over many subjects, overall and by age decade.

As in the paper's figure of attention by decade, each subject's attention map (on its own input
grid, as ``brainage predict --explain`` or a batch run writes it) is first carried into template
space with the subject's ``input_to_template`` transform (4x4, input RAS mm -> template RAS mm,
from the registration done in preprocessing, stored in the ``<stem>_attention.json`` sidecar that
:func:`BrainAgeLib.explain.outputs.write_explanation_outputs` writes; inputs that were already
skull-stripped are not registered by preprocessing, so they are registered here from the input
image named in the batch run's ``predictions.csv``), resampled (trilinear) onto
the bundled 2 mm MNI152 grid, and averaged. Decades are of chronological age (years): a subject
of 64.9 falls in "60-69". Subjects without a chronological age count in the overall mean only.

Maps are accumulated one subject at a time, so a cohort of any size fits in memory.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np

from ..cohort.evaluate import decade_label
from ..errors import BrainAgeError, CohortError
from ..volume import Volume
from .outputs import SIDECAR_SUFFIX

PathLike = Union[str, Path]
logger = logging.getLogger(__name__)


@dataclass
class ExplainedSubject:
    """One subject's explanation as a batch run left it (its ``*_attention.json`` sidecar); the
    subject itself is a :class:`BrainAgeLib.cohort.tables.Subject`."""

    name: str
    attention_path: Path
    chronological_age: Optional[float] = None   # years
    predicted_age: Optional[float] = None       # years
    input_to_template: Optional[np.ndarray] = None  # 4x4, input RAS mm -> template RAS mm
    input_path: Optional[Path] = None           # the input T1, to register when no transform is stored
    model_name: str = ""                        # the model that made the map
    model_weights_sha256: Optional[str] = None  # SHA-256 of its weights, when the sidecar names it
    model_is_demo: bool = False                 # the bundled demo model (or another demo checkpoint)
    explain_method: str = "paper"               # how the map was made (sidecars before it was recorded: paper)


@dataclass
class CohortMaps:
    """Mean attention in template space: over everyone, and per decade of chronological age.

    ``mean`` and every ``by_decade`` map lie on ``template``'s grid; ``counts`` holds how many
    subjects each map averages ("all" and each decade label such as "60-69"); ``model`` names the
    model that made the maps: ``{"name", "weights_sha256" (None when the sidecars do not say),
    "is_demo"}``.
    """

    mean: Volume
    by_decade: Dict[str, Volume]
    counts: Dict[str, int]
    subjects: List[str] = field(default_factory=list)
    model: Dict[str, Any] = field(default_factory=lambda: {"name": "", "weights_sha256": None, "is_demo": False})
    #: the explanation method of every map averaged ("paper" or "relevance")
    explain_method: str = "paper"


def read_batch_explanations(folders: Union[PathLike, Sequence[PathLike]]) -> List[ExplainedSubject]:
    """Every subject explanation under ``folders`` (searched recursively for ``*_attention.json``).

    An input image found twice (the same run given twice, or a copy of it) counts once, with a
    logged warning. Raises ``CohortError`` if there is none, if a sidecar is unreadable or names
    a map that does not exist, or if the maps come from different models, by name or by weights
    digest, or were made by different explanation methods (averaging them would mean nothing).
    """
    if isinstance(folders, (str, Path)):
        folders = [folders]
    subjects: List[ExplainedSubject] = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise CohortError(f"{folder}: not a folder")
        for sidecar in sorted(folder.rglob(f"*{SIDECAR_SUFFIX}"), key=lambda p: (p.name, str(p))):
            subjects.append(_read_sidecar(sidecar))
    if not subjects:
        raise CohortError(
            f"no explanations (*{SIDECAR_SUFFIX}) under {', '.join(str(f) for f in folders)}; "
            "run the batch with --explain")
    inputs: Dict[Path, Path] = {}
    for folder in folders:
        for table in Path(folder).rglob("predictions.csv"):
            inputs.update(_inputs_of_batch_table(table))
    for subject in subjects:
        if subject.input_path is None:
            subject.input_path = inputs.get(subject.attention_path.resolve())
    models = sorted({subject.model_name for subject in subjects if subject.model_name})
    if len(models) > 1:
        raise CohortError(f"the explanations come from {len(models)} models ({'; '.join(models)}); "
                          "make cohort maps of one model at a time")
    methods = sorted({subject.explain_method for subject in subjects})
    if len(methods) > 1:
        counts = ", ".join(f"{sum(s.explain_method == m for s in subjects)} {m}" for m in methods)
        raise CohortError(f"the explanations were made by different methods ({counts}); a mean of maps that "
                          "answer different questions means nothing: make cohort maps of one method at a time "
                          "(brainage batch --explain-method)")
    digests = sorted({s.model_weights_sha256 for s in subjects if s.model_weights_sha256})
    if len(digests) > 1:
        raise CohortError(f"the explanations come from models with different weights (SHA-256 "
                          f"{'; '.join(d[:12] for d in digests)}) under one name; "
                          "make cohort maps of one model at a time")
    unique: Dict[Path, ExplainedSubject] = {}
    kept: List[ExplainedSubject] = []
    for subject in subjects:
        key = Path(subject.input_path).resolve() if subject.input_path is not None else subject.attention_path.resolve()
        if key in unique:
            logger.warning("%s: the explanation of %s is there already (%s); counted once",
                           subject.attention_path, key, unique[key].attention_path)
            continue
        unique[key] = subject
        kept.append(subject)
    return kept


def _inputs_of_batch_table(table: Path) -> Dict[Path, Path]:
    """{attention map -> input image} from a batch run's predictions.csv (columns path, attention_map)."""
    from ..cohort.predictions_csv import read_predictions

    try:
        rows = read_predictions(table)
    except (OSError, BrainAgeError):
        return {}  # no usable table: subjects without a stored transform will say so
    return {(table.parent / row.attention_map).resolve(): Path(row.path)
            for row in rows if row.attention_map and row.path}


def _read_sidecar(path: Path) -> ExplainedSubject:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        attention_path = path.parent / str(data["attention_file"])
        transform = data.get("input_to_template")
        transform = None if transform is None else np.asarray(transform, dtype=np.float64).reshape(4, 4)
        age = data.get("chronological_age")
        predicted = data.get("predicted_age")
        input_file = data.get("input_file")
        model_name = str(data.get("model_name") or "")
        digest = data.get("model_weights_sha256")
        is_demo = bool(data.get("model_is_demo", False))
        method = str(data.get("explain_method") or "paper")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CohortError(f"{path}: unreadable explanation sidecar ({type(error).__name__}: {error})") from None
    if not attention_path.exists():
        raise CohortError(f"{path}: its attention map {attention_path.name} is missing")
    return ExplainedSubject(
        name=path.name[: -len(SIDECAR_SUFFIX)],
        attention_path=attention_path,
        chronological_age=None if age is None else float(age),
        predicted_age=None if predicted is None else float(predicted),
        input_to_template=transform,
        input_path=None if not input_file else path.parent / str(input_file),
        model_name=model_name,
        model_weights_sha256=str(digest) if digest else None,
        model_is_demo=is_demo,
        explain_method=method,
    )


def attention_in_template_space(attention: Volume, input_to_template: Optional[np.ndarray],
                                template_grid: Volume) -> np.ndarray:
    """Resample a subject's map (its input grid) onto ``template_grid`` (trilinear, 0 outside).

    ``input_to_template`` maps input RAS mm to template RAS mm; None means the input already is
    in template space (identity). Returns float32 on the template's [I, J, K].
    """
    from ..geometry import resample

    # template voxel -> template RAS -> input RAS -> input voxel
    template_to_input = (None if input_to_template is None
                         else np.linalg.inv(np.asarray(input_to_template, dtype=np.float64)))
    attention = Volume(np.asarray(attention.array, dtype=np.float32), attention.affine)
    return resample(attention, template_grid.affine, template_grid.shape, order=1,
                    world_map=template_to_input, mode="constant", cval=0.0).array


def register_subject(subject: ExplainedSubject) -> np.ndarray:
    """The input -> template transform of a subject whose preprocessing did not register it
    (a skull-stripped input): its input image registered to the bundled MNI152 template."""
    from ..io import load_volume
    from ..preprocess.registration import register_to_template
    from ..preprocess.template_strip import detect_skull_stripped

    if subject.input_path is None or not Path(subject.input_path).exists():
        what = ("its input image is not known" if subject.input_path is None
                else f"its input image {subject.input_path} is missing")
        raise CohortError(
            f"{subject.attention_path}: no input -> template transform was stored for this subject and "
            f"{what}; only if the inputs are already registered to MNI152, say so "
            "(--assume-template-space; assume_template_space=True in Python)")
    volume = load_volume(subject.input_path)
    result = register_to_template(volume, with_skull=not detect_skull_stripped(volume))
    return np.asarray(result.input_to_template, dtype=np.float64)


def cohort_attention_maps(subjects: Iterable[ExplainedSubject], template_grid: Optional[Volume] = None, *,
                          decade_width: int = 10, assume_template_space: bool = False,
                          progress: Optional[Callable[[int, str], None]] = None) -> CohortMaps:
    """Average the subjects' attention maps in template space, overall and by age decade.

    ``template_grid`` defaults to the bundled MNI152 2 mm template. A subject without a stored
    ``input_to_template`` transform (its input was skull-stripped, so preprocessing did not
    register it) is registered here from its input image (:func:`register_subject`), unless
    ``assume_template_space`` says the inputs already are in template space; without either it
    is an error, since its map would land on the wrong anatomy. ``progress(i, name)`` is called
    per subject.
    """
    from ..io import load_volume

    if template_grid is None:
        from ..preprocess.template import load_template

        template_grid = load_template().t1
    total = np.zeros(template_grid.shape, dtype=np.float64)
    decade_sums: Dict[str, np.ndarray] = {}
    counts: Dict[str, int] = {"all": 0}
    names: List[str] = []
    model: Dict[str, Any] = {"name": "", "weights_sha256": None, "is_demo": False}
    methods: List[str] = []
    for index, subject in enumerate(subjects):
        method = getattr(subject, "explain_method", "paper")
        if methods and method != methods[0]:
            raise CohortError(f"{subject.attention_path}: a {method} map among {methods[0]} maps; "
                              "make cohort maps of one explanation method at a time")
        methods.append(method)
        model["name"] = model["name"] or subject.model_name
        model["weights_sha256"] = model["weights_sha256"] or subject.model_weights_sha256
        model["is_demo"] = bool(model["is_demo"] or subject.model_is_demo)
        if progress is not None:
            progress(index, subject.name)
        transform = subject.input_to_template
        if transform is None and not assume_template_space:
            try:
                transform = register_subject(subject)
            except CohortError:
                raise
            except BrainAgeError as error:
                raise CohortError(f"{subject.attention_path}: could not register its input: {error}") from None
        try:
            attention = load_volume(subject.attention_path)
        except BrainAgeError as error:
            raise CohortError(str(error)) from None
        mapped = attention_in_template_space(attention, transform, template_grid)
        total += mapped
        counts["all"] += 1
        names.append(subject.name)
        if subject.chronological_age is not None and np.isfinite(subject.chronological_age):
            label = decade_label(subject.chronological_age, decade_width)
            if label not in decade_sums:
                decade_sums[label] = np.zeros(template_grid.shape, dtype=np.float64)
                counts[label] = 0
            decade_sums[label] += mapped
            counts[label] += 1
    if counts["all"] == 0:
        raise CohortError("no subjects to average")
    mean = template_grid.with_array((total / counts["all"]).astype(np.float32))
    labels = sorted(decade_sums, key=lambda text: int(text.split("-")[0]))
    by_decade = {
        label: template_grid.with_array((decade_sums[label] / counts[label]).astype(np.float32))
        for label in labels
    }
    counts = {"all": counts["all"], **{label: counts[label] for label in labels}}
    if model["name"] and not model["is_demo"]:
        from ..cohort.evaluate import demo_model_names

        model["is_demo"] = model["name"] in demo_model_names()
    return CohortMaps(mean=mean, by_decade=by_decade, counts=counts, subjects=names, model=model,
                      explain_method=methods[0])


def write_cohort_maps(maps: CohortMaps, out_dir: PathLike, fmt: str = "nii.gz",
                      background: Optional[Volume] = None) -> Dict[str, Path]:
    """Write the cohort maps, a summary JSON and a PNG figure (rows: all, then each decade).

    Files: ``cohort_attention_mean.<fmt>``, ``cohort_attention_<decade>.<fmt>``,
    ``cohort_maps.json`` (counts, subjects, the model: name, weights digest, whether it is the
    demo model; not named ``*_attention.json``, so a folder holding these maps can be searched
    for subjects again) and ``cohort_attention.png``.
    """
    from ..atomic_files import write_json_atomic
    from .outputs import FORMATS
    from ..io import save_volume

    if fmt not in FORMATS:
        raise BrainAgeError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise BrainAgeError(f"{out_dir}: output folder does not exist")
    ext = FORMATS[fmt]
    paths: Dict[str, Path] = {"mean": save_volume(maps.mean, out_dir / f"cohort_attention_mean{ext}")}
    for label, volume in maps.by_decade.items():
        paths[label] = save_volume(volume, out_dir / f"cohort_attention_{label}{ext}")
    summary = {"model": dict(maps.model), "explain_method": maps.explain_method, "counts": maps.counts, "subjects": maps.subjects,
               "files": {key: path.name for key, path in paths.items()}}
    if maps.model.get("is_demo"):
        from ..result import DEMO_DISCLAIMER

        summary["disclaimer"] = DEMO_DISCLAIMER
    paths["summary"] = write_json_atomic(out_dir / "cohort_maps.json", summary)
    paths["figure"] = write_cohort_figure(maps, out_dir / "cohort_attention.png", background=background)
    return paths


def write_cohort_figure(maps: CohortMaps, path: PathLike, background: Optional[Volume] = None,
                        dpi: int = 100) -> Path:
    """PNG: one row per map (all subjects, then each decade), axial/coronal/sagittal planes through
    the centre of the overall mean's top-decile region, cropped to the brain, over ``background``
    (default: the bundled template T1); a colour bar, and the demo disclaimer for the demo model."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from .outputs import add_colour_bar, add_demo_note, overlay_rgba, save_figure
    from .slice_views import PLANES, figure_layout, frame_for, head_mask, style_panel, top_region_centre

    if background is None:
        try:
            from ..preprocess.template import load_template

            background = load_template().t1
        except BrainAgeError:
            background = None
    if background is not None and background.shape != maps.mean.shape:
        background = None
    rows = [("all", maps.mean)] + list(maps.by_decade.items())
    mean_ras = maps.mean.reoriented("RAS")
    mean = np.asarray(mean_ras.array, dtype=np.float32)
    bg = None
    brain = mean > 0
    if background is not None:
        bg = np.asarray(background.reoriented("RAS").array, dtype=np.float32)
        bg = np.clip(bg / max(float(np.percentile(bg, 99.5)), 1e-6), 0, 1)
        if (brain & head_mask(bg)).any():
            brain &= head_mask(bg)
    frame = frame_for(mean_ras.shape, mean_ras.spacing, top_region_centre(mean, brain, mean_ras.spacing), brain)
    vmax = max(float(np.asarray(v.array).max()) for _, v in rows) or 1.0
    layout = figure_layout(frame, rows=len(rows), panel_height_in=2.4, left_in=1.0, top_in=0.9,
                           bottom_in=0.9 if maps.model.get("is_demo") else 0.3, min_width_in=8.0)
    fig = plt.figure(figsize=layout["figsize"], facecolor="black")
    grid = fig.add_gridspec(len(rows), 3, **layout["gridspec"])
    cmap = matplotlib.colormaps["hot"]
    for row, (label, volume) in enumerate(rows):
        values = np.asarray(volume.reoriented("RAS").array, dtype=np.float32)
        for col, name in enumerate(PLANES):
            ax = fig.add_subplot(grid[row, col])
            extent = frame.extent(name)
            if bg is not None:
                ax.imshow(frame.plane(bg, name), cmap="gray", origin="lower", extent=extent, vmin=0, vmax=1)
            ax.imshow(overlay_rgba(frame.plane(values, name), cmap, bg is not None, vmax), origin="lower",
                      extent=extent)
            style_panel(ax, name, name if row == 0 else None)
            if col == 0:
                title = "all subjects" if label == "all" else f"age {label}"
                ax.set_ylabel(f"{title}\n(n={maps.counts.get(label, 0)})", color="white", fontsize=9, labelpad=14)
    add_colour_bar(fig, layout["colorbar"], cmap, vmax=vmax, label="mean attention")
    model = maps.model.get("name") or "unnamed model"
    fig.suptitle(f"Mean attention in MNI152 space | model {model} | map: {maps.explain_method}\nplanes through the overall map's top-decile "
                 "region; axial and coronal in radiological view (patient right on the left)",
                 color="white", fontsize=10)
    if maps.model.get("is_demo"):
        add_demo_note(fig, y=0.45 / layout["figsize"][1])
    return save_figure(fig, path, dpi=dpi)
