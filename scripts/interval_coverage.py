"""Coverage and width of a model's prediction intervals on phantoms it never saw.

    python scripts/interval_coverage.py [--n 96] [--work build/demo_calibration] [--model demo]

Regenerates the demo cohort's held-out test phantoms (``scripts/demo_split_phantoms.py test``;
neither trained nor calibrated on: the intervals come from the validation split), runs the model
on them (a resumable batch run in WORK/test_run; about 10 s a phantom on 2 cores) and prints, at
the calibration's level and overall and per band of predicted age, the fraction of phantoms whose
chronological age lies inside the interval and the interval's mean width. ``--json`` prints it as
one object.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from demo_split_phantoms import write_split  # noqa: E402

from BrainAgeLib.cohort.batch import run_batch  # noqa: E402
from BrainAgeLib.model.checkpoint import load_model  # noqa: E402


def coverage(calibration, ages, predicted, level=None):
    """(fraction inside, mean width in years, n) of the intervals at ``level``."""
    intervals = [calibration.interval(p, level) for p in predicted]
    inside = [lo <= a <= hi for a, (lo, hi) in zip(ages, intervals)]
    return float(np.mean(inside)), float(np.mean([hi - lo for lo, hi in intervals])), len(inside)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--n", type=int, default=0, help="evenly spaced subset of the 96 test phantoms (0: all)")
    parser.add_argument("--work", type=Path, default=REPO / "build" / "demo_calibration")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--record", action="store_true",
                        help="write the phantoms' ages and predictions to Resources/Models/brainage_demo_interval_check.json "
                             "(Testing/test_demo_intervals.py checks the card's intervals against them)")
    parser.add_argument("--card", action="store_true",
                        help="add the coverage line to Resources/Models/brainage_demo.md's interval section")
    args = parser.parse_args()
    model = load_model(args.model)
    calibration = model.calibration
    if calibration is None:
        raise SystemExit(f"model {args.model!r} is not calibrated")
    cohort = write_split("test", args.work / "test", args.n)
    ids = {line.split(",")[0] for line in cohort.read_text(encoding="utf-8").splitlines()[1:]}
    summary = run_batch(cohort, args.work / "test_run", model=model, workers=args.workers, device="cpu")
    rows = [r for r in summary.rows if r.ok and r.id in ids]
    ages = np.array([r.chronological_age for r in rows])
    predicted = np.array([r.predicted_age for r in rows])
    report = {"model": model.name, "level": calibration.level, "n_reference": calibration.n_reference}
    report["overall"] = dict(zip(("coverage", "mean_width", "n"), coverage(calibration, ages, predicted)))
    bands = np.array([calibration.band_of(p) for p in predicted])
    edges = [-np.inf, *calibration.band_edges, np.inf]
    report["bands"] = [{"predicted_from": edges[b], "predicted_to": edges[b + 1],
                        **dict(zip(("coverage", "mean_width", "n"),
                                   coverage(calibration, ages[bands == b], predicted[bands == b])))}
                       for b in range(len(edges) - 1) if np.any(bands == b)]
    report["levels"] = {f"{lv:g}": dict(zip(("coverage", "mean_width", "n"), coverage(calibration, ages, predicted, lv)))
                        for lv in (0.5, 0.8, 0.9, 0.95) if calibration.half_width(50.0, lv) is not None}
    o = report["overall"]
    if args.record:
        record = [{"id": r.id, "age": r.chronological_age, "sex": r.sex, "predicted_age": round(r.predicted_age, 4)}
                  for r in rows]
        (REPO / "Resources" / "Models" / "brainage_demo_interval_check.json").write_text(
            json.dumps({"what": "the demo's held-out test phantoms (scripts/demo_split_phantoms.py test) and the "
                                "ages the shipped model predicts for them with the default preprocessing",
                        "command": "python scripts/interval_coverage.py --record", "phantoms": record}, indent=1),
            encoding="utf-8")
    if args.card:
        card_path = REPO / "Resources" / "Models" / "brainage_demo.md"
        card = card_path.read_text(encoding="utf-8")
        line = (f"On the {o['n']} held-out test phantoms (`python scripts/interval_coverage.py`) the 90% intervals "
                f"held the chronological age of {o['coverage']:.1%}, mean width {o['mean_width']:.1f} years.\n")
        start = card.find("## Prediction intervals")
        end = card.find("\n## ", start + 5)
        section = card[start:end + 1]
        section = "".join(l for l in section.splitlines(keepends=True) if not l.startswith("On the ") or
                          "interval_coverage" not in l)
        card_path.write_text(card[:start] + section.rstrip("\n") + "\n" + line + "\n" + card[end + 1:], encoding="utf-8")
    if args.json:
        print(json.dumps(report, indent=2, default=float))
        return
    print(f"{model.name}: {o['n']} held-out phantoms, {calibration.level:.0%} intervals from {calibration.n_reference} "
          f"validation phantoms: coverage {o['coverage']:.1%}, mean width {o['mean_width']:.1f} years")
    for band in report["bands"]:
        print(f"  predicted {band['predicted_from']:.1f}-{band['predicted_to']:.1f}: n {band['n']}, coverage "
              f"{band['coverage']:.1%}, mean width {band['mean_width']:.1f} years")
    for level, values in report["levels"].items():
        print(f"  level {level}: coverage {values['coverage']:.1%}, mean width {values['mean_width']:.1f} years")


if __name__ == "__main__":
    main()
