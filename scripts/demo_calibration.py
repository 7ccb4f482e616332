"""Give the bundled demo model its prediction intervals without touching its weights.

    python scripts/demo_calibration.py [--work build/demo_calibration]

Regenerates the demo's 96 validation phantoms (``scripts/demo_split_phantoms.py``: never trained
on), runs the shipped model on them as ``brainage calibrate`` does (a resumable batch run in
WORK/val_run; about 10 s a phantom on 2 cores), fits the split-conformal residuals and the gap SD on them (keeping the bias correction the demo
was trained with) and rewrites only the metadata of
``Resources/Models/brainage_demo.safetensors``: the weights digest is checked to be identical.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from card_sections import replace_section  # noqa: E402
from demo_split_phantoms import write_split  # noqa: E402

from BrainAgeLib.bias_correction import BiasCorrection  # noqa: E402
from BrainAgeLib.cohort.calibrate import calibrate_model  # noqa: E402
from BrainAgeLib.cohort.predictions_csv import read_predictions  # noqa: E402
from BrainAgeLib.conformal import ConformalCalibration  # noqa: E402
from BrainAgeLib.digests import weights_digest  # noqa: E402
from BrainAgeLib.model.card_rewrite import rewrite_card  # noqa: E402
from BrainAgeLib.model.checkpoint import read_metadata  # noqa: E402

MODEL = REPO / "Resources" / "Models" / "brainage_demo.safetensors"


def tensors_digest(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return weights_digest({key: handle.get_tensor(key) for key in handle.keys()})


CARD = REPO / "Resources" / "Models" / "brainage_demo.md"
SECTION = "## Prediction intervals"


def write_card_section(calibration, refitted) -> None:
    """Replace (or add) the model card's section on the intervals; ``interval_coverage.py
    --card`` adds the held-out coverage line to it."""
    s = calibration.summary()
    age, predicted = np.asarray(calibration.reference_age), np.asarray(calibration.reference_predicted)
    young = float(np.mean((predicted - age)[age < 40]))
    widths = ", ".join(f"+-{w:.1f}" for w in s["half_widths"])
    edges = [f"{e:.1f}" for e in s["band_edges"]]
    bands = ", ".join([f"below {edges[0]}", *(f"{a}-{b}" for a, b in zip(edges, edges[1:])),
                       f"above {edges[-1]}"]) if edges else "one band"
    text = f"""{SECTION}
Split-conformal 90% intervals (`BrainAgeLib/conformal.py`) from the shipped model's predictions, with
today's default preprocessing (deepbet), on the {s['n_reference']} validation phantoms (ages
{s['age_range'][0]:g}-{s['age_range'][1]:g}; never trained on; `python scripts/demo_calibration.py`, which
rewrote only this checkpoint's metadata: the weights digest is unchanged). Half-widths by band of predicted
age ({bands} years): {widths} years; the young phantoms, whose ages this model overestimates with deepbet
masks (mean gap {young:+.1f} years under 40), get the widest. Gap SD (for gap z) {s['gap_sd']:.2f} years, with the
bias correction above (refitted on these predictions it would be slope {refitted.slope:+.3f}, intercept
{refitted.intercept:+.2f}: the correction the model was trained with is kept).
"""
    replace_section(CARD, SECTION, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / "build" / "demo_calibration")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    before = tensors_digest(MODEL)
    cohort = write_split("val", args.work / "val")
    staged = args.work / "brainage_demo_calibrated.safetensors"
    run = calibrate_model(cohort, MODEL, staged, work_dir=args.work / "val_run", workers=args.workers, device="cpu")
    # the demo keeps the bias correction it was trained with (fitted on the same validation
    # phantoms, from training's cached slices): only the intervals and the gap SD are new
    shipped = read_metadata(MODEL)
    correction = BiasCorrection.from_dict(shipped["bias_correction"])
    rows = [r for r in read_predictions(run.work_dir / "predictions.csv") if r.ok]
    fitted = ConformalCalibration.fit([r.chronological_age for r in rows], [r.predicted_age for r in rows],
                                      correction, source=run.calibration.source)
    calibration = fitted.to_dict()
    calibration["source"] = {**calibration["source"], "cohort": "the demo's 96 validation phantoms (cohort seed 2026, "
                             "split seed 0; scripts/demo_split_phantoms.py val)",
                             "how": "scripts/demo_calibration.py: the shipped model run on them as brainage calibrate does"}
    rewrite_card(MODEL, MODEL, {"calibration": calibration})
    after = tensors_digest(MODEL)
    if after != before or read_metadata(MODEL)["weights_sha256"] != before:
        raise SystemExit(f"weights changed: {before} -> {after}")
    s = fitted.summary()
    write_card_section(fitted, run.bias_correction)
    print(f"demo model calibrated on {s['n_reference']} validation phantoms, ages {s['age_range']}; bands "
          f"{s['band_edges']}, {s['level']:.0%} half-widths {[round(w, 2) for w in s['half_widths']]} years, "
          f"gap SD {s['gap_sd']:.2f} (with the shipped bias correction; refitted on these predictions it would be "
          f"slope {run.bias_correction.slope:+.3f}, intercept {run.bias_correction.intercept:+.2f}); weights sha256 unchanged ({after})")


if __name__ == "__main__":
    main()
