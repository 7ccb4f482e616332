"""``brainage evaluate PREDICTIONS.csv``: accuracy metrics, bias correction and plots of predictions."""
from __future__ import annotations

import argparse

from ._common import writable_folder

COMMAND = "evaluate"
HELP = "metrics (MAE with bootstrap CI, RMSE, r, rho, R^2, per decade/sex), bias correction and plots"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("predictions", metavar="PREDICTIONS.csv",
                        help="table with age, predicted_age, sex and optional split/id columns")
    parser.add_argument("--out", metavar="DIR",
                        help="write metrics.json, scatter.png and bland_altman.png here (created)")
    parser.add_argument("--reference-fraction", type=float, default=0.3, metavar="F",
                        help="fraction of rows the bias correction is fitted on when no row's split is "
                             "reference/val (default 0.3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the reference draw and the bootstrap")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _line(name: str, metrics) -> str:
    ci = metrics.get("mae_ci95")
    r, rho, r2 = metrics.get("pearson_r"), metrics.get("spearman_rho"), metrics.get("r2")
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    return (f"{name:<26} n={metrics['n']:<5} MAE {metrics['mae']:.2f} y"
            + (f" (95% CI {ci[0]:.2f}-{ci[1]:.2f})" if ci else "")
            + f", RMSE {metrics['rmse']:.2f}, mean error {metrics['mean_error']:+.2f}, "
            f"r {fmt(r, '.3f')}, rho {fmt(rho, '.3f')}, R^2 {fmt(r2, '.3f')}")


def run(args: argparse.Namespace) -> int:
    import json

    from ..cohort.evaluate import evaluate_predictions

    if args.out:
        writable_folder(args.out)
    report = evaluate_predictions(args.predictions, args.out, reference_fraction=args.reference_fraction,
                                  seed=args.seed)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    for note in report.notes:
        print(f"NOTE: {note}")
    if report.skipped:
        print(f"left out {len(report.skipped)} row(s): " + "; ".join(report.skipped[:5])
              + (" ..." if len(report.skipped) > 5 else ""))
    print(_line("all rows", report.all))
    print(f"reference split: {report.reference['n']} rows ({report.reference['chosen_by']})")
    print(_line("evaluated rows", report.evaluated))
    if report.corrected is None:  # the fit was refused: say why, where its figures would be
        print(f"  {report.reference.get('note', 'no bias correction')}")
    else:
        print(_line("  bias-corrected", report.corrected))
        c = report.gap_age_correlation
        fmt = lambda v: "n/a" if v is None else f"{v:+.3f}"  # noqa: E731
        print(f"  correlation of the gap with age: {fmt(c['uncorrected'])} before, {fmt(c['corrected'])} after")
    decades = ", ".join(f"{k}: {v['mae']:.2f} (n={v['n']})" for k, v in report.all["per_decade"].items())
    print(f"MAE by decade: {decades}")
    if "per_sex" in report.all:
        print("MAE by sex: " + ", ".join(f"{k}: {v['mae']:.2f} (n={v['n']})" for k, v in report.all["per_sex"].items()))
    for name, path in report.files.items():
        print(f"{name}: {path}")
    return 0
