"""The Slicer module's background worker: one prediction (or one batch) in its own process.

Run as ``PythonSlicer -m BrainAgeLib.slicer_worker ...`` by the module (the argument lists come
from ``worker_protocol.worker_command`` / ``batch_command``), or with any Python::

    python -m BrainAgeLib.slicer_worker predict input.nii.gz --out DIR --sex F --age 67 --model demo
    python -m BrainAgeLib.slicer_worker batch cohort.csv --out DIR --model demo --explain
    python -m BrainAgeLib.slicer_worker download brainrotvit
    python -m BrainAgeLib.slicer_worker report DIR --out report.html --model demo

``predict`` writes into DIR (which must exist), each file atomically: the attention map, its
labelmap and colour table, the montage and sidecar (``explain.outputs.write_explanation_outputs``),
the brain mask, the QC picture (``explain.qc_figure``), and last the result file
(``worker_protocol.RESULT_FILE``: ``Result.to_dict()`` and the output file names). ``download``
fetches a registered model into the cache (the published BrainRotViT: its 17 archive volumes, each
verified, then the import); a cancelled download resumes where it stopped. Progress, the final
line (for ``download``: the model's path; for ``report``, which writes the HTML report of a finished
``predict`` folder: the report's path) and the exit codes follow ``worker_protocol``. The worker runs in its own process so
Slicer stays responsive, and Cancel can stop it at any point by killing it.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from importlib.util import find_spec
from pathlib import Path
from typing import List, Optional

from .errors import BrainAgeError
from .worker_protocol import (BRAIN_MASK_FILE, EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, INPUT_FILE, OUTPUT_STEM,
                              RESULT_FILE, ProgressWriter, load_worker_result)

#: Where the steps of ``predict`` sit in the progress bar (start, span), as fractions of the whole.
LOAD_SPAN = (0.0, 0.05)
PREDICT_SPAN = (0.05, 0.80)
WRITE_SPAN = (0.85, 0.15)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m BrainAgeLib.slicer_worker",
                                     description="BrainAge's background worker for the Slicer module")
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("predict", help="brain age of one volume file, with its attention map")
    one.add_argument("input", help="the volume file (NIfTI) the module wrote")
    one.add_argument("--out", required=True, help="existing folder for the output files")
    one.add_argument("--sex", default="unknown", help="F, M or unknown")
    one.add_argument("--age", type=float, default=None, help="chronological age in years")
    one.add_argument("--model", default="demo", help="registered model name or checkpoint path")
    one.add_argument("--device", default="auto", help="auto, cpu or cuda")
    one.add_argument("--no-explain", dest="explain", action="store_false", help="no attention map")
    one.add_argument("--explain-method", default="paper",
                     help="the map's method (explain.methods.METHODS: paper, relevance); checked by predict")
    one.add_argument("--levels", type=int, default=None, help="levels of the attention labelmap")
    many = sub.add_parser("batch", help="a cohort into OUT/predictions.csv (cohort.batch.run_batch)")
    many.add_argument("cohort", nargs="+", help="a cohort table, a BIDS or image folder, or image files")
    many.add_argument("--out", required=True, help="output folder")
    many.add_argument("--model", default="demo")
    many.add_argument("--device", default="auto")
    many.add_argument("--explain", action="store_true")
    many.add_argument("--explain-method", default="paper", help="as for predict")
    report = sub.add_parser("report", help="the HTML report of a finished predict folder (BrainAgeLib.report)")
    report.add_argument("folder", help="the folder a predict run wrote (its result file and input)")
    report.add_argument("--out", required=True, help="the .html file to write")
    report.add_argument("--model", default="demo", help="the model the prediction used (its card and reference set)")
    report.add_argument("--subject", default="", help="a name for the report's title")
    fetch = sub.add_parser("download", help="fetch a registered model (e.g. brainrotvit) into the cache")
    fetch.add_argument("name", help="registered model name")
    fetch.add_argument("--cache-dir", default=None, help="model cache (default: $BRAINAGE_CACHE, else ~/.cache/brainage)")
    return parser


def run_predict(args: argparse.Namespace, progress: ProgressWriter) -> Path:
    """One prediction into ``args.out``; returns the result file."""
    from .atomic_files import write_json_atomic
    from .demographics import check_age
    from .sex import parse_sex

    sex, age = parse_sex(args.sex), check_age(args.age)  # bad input fails before torch loads
    out_dir = Path(args.out)
    if not out_dir.is_dir():
        raise BrainAgeError(f"{out_dir}: output folder does not exist")
    load = progress.part(*LOAD_SPAN)
    load(0.0, "Loading the input volume")
    from .io import load_volume

    volume = load_volume(args.input)
    load(0.3, f"Loading model {args.model}")
    from .model.checkpoint import load_model

    model = load_model(args.model, progress=lambda fraction, message: load(0.3 + 0.7 * fraction, message))
    from .inference import predict

    result = predict(model, volume, sex, age=age, explain=args.explain and args.explain_method, device=args.device,
                     progress=progress.part(*PREDICT_SPAN))
    write = progress.part(*WRITE_SPAN)
    outputs = {}
    thresholds: List[float] = []
    figures = find_spec("matplotlib") is not None  # Slicer does not install it: no PNGs then, all else written
    if not figures:
        print("matplotlib is not installed: the montage and QC pictures are not drawn")
    if args.explain and result.attention is not None:
        write(0.0, "Writing the attention map and labelmap" + (" and montage" if figures else ""))
        from .explain.labelmap import attention_labelmap
        from .explain.outputs import write_explanation_outputs

        written = write_explanation_outputs(result, out_dir, OUTPUT_STEM, volume=volume, levels=args.levels,
                                            montage=figures)
        outputs.update({key: path.name for key, path in written.items()})
        labelmap = attention_labelmap(result, args.levels) if args.levels else attention_labelmap(result)
        thresholds = [float(t) for t in labelmap.thresholds]
    if result.brain_mask is not None:
        write(0.6, "Writing the brain mask and QC picture")
        from .explain.qc_figure import write_result_qc_figure
        from .io import save_volume

        outputs["brain_mask"] = save_volume(result.brain_mask, out_dir / BRAIN_MASK_FILE).name
        if figures:
            outputs["qc_figure"] = write_result_qc_figure(result, volume, out_dir, OUTPUT_STEM).name
    write(0.9, "Writing the result")
    result_path = write_json_atomic(out_dir / RESULT_FILE, {
        **result.to_dict(), "model": str(args.model), "attention_thresholds": thresholds, "outputs": outputs})
    progress(1.0, f"Predicted brain age {result.predicted_age:.1f} years")
    return result_path


def run_batch_command(args: argparse.Namespace, progress: ProgressWriter) -> Path:
    """``cohort.batch.run_batch`` with protocol progress; returns the predictions table."""
    from .cohort.batch import run_batch
    from .io import READ_EXTENSIONS

    progress(0.0, f"Loading model {args.model}")
    # one table or folder is a cohort; image files (one or more) are a list of subjects
    single = args.cohort[0] if len(args.cohort) == 1 else None
    is_image = single is not None and single.lower().endswith(READ_EXTENSIONS)
    cohort = single if single is not None and not is_image else list(args.cohort)
    summary = run_batch(cohort, args.out, model=args.model, explain=args.explain and args.explain_method,
                        device=args.device,
                        progress=progress)
    progress(1.0, f"Batch finished: {summary.n_done} done, {summary.n_failed} failed, {summary.n_skipped} skipped")
    return Path(args.out) / "predictions.csv"


def run_download(args: argparse.Namespace, progress: ProgressWriter) -> Path:
    """A registered model into the cache (nothing to do when it is there); returns its file."""
    from .model.checkpoint import resolve_checkpoint
    from .registry import REGISTRY, is_cached

    if args.name not in REGISTRY:
        raise BrainAgeError(f"unknown model {args.name!r} (registered: {', '.join(REGISTRY)})")
    if is_cached(args.name, args.cache_dir):
        progress(1.0, f"Model {args.name} is already downloaded")
    path = resolve_checkpoint(args.name, cache_dir=args.cache_dir, progress=progress)
    progress(1.0, f"Model {args.name} is ready: {path}")
    return path


def run_report(args: argparse.Namespace, progress: ProgressWriter) -> Path:
    """The subject report of a finished ``predict`` folder (Slicer's *Save report*); returns the HTML file."""
    from .io import load_volume
    from .report.subject import write_subject_report

    progress(0.1, "Reading the result")
    result, _ = load_worker_result(args.folder)
    progress(0.3, "Drawing the report")
    path = write_subject_report(result, args.out, model=args.model, volume=load_volume(Path(args.folder) / INPUT_FILE),
                                subject=args.subject)
    progress(1.0, f"Report written: {path}")
    return path


RUNNERS = {"predict": run_predict, "batch": run_batch_command, "download": run_download, "report": run_report}


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):  # a non-ASCII path must not stop the worker
        sys.stdout.reconfigure(errors="backslashreplace")
    progress = ProgressWriter()
    try:
        progress(0.0, "Starting the BrainAge worker")
        written = RUNNERS[args.command](args, progress)
    except BrainAgeError as error:
        progress.error(str(error))
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        progress.error("interrupted")
        return 130
    except Exception as error:  # shown in Slicer's console with its traceback, then as one line
        traceback.print_exc(file=sys.stdout)
        progress.error(f"{type(error).__name__}: {error}")
        return EXIT_FAILED
    progress.done(written if args.command in ("download", "report") else args.out)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
