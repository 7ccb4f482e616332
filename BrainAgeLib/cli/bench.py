"""``brainage bench``: time every stage of one prediction against the bare ViT forward pass."""
from __future__ import annotations

import argparse
import json
import sys

from ._common import positive_int

COMMAND = "bench"
HELP = "time each stage of a prediction (random weights, generated head) against the bare ViT"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..presets import PRECISIONS, PRESETS

    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help="model preset to time (default: paper; demo with --cohort)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda, cuda:N")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS, help="ViT autocast precision")
    parser.add_argument("--no-explain", dest="explain", action="store_false", help="skip the explanation stage")
    parser.add_argument("--explain-method", default="paper", choices=("paper", "relevance"),
                        help="the explanation to time (default paper)")
    parser.add_argument("--head", default=None, metavar="PATH",
                        help="time this T1 file instead of a generated head")
    parser.add_argument("--repeat", type=positive_int, default=1, metavar="N",
                        help="run the model stages N times and keep each one's fastest time (default: 1)")
    parser.add_argument("--cohort", type=positive_int, default=None, metavar="N",
                        help="instead: volumes/minute for N generated heads: one `brainage predict` command per "
                             "head, in-process predict calls and batch mode (BrainAgeLib.bench.cohort)")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="with --cohort: batch mode's preprocessing workers (default: as brainage batch, and "
                             "batch mode is timed with 1, 2, ... workers too, up to the cores given)")
    parser.add_argument("--no-cli-baseline", dest="cli_baseline", action="store_false",
                        help="with --cohort: skip timing one `brainage predict` command per head")
    parser.add_argument("--no-compare", dest="compare", action="store_false",
                        help="skip the authors'-style loop and the CPU precisions (timed by default)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from ..bench.single import run_benchmark

    verbose = not args.json and sys.stderr.isatty()
    if args.cohort is not None:
        from ..bench.cohort import run_cohort_benchmark, scaling_counts

        cohort = run_cohort_benchmark(
            args.cohort, preset=args.preset or "demo", device=args.device, workers=args.workers,
            precision=args.precision, repeats=args.repeat, cli_baseline=args.cli_baseline,
            scaling=scaling_counts() if args.workers is None else None,
            log=(lambda message: print(f"  ... {message}", file=sys.stderr)) if verbose else (lambda message: None))
        print(json.dumps(cohort.to_dict(), indent=2) if args.json else cohort.table())
        return 0
    result = run_benchmark(
        args.preset or "paper", device=args.device, precision=args.precision, explain=args.explain,
        repeats=args.repeat, head_file=args.head, explain_method=args.explain_method, compare=args.compare,
        log=(lambda message: print(f"  ... {message}", file=sys.stderr)) if verbose else (lambda message: None),
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.table())
    return 0
