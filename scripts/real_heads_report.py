"""Brain extraction and QC on the real heads of ../shared/data/real-t1 (a development check).

For each head, with each brain-extraction method: the mask volume (ml), the QC flags, the
demo model's age (and the Dice of the two methods' masks); with --figures DIR also the QC
picture of each mask. Prints a table, or JSON with --json.

    python scripts/real_heads_report.py [--data ../shared/data/real-t1] [--methods deepbet template]
        [--model demo] [--figures DIR] [--json]

The heads are for checking preprocessing on real anatomy only: never train or tune on them.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from BrainAgeLib.model.checkpoint import load_model
from BrainAgeLib.inference import predict_prepared
from BrainAgeLib.io import load_volume
from BrainAgeLib.preprocess.pipeline import prepare

REPO = Path(__file__).resolve().parents[1]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "real-t1"))
    parser.add_argument("--methods", nargs="+", default=["deepbet", "template"])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--figures", default=None, metavar="DIR")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    model = load_model(args.model)
    data = Path(args.data)
    with open(data / "participants.csv", newline="") as handle:
        people = list(csv.DictReader(handle))
    rows = []
    for person in people:
        volume = load_volume(data / person["path"])
        masks = {}
        for method in args.methods:
            config = dataclasses.replace(model.config.preprocess, skull_strip=method)
            tic = time.perf_counter()
            prepared = prepare(volume, config)
            seconds = time.perf_counter() - tic
            result = predict_prepared(model, prepared, person["sex"], float(person["age"]), device="cpu")
            masks[method] = prepared.input_brain_mask
            rows.append({
                "id": person["id"], "age": float(person["age"]), "sex": person["sex"], "method": method,
                "brain_ml": prepared.qc.brain_volume_ml, "t1_contrast": prepared.qc.t1_contrast,
                "predicted_age": result.predicted_age, "prepare_s": seconds, "flags": result.qc.flags,
            })
            if args.figures:
                from BrainAgeLib.explain.qc_figure import write_qc_figure

                Path(args.figures).mkdir(parents=True, exist_ok=True)
                write_qc_figure(volume, prepared.input_brain_mask, Path(args.figures) / f"{person['id']}_{method}.png",
                                f"{person['id']} ({method}): {prepared.qc.brain_volume_ml:.0f} ml")
        if len(masks) == 2:
            a, b = masks.values()
            for row in rows[-2:]:
                row["dice_between_methods"] = dice(a, b)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'id':<16}{'age':>6} {'method':<9}{'mask ml':>8}{'T1 c.':>7}{'pred':>7}{'prep s':>7}{'Dice':>6}  flags")
    for row in rows:
        print(f"{row['id']:<16}{row['age']:>6.1f} {row['method']:<9}{row['brain_ml'] or 0:>8.0f}"
              f"{row['t1_contrast'] or 0:>7.2f}{row['predicted_age']:>7.1f}{row['prepare_s']:>7.1f}"
              f"{row.get('dice_between_methods', float('nan')):>6.3f}  {' | '.join(row['flags']) or '-'}")
    for method in args.methods:
        chosen = [r for r in rows if r["method"] == method]
        errors = np.array([r["predicted_age"] - r["age"] for r in chosen])
        ages = np.array([r["age"] for r in chosen])
        predicted = np.array([r["predicted_age"] for r in chosen])
        r = float(np.corrcoef(ages, predicted)[0, 1]) if len(chosen) > 2 else float("nan")
        flagged = sum(bool(r_["flags"]) for r_ in chosen)
        print(f"{method}: MAE {np.abs(errors).mean():.1f} y, mean error {errors.mean():+.1f} y, r {r:.2f}, "
              f"flagged {flagged}/{len(chosen)}, mask {min(x['brain_ml'] for x in chosen):.0f}-"
              f"{max(x['brain_ml'] for x in chosen):.0f} ml")


if __name__ == "__main__":
    main()
