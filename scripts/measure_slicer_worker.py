"""Measure the Slicer module's background worker: start-up overhead and time to cancel.

    python scripts/measure_slicer_worker.py [--repeats 3] [--presets demo paper] [--device cpu]

Start-up overhead: from starting ``python -m BrainAgeLib.slicer_worker predict`` to its first
progress line from ``inference.predict`` (Python start, imports, reading the input, loading the
model). ``paper`` is ``build_model("paper")`` with random weights saved to a temporary checkpoint.
Cancel: the worker is killed (``WorkerMonitor.cancel``) 1 s into preprocessing; the time is from
the call until the worker and all its children are gone. GUI work per timer tick: one whole demo
estimate polled every 100 ms as the module's QTimer polls it (``WorkerMonitor.poll`` with a progress
callback that formats what the panel shows); the time each tick spends in Python, not Qt's repaint.
Input: the bundled sample head.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from BrainAgeLib.worker_protocol import INPUT_FILE, WorkerMonitor, worker_command  # noqa: E402

SAMPLE = REPO / "Resources" / "Samples" / "sample_phantom_F67.nii.gz"


def start(command):
    return WorkerMonitor(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                          cwd=REPO))


def wait_for(monitor, text, timeout=600.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for message in monitor.drain():
            if message.text == text:
                return time.monotonic()
        if monitor.finished and monitor.lines.empty():
            raise RuntimeError(f"the worker ended before {text!r}: {monitor.failure()}")
        time.sleep(0.005)
    raise RuntimeError(f"no {text!r} within {timeout} s")


def startup(model, folder, device):
    """Seconds to the first line, and to predict's first line (model loaded)."""
    shutil.copy(SAMPLE, folder / INPUT_FILE)
    tic = time.monotonic()
    monitor = start(worker_command(sys.executable, folder / INPUT_FILE, folder, "F", 67.0, model, device))
    first = wait_for(monitor, "Starting the BrainAge worker") - tic
    loaded = wait_for(monitor, "Loading volume") - tic  # predict's first report: the model is loaded
    monitor.cancel()
    monitor.wait(5)
    return first, loaded


def cancel_time(folder, device):
    shutil.copy(SAMPLE, folder / INPUT_FILE)
    monitor = start(worker_command(sys.executable, folder / INPUT_FILE, folder, "F", 67.0, "demo", device))
    wait_for(monitor, "Preparing sagittal slices")
    time.sleep(1.0)
    tree = [monitor.process.pid] + [c.pid for c in psutil.Process(monitor.process.pid).children(recursive=True)]
    tic = time.monotonic()
    monitor.cancel()
    monitor.wait(5)
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in tree):
        time.sleep(0.001)
    return time.monotonic() - tic, len(tree), sorted(p.name for p in folder.iterdir())


def tick_cost(folder, device, interval_s=0.1):
    """Seconds spent in each timer tick (poll + the panel's progress formatting) over one whole estimate."""
    shutil.copy(SAMPLE, folder / INPUT_FILE)
    shown = {}

    def on_progress(fraction, message):  # what BrainAgeWidget.onProgress computes before handing it to Qt
        shown["bar"], shown["status"] = int(round(100 * fraction)), str(message)

    monitor = WorkerMonitor(subprocess.Popen(
        worker_command(sys.executable, folder / INPUT_FILE, folder, "F", 67.0, "demo", device),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO), on_progress, lambda line: None)
    ticks = []
    while True:
        tic = time.perf_counter()
        ended = monitor.poll()
        ticks.append(time.perf_counter() - tic)
        if ended:
            return ticks
        time.sleep(interval_s)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--presets", nargs="+", default=["demo", "paper"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        temporary = Path(temporary)
        models = {}
        for preset in args.presets:
            if preset == "demo":
                models[preset] = "demo"
                continue
            from BrainAgeLib import build_model, save_checkpoint

            tic = time.monotonic()
            models[preset] = str(save_checkpoint(build_model(preset, seed=0), temporary / f"{preset}.safetensors"))
            size = Path(models[preset]).stat().st_size / 2**20
            print(f"{preset}: random-weight checkpoint {size:.0f} MiB written in {time.monotonic() - tic:.1f} s")
        for preset, model in models.items():
            runs = []
            for repeat in range(args.repeats):
                folder = temporary / f"{preset}-{repeat}"
                folder.mkdir()
                runs.append(startup(model, folder, args.device))
            print(f"{preset}: first line after " + ", ".join(f"{a:.2f}" for a, _ in runs)
                  + " s; model loaded, predict starts after " + ", ".join(f"{b:.2f}" for _, b in runs)
                  + f" s (median {statistics.median(b for _, b in runs):.2f} s)")
        cancels = []
        for repeat in range(args.repeats):
            folder = temporary / f"cancel-{repeat}"
            folder.mkdir()
            cancels.append(cancel_time(folder, args.device))
        (temporary / "ticks").mkdir()
        ticks = sorted(tick_cost(temporary / "ticks", args.device))
        print(f"GUI work per 100 ms tick over one demo estimate: {len(ticks)} ticks, median {statistics.median(ticks) * 1e6:.0f} us, "
              f"99th percentile {ticks[int(0.99 * (len(ticks) - 1))] * 1e6:.0f} us, max {ticks[-1] * 1e6:.0f} us")
        print("cancel -> process tree gone: " + ", ".join(f"{s * 1000:.0f} ms ({n} processes)" for s, n, _ in cancels)
              + f"; files left: {[files for _, _, files in cancels][0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
