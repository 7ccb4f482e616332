"""Write Resources/ColorTables/BrainAgeAttention.ctbl, the bundled attention colour table.

It is the colour table of ``attention_labelmap(..., levels=DEFAULT_LEVELS)``; the test suite
checks the committed file still matches. Run from the repository root:

    python scripts/make_color_table.py
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from BrainAgeLib.explain.labelmap import BUNDLED_COLOR_TABLE, DEFAULT_LEVELS, attention_colors, write_color_table  # noqa: E402

if __name__ == "__main__":
    target = REPO / "Resources" / "ColorTables" / BUNDLED_COLOR_TABLE
    target.parent.mkdir(parents=True, exist_ok=True)
    print(write_color_table(attention_colors(DEFAULT_LEVELS), target))
