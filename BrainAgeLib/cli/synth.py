"""``brainage synth``: write a cohort of synthetic ageing phantoms (images, ageing maps, CSV)."""
from __future__ import annotations

import argparse

from ._common import writable_folder

COMMAND = "synth"
HELP = "make synthetic T1 heads of known age and sex from the MNI152 template (cohort.csv + NIfTI)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, required=True, metavar="N", help="number of phantoms")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created; reruns resume)")
    parser.add_argument("--seed", type=int, required=True, metavar="S",
                        help="cohort seed: the same seed gives bit-identical heads")
    parser.add_argument("--spacing", type=float, nargs="+", default=[1.0, 1.5], metavar="MM",
                        help="voxel size in mm, one value, or LOW HIGH for a uniform range (default 1.0 1.5)")
    parser.add_argument("--age-range", type=float, nargs=2, default=[20.0, 90.0], metavar=("LOW", "HIGH"),
                        help="ages are uniform in this range, years (default 20 90)")
    parser.add_argument("--skull-fraction", type=float, default=0.5, metavar="F",
                        help="fraction of heads with a synthetic skull and scalp (default 0.5)")
    parser.add_argument("--workers", type=int, default=1, metavar="W",
                        help="processes making phantoms in parallel (default 1)")
    parser.add_argument("--sulcal-csf", type=float, default=0.0, metavar="F",
                        help="the most grey matter (fraction, up to 0.2) each phantom turns into sulcal CSF "
                             "whatever its age, drawn per phantom (default 0: the MNI152 template's near-closed "
                             "sulci; real young adults have more CSF, see scripts/phantom_cues.py)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..synth.phantoms import SynthError, make_cohort

    if len(args.spacing) not in (1, 2):
        raise SynthError("--spacing takes one value or a LOW HIGH range (mm)")
    spacing = args.spacing[0] if len(args.spacing) == 1 else tuple(args.spacing)
    writable_folder(args.out)
    path = make_cohort(args.n, args.out, args.seed, age_range=tuple(args.age_range), spacing=spacing,
                       skull_fraction=args.skull_fraction, workers=args.workers, progress=not args.no_progress,
                       sulcal_csf=args.sulcal_csf)
    print(f"wrote {args.n} phantoms; cohort table: {path}")
    return 0
