"""Measure `brainage models download brainrotvit` on a synthetic archive at full vit-base size.

    python scripts/measure_published_install.py [--volumes 17] [--keep FOLDER]

Builds the authors' two files as Testing/test_import_official.py builds them, at the real sizes
(a DoRA-wrapped Hugging Face ViT-B/16 with 18 classes; their CNN on 160 x 768 embeddings), in
their layout (``model_dumps/``, ``model_dumps/mix/``), 7z-compresses them (py7zr, LZMA2) into
numbered volumes, serves those from a loopback HTTP server (Range support) and runs
``install_published_model`` against it into an empty cache, as the CLI and the Slicer worker do.
Prints the time of each phase (download, extract, import, from its progress messages), the peak
disk use of the cache folder (sampled every 20 ms), the model file's size, and what
``brainage models list`` prints afterwards. The import includes the card's CPU-precision record
(``model.precision``); ``BRAINAGE_PRECISION_RECORD=0`` leaves it out. The network is loopback: real downloads add the
transfer time of the archive's size.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "Testing"))  # the authors' model code, rebuilt for the import tests

from BrainAgeLib.model import published  # noqa: E402
from BrainAgeLib.model.import_official import OFFICIAL_CNN_FILENAME, OFFICIAL_VIT_FILENAME  # noqa: E402


def folder_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass  # removed while walking
    return total


def build_archive(root: Path, volumes: int):
    import multivolumefile
    import py7zr
    from transformers import ViTConfig

    from test_import_official import pickle_their_cnn, save_their_vit, their_cnn, their_dora_vit
    from test_published_model import blob_id

    tree, served = root / "tree", root / "served"
    if served.is_dir() and len(list(served.glob("best_checkpoints.7z.*"))) == volumes:  # --keep: built before
        files = {p.name: p.read_bytes() for p in sorted(served.glob("best_checkpoints.7z.*"))}
        return files, tuple((name, blob_id(data)) for name, data in files.items()), folder_bytes(tree)
    (tree / "model_dumps" / "mix").mkdir(parents=True)
    vit = their_dora_vit(ViTConfig(num_labels=18, image_size=224), seed=21)  # ViT-B/16, as the paper
    save_their_vit(vit, tree / "model_dumps" / OFFICIAL_VIT_FILENAME, train_step=False)
    pickle_their_cnn(their_cnn((1, 160, 768), seed=22), tree / "model_dumps" / "mix" / OFFICIAL_CNN_FILENAME,
                     train_step=False)
    files_bytes = folder_bytes(tree)
    single = root / "single.7z"
    filters = [{"id": py7zr.FILTER_LZMA2, "preset": 1}]
    with py7zr.SevenZipFile(single, "w", filters=filters) as archive:
        archive.writeall(tree / "model_dumps", arcname="model_dumps")
    served.mkdir()
    with multivolumefile.MultiVolume(served / "best_checkpoints.7z", mode="wb",
                                     volume=single.stat().st_size // volumes + 1, ext_digits=3) as target:
        with py7zr.SevenZipFile(target, "w", filters=filters) as archive:
            archive.writeall(tree / "model_dumps", arcname="model_dumps")
    files = {p.name: p.read_bytes() for p in sorted(served.glob("best_checkpoints.7z.*"))}
    return files, tuple((name, blob_id(data)) for name, data in files.items()), files_bytes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=17)
    parser.add_argument("--keep", default=None,
                        help="build and install under this folder (default: a temporary one); an archive built "
                             "there before is reused")
    args = parser.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="brainage-published-"))
    tic = time.monotonic()
    files, parts, files_bytes = build_archive(root, args.volumes)
    archive_bytes = sum(len(data) for data in files.values())
    print(f"synthetic archive: {len(files)} volumes, {archive_bytes / 1e6:.0f} MB compressed from "
          f"{files_bytes / 1e6:.0f} MB of checkpoints (built in {time.monotonic() - tic:.0f} s)")

    from test_published_model import ArchiveServer

    server = ArchiveServer(files)
    archive = dataclasses.replace(published.BRAINROTVIT, parts=parts)
    cache = root / "cache"
    shutil.rmtree(cache, ignore_errors=True)  # an empty cache, as on first use
    cache.mkdir()
    peak, sampling = [0], [True]

    def sample():
        while sampling[0]:
            peak[0] = max(peak[0], folder_bytes(cache))
            time.sleep(0.02)

    phases = {}
    start = time.monotonic()

    def progress(fraction, message):
        phase = message.split()[0]  # downloading / extracting / importing / installed
        phases.setdefault(phase, time.monotonic() - start)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        model = published.install_published_model(archive=archive, cache_dir=cache, base_url=server.url,
                                                   progress=progress)
    finally:
        sampling[0] = False
        sampler.join()
        server.stop()
    total = time.monotonic() - start
    download = phases["extracting"] - phases["downloading"]
    extract = phases["importing"] - phases["extracting"]
    imported = phases["installed"] - phases["importing"]
    print(f"install: {total:.1f} s = download {download:.1f} s (loopback) + extract {extract:.1f} s + "
          f"import {imported:.1f} s; peak disk in the cache {peak[0] / 1e6:.0f} MB; "
          f"model file {model.stat().st_size / 1e6:.0f} MB; left in the cache: "
          f"{sorted(str(p.relative_to(cache)) for p in cache.rglob('*') if p.is_file())}")
    print("\n$ brainage models list --cache-dir CACHE")
    from BrainAgeLib.cli import main as brainage

    brainage(["models", "list", "--cache-dir", str(cache)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
