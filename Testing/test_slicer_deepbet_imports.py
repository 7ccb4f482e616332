"""deepbet without its GUI: brain extraction must not import customtkinter (deepbet's GUI toolkit,
which needs tkinter, absent from Slicer's Python) nor ``deepbet.ui``.

Run in a fresh interpreter, so modules other tests imported cannot hide (or cause) an import.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
GUI_MODULES = ("customtkinter", "deepbet.ui", "tkinter", "darkdetect")

CHILD = """
import json, sys
import torch
torch.set_num_threads(2)
from BrainAgeLib.preprocess.brain_extraction import deepbet_brain_mask
from BrainAgeLib.preprocess.pipeline import reorient_to_ras
from BrainAgeLib.synth.phantoms import ellipsoid_head

after_import = sorted(sys.modules)
mask = deepbet_brain_mask(reorient_to_ras(ellipsoid_head(3.0)), device="cpu")
print(json.dumps({"after_import": after_import, "after_run": sorted(sys.modules), "brain_voxels": int(mask.sum()),
                  "voxels": int(mask.size)}))
"""


def _gui(modules):
    return [name for name in modules if any(name == gui or name.startswith(gui + ".") for gui in GUI_MODULES)]


def test_deepbet_brain_mask_runs_without_importing_deepbets_gui():
    done = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert _gui(report["after_import"]) == []
    assert _gui(report["after_run"]) == [], "deepbet's GUI was imported by running the extraction"
    assert "deepbet.bet" in report["after_run"]  # deepbet itself did run
    assert 0 < report["brain_voxels"] < report["voxels"]


def test_no_brainagelib_module_imports_deepbets_gui():
    """Statically, for every code path (CLI, batch, Slicer, also those the run above does not take)."""
    problems = []
    for path in sorted((REPO / "BrainAgeLib").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:  # from deepbet import ui: deepbet.ui
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            if _gui(names):
                problems.append(f"{path.relative_to(REPO)}:{node.lineno}: imports {', '.join(_gui(names))}")
    assert not problems, "\n".join(problems)
