"""Make Resources/Screenshots/BrainAge-attention.png, the extension's screenshot and README figure.

It is the montage ``brainage predict --explain`` writes, for the bundled demo model on a synthetic
75-year-old head (BrainAgeLib.synth.phantoms, with skull): the input with the attention map in axial,
coronal and sagittal planes through the centre of its top-decile region, predicted age and BAG in the title, and the
demo model's warning. Run from the repository root (about a minute on a CPU):

    python scripts/make_screenshot.py
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from BrainAgeLib.cli import main as brainage  # noqa: E402
from BrainAgeLib.io import save_volume  # noqa: E402
from BrainAgeLib.synth.phantoms import make_phantom  # noqa: E402

TARGET = REPO / "Resources" / "Screenshots" / "BrainAge-attention.png"
AGE, SEX, SEED = 75.0, "F", 11

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        head = Path(folder) / "phantom_T1w.nii.gz"
        save_volume(make_phantom(age=AGE, sex=SEX, seed=SEED, spacing=1.5).volume, head)
        status = brainage(["predict", str(head), "--sex", SEX, "--age", str(AGE), "--model", "demo",
                           "--explain", "--out", folder])
        montages = sorted(Path(folder).glob("*_attention.png"))
        if status != 0 or len(montages) != 1:
            raise SystemExit(f"brainage predict exited with {status} and wrote {montages}")
        TARGET.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(montages[0], TARGET)
    print(TARGET.relative_to(REPO))
