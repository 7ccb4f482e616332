"""Which phantom cue makes the demo model misjudge real heads: tissue measures of generated
phantoms of known age against the real development heads (issue 19's diagnostic).

For each head, after the preprocessing a prediction gets (RAS, deepbet mask, N4 on the brain):
the brain mask's volume (ml), a 3-class intensity clustering inside it (k-means on intensities
scaled by the brain's 99th percentile) giving the CSF / GM / WM fractions and the grey/white
contrast (WM - GM) / (WM + GM) of the class means, and the demo model's age. For every measure
it fits the phantoms' straight line against age and reports the age at which a real head's value
sits on it ("reads as"): a measure whose reading of the real heads is far from their ages is a
cue the phantoms teach differently from real brains.

    python scripts/phantom_cues.py [--phantoms 15] [--json OUT]

The real heads (``../shared/data/real-t1``, Colin27, the MNI152 template) are a development check:
never train, select or tune on them.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from BrainAgeLib.inference import predict_prepared
from BrainAgeLib.io import load_volume
from BrainAgeLib.model.checkpoint import load_model
from BrainAgeLib.preprocess.pipeline import deepbet_strip, n4_bias_correction, prepare, reorient_to_ras
from BrainAgeLib.synth.phantoms import make_phantom, template_dir, TEMPLATE_FILES
from BrainAgeLib.volume import Volume

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "data" / "real-t1"
COLIN27 = Path("/usr/share/mricron/templates/ch2.nii.gz")
COLIN27_AGE = 28.0   # as issue 19 gives it (scanned in his late 20s-early 30s)
MNI152_AGE = 25.0    # the 2009a average: young adults, mean age about 25
MEASURES = ("brain_ml", "csf", "gm", "wm", "contrast")


def kmeans3(values: np.ndarray, iterations: int = 30) -> np.ndarray:
    centres = np.percentile(values, [10, 50, 90]).astype(np.float64)
    for _ in range(iterations):
        labels = np.argmin(np.abs(values[:, None] - centres[None, :]), axis=1)
        centres = np.array([values[labels == k].mean() if np.any(labels == k) else centres[k] for k in range(3)])
    return centres


def measures(volume: Volume) -> dict:
    ras = reorient_to_ras(volume)
    brain, mask = deepbet_strip(ras)
    corrected = n4_bias_correction(brain, 4, mask)
    values = corrected.array[mask].astype(np.float64)
    values = values / np.percentile(values, 99)
    centres = kmeans3(values)
    labels = np.argmin(np.abs(values[:, None] - centres[None, :]), axis=1)
    fractions = np.bincount(labels, minlength=3) / labels.size
    return {"brain_ml": float(mask.sum() * np.prod(ras.spacing) / 1000.0), "csf": float(fractions[0]),
            "gm": float(fractions[1]), "wm": float(fractions[2]),
            "contrast": float((centres[2] - centres[1]) / (centres[2] + centres[1]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phantoms", type=int, default=15)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model = load_model("demo")
    rows = []

    def add(kind: str, name: str, volume: Volume, age: float, sex: str) -> None:
        row = {"kind": kind, "name": name, "age": age, "sex": sex, **measures(volume)}
        row["demo_age"] = float(predict_prepared(model, prepare(volume, model.config), sex, age, device="cpu").predicted_age)
        rows.append(row)
        print(f"{kind:8s} {name:22s} age {age:5.1f} demo {row['demo_age']:5.1f}  " +
              "  ".join(f"{m} {row[m]:.3f}" for m in MEASURES), flush=True)

    for i in range(args.phantoms):
        age = 20.0 + 70.0 * i / max(1, args.phantoms - 1)
        sex = ("F", "M")[i % 2]
        add("phantom", f"seed {800_000 + i}", make_phantom(age, sex, seed=800_000 + i, spacing=1.5, skull=True,
                                                           with_tissue=False).volume, age, sex)
    with open(REAL / "participants.csv", encoding="utf-8") as handle:
        for subject in csv.DictReader(handle):
            add("real", subject["id"], load_volume(REAL / subject["path"]), float(subject["age"]), subject["sex"])
    if COLIN27.is_file():
        add("real", "Colin27", load_volume(COLIN27), COLIN27_AGE, "M")
    add("real", "MNI152 2009a", load_volume(template_dir() / TEMPLATE_FILES["t1"]), MNI152_AGE, "F")

    phantoms = [r for r in rows if r["kind"] == "phantom"]
    ages = np.array([r["age"] for r in phantoms])
    print("\nmeasure   phantom slope/decade  r(age)   real heads read as (age: reading)")
    summary = {}
    for m in MEASURES:
        values = np.array([r[m] for r in phantoms])
        slope, intercept = np.polyfit(ages, values, 1)
        r = float(np.corrcoef(ages, values)[0, 1])
        readings = {x["name"]: float((x[m] - intercept) / slope) for x in rows if x["kind"] == "real"}
        summary[m] = {"slope_per_decade": float(slope * 10), "r_with_age": r, "real_read_as": readings}
        print(f"{m:9s} {slope * 10:+.4f}  {r:+.2f}   " + ", ".join(
            f"{x['age']:.0f}:{readings[x['name']]:.0f}" for x in rows if x["kind"] == "real"))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "summary": summary}, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
