"""Pieces the sub-commands share (a leading underscore keeps this module out of the command list)."""
from __future__ import annotations

import argparse
import sys


def load_model_from_args(args: argparse.Namespace):
    """The model named by ``--model`` (default: the bundled demo) or, loudly, ``--preset``'s random weights."""
    if args.preset:
        from ..model import build_model

        print(f"WARNING: --preset {args.preset} builds a model with RANDOM, UNTRAINED weights; its "
              "predictions mean nothing. Use it only to test the software.", file=sys.stderr)
        return build_model(args.preset, seed=0)
    from ..checkpoint import load_model

    return load_model(args.model or "demo")
