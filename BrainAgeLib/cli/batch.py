"""``brainage batch COHORT --out DIR``: brain age of every subject of a cohort, resumable.

COHORT is a CSV/TSV table (image path, sex, optional age, id and site), a BIDS dataset folder
(or its participants.tsv) or a folder of images. Rows go to ``DIR/predictions.csv`` as each
subject finishes (see ``BrainAgeLib.cohort.predictions_csv``); running the same command again skips
the finished subjects. At the end: done/failed counts and, when ages are given, MAE and
brain-age-gap statistics with the plots of ``brainage evaluate`` in ``DIR/evaluation``.
Under ``torchrun`` every rank takes its share of the cohort and rank 0 prints the summary.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, Optional

from ..result import DEMO_DISCLAIMER
from ._common import add_model_arguments, check_device, check_writable_folder, load_model_from_args

#: Exit code when the run finished but no subject got an age (every row of predictions.csv is
#: an error). A run where only some subjects failed exits 0: their rows say why.
EXIT_ALL_FAILED = 3

COMMAND = "batch"
HELP = "estimate the brain age of every subject of a cohort (CSV/TSV, BIDS or image folder), resumable"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("cohort", metavar="COHORT",
                        help="cohort table (CSV/TSV with path, sex, optional age/id/site), BIDS dataset "
                             "folder or participants.tsv, or a folder of images")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder: predictions.csv (appended as subjects finish), attention "
                             "maps, evaluation plots")
    add_model_arguments(parser)
    parser.add_argument("--explain", action="store_true",
                        help="also write each subject's attention map files into DIR/attention/")
    parser.add_argument("--explain-format", default="nii.gz", choices=("nii.gz", "nii", "nrrd"),
                        help="file format of the attention maps (default nii.gz)")
    parser.add_argument("--explain-method", default=None, choices=("paper", "relevance"),
                        help="how the map is made (implies --explain): paper (default) = the paper's fused map, "
                             "where the ViT looked; relevance = gradient-weighted attention relevance from the "
                             "predicted age, which the whole model moves (README: 'How far to trust a map')")
    parser.add_argument("--qc", action="store_true",
                        help="also write each subject's QC picture (brain-mask outline over the input) to OUT/qc/")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="processes reading and preprocessing the next subjects while the model "
                             "runs (default: one per CPU core, at most 4; 0: all in one process)")
    parser.add_argument("--retry-failed", action="store_true",
                        help="on a resumed run, try the subjects whose row is an error again")
    parser.add_argument("--report", action="store_true",
                        help="also write HTML reports: OUT/report/index.html (sortable subject table, scatter, "
                             "Bland-Altman, gap by group/site) and each subject's in OUT/report/subjects/")
    parser.add_argument("--group-column", default="group", metavar="NAME",
                        help="cohort column whose values the report's gap-by-group plot uses (default: group)")
    parser.add_argument("--no-plots", action="store_true", help="skip the evaluation plots")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    parser.epilog = ("exit status: 0 when the run finished and at least one subject has an age (subjects "
                     "that failed have a row whose error column says why; rerun with --retry-failed); "
                     f"{EXIT_ALL_FAILED} when every subject failed; 2 for bad arguments or an unreadable cohort "
                     "or output folder; 130 when interrupted")


def run(args: argparse.Namespace) -> int:
    from ..cohort.batch import cohort_statistics, cohort_subjects, run_batch

    subjects = cohort_subjects(args.cohort)  # a bad table fails before the model loads
    check_device(args.device)
    check_writable_folder(args.out)  # made by run_batch once the model has loaded
    model = load_model_from_args(args)
    with _progress_bar(len(subjects)) as progress:
        explain = (args.explain_method or "paper") if (args.explain or args.explain_method) else False
        summary = run_batch(subjects, args.out, model=model, explain=explain, device=args.device,
                            workers=args.workers, progress=progress, retry_failed=args.retry_failed,
                            explain_format=args.explain_format, precision=args.precision, qc=args.qc,
                            report=args.report)
    if summary.rank != 0:
        return 0
    statistics = cohort_statistics(summary.rows, summary.out_dir, plots=not args.no_plots)
    if args.report:
        from ..report.cohort_report import write_batch_report

        groups = {str(s.id): s.extra[args.group_column] for s in subjects
                  if (s.extra or {}).get(args.group_column)}
        index = write_batch_report(summary.out_dir, summary.rows, model=model, groups=groups,
                                   group_label=args.group_column)
        (statistics if statistics is not None else {}).setdefault("files", {})["report"] = str(index)
        if statistics is None:
            print(f"report: {index}", file=sys.stdout if not args.json else sys.stderr)
    if args.json:
        print(json.dumps({**summary.to_dict(), "statistics": statistics}, indent=2))
    else:
        print(summary_text(summary, statistics))
    return EXIT_ALL_FAILED if summary.n_failed_total and not summary.n_succeeded_total else 0


def summary_text(summary: Any, statistics: Optional[Dict[str, Any]]) -> str:
    """What ``brainage batch`` prints after a run (without ``--json``): counts and speed, the
    cohort's predictions and errors, subjects left out, QC flags, failures and the accuracy."""
    lines = [
        f"Done: {summary.n_done} succeeded, {summary.n_failed} failed"
        + (f", {summary.n_skipped} already finished before" if summary.n_skipped else "")
        + f" in {summary.seconds:.1f} s ({summary.volumes_per_minute:.1f} volumes/minute, "
          f"{summary.world_size} process{'es' if summary.world_size > 1 else ''}, {summary.workers} "
          f"preprocessing worker{'s' if summary.workers != 1 else ''} each, {summary.device})",
        f"Cohort: {summary.n_subjects} subjects; predictions.csv holds {summary.n_succeeded_total} "
        f"predictions and {summary.n_failed_total} errors",
    ]
    if summary.excluded:  # the dataset's subjects that are not in the cohort (e.g. BIDS without a T1w)
        lines.append(f"Left out of the cohort: {len(summary.excluded)} subject(s) or session(s) of the dataset")
        lines.extend(f"  skipped {entry}" for entry in summary.excluded[:10])
        if len(summary.excluded) > 10:
            lines.append(f"  ... and {len(summary.excluded) - 10} more (--json lists them all)")
    flagged = [row for row in summary.rows if row.ok and row.qc_flags]
    if flagged:  # still predicted, and in the statistics below: say which
        lines.append(f"QC flags on {len(flagged)} of {summary.n_succeeded_total} predictions (the qc_flags column):")
        lines.extend(f"  {row.id}: {' | '.join(row.qc_flags)}" for row in flagged[:10])
        if len(flagged) > 10:
            lines.append(f"  ... and {len(flagged) - 10} more")
    failed = [row for row in summary.rows if not row.ok]
    for row in failed[:10]:
        lines.append(f"  failed {row.id}: {row.error}")
    if len(failed) > 10:
        lines.append(f"  ... and {len(failed) - 10} more (the error column of predictions.csv)")
    if statistics is not None:
        m = statistics["metrics"]
        ci = m.get("mae_ci95")
        r = m.get("pearson_r")
        lines.append(
            f"Accuracy ({statistics['n']} subjects with an age): MAE {m['mae']:.2f} years"
            + (f" (95% CI {ci[0]:.2f}-{ci[1]:.2f})" if ci else "")
            + f", RMSE {m['rmse']:.2f}" + ("" if r is None else f", r {r:.3f}"))
        bag = statistics["bag"]
        lines.append(f"Brain-age gap: mean {bag['mean']:+.2f} years, SD {bag['sd']:.2f}")
        covered = [r.interval_low <= r.chronological_age <= r.interval_high for r in summary.rows
                   if r.ok and r.chronological_age is not None and r.interval_low is not None and r.interval_high is not None]
        if covered:   # for healthy controls about the interval's level; far below it: calibrate for this site
            level = next(r.interval_level for r in summary.rows if r.interval_level is not None)
            lines.append(f"Ages inside their {level:.0%} prediction interval: {sum(covered)} of {len(covered)} "
                         f"({sum(covered) / len(covered):.0%})")
        if statistics["corrected_bag"] is not None:
            cb = statistics["corrected_bag"]
            lines.append(f"Bias-corrected gap (model's coefficients): mean {cb['mean']:+.2f} years, SD {cb['sd']:.2f}")
        evaluation = statistics.get("evaluation") or {}
        if evaluation.get("corrected"):
            c = evaluation["corrected"]
            lines.append(
                f"Bias-corrected on this cohort (de Lange & Cole, fitted on {evaluation['reference']['n']} "
                f"reference subjects): MAE {c['mae']:.2f} years, mean gap {c['mean_error']:+.2f}")
        elif evaluation:  # the fit was refused: say why instead of a corrected MAE
            lines.append("De Lange & Cole fit on this cohort: "
                         + evaluation["reference"].get("note", "no bias correction"))
        for name, path in statistics.get("files", {}).items():
            lines.append(f"{name}: {path}")
    elif summary.n_succeeded_total:
        lines.append("No accuracy statistics: the cohort gives fewer than two ages")
    lines.append(f"Model: {summary.model_name}")
    notes = list((statistics or {}).get("notes", []))  # what metrics.json says the reader must know
    if summary.model_is_demo and DEMO_DISCLAIMER not in notes:
        notes.insert(0, DEMO_DISCLAIMER)
    lines.extend(f"NOTE: {note}" for note in notes)
    lines.append(f"Results: {summary.predictions_csv}")
    return "\n".join(lines)


class _progress_bar:
    """A tqdm bar (percent of this run's subjects) on a terminal; nothing otherwise."""

    def __init__(self, total: int):
        self.total = total
        self.bar = None

    def __enter__(self):
        if not sys.stderr.isatty():
            return None
        from tqdm import tqdm

        self.bar = tqdm(total=100, file=sys.stderr, bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}")

        def progress(fraction: float, message: str) -> None:
            self.bar.update(int(round(100 * fraction)) - self.bar.n)
            self.bar.set_postfix_str(message[:60])

        return progress

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
