"""``brainage calibrate CONTROLS --model M --out M_site.safetensors``: calibrate a model on a
site's healthy controls without retraining (``BrainAgeLib.cohort.calibrate``).

Runs the model on every control (resumable: the batch run lives in ``--work``, default
``<out stem>_calibration/`` beside ``--out``), fits the de Lange & Cole bias correction and the
split-conformal prediction intervals on them, and writes a checkpoint with the same weights and
the new calibration in its card. Refuses fewer than 20 controls with an age or an age span under
10 years (exit code 2, naming the cohort).
"""
from __future__ import annotations

import argparse
import json

from ._common import check_device, check_writable_folder

COMMAND = "calibrate"
HELP = "calibrate a model on a site's healthy controls (bias correction + prediction intervals), same weights"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..presets import PRECISIONS

    parser.add_argument("controls", metavar="CONTROLS",
                        help="healthy controls with ages: cohort table (CSV/TSV), BIDS dataset folder or "
                             "participants.tsv")
    parser.add_argument("--model", default="demo", metavar="NAME|PATH",
                        help="registered model name or .safetensors checkpoint to calibrate (default: demo)")
    parser.add_argument("--out", required=True, metavar="FILE.safetensors",
                        help="the calibrated checkpoint to write (same weights, new calibration)")
    parser.add_argument("--work", default=None, metavar="DIR",
                        help="folder of the controls' batch run (predictions.csv; rerunning resumes); "
                             "default: <out stem>_calibration/ beside --out")
    parser.add_argument("--level", type=float, default=0.9,
                        help="the prediction intervals' default level (default 0.9)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda, cuda:N")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS, help="ViT autocast precision")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="preprocessing processes (as brainage batch; 0: all in one process)")
    parser.add_argument("--retry-failed", action="store_true", help="try the controls that failed before again")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..cohort.calibrate import calibrate_model, check_controls, default_work_dir
    from ..cohort.batch import cohort_subjects
    from ..errors import BrainAgeError

    if not 0.0 < args.level < 1.0:
        raise BrainAgeError(f"--level must be a probability in (0, 1), got {args.level}")
    subjects = cohort_subjects(args.controls)  # a bad table or too few controls fail before the model loads
    check_controls([_age(s) for s in subjects], args.controls)
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise BrainAgeError(f"{out}: the calibrated checkpoint's name must end in .safetensors")
    check_writable_folder(out.parent if str(out.parent) else ".")
    check_device(args.device)
    work = Path(args.work) if args.work else default_work_dir(out)
    check_writable_folder(work, "--work")
    run_ = calibrate_model(args.controls, args.model, out,
                           work_dir=work, level=args.level, device=args.device, workers=args.workers,
                           retry_failed=args.retry_failed, precision=args.precision)
    if args.json:
        print(json.dumps(run_.to_dict(), indent=2))
        return 0
    c, s, cohort = run_.bias_correction, run_.calibration.summary(), run_.cohort_summary
    widths = ", ".join("n/a" if w is None else f"+-{w:.1f}" for w in s["half_widths"])
    print(f"Calibrated on {cohort['n']} controls ({cohort['n_female']} F, {cohort['n_male']} M), ages "
          f"{cohort['age_range'][0]:g}-{cohort['age_range'][1]:g}"
          + (f"; {run_.n_failed} failed (see {run_.work_dir / 'predictions.csv'})" if run_.n_failed else ""))
    print(f"Bias correction (de Lange & Cole): slope {c.slope:+.3f}, intercept {c.intercept:+.2f} years")
    print(f"Prediction intervals ({s['level'] * 100:g}%): {len(s['half_widths'])} band(s) of predicted age, "
          f"half-widths {widths} years; gap SD {s['gap_sd']:.2f} years")
    print(f"Weights unchanged (sha256 {run_.weights_sha256})")
    print(f"Wrote {run_.checkpoint}")
    return 0


def _age(subject):
    try:
        return float(subject.age)
    except (TypeError, ValueError):
        return None
