"""HTML reports: one scan's (``write_subject_report``, ``brainage predict --report``) and a cohort
run's (``brainage batch --report``): they parse, hold every element the issue lists, fetch
nothing remote, and render in headless Chromium (where installed) to a picture that is not blank.

The model is the tiny preset with seeded random weights, given a calibration (reference set)
and the demo flag in its card, on 3 mm phantom heads: fast, and every element is exercised.
"""
from __future__ import annotations

import html.parser
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from BrainAgeLib.bias_correction import BiasCorrection
from BrainAgeLib.conformal import ConformalCalibration
from BrainAgeLib.inference import predict
from BrainAgeLib.io import load_volume
from BrainAgeLib.model import build_model
from BrainAgeLib.model.checkpoint import load_model, save_checkpoint
from BrainAgeLib.report import write_subject_report
from BrainAgeLib.result import DEMO_DISCLAIMER

from cohort_heads import write_bad_inputs, write_cohort_csv, write_heads

REPO = Path(__file__).resolve().parents[1]


class Page(html.parser.HTMLParser):
    """What a report holds: element ids, image sources, link targets, table headers, scripts, text."""

    def __init__(self, text: str):
        super().__init__()
        self.ids, self.images, self.links, self.headers, self.scripts = [], [], [], [], []
        self.text, self._in = [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self._in.append(tag)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag in ("a", "link"):
            self.links.append(attrs.get("href", ""))
        if tag == "script":
            self.scripts.append(attrs.get("src"))

    def handle_endtag(self, tag):
        if self._in and self._in[-1] == tag:
            self._in.pop()

    def handle_data(self, data):
        if self._in and self._in[-1] == "th":
            self.headers.append(data.strip())
        self.text.append(data)

    @property
    def all_text(self) -> str:
        return " ".join(" ".join(self.text).split())


def assert_offline(text: str, page: Page) -> None:
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, flags=re.I)
    assert "http://" not in text and "https://" not in text
    assert all(src.startswith("data:image/png;base64,") for src in page.images)
    assert all(src is None for src in page.scripts)       # inline scripts only


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A tiny checkpoint whose card says demo and carries a reference set; 3 mm phantom heads."""
    folder = tmp_path_factory.mktemp("reports")
    heads = write_heads(folder / "heads")
    rng = np.random.default_rng(0)
    age = rng.uniform(20, 85, 60)
    predicted = 0.8 * age + 11 + rng.normal(0, 4, 60)
    correction = BiasCorrection.fit(age, predicted)
    model = build_model("tiny", seed=0)
    path = save_checkpoint(model, folder / "tiny_calibrated.safetensors", {
        "name": "tiny-demo-test", "is_demo": True, "trained": True, "intended_use": "tests",
        "bias_correction": correction,
        "calibration": ConformalCalibration.fit(age, predicted, correction, source={"cohort": "simulated", "n": 60}),
    })
    return {"folder": folder, "heads": heads, "checkpoint": path}


def test_subject_report_holds_every_element_and_nothing_remote(calibrated, tmp_path):
    model = load_model(calibrated["checkpoint"])
    head, age, sex = calibrated["heads"][0]
    volume = load_volume(head)
    result = predict(model, volume, sex, age, explain=True, device="cpu", use_cache=False)
    path = write_subject_report(result, tmp_path / "head0_report.html", model=model, volume=volume, subject="head0")
    text = path.read_text(encoding="utf-8")
    page = Page(text)
    # the demo disclaimer comes first, in red
    assert page.ids[0] == "disclaimer" and DEMO_DISCLAIMER in page.all_text
    assert re.search(r"\.disclaimer\s*\{[^}]*color:\s*#b00000", text)
    assert {"headline", "numbers", "reference", "qc", "attention", "card"} <= set(page.ids)
    words = page.all_text
    assert result.interval_text in words and "90% interval" in words
    for label in ("Chronological age", "Brain-age gap (BAG)", "Bias-corrected BAG", "Gap z", "QC: no flags",
                  "Weights SHA-256", "Calibration"):
        assert label in words or result.qc.flags, label
    # reference plot, QC picture, attention montage: three embedded PNGs
    assert len(page.images) == 3
    assert_offline(text, page)


def test_subject_report_of_an_uncalibrated_model_says_so(calibrated, tmp_path):
    model = build_model("tiny", seed=0)
    head, age, sex = calibrated["heads"][1]
    result = predict(model, head, sex, age, device="cpu", use_cache=False)
    text = write_subject_report(result, tmp_path / "plain.html", model=model).read_text(encoding="utf-8")
    page = Page(text)
    assert "no interval: not calibrated" in page.all_text and "disclaimer" not in page.ids
    assert page.images == []           # no reference set, no volume given: no picture
    assert_offline(text, page)


@pytest.fixture(scope="module")
def batch_report(calibrated):
    """A batch run with --report over 3 heads (two groups, two sites) and one missing file."""
    folder = calibrated["folder"]
    bad = write_bad_inputs(folder / "bad", calibrated["heads"][0][0])
    entries = [(f"sub-{k}", file, age, sex) for k, (file, age, sex) in enumerate(calibrated["heads"])]
    entries.append(("sub-missing", bad["missing"], 50.0, "F"))
    cohort = write_cohort_csv(folder / "cohort.csv", entries)
    text = cohort.read_text(encoding="utf-8").splitlines()
    groups = ["control", "patient", "control", "patient"]
    sites = ["A", "B", "A", "B"]
    cohort.write_text("\n".join([text[0] + ",group,site"] + [f"{line},{g},{s}" for line, g, s
                                                              in zip(text[1:], groups, sites)]) + "\n", encoding="utf-8")
    out = folder / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "BrainAgeLib", "batch", str(cohort), "--out", str(out), "--model",
                           str(calibrated["checkpoint"]), "--workers", "0", "--report", "--no-plots"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return out


def test_batch_report_has_a_sortable_table_plots_and_links(batch_report):
    index = batch_report / "report" / "index.html"
    text = index.read_text(encoding="utf-8")
    page = Page(text)
    assert page.ids[0] == "disclaimer"
    for header in ("id", "age", "predicted", "interval", "BAG", "corrected BAG", "z", "QC flags", "error", "group", "site"):
        assert header in page.headers, header
    assert "addEventListener" in text and "sort" in text       # the inline sorting script
    assert {"scatter", "bland-altman", "gap-by-group", "gap-by-site", "card"} <= set(page.ids)
    reports = [href for href in page.links if href.endswith(".html")]
    assert len(reports) == 3 and all((index.parent / href).is_file() for href in reports)
    assert "no_such_scan.nii.gz" in page.all_text                # the failed subject's error
    assert_offline(text, page)
    for href in reports:
        subject = (index.parent / href).read_text(encoding="utf-8")
        assert_offline(subject, Page(subject))
    # predictions.csv carries the intervals
    header = (batch_report / "predictions.csv").read_text(encoding="utf-8").splitlines()[0]
    assert "interval_low" in header and "gap_z" in header


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return ""


@pytest.mark.skipif(not chromium(), reason="needs Chromium (apt-get install chromium; .ci/run installs it)")
def test_reports_render_in_headless_chromium_to_a_picture_that_is_not_blank(batch_report, tmp_path):
    from PIL import Image

    index = batch_report / "report" / "index.html"
    subject = next((batch_report / "report" / "subjects").glob("*.html"))
    for page in (index, subject):
        shot = tmp_path / f"{page.stem}.png"
        subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--window-size=1100,1600", f"--screenshot={shot}", page.as_uri()],
                       capture_output=True, timeout=120, check=False)
        assert shot.is_file(), f"chromium wrote no screenshot of {page}"
        pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
        assert pixels.std() > 10, f"{page.name} rendered blank"
        assert (pixels < 128).mean() > 0.01                      # text and plots, not an empty page
