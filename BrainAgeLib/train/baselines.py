"""Reference predictors a trained brain-age model must beat, on the same subject split.

- **Training mean**: predict every subject's age as the mean training age. Its MAE is what a
  model that learned nothing scores.
- **Ridge on tissue volumes**: a linear model on CSF / grey / white matter estimated from the
  very slices the network sees. Ventricle and sulcal widening and grey-matter loss are the
  textbook correlates of age, so this is the classical volumetric approach a deep model is
  measured against.
- **Ridge on the cohort's own volumes**: when the cohort table carries tissue volumes in mL
  (columns ``gm_ml``, ``wm_ml``, ``csf_ml``, ``ventricles_ml``, ``brain_ml``, e.g. from a
  FreeSurfer run, or the exact volumes ``brainage synth`` writes for its phantoms), the same
  ridge on those volumes expressed as fractions of the brain volume. For phantoms these are the
  generator's ground truth, so this is an upper bound for any volumetric method, not a rival
  that sees only the image.

Tissue classes come from a three-class 1-D k-means of the foreground intensities of the
prepared (skull-stripped, per-slice min-max scaled) slices: T1 contrast orders them
CSF < grey matter < white matter.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Optional, Sequence

import numpy as np

#: Prepared-slice intensity below which a pixel is background (slices are min-max scaled to [0, 1]).
FOREGROUND_THRESHOLD = 0.02
TISSUE_FEATURES = ("csf_fraction", "gm_fraction", "wm_fraction", "gm_wm_contrast", "foreground_fraction")


def _kmeans_1d(values: np.ndarray, k: int = 3, iterations: int = 30) -> np.ndarray:
    """Sorted cluster centres of 1-D data (Lloyd's algorithm from quantile starts)."""
    centres = np.quantile(values, (np.arange(k) + 0.5) / k)
    for _ in range(iterations):
        labels = np.argmin(np.abs(values[:, None] - centres[None, :]), axis=1)
        updated = np.array([values[labels == i].mean() if np.any(labels == i) else centres[i] for i in range(k)])
        if np.allclose(updated, centres):
            break
        centres = updated
    return np.sort(centres)


def tissue_features(slices: np.ndarray, brain_volume_ml: Optional[float] = None) -> Dict[str, float]:
    """CSF / GM / WM fractions of the brain foreground of prepared slices [S, H, W] in [0, 1].

    With ``brain_volume_ml`` (the brain mask's volume on the input grid, mL) the tissue volumes
    in mL are added as ``csf_ml``, ``gm_ml``, ``wm_ml``.
    """
    values = np.asarray(slices, dtype=np.float32).ravel()
    foreground = values[values > FOREGROUND_THRESHOLD]
    if foreground.size < 10:
        raise ValueError("prepared slices are empty: no foreground to segment")
    rng = np.random.default_rng(0)
    sample = foreground if foreground.size <= 200_000 else rng.choice(foreground, 200_000, replace=False)
    centres = _kmeans_1d(sample.astype(np.float64))
    labels = np.argmin(np.abs(foreground[:, None] - centres[None, :].astype(np.float32)), axis=1)
    fractions = np.bincount(labels, minlength=3) / labels.size
    features = {
        "csf_fraction": float(fractions[0]),
        "gm_fraction": float(fractions[1]),
        "wm_fraction": float(fractions[2]),
        "gm_wm_contrast": float((centres[2] - centres[1]) / max(centres[2], 1e-6)),
        "foreground_fraction": float(foreground.size / values.size),
    }
    if brain_volume_ml is not None:
        features["brain_ml"] = float(brain_volume_ml)
        for name, fraction in zip(("csf_ml", "gm_ml", "wm_ml"), fractions):
            features[name] = float(fraction * brain_volume_ml)
    return features


#: Cohort-table columns (mL) used by the "cohort volumes" ridge when every subject has them.
COHORT_VOLUME_COLUMNS = ("gm_ml", "wm_ml", "csf_ml", "ventricles_ml", "brain_ml")


def cohort_volume_features(values: Dict[str, str]) -> Optional[Dict[str, float]]:
    """Volume fractions (of ``brain_ml``) and log ventricle volume from a row's mL columns, or None."""
    try:
        volumes = {name: float(values[name]) for name in COHORT_VOLUME_COLUMNS if name in values}
    except (TypeError, ValueError):
        return None
    if "brain_ml" not in volumes or len(volumes) < 2 or volumes["brain_ml"] <= 0:
        return None
    brain = volumes.pop("brain_ml")
    features = {f"{name[:-3]}_fraction": value / brain for name, value in volumes.items()}
    features["brain_ml"] = brain
    if volumes.get("ventricles_ml", 0) > 0:
        features["log_ventricles_ml"] = float(np.log(volumes["ventricles_ml"]))
    return features


@dataclass
class BaselineResult:
    """Test-split MAE (years) of the reference predictors."""

    mean_age_mae: float
    mean_age: float
    ridge_mae: float
    ridge_alpha: float
    ridge_features: Sequence[str]
    cohort_volumes_ridge_mae: Optional[float] = None
    cohort_volumes_features: Optional[Sequence[str]] = None

    def to_dict(self) -> Dict[str, object]:
        data = asdict(self)
        data["ridge_features"] = list(self.ridge_features)
        if self.cohort_volumes_features is not None:
            data["cohort_volumes_features"] = list(self.cohort_volumes_features)
        return data


def _design(features: Sequence[Dict[str, float]], names: Sequence[str], sex: np.ndarray) -> np.ndarray:
    x = np.array([[f[n] for n in names] for f in features], dtype=np.float64)
    return np.column_stack([x, sex])


def ridge_fit(x: np.ndarray, y: np.ndarray, alpha: float):
    """Ridge regression on standardised columns; returns a predict(x) function."""
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale == 0] = 1.0
    z = (x - mean) / scale
    y_mean = y.mean()
    coef = np.linalg.solve(z.T @ z + alpha * np.eye(z.shape[1]), z.T @ (y - y_mean))
    return lambda new: ((new - mean) / scale) @ coef + y_mean


def run_baselines(
    train: Dict[str, object], val: Dict[str, object], test: Dict[str, object]
) -> BaselineResult:
    """Fit both baselines on the training split (ridge alpha chosen on validation), score the test split.

    Each split is a dict with ``age`` (years), ``sex`` (M=0, F=1), ``features`` (a list of
    :func:`tissue_features` dicts) and optionally ``volumes`` (a list of
    :func:`cohort_volume_features` dicts, or Nones).
    """
    splits = (train, val, test)
    names = [n for n in TISSUE_FEATURES if all(n in f for split in splits for f in split["features"])]
    names += [n for n in ("csf_ml", "gm_ml", "wm_ml", "brain_ml")
              if all(n in f for split in splits for f in split["features"])]
    mean_age = float(np.mean(np.asarray(train["age"], dtype=np.float64)))
    mean_mae = float(np.mean(np.abs(np.asarray(test["age"], dtype=np.float64) - mean_age)))
    ridge_mae, alpha = _ridge_mae(splits, "features", names)
    result = BaselineResult(mean_mae, mean_age, ridge_mae, alpha, names + ["sex"])
    volumes = [split.get("volumes") for split in splits]
    if all(v is not None and all(f is not None for f in v) for v in volumes):
        volume_names = [n for n in volumes[0][0] if all(n in f for v in volumes for f in v)]
        if volume_names:
            result.cohort_volumes_ridge_mae, _ = _ridge_mae(splits, "volumes", volume_names)
            result.cohort_volumes_features = volume_names + ["sex"]
    return result


def _ridge_mae(splits, key: str, names: Sequence[str]):
    """Test MAE of a ridge on ``names`` (+ sex), alpha chosen by validation MAE."""
    train, val, test = splits
    y_train = np.asarray(train["age"], dtype=np.float64)
    y_val = np.asarray(val["age"], dtype=np.float64)
    y_test = np.asarray(test["age"], dtype=np.float64)
    x_train, x_val, x_test = (_design(s[key], names, np.asarray(s["sex"], dtype=np.float64)) for s in splits)
    best = None
    for alpha in (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0):
        predict = ridge_fit(x_train, y_train, alpha)
        mae = float(np.mean(np.abs(predict(x_val) - y_val)))
        if best is None or mae < best[0]:
            best = (mae, alpha)
    predict = ridge_fit(x_train, y_train, best[1])
    return float(np.mean(np.abs(predict(x_test) - y_test))), best[1]
