"""How good are brain-age predictions: error metrics, bias correction, and two plots.

:func:`compute_metrics` takes chronological and predicted ages (years) and returns, in a plain
dict (JSON-ready; ``None`` where a value is undefined, e.g. a correlation of constant data):

- ``n``; ``mae`` with ``mae_ci95`` (percentile bootstrap over subjects, seeded, so the same
  data always give the same interval); ``rmse``; ``mean_error`` (mean of predicted - age,
  i.e. the mean brain-age gap); ``pearson_r``; ``spearman_rho``; ``r2`` (1 - SS_res/SS_tot of
  the predictions, not of a refitted line);
- ``per_decade``: ``{"20-29": {"n", "mae"}, ...}`` by chronological age; ``per_sex``:
  ``{"F": {"n", "mae"}, "M": ...}`` when sexes are given.

:func:`evaluate_predictions` reads a predictions table (``age``, ``predicted_age``, ``sex``,
optional ``split`` and ``id``), fits the de Lange & Cole correction
(:class:`~BrainAgeLib.bias_correction.BiasCorrection`) on a reference split (rows whose split
is ``reference``, ``val`` or ``validation``; else a seeded random fraction; refused, with the
reason in ``reference["note"]``, below the minimum subjects and age span stated in
:mod:`~BrainAgeLib.bias_correction`) and reports
metrics on the other rows before and after correction, together with the correlation of the
gap with age that the correction removes. (Corrected "ages" are chronological age + corrected
gap: they use the true age by construction, so they describe the gap, not how well age itself
is predicted.) It writes ``metrics.json``, a scatter plot of
predicted vs chronological age with the identity line (``scatter.png``) and a Bland-Altman
plot (``bland_altman.png``), each atomically.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from ..atomic_files import write_bytes_atomic, write_json_atomic
from ..errors import BrainAgeError, CohortError

PathLike = Union[str, Path]

REFERENCE_SPLITS = ("reference", "val", "validation")
AGE_COLUMNS = ("age", "chronological_age")
PREDICTED_COLUMNS = ("predicted_age", "predicted", "brain_age")
BOOTSTRAP_SAMPLES = 2000


def _finite_or_none(value: float) -> Optional[float]:
    value = float(value)
    return value if math.isfinite(value) else None


def _correlations(age: np.ndarray, predicted: np.ndarray) -> tuple:
    from scipy import stats

    if age.size < 2 or np.ptp(age) == 0 or np.ptp(predicted) == 0:
        return None, None
    return (_finite_or_none(stats.pearsonr(age, predicted)[0]),
            _finite_or_none(stats.spearmanr(age, predicted)[0]))


def bootstrap_mae_ci(age: Sequence[float], predicted: Sequence[float], *, samples: int = BOOTSTRAP_SAMPLES,
                     seed: int = 0, level: float = 0.95) -> Optional[List[float]]:
    """Percentile bootstrap interval (years) of the MAE, resampling subjects with replacement."""
    errors = np.abs(np.asarray(predicted, np.float64) - np.asarray(age, np.float64))
    if errors.size < 2:
        return None
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    for start in range(0, samples, 500):  # chunks keep memory flat for large cohorts
        stop = min(samples, start + 500)
        picks = rng.integers(0, errors.size, size=(stop - start, errors.size))
        means[start:stop] = errors[picks].mean(axis=1)
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return [float(low), float(high)]


def decade_label(age: float, width: int = 10) -> str:
    """``"20-29"`` for ages 20.0-29.99 years: ``width``-year bins starting at multiples of
    ``width`` (the decades of the metrics' per-decade MAE and of ``explain.cohort_maps``)."""
    low = int(math.floor(float(age) / width) * width)
    return f"{low}-{low + width - 1}"


def compute_metrics(age: Sequence[float], predicted: Sequence[float], sex: Optional[Sequence[str]] = None, *,
                    bootstrap: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> Dict[str, Any]:
    """Accuracy of ``predicted`` against chronological ``age`` (both years); see the module
    docstring for the keys. ``sex`` (F/M/unknown per subject) adds ``per_sex``."""
    age = np.asarray(age, dtype=np.float64).ravel()
    predicted = np.asarray(predicted, dtype=np.float64).ravel()
    if age.shape != predicted.shape:
        raise ValueError(f"{age.size} ages but {predicted.size} predictions")
    if age.size == 0:
        raise ValueError("no subjects to evaluate")
    if not (np.all(np.isfinite(age)) and np.all(np.isfinite(predicted))):
        raise ValueError("ages and predictions must be finite numbers")
    error = predicted - age
    pearson, spearman = _correlations(age, predicted)
    total = float(np.sum((age - age.mean()) ** 2))
    metrics: Dict[str, Any] = {
        "n": int(age.size),
        "mae": float(np.mean(np.abs(error))),
        "mae_ci95": bootstrap_mae_ci(age, predicted, samples=bootstrap, seed=seed) if bootstrap else None,
        "rmse": float(np.sqrt(np.mean(error**2))),
        "mean_error": float(np.mean(error)),
        "pearson_r": pearson,
        "spearman_rho": spearman,
        "r2": (1.0 - float(np.sum(error**2)) / total) if total > 0 else None,
    }
    decades: Dict[str, Dict[str, Any]] = {}
    for label in sorted({decade_label(a) for a in age}, key=lambda s: int(s.split("-")[0])):
        chosen = np.array([decade_label(a) == label for a in age])
        decades[label] = {"n": int(chosen.sum()), "mae": float(np.mean(np.abs(error[chosen])))}
    metrics["per_decade"] = decades
    if sex is not None:
        from .tables import parse_cohort_sex

        sexes = [parse_cohort_sex(s) for s in sex]
        if len(sexes) != age.size:
            raise ValueError(f"{age.size} ages but {len(sexes)} sexes")
        metrics["per_sex"] = {
            s: {"n": int(sum(x == s for x in sexes)),
                "mae": float(np.mean(np.abs(error[[x == s for x in sexes]])))}
            for s in ("F", "M", "unknown") if s in sexes
        }
    return metrics


# ----------------------------------------------------------------------------------------
# A predictions table
# ----------------------------------------------------------------------------------------


@dataclass
class Predictions:
    """A predictions table: one row per subject."""

    ids: List[str]
    age: np.ndarray
    predicted: np.ndarray
    sex: List[str]
    split: List[str]
    source: str = ""
    #: rows left out, as "id: why" (a batch run's failed subjects, subjects without an age)
    skipped: List[str] = field(default_factory=list)
    models: List[str] = field(default_factory=list)   # names in a "model" column (batch tables have one)


def read_prediction_table(path: PathLike) -> Predictions:
    """Any predictions table to evaluate (CSV/TSV): its ``age``, ``predicted_age``, ``sex`` and
    optional ``split``/``id`` columns, as one :class:`Predictions` (a ``brainage batch``
    ``predictions.csv`` row by row, with every column, is ``predictions_csv.read_predictions``).

    A ``brainage batch`` table reads as it is: rows with an ``error`` (failed subjects) and rows
    whose age is blank or "n/a" (subjects without a chronological age) are left out and listed
    in ``Predictions.skipped``; any other unreadable value is an error naming its line.
    """
    from .tables import MAX_AGE_YEARS, MISSING, first_column, read_table_rows, parse_cohort_sex

    path = Path(path).expanduser()
    if not path.is_file():
        raise CohortError(f"{path}: no such predictions table")
    header, rows = read_table_rows(path)
    age_column, predicted_column = first_column(header, AGE_COLUMNS), first_column(header, PREDICTED_COLUMNS)
    for column, names in ((age_column, AGE_COLUMNS), (predicted_column, PREDICTED_COLUMNS)):
        if column is None:
            raise CohortError(f"{path}: no {' / '.join(names)} column (columns: {', '.join(header)})")
    ids, ages, predicted, sexes, splits, skipped, models = [], [], [], [], [], [], set()
    for line, row in rows:
        where = f"{path}, line {line}"
        row_id = row.get("id") or row.get("subject") or row.get("participant_id") or f"row{line}"
        if (row.get("error") or "").strip():
            skipped.append(f"{row_id}: failed ({row['error'].strip()})")
            continue
        if (row[age_column] or "").strip().lower() in MISSING:
            skipped.append(f"{row_id}: no chronological age")
            continue
        try:
            age = float(row[age_column])
            guess = float(row[predicted_column])
        except ValueError:
            raise CohortError(f"{where}: {age_column} {row[age_column]!r} and {predicted_column} "
                              f"{row[predicted_column]!r} must both be numbers of years") from None
        if not (math.isfinite(age) and math.isfinite(guess)):
            raise CohortError(f"{where}: ages must be finite numbers")
        if not 0.0 <= age <= MAX_AGE_YEARS:
            raise CohortError(f"{where}: {age_column} {row[age_column]!r} is outside 0-{MAX_AGE_YEARS:g} years")
        try:
            sexes.append(parse_cohort_sex(row.get("sex")))
        except ValueError as error:
            raise CohortError(f"{where}: {error}") from None
        ids.append(row_id)
        if (row.get("model") or "").strip():
            models.add(row["model"].strip())
        ages.append(age)
        predicted.append(guess)
        splits.append((row.get("split") or "").lower())
    if not rows:
        raise CohortError(f"{path}: the table has a header but no rows")
    if not ids:
        raise CohortError(f"{path}: no row has both an age and a prediction ({len(skipped)} left out, "
                          f"e.g. {skipped[0]})")
    return Predictions(ids, np.array(ages), np.array(predicted), sexes, splits, str(path), skipped, sorted(models))


@dataclass
class EvaluationReport:
    """Metrics of a predictions table, before and after the de Lange & Cole correction."""

    all: Dict[str, Any]
    evaluated: Dict[str, Any]  # uncorrected, on the rows outside the reference split
    corrected: Optional[Dict[str, Any]]  # corrected, same rows (None if no correction)
    bias_correction: Optional[Dict[str, Any]]
    reference: Dict[str, Any]
    gap_age_correlation: Dict[str, Optional[float]]
    files: Dict[str, str] = field(default_factory=dict)
    skipped: List[str] = field(default_factory=list)  # rows of the table left out, "id: why"
    models: List[str] = field(default_factory=list)   # the models that made the predictions, when named
    notes: List[str] = field(default_factory=list)    # what the reader must know (demo model, few rows)

    def to_dict(self) -> Dict[str, Any]:
        return {"all": self.all, "evaluated": self.evaluated, "corrected": self.corrected,
                "bias_correction": self.bias_correction, "reference": self.reference,
                "gap_age_correlation": self.gap_age_correlation, "files": self.files,
                "skipped": self.skipped, "models": self.models, "notes": self.notes}


#: Fewer evaluated rows than this and the report says its figures are unreliable.
FEW_ROWS = 10


def demo_model_names() -> List[str]:
    """The name of the bundled demo model, whose predictions must always carry its disclaimer."""
    from ..model.checkpoint import read_metadata
    from ..resources import resource_path

    try:
        return [str(read_metadata(resource_path("Models", "brainage_demo.safetensors"))["name"])]
    except (BrainAgeError, KeyError, OSError):
        return []


def report_notes(models: Sequence[str], n_evaluated: int) -> List[str]:
    """The disclaimer when a demo model made the predictions, and a warning for few rows."""
    from ..result import DEMO_DISCLAIMER

    notes = []
    if set(models) & set(demo_model_names()):
        notes.append(DEMO_DISCLAIMER)
    if n_evaluated < FEW_ROWS:
        notes.append(f"only {n_evaluated} rows were evaluated: these figures and their intervals are unreliable")
    return notes


def choose_reference(predictions: Predictions, fraction: float = 0.3, seed: int = 0) -> np.ndarray:
    """Boolean mask of the reference rows: split reference/val/validation if any row has one,
    else a seeded random ``fraction`` of rows (at least two when there are four or more)."""
    marked = np.array([s in REFERENCE_SPLITS for s in predictions.split])
    if marked.any():
        return marked
    if not 0.0 < fraction < 1.0:
        raise CohortError(f"reference fraction must be between 0 and 1, got {fraction}")
    n = predictions.age.size
    count = int(round(fraction * n))
    count = max(count, 2) if n >= 4 else 0
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed).permutation(n)[:count]] = True
    return mask


def evaluate_predictions(path: Union[PathLike, Predictions], out_dir: Optional[PathLike] = None, *,
                         reference_fraction: float = 0.3, seed: int = 0, plots: bool = True) -> EvaluationReport:
    """Evaluate a predictions table (a file, or a :class:`Predictions` already in memory; see the
    module docstring); with ``out_dir``, write ``metrics.json``, ``scatter.png`` and
    ``bland_altman.png`` there."""
    from ..bias_correction import BiasCorrection

    table = path if isinstance(path, Predictions) else read_prediction_table(path)
    reference = choose_reference(table, reference_fraction, seed)
    rest = ~reference if (~reference).any() else np.ones_like(reference)
    age, predicted = table.age, table.predicted
    sexes = np.array(table.sex, dtype=object)
    all_metrics = compute_metrics(age, predicted, table.sex, seed=seed)
    evaluated = compute_metrics(age[rest], predicted[rest], list(sexes[rest]), seed=seed)
    correction, corrected, note = None, None, ""
    try:
        correction = BiasCorrection.fit_on_reference(age[reference], predicted[reference])
    except ValueError as error:
        note = f"no bias correction: {error}"
    gap = predicted - age
    correlation = {"uncorrected": _correlations(age[rest], gap[rest])[0], "corrected": None}
    if correction is not None:
        corrected_gap = np.asarray(correction.corrected_gap(predicted[rest], age[rest]), dtype=np.float64)
        corrected = compute_metrics(age[rest], age[rest] + corrected_gap, list(sexes[rest]), seed=seed)
        correlation["corrected"] = _correlations(age[rest], corrected_gap)[0]
    source = "split column" if any(s in REFERENCE_SPLITS for s in table.split) else (
        f"random {reference_fraction:g} of rows (seed {seed})")
    report = EvaluationReport(
        all=all_metrics, evaluated=evaluated, corrected=corrected,
        bias_correction=correction.to_dict() if correction else None,
        reference={"n": int(reference.sum()), "chosen_by": source, **({"note": note} if note else {})},
        gap_age_correlation=correlation, skipped=list(table.skipped), models=list(table.models),
        notes=report_notes(table.models, int(rest.sum())))
    if out_dir is not None:
        out = Path(out_dir).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        if plots:
            note = "  ".join(report.notes)
            report.files["scatter"] = str(plot_scatter(age, predicted, table.sex, out / "scatter.png",
                                                       metrics=all_metrics, note=note))
            report.files["bland_altman"] = str(plot_bland_altman(age, predicted, out / "bland_altman.png", note=note))
        report.files["metrics"] = str(out / "metrics.json")
        write_json_atomic(out / "metrics.json", report.to_dict())
    return report


# ----------------------------------------------------------------------------------------
# Plots (matplotlib's Agg canvas, no pyplot state) and atomic files
# ----------------------------------------------------------------------------------------




def _save_figure(figure, path: Path, note: str = "") -> Path:
    """The figure as a PNG, atomically; ``note`` (e.g. the demo disclaimer) in red along the bottom."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    if note:
        figure.tight_layout(rect=(0, 0.12, 1, 1))
        figure.text(0.5, 0.01, note, ha="center", va="bottom", color="red", fontsize=6.5, wrap=True)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    return write_bytes_atomic(path, buffer.getvalue())


_SEX_STYLE = {"F": ("tab:red", "female"), "M": ("tab:blue", "male"), "unknown": ("tab:gray", "sex unknown")}


def plot_scatter(age: Sequence[float], predicted: Sequence[float], sex: Optional[Sequence[str]], path: PathLike,
                 metrics: Optional[Dict[str, Any]] = None, note: str = "") -> Path:
    """PNG: predicted vs chronological age (years), one colour per sex, with the identity line."""
    from matplotlib.figure import Figure

    age, predicted = np.asarray(age, float), np.asarray(predicted, float)
    sexes = list(sex) if sex is not None else ["unknown"] * age.size
    figure = Figure(figsize=(5.5, 5.0))
    axes = figure.add_subplot(1, 1, 1)
    low = float(min(age.min(), predicted.min())) - 2
    high = float(max(age.max(), predicted.max())) + 2
    axes.plot([low, high], [low, high], color="black", linewidth=1, label="identity")
    for key, (colour, label) in _SEX_STYLE.items():
        chosen = np.array([s == key for s in sexes])
        if chosen.any():
            axes.scatter(age[chosen], predicted[chosen], s=14, alpha=0.7, color=colour, label=label)
    axes.set_xlim(low, high)
    axes.set_ylim(low, high)
    axes.set_aspect("equal")
    axes.set_xlabel("chronological age (years)")
    axes.set_ylabel("predicted age (years)")
    if metrics:
        r = metrics.get("pearson_r")
        axes.set_title(f"MAE {metrics['mae']:.2f} y" + (f", r = {r:.3f}" if r is not None else "")
                       + f", n = {metrics['n']}")
    axes.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    return _save_figure(figure, Path(path), note)


def plot_bland_altman(age: Sequence[float], predicted: Sequence[float], path: PathLike, note: str = "") -> Path:
    """PNG: Bland-Altman plot, difference (predicted - age) against the mean of the two,
    with the mean difference and its 95% limits of agreement (mean +- 1.96 SD)."""
    from matplotlib.figure import Figure

    age, predicted = np.asarray(age, float), np.asarray(predicted, float)
    mean, difference = 0.5 * (age + predicted), predicted - age
    bias = float(difference.mean())
    spread = 1.96 * float(difference.std(ddof=1)) if difference.size > 1 else 0.0
    figure = Figure(figsize=(6.0, 4.5))
    axes = figure.add_subplot(1, 1, 1)
    axes.scatter(mean, difference, s=14, alpha=0.7, color="tab:blue")
    axes.axhline(bias, color="black", linewidth=1, label=f"mean difference {bias:+.2f} y")
    for limit in (bias - spread, bias + spread):
        axes.axhline(limit, color="gray", linestyle="--", linewidth=1)
    axes.plot([], [], color="gray", linestyle="--", label=f"95% limits of agreement (±{spread:.2f} y)")
    axes.set_xlabel("mean of chronological and predicted age (years)")
    axes.set_ylabel("predicted - chronological age (years)")
    axes.legend(loc="best", fontsize=8)
    figure.tight_layout()
    return _save_figure(figure, Path(path), note)
