"""The reports' plots (matplotlib, Agg), embedded in the HTML as base64 PNG ``data:`` URIs so a
report is one file that opens offline.

- :func:`reference_figure`: one subject against the model's reference set (predicted vs
  chronological age of the reference subjects, the identity line, the subject and its interval);
- :func:`cohort_scatter_figure` and :func:`bland_altman_figure`: a cohort's predictions;
- :func:`gap_by_group_figure`: the brain-age gap's distribution per group or site.
"""
from __future__ import annotations

import base64
import io
import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np

PathLike = Union[str, "os.PathLike[str]"]

SUBJECT_COLOUR = "#d62728"
REFERENCE_COLOUR = "#7f7f7f"
COHORT_COLOUR = "#1f77b4"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def figure_data_uri(fig: Any, dpi: int = 100) -> str:
    """A matplotlib figure as a ``data:image/png;base64,...`` URI (the figure is closed)."""
    plt = _pyplot()
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", facecolor=fig.get_facecolor())
    finally:
        plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def png_file_data_uri(path: PathLike) -> str:
    """A PNG file as a ``data:`` URI."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def reference_figure(calibration: Any, predicted_age: float, chronological_age: Optional[float],
                     interval: Optional[Tuple[float, float]], level: Optional[float]) -> str:
    """The subject (red) against the model's reference subjects (grey): predicted vs chronological
    age, years, with the identity line; the subject's interval as an error bar (without a
    chronological age: the predicted age and its interval as a horizontal line and band).
    Returns a data URI."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 4.6))
    ages = np.asarray(calibration.reference_age, dtype=np.float64)
    predicted = np.asarray(calibration.reference_predicted, dtype=np.float64)
    ax.scatter(ages, predicted, s=14, color=REFERENCE_COLOUR, alpha=0.6,
               label=f"reference set (n = {ages.size})")
    values = [*ages, *predicted, predicted_age] + ([chronological_age] if chronological_age is not None else [])
    if interval is not None:
        values += list(interval)
    low, high = float(np.min(values)) - 3, float(np.max(values)) + 3
    ax.plot([low, high], [low, high], color="black", lw=0.8, ls="--", label="predicted = chronological")
    label = "this scan" + ("" if interval is None else f" ({level * 100:g}% interval)")
    if chronological_age is not None:
        error = None if interval is None else [[predicted_age - interval[0]], [interval[1] - predicted_age]]
        ax.errorbar([chronological_age], [predicted_age], yerr=error, fmt="*", ms=16, color=SUBJECT_COLOUR,
                    ecolor=SUBJECT_COLOUR, elinewidth=2, capsize=5, label=label, zorder=5)
    else:
        ax.axhline(predicted_age, color=SUBJECT_COLOUR, lw=2, label=label + ", age not given")
        if interval is not None:
            ax.axhspan(interval[0], interval[1], color=SUBJECT_COLOUR, alpha=0.15)
    return _age_axes_figure(fig, ax, low, high)


def _age_axes_figure(fig: Any, ax: Any, low: float, high: float) -> str:
    """Square predicted-vs-chronological axes from ``low`` to ``high`` years, labelled, as a data URI."""
    ax.set_xlim(low, high)
    ax.set_ylim(low, high)
    ax.set_aspect("equal")
    ax.set_xlabel("chronological age (years)")
    ax.set_ylabel("predicted brain age (years)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    return figure_data_uri(fig)


def cohort_scatter_figure(age: Sequence[float], predicted: Sequence[float], reference: Any = None) -> str:
    """Predicted vs chronological age of a cohort (blue), over the model's reference set (grey)
    when given, with the identity line. Returns a data URI."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 4.6))
    age, predicted = np.asarray(age, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    values = [*age, *predicted]
    if reference is not None:
        ax.scatter(reference.reference_age, reference.reference_predicted, s=10, color=REFERENCE_COLOUR, alpha=0.4,
                   label=f"model's reference set (n = {reference.n_reference})")
        values += [*reference.reference_age, *reference.reference_predicted]
    ax.scatter(age, predicted, s=18, color=COHORT_COLOUR, label=f"this cohort (n = {age.size})")
    low, high = float(np.min(values)) - 3, float(np.max(values)) + 3
    ax.plot([low, high], [low, high], color="black", lw=0.8, ls="--", label="predicted = chronological")
    return _age_axes_figure(fig, ax, low, high)


def bland_altman_figure(age: Sequence[float], predicted: Sequence[float]) -> str:
    """Bland-Altman plot: the gap (predicted - chronological) against the mean of the two, with
    the mean gap and its 95% limits of agreement (mean +- 1.96 SD). Returns a data URI."""
    plt = _pyplot()
    age, predicted = np.asarray(age, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    mean, gap = (age + predicted) / 2, predicted - age
    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    ax.scatter(mean, gap, s=18, color=COHORT_COLOUR)
    centre = float(gap.mean())
    spread = 1.96 * float(gap.std(ddof=1)) if gap.size > 1 else 0.0
    ax.axhline(centre, color="black", lw=1, label=f"mean gap {centre:+.1f} years")
    for limit in (centre - spread, centre + spread):
        ax.axhline(limit, color="black", lw=0.8, ls="--")
    ax.plot([], [], color="black", lw=0.8, ls="--", label=f"95% limits of agreement (+-{spread:.1f})")
    ax.set_xlabel("mean of chronological and predicted age (years)")
    ax.set_ylabel("brain-age gap (years)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return figure_data_uri(fig)


def gap_by_group_figure(gaps: Dict[str, Sequence[float]], label: str) -> str:
    """The (corrected) brain-age gap per group (box and points), years. Returns a data URI."""
    plt = _pyplot()
    names = list(gaps)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(names) + 2), 4.0))
    data = [np.asarray(gaps[n], dtype=np.float64) for n in names]
    ax.boxplot(data, showfliers=False)
    ax.set_xticks(range(1, len(names) + 1), [f"{n}\n(n = {len(d)})" for n, d in zip(names, data)])
    rng = np.random.default_rng(0)
    for n, values in enumerate(data, start=1):
        ax.scatter(n + rng.uniform(-0.12, 0.12, values.size), values, s=12, color=COHORT_COLOUR, alpha=0.7)
    ax.axhline(0, color="black", lw=0.8, ls="--")
    ax.set_ylabel("brain-age gap (years)")
    ax.set_xlabel(label)
    ax.grid(alpha=0.3, axis="y")
    return figure_data_uri(fig)
