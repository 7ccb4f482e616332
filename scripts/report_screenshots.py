"""The README's pictures of the two HTML reports, rendered by headless Chromium.

    python scripts/report_screenshots.py [--work build/report_screenshots] [--n 12]

1. ``brainage predict Resources/Samples/sample_phantom_F67.nii.gz --sex F --age 67 --explain
   --report`` (the bundled demo model) -> Resources/Screenshots/BrainAge-report-subject.png;
2. ``brainage batch`` with ``--report`` over ``--n`` of the demo's held-out test phantoms
   (``scripts/demo_split_phantoms.py test --n N``; the group column says whether the phantom has
   a skull) -> Resources/Screenshots/BrainAge-report-batch.png.

Needs chromium (``apt-get install chromium``). ``--real FILE --age A --sex S`` instead writes the
subject report of a real head into WORK (for looking at, not for the README).
"""
from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "Resources" / "Screenshots"
sys.path.insert(0, str(REPO / "scripts"))


def brainage(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "BrainAgeLib", *args], check=True, cwd=REPO)


def screenshot(page: Path, png: Path, width: int = 1100, height: int = 2000) -> Path:
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if browser is None:
        raise SystemExit("needs chromium (apt-get install chromium)")
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={width},{height}", f"--screenshot={png}", page.as_uri()],
                   check=True, capture_output=True)
    return crop_blank_bottom(png)


def crop_blank_bottom(png: Path, margin: int = 24) -> Path:
    """Cut the white below the page's last content (the window is taller than most pages) and
    store the picture with a 256-colour palette."""
    import numpy as np
    from PIL import Image

    image = Image.open(png).convert("RGB")
    rows = np.flatnonzero((np.asarray(image.convert("L")) < 250).any(axis=1))
    if rows.size:
        image = image.crop((0, 0, image.width, min(image.height, int(rows[-1]) + margin)))
    image.quantize(256).save(png, optimize=True)      # a palette PNG: a third of the size, looks the same
    return png


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / "build" / "report_screenshots")
    parser.add_argument("--n", type=int, default=12)
    parser.add_argument("--real", type=Path, default=None)
    parser.add_argument("--age", default=None)
    parser.add_argument("--sex", default=None)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.real is not None:
        out = args.work / "real"
        brainage("predict", str(args.real), "--sex", args.sex, "--age", args.age, "--explain", "--report", "--out", str(out))
        report = next(out.glob("*_report.html"))
        print(screenshot(report, out / f"{report.stem}.png", height=3000))
        return

    sample = REPO / "Resources" / "Samples" / "sample_phantom_F67.nii.gz"
    subject_out = args.work / "subject"
    brainage("predict", str(sample), "--sex", "F", "--age", "67", "--explain", "--report", "--out", str(subject_out))
    print(screenshot(subject_out / "sample_phantom_F67_report.html", SHOTS / "BrainAge-report-subject.png", height=2900))

    from demo_split_phantoms import write_split

    cohort = write_split("test", args.work / "phantoms", args.n)
    with open(cohort, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    grouped = args.work / "phantoms" / "cohort_grouped.csv"
    with open(grouped, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "path", "age", "sex", "site", "group"])
        writer.writeheader()
        for row in rows:
            writer.writerow({"id": row["id"], "path": row["path"], "age": row["age"], "sex": row["sex"],
                             "site": row["site"], "group": "with skull" if row["has_skull"] == "1" else "skull-stripped"})
    brainage("batch", str(grouped), "--out", str(args.work / "batch"), "--report", "--workers", "1")
    print(screenshot(args.work / "batch" / "report" / "index.html", SHOTS / "BrainAge-report-batch.png", height=2300))


if __name__ == "__main__":
    main()
