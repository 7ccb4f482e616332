"""Pieces the sub-commands share (a leading underscore keeps this module out of the command list)."""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model | --preset, --device and --precision, as predict and batch take them."""
    from ..presets import PRECISIONS, PRESETS

    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", default=None, metavar="NAME|PATH",
                       help="registered model name or .safetensors checkpoint (default: demo)")
    which.add_argument("--preset", default=None, choices=sorted(PRESETS),
                       help="RANDOM UNTRAINED weights of a preset: for testing the software only")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda, cuda:N")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="ViT autocast precision (default auto: fp16 on CUDA; on a CPU, bf16 only for a "
                             "checkpoint validated in bf16 and a CPU with native bf16, else fp32)")


def load_model_from_args(args: argparse.Namespace):
    """The model named by ``--model`` (default: the bundled demo) or, loudly, ``--preset``'s random weights."""
    if args.preset:
        from ..model import build_model

        print(f"WARNING: --preset {args.preset} builds a model with RANDOM, UNTRAINED weights; its "
              "predictions mean nothing. Use it only to test the software.", file=sys.stderr)
        return build_model(args.preset, seed=0)
    from ..model.checkpoint import load_model
    from ..registry import REGISTRY, is_cached

    name = args.model or "demo"
    if name in REGISTRY and not is_cached(name):  # first use: the download and import, with a progress bar
        with TerminalProgress() as progress:
            return load_model(name, progress=progress)
    return load_model(name)


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def writable_folder(path, option: str = "--out") -> Path:
    """Create the output folder ``path`` (with its parents) once :func:`check_writable_folder` passes."""
    folder = check_writable_folder(path, option)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def check_writable_folder(path, option: str = "--out") -> Path:
    """``path`` as a Path if it is, or can be made as, a folder this process can write in.

    Creates nothing and leaves nothing behind: the probe is a nameless temporary file in the
    folder or, for a folder still to be made, in its nearest existing parent (making a folder
    there needs the same permission). Called before any slow work, so a read-only or mistyped
    destination fails at once with a BrainAgeError naming the folder, not with a traceback after
    minutes of computing; the command makes the folder when it has something to write.
    """
    from ..errors import BrainAgeError

    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise BrainAgeError(f"{folder}: {option} must be a folder, not a file")
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    problem = "write in" if existing == folder.absolute() else "create"
    if not existing.is_dir():
        raise BrainAgeError(f"{folder}: cannot create the {option} folder ({existing} is a file)")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise BrainAgeError(f"{folder}: cannot {problem} the {option} folder ({error.strerror or error})") from None
    return folder


def check_device(device: str) -> None:
    """Fail now, with a clear message, if ``device`` (e.g. "cuda") is not usable here."""
    from ..devices import resolve_device

    resolve_device(device)


def report_warnings(caught, category: type = Warning) -> None:
    """Print the ``category`` warnings recorded by ``warnings.catch_warnings(record=True)`` to stderr
    as one ``WARNING:`` line each (repeats once); others go to ``warnings.showwarning`` as usual."""
    import warnings

    seen = set()
    for warning in caught:
        if not issubclass(warning.category, category):
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
            continue
        text = str(warning.message)
        if text not in seen:
            seen.add(text)
            print(f"WARNING: {text}", file=sys.stderr)


class TerminalProgress:
    """``progress(fraction, message)`` for the library: a tqdm bar on a terminal, else one line per step."""

    def __init__(self) -> None:
        self.bar = None
        self.message = ""

    def __enter__(self) -> "TerminalProgress":
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=1000, file=sys.stderr, bar_format="{l_bar}{bar}| {elapsed}<{remaining}")
        return self

    def __call__(self, fraction: float, message: str) -> None:
        if self.bar is not None:
            self.bar.n = int(round(1000 * fraction))
            self.bar.set_description_str(message, refresh=False)
            self.bar.refresh()
        elif message != self.message:
            print(f"[{100 * fraction:3.0f}%] {message}", file=sys.stderr)
        self.message = message

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
