"""``brainage cohort-maps``: mean attention over a batch run's subjects, overall and by age decade."""
from __future__ import annotations

import argparse

from ._common import writable_folder

COMMAND = "cohort-maps"
HELP = "average the attention maps of a batch run in MNI152 space, overall and by age decade"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folders", nargs="+", metavar="FOLDER",
                        help="output folder(s) of 'brainage batch --explain' or 'brainage predict --explain' "
                             "(searched recursively for *_attention.json)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the cohort maps (created)")
    parser.add_argument("--format", choices=("nii.gz", "nii", "nrrd"), default="nii.gz",
                        help="file format of the maps (default nii.gz)")
    parser.add_argument("--decade-width", type=int, default=10, metavar="YEARS",
                        help="width of the age groups in years (default 10)")
    parser.add_argument("--assume-template-space", action="store_true",
                        help="inputs without a stored registration are already in MNI152 space "
                             "(default: register them from the input images named in predictions.csv)")


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from ..explain.cohort_maps import cohort_attention_maps, read_batch_explanations, write_cohort_maps

    subjects = read_batch_explanations(args.folders)
    writable_folder(args.out)
    to_register = sum(s.input_to_template is None for s in subjects) if not args.assume_template_space else 0
    if to_register:
        print(f"{to_register} of {len(subjects)} subjects have no stored registration (skull-stripped inputs): "
              "registering them to MNI152 now", file=sys.stderr)
    maps = cohort_attention_maps(subjects, decade_width=args.decade_width,
                                 assume_template_space=args.assume_template_space)
    paths = write_cohort_maps(maps, Path(args.out), fmt=args.format)
    groups = ", ".join(f"{label}: {n}" for label, n in maps.counts.items() if label != "all")
    print(f"averaged {maps.counts['all']} subjects" + (f" ({groups})" if groups else ""))
    model, digest = maps.model.get("name") or "(unnamed)", maps.model.get("weights_sha256")
    print(f"model: {model}" + (f" (weights SHA-256 {digest[:12]})" if digest else ""))
    if maps.model.get("is_demo"):
        from ..result import DEMO_DISCLAIMER

        print(f"NOTE: {DEMO_DISCLAIMER}")
    for key, path in paths.items():
        print(f"{key}: {path}")
    return 0
