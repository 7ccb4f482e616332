"""Rewrite the file lists in BrainAge/CMakeLists.txt from what is on disk.

``BRAINAGELIB_PYTHON_SCRIPTS``: every ``.py`` file under BrainAgeLib/; ``BRAINAGE_SHARED_RESOURCES``:
every file under Resources/ except Resources/Screenshots/ (documentation, not installed).
Testing/test_slicer_module_static.py fails when these lists and the disk disagree. Run from the
repository root after adding or removing a BrainAgeLib module or a resource:

    python scripts/update_slicer_cmake_lists.py
"""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CMAKE = REPO / "BrainAge" / "CMakeLists.txt"
UNINSTALLED_RESOURCE_FOLDERS = {"Screenshots"}


def brainagelib_scripts() -> list:
    root = REPO / "BrainAgeLib"
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def shared_resources() -> list:
    root = REPO / "Resources"
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.relative_to(root).parts[0] not in UNINSTALLED_RESOURCE_FOLDERS)


def replace_list(text: str, name: str, entries: list) -> str:
    block = re.compile(rf"(set\({name}\n)(.*?)(\n  \))", flags=re.S)
    if not block.search(text):
        raise SystemExit(f"{CMAKE}: no 'set({name}' block to update")
    return block.sub(lambda m: m.group(1) + "\n".join(f"  {entry}" for entry in entries) + m.group(3), text, count=1)


def main() -> None:
    text = CMAKE.read_text()
    text = replace_list(text, "BRAINAGELIB_PYTHON_SCRIPTS", brainagelib_scripts())
    text = replace_list(text, "BRAINAGE_SHARED_RESOURCES", shared_resources())
    CMAKE.write_text(text)
    print(f"updated {CMAKE.relative_to(REPO)}")


if __name__ == "__main__":
    main()
