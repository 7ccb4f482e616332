"""The ``brainage`` command line: one module per sub-command (``predict``, ``batch``, ``train``, ...),
shared argument handling in ``_common``.

Each sub-command lives in its own module in this package and provides ``COMMAND`` (its name),
``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``. Modules keep heavy
imports (torch, SimpleITK) inside ``run`` so ``brainage --help`` stays fast.
Errors BrainAge raises on purpose (``BrainAgeError``) become one line on stderr and exit code 2;
an operating-system error (``OSError``: disk full, permission denied) one line and exit code 1.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from typing import List, Optional

from .. import __version__
from ..errors import BrainAgeError

EXIT_BAD_INPUT = 2
EXIT_SYSTEM_ERROR = 1


def _command_modules():
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "COMMAND") and hasattr(module, "run"):
            yield module


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="brainage",
        description="Brain age from a T1-weighted MRI with the BrainRotViT model.",
    )
    parser.add_argument("--version", action="version", version=f"brainage {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in _command_modules():
        cmd = sub.add_parser(module.COMMAND, help=module.HELP, description=module.HELP)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except BrainAgeError as error:
        print(f"brainage {args.command}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as error:
        # the system refused a read or write we did not foresee (a full disk, a file that
        # vanished, permissions): one line naming the file, not a traceback
        where = f"{error.filename}: " if error.filename else ""
        print(f"brainage {args.command}: error: {where}{error.strerror or error}", file=sys.stderr)
        return EXIT_SYSTEM_ERROR
    except KeyboardInterrupt:
        print(f"brainage {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
