"""``brainage predict``: brain age of one T1-weighted MRI.

Prints a short summary (or, with ``--json``, one JSON object with the keys of
``Result.to_dict()`` plus the input and output file names) and writes
``OUT/<input stem>_brainage.json``; with ``--explain`` also the attention map and its
labelmap, colour table, PNG montage and sidecar (``explain_outputs``); with ``--report`` a
self-contained HTML report (``BrainAgeLib.report.write_subject_report``). A progress bar is shown
only when stderr is a terminal.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Dict

from ._common import add_model_arguments, check_device, check_writable_folder, load_model_from_args

COMMAND = "predict"
HELP = "estimate the brain age of one T1-weighted MRI"
#: Exit status of ``--strict-qc`` when the input has a QC flag.
STRICT_QC_EXIT = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="INPUT",
                        help="T1-weighted MRI: NIfTI, NRRD, MetaImage, MGH or a DICOM series folder")
    parser.add_argument("--sex", default=None,
                        help="F, M (also female/male) or unknown (the mean of both predictions); default: "
                             "a DICOM series' PatientSex, else unknown")
    parser.add_argument("--age", type=float, default=None, metavar="YEARS",
                        help="chronological age in years; gives the brain-age gap (default: a DICOM "
                             "series' PatientAge)")
    add_model_arguments(parser)
    parser.add_argument("--explain", action="store_true",
                        help="also compute and write the 3D attention map (on the input's grid)")
    parser.add_argument("--explain-format", default="nii.gz", choices=("nii.gz", "nii", "nrrd"),
                        help="file format of the attention map and its labelmap (default nii.gz)")
    parser.add_argument("--explain-method", default=None, choices=("paper", "relevance"),
                        help="how the map is made (implies --explain): paper (default) = the paper's fused map, "
                             "where the ViT looked; relevance = gradient-weighted attention relevance from the "
                             "predicted age, which the whole model moves (README: 'How far to trust a map')")
    parser.add_argument("--qc", action="store_true",
                        help="also write the QC picture: the brain mask's outline over the input (<stem>_qc.png; "
                             "--explain writes it too)")
    parser.add_argument("--strict-qc", action="store_true",
                        help="exit with code 4 when the input has a QC flag (the results are still written)")
    parser.add_argument("--report", action="store_true",
                        help="also write a self-contained HTML report (<stem>_report.html): numbers with interval "
                             "and gap z, the scan against the model's reference set, QC, attention when explained, "
                             "the model card")
    parser.add_argument("--out", default=".", metavar="DIR", help="folder for the output files (default: .)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")


def run(args: argparse.Namespace) -> int:
    import time

    from ..atomic_files import write_json_atomic
    from ..demographics import check_age, with_header_defaults
    from ..errors import InvalidVolumeError
    from ..io import check_image_path, image_stem, load_volume
    from ..sex import parse_sex

    if args.explain_method is not None:
        args.explain = True
    explain = (args.explain_method or "paper") if args.explain else False
    # Bad input fails before torch is imported (seconds) and before anything is written.
    given_sex = None if args.sex is None else parse_sex(args.sex)
    given_age = check_age(args.age)
    source = check_image_path(args.input)
    out_dir = check_writable_folder(args.out)
    tic = time.perf_counter()
    notes: list = []
    header: dict = {}
    volume = load_volume(source, notes=notes, dicom_header=header)
    load_seconds = time.perf_counter() - tic
    age, sex, header_notes = with_header_defaults(given_age, given_sex, header)
    check_device(args.device)
    model = load_model_from_args(args)
    from ..inference import predict

    with _progress_bar() as progress:
        try:
            result = predict(model, volume, sex, age=age, explain=explain, device=args.device,
                                   progress=progress, precision=args.precision)
        except InvalidVolumeError as error:  # preprocessing found the image unusable: name the file
            if error.path is None:
                raise InvalidVolumeError(error.problem, source) from None
            raise
    result.timings = {"load": load_seconds, **result.timings}
    result.warnings = notes + header_notes + list(result.warnings)

    stem = image_stem(source)
    out_dir.mkdir(parents=True, exist_ok=True)  # made only now that there is something to write
    outputs: Dict[str, str] = {}
    if args.explain:
        from ..explain.outputs import write_explanation_outputs

        written = write_explanation_outputs(result, out_dir, stem, args.explain_format, volume=volume,
                                            input_path=source)
        outputs.update({key: str(path) for key, path in written.items()})
    if args.qc or args.explain:
        from ..explain.qc_figure import write_result_qc_figure

        outputs["qc_figure"] = str(write_result_qc_figure(result, volume, out_dir, stem))
    if args.report:
        from ..report.subject import write_subject_report

        montage = outputs.get("montage")
        outputs["report"] = str(write_subject_report(
            result, out_dir / f"{stem}_report.html", model=model, volume=volume, subject=stem,
            qc_picture=outputs.get("qc_figure"), montage=montage))
    report = {**result.to_dict(), "input": str(source), "model": _model_label(args), "outputs": outputs}
    result_path = out_dir / f"{stem}_brainage.json"
    outputs["result"] = str(result_path)
    write_json_atomic(result_path, report)

    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(result.summary())
        print(f"Results: {result_path}")
        if args.explain:
            print(f"Attention map: {outputs['attention']}")
            print(f"Labelmap and colour table: {outputs['labelmap']}, {outputs['color_table']}")
            print(f"Montage: {outputs['montage']}")
        if "qc_figure" in outputs:
            print(f"QC picture: {outputs['qc_figure']}")
        if "report" in outputs:
            print(f"Report: {outputs['report']}")
    if args.strict_qc and not result.qc.ok:
        problems = result.qc.flags if result.qc.measured else ["quality control did not run"]
        print(f"error: {source}: {len(problems)} QC flag(s) (--strict-qc): " + "; ".join(problems), file=sys.stderr)
        return STRICT_QC_EXIT
    return 0


def _model_label(args: argparse.Namespace) -> str:
    return f"preset:{args.preset} (random weights)" if args.preset else (args.model or "demo")


class _progress_bar:
    """A tqdm bar on stderr when it is a terminal; the callback predict() reports to."""

    def __enter__(self):
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=100, file=sys.stderr, unit="%", leave=False,
                            bar_format="{l_bar}{bar}| {elapsed}")
        return self if self.bar is not None else None

    def __call__(self, fraction: float, message: str) -> None:
        self.bar.set_description_str(message)
        self.bar.update(int(round(100 * fraction)) - self.bar.n)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
