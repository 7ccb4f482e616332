"""The bundled demo model on its held-out phantoms, regenerated from their cohort seed, with a
chosen brain extraction: MAE and Pearson r against the ages, and the change from the ages the
build predicted (Resources/Models/brainage_demo_heldout.json).

    python scripts/demo_heldout_check.py [--skull-strip deepbet|template|none] [--n 96]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np

from BrainAgeLib.model.checkpoint import load_model
from BrainAgeLib.inference import predict_prepared
from BrainAgeLib.io import load_volume
from BrainAgeLib.preprocess.pipeline import prepare
from BrainAgeLib.synth.phantoms import cohort_specs, write_phantom

HELDOUT = Path(__file__).resolve().parents[1] / "Resources" / "Models" / "brainage_demo_heldout.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skull-strip", default="deepbet")
    parser.add_argument("--n", type=int, default=None, help="evenly spaced subset of the held-out phantoms")
    args = parser.parse_args()
    model = load_model("demo")
    config = dataclasses.replace(model.config.preprocess, skull_strip=args.skull_strip)
    heldout = json.loads(HELDOUT.read_text())
    if args.n:
        heldout = [heldout[i] for i in np.linspace(0, len(heldout) - 1, args.n).round().astype(int)]
    first = heldout[0]
    specs = {s.id: s for s in cohort_specs(first["n_phantoms"], first["cohort_seed"], spacing=(1.5, 2.0),
                                          skull_fraction=0.5)}
    ages, predicted, recorded, skulls = [], [], [], []
    with tempfile.TemporaryDirectory() as folder:
        for row in heldout:
            spec = specs[row["id"]]
            written = write_phantom(spec, folder)
            prepared = prepare(load_volume(Path(folder) / written["path"]), config)
            result = predict_prepared(model, prepared, spec.sex, spec.age, device="cpu")
            ages.append(spec.age)
            predicted.append(result.predicted_age)
            recorded.append(row["predicted_age"])
            skulls.append(spec.has_skull)
    ages, predicted, recorded, skulls = map(np.asarray, (ages, predicted, recorded, skulls))
    error = np.abs(predicted - ages)
    print(f"{args.skull_strip}: n {len(ages)}, MAE {error.mean():.2f} y (with skull {error[skulls].mean():.2f}, "
          f"stripped {error[~skulls].mean():.2f}), r {np.corrcoef(ages, predicted)[0, 1]:.3f}; "
          f"build's MAE on the same {np.abs(recorded - ages).mean():.2f}; change from the build's ages: "
          f"mean {np.mean(predicted - recorded):+.2f}, max {np.abs(predicted - recorded).max():.2f} y")


if __name__ == "__main__":
    main()
