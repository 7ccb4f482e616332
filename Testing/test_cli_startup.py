"""`brainage --help` stays quick: listing the commands must not import torch."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]

# Runs `python -m BrainAgeLib --help` in a fresh interpreter and reports which heavy modules it loaded.
PROBE = (
    "import runpy, sys\n"
    "sys.argv = ['brainage', '--help']\n"
    "try:\n"
    "    runpy.run_module('BrainAgeLib', run_name='__main__', alter_sys=True)\n"
    "except SystemExit as stop:\n"
    "    assert stop.code in (0, None), stop.code\n"
    "print('LOADED', sorted(m for m in ('torch', 'timm', 'transformers') if m in sys.modules))\n"
)


def test_help_lists_the_commands_without_importing_torch():
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "predict" in done.stdout and "batch" in done.stdout and "demo" in done.stdout
    assert "LOADED []" in done.stdout, done.stdout.splitlines()[-1]
