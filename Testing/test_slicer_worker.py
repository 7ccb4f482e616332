"""The Slicer module's background worker (BrainAgeLib.slicer_worker) and how the module talks to
it (BrainAgeLib.worker_protocol): argument lists, progress lines, outputs read back, and real
worker processes started as Slicer starts them (stdout and stderr merged, text), run to the end
on the bundled sample head and cancelled half-way through preprocessing.
"""
from __future__ import annotations

import io
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from BrainAgeLib.errors import BrainAgeError
from BrainAgeLib.worker_protocol import (BRAIN_MASK_FILE, INPUT_FILE, RESULT_FILE, ProgressWriter, WorkerMonitor,
                                         batch_command, kill_process_tree, load_worker_result, parse_worker_line,
                                         progress_line, read_worker_outputs, worker_command, worker_python)

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "Resources" / "Samples" / "sample_phantom_F67.nii.gz"


def start(command):
    """The worker as ``slicer.util.launchConsoleProcess`` starts it (outside Slicer)."""
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)


# --- argument lists ---------------------------------------------------------------------------

def test_worker_command_names_every_input():
    command = worker_command("/opt/Slicer/bin/PythonSlicer", "/tmp/job/input.nii.gz", "/tmp/job", "F", 63.5,
                             "demo", "cuda", levels=10)
    assert command[:4] == ["/opt/Slicer/bin/PythonSlicer", "-m", "BrainAgeLib.slicer_worker", "predict"]
    assert command[4] == "/tmp/job/input.nii.gz"
    pairs = dict(zip(command[5::2], command[6::2]))
    assert pairs == {"--out": "/tmp/job", "--sex": "F", "--model": "demo", "--device": "cuda", "--age": "63.5",
                     "--levels": "10"}
    plain = worker_command("python", "in.nii.gz", "out", None, None, "/models/my model.safetensors", "auto",
                           explain=False)
    assert "--age" not in plain and plain[plain.index("--sex") + 1] == "unknown"
    assert plain[-1] == "--no-explain"
    assert "/models/my model.safetensors" in plain  # one argument, spaces kept: no shell involved


def test_worker_command_is_what_the_worker_parses():
    from BrainAgeLib.slicer_worker import build_parser

    args = build_parser().parse_args(worker_command("python", "in.nii.gz", "out", "M", 40.0, "demo", "cpu")[3:])
    assert (args.command, args.input, args.out, args.sex, args.age, args.model, args.device, args.explain) == \
        ("predict", "in.nii.gz", "out", "M", 40.0, "demo", "cpu", True)
    batch = build_parser().parse_args(batch_command("python", ["a.nii.gz", "b.nii.gz"], "out", explain=True)[3:])
    assert (batch.command, batch.cohort, batch.out, batch.explain) == ("batch", ["a.nii.gz", "b.nii.gz"], "out", True)
    assert (args.explain_method, batch.explain_method) == ("paper", "paper")


def test_the_explanation_method_reaches_the_worker():
    from BrainAgeLib.slicer_worker import build_parser

    one = build_parser().parse_args(
        worker_command("python", "in.nii.gz", "out", "M", 40.0, "demo", "cpu", explain="relevance")[3:])
    assert (one.explain, one.explain_method) == (True, "relevance")
    many = build_parser().parse_args(batch_command("python", ["a.nii.gz"], "out", explain="relevance")[3:])
    assert (many.explain, many.explain_method) == (True, "relevance")
    assert "--explain-method" not in worker_command("python", "in.nii.gz", "out", "M", 40.0, "demo", "cpu", explain=False)
    with pytest.raises(BrainAgeError, match="no input"):
        batch_command("python", [], "out")


def test_worker_python_prefers_python_slicer():
    assert worker_python(lambda name: "/Slicer/bin/PythonSlicer" if name == "PythonSlicer" else None) == \
        "/Slicer/bin/PythonSlicer"
    assert worker_python(lambda name: None, executable="/usr/bin/python3") == "/usr/bin/python3"


# --- the progress protocol --------------------------------------------------------------------

def test_progress_lines_round_trip():
    stream = io.StringIO()
    writer = ProgressWriter(stream)
    writer(0.25, "Preparing sagittal\nslices")  # a message is always one line
    writer.part(0.5, 0.5)(0.5, "Encoding")      # 0.5 + 0.5 * 0.5
    writer(7.0, "clipped")
    writer.done("/tmp/out dir")
    writer.error("input.nii.gz: not a readable NIfTI image")
    messages = [parse_worker_line(line) for line in stream.getvalue().splitlines(keepends=True)]
    assert [(m.kind, m.fraction, m.text) for m in messages] == [
        ("progress", 0.25, "Preparing sagittal slices"),
        ("progress", 0.75, "Encoding"),
        ("progress", 1.0, "clipped"),
        ("done", None, "/tmp/out dir"),
        ("error", None, "input.nii.gz: not a readable NIfTI image"),
    ]


@pytest.mark.parametrize("line", ["BRAINAGE_PROGRESS", "BRAINAGE_PROGRESS half way", "BRAINAGE_PROGRESS 1.5 over",
                                  "BRAINAGE_PROGRESS nan x", "BRAINAGE_DONE", "BRAINAGE_ERROR  ", "BRAINAGE_RESULT 1"])
def test_malformed_protocol_lines_are_reported_not_taken(line):
    message = parse_worker_line(line + "\n")
    assert message.kind == "malformed" and message.text == line and message.fraction is None


def test_other_output_passes_through():
    message = parse_worker_line("Traceback (most recent call last):\n")
    assert (message.kind, message.text) == ("output", "Traceback (most recent call last):")
    assert parse_worker_line(progress_line(0.5, "")).kind == "progress"


def test_poll_hands_each_line_to_its_callback_and_ends_once():
    script = ("print('BRAINAGE_PROGRESS 0.5000 Half way'); print('BRAINAGE_PROGRESS soon'); "
              "print('a library note'); import sys; print('BRAINAGE_DONE /out'); sys.exit(0)")
    progress, log, ends = [], [], []
    monitor = WorkerMonitor(start([sys.executable, "-c", script]), lambda f, m: progress.append((f, m)), log.append,
                            ends.append)
    assert monitor.poll_until_finished(0.01) is None
    assert progress == [(0.5, "Half way")] and log == ["BRAINAGE_PROGRESS soon", "a library note"]
    assert monitor.poll() is True and ends == [monitor]
    crashed = WorkerMonitor(start([sys.executable, "-c", "import sys; print('BRAINAGE_PROGRESS 0.1 x'); sys.exit(3)"]))
    assert "exit code 3 and no result" in crashed.poll_until_finished(0.01)


# --- reading the outputs back -----------------------------------------------------------------

def test_a_folder_without_the_result_file_holds_no_result(tmp_path):
    (tmp_path / "brainage_attention.nii.gz").write_bytes(b"half")
    with pytest.raises(BrainAgeError, match=f"{RESULT_FILE}: no result file"):
        read_worker_outputs(tmp_path)
    (tmp_path / RESULT_FILE).write_text("{not json")
    with pytest.raises(BrainAgeError, match="not a readable result file"):
        read_worker_outputs(tmp_path)
    (tmp_path / RESULT_FILE).write_text(json.dumps({"predicted_age": 60.0, "outputs": {"brain_mask": BRAIN_MASK_FILE}}))
    with pytest.raises(BrainAgeError, match="lists brain_mask as brainage_brain_mask.nii.gz, which is not a file"):
        read_worker_outputs(tmp_path)
    (tmp_path / RESULT_FILE).write_text(json.dumps({"predicted_age": 60.0, "outputs": {"x": "../etc/passwd"}}))
    with pytest.raises(BrainAgeError, match="not a file in"):
        read_worker_outputs(tmp_path)
    (tmp_path / RESULT_FILE).write_text(json.dumps({"predicted_age": None, "outputs": {}}))
    with pytest.raises(BrainAgeError, match="no predicted_age"):
        load_worker_result(tmp_path)
    (tmp_path / RESULT_FILE).write_text(json.dumps({"predicted_age": 61.5, "sex": "M", "qc": {"flags": ["x"]},
                                                    "outputs": {}}))
    result, labelmap = load_worker_result(tmp_path)  # a result without maps (explain off)
    assert (result.predicted_age, result.sex, result.qc.flags, result.attention, labelmap) == (61.5, "M", ["x"], None, None)
    (tmp_path / RESULT_FILE).write_text(json.dumps({"predicted_age": 61.5, "explain_method": "relevance", "outputs": {}}))
    assert load_worker_result(tmp_path)[0].explain_method == "relevance"  # the panel names the labelmap after it


# --- a real worker ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_worker(tmp_path_factory):
    """The worker run to the end on the bundled sample (a 67-year-old female phantom), demo model,
    polled as the module's timer polls it: progress lines, other output and the end each to their callback."""
    out = tmp_path_factory.mktemp("worker")
    shutil.copy(SAMPLE, out / INPUT_FILE)
    progress, other, ends = [], [], []
    monitor = WorkerMonitor(start(worker_command(sys.executable, out / INPUT_FILE, out, "F", 67.0, "demo", "cpu",
                                                 levels=10)),
                            progress=lambda fraction, text: progress.append((fraction, text, time.monotonic())),
                            log=other.append, finished=ends.append)
    while not monitor.poll():
        time.sleep(0.05)
    assert monitor.poll() and ends == [monitor]  # finished is called once, however often poll runs after
    return out, monitor, progress, other


@pytest.mark.slow
def test_worker_reports_progress_and_gives_the_in_process_age(finished_worker):
    from BrainAgeLib.inference import predict
    from BrainAgeLib.model.checkpoint import load_model

    out, monitor, progress, other = finished_worker
    assert monitor.returncode == 0 and monitor.failure() is None, other
    fractions = [fraction for fraction, _, _ in progress]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    texts = [text for _, text, _ in progress]
    explaining = next(text for text in texts if text.startswith("Computing the"))  # the attention/explanation map
    assert "Preparing sagittal slices" in texts
    assert monitor.final.kind == "done" and monitor.final.text == str(out)
    assert not [line for line in other if line.startswith("BRAINAGE_")]
    # the lines arrive while the worker runs, not all at its end
    seen = {text: at for _, text, at in progress}
    assert seen[explaining] - seen["Preparing sagittal slices"] > 1.0

    result = json.loads((out / RESULT_FILE).read_text())
    in_process = predict(load_model("demo"), SAMPLE, "F", age=67.0, explain=True, device="cpu", use_cache=False)
    assert result["predicted_age"] == pytest.approx(in_process.predicted_age, abs=1e-3)
    assert result["brain_age_gap"] == pytest.approx(in_process.brain_age_gap, abs=1e-3)
    assert result["qc"]["brain_volume_ml"] == pytest.approx(in_process.qc.brain_volume_ml, abs=0.1)


@pytest.mark.slow
def test_worker_outputs_read_back_on_the_input_grid(finished_worker):
    from BrainAgeLib.io import load_volume
    from BrainAgeLib.slicer_bridge import result_text

    out = finished_worker[0]
    outputs = read_worker_outputs(out)
    assert {"result", "attention", "labelmap", "color_table", "montage", "sidecar", "brain_mask", "qc_figure"} <= \
        set(outputs.paths)
    assert all(path.parent == out and path.stat().st_size > 0 for path in outputs.paths.values())
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"

    result, labelmap = load_worker_result(out)
    source = load_volume(out / INPUT_FILE)
    for volume in (result.attention, result.brain_mask, labelmap.volume):
        assert volume.shape == source.shape
        np.testing.assert_allclose(volume.affine, source.affine, atol=1e-4)
    assert int(np.asarray(labelmap.volume.array).max()) == 10 == labelmap.levels
    assert len(labelmap.thresholds) == 11
    mask = np.asarray(result.brain_mask.array) > 0
    assert mask.sum() * np.prod(source.spacing) / 1000.0 == pytest.approx(result.qc.brain_volume_ml, abs=0.5)
    assert result.qc.measured and math.isfinite(result.predicted_age) and result.model_is_demo
    text = result_text(result)
    assert f"{result.predicted_age:.1f} years" in text and "Demo model" in text


def test_worker_reports_a_bad_input_as_one_error_line(tmp_path):
    bad = tmp_path / INPUT_FILE
    bad.write_bytes(b"this is not a NIfTI file")
    monitor = WorkerMonitor(start(worker_command(sys.executable, bad, tmp_path, "F", None, "demo", "cpu")))
    failure = monitor.poll_until_finished(0.05)
    assert monitor.returncode == 2
    assert monitor.final.kind == "error" and str(bad) in monitor.final.text and failure == monitor.final.text
    assert sorted(p.name for p in tmp_path.iterdir()) == [INPUT_FILE]


def test_worker_refuses_a_bad_age_before_loading_anything(tmp_path):
    monitor = WorkerMonitor(start(worker_command(sys.executable, tmp_path / INPUT_FILE, tmp_path, "F", -3.0,
                                                 "demo", "cpu")))
    assert monitor.wait(60) == 2
    assert "age" in monitor.drain()[-1].text


REAL_HEAD = REPO.parent / "shared" / "data" / "real-t1" / "IXI132-HH-1415_T1.nii.gz"  # a real IXI head with neck


@pytest.mark.slow
@pytest.mark.parametrize("head", [SAMPLE, REAL_HEAD], ids=["sample phantom", "real IXI head"])
def test_cancel_mid_preprocessing_kills_the_tree_and_leaves_no_files(tmp_path, head):
    if not head.is_file():
        pytest.skip(f"{head} is not here (../shared beside the checkout)")
    shutil.copy(head, tmp_path / INPUT_FILE)
    monitor = WorkerMonitor(start(worker_command(sys.executable, tmp_path / INPUT_FILE, tmp_path, "F", 67.0, "demo",
                                                 "cpu")))
    deadline = time.monotonic() + 120
    while not any(m.text == "Preparing sagittal slices" for m in monitor.drain()):
        assert time.monotonic() < deadline and not monitor.finished, "the worker never started preprocessing"
        time.sleep(0.02)
    time.sleep(1.0)  # well inside the ~10 s of brain extraction
    tree = [monitor.process.pid] + [c.pid for c in psutil.Process(monitor.process.pid).children(recursive=True)]
    tic = time.monotonic()
    killed = monitor.cancel()
    assert monitor.wait(2.0) is not None
    elapsed = time.monotonic() - tic
    assert elapsed < 2.0
    assert set(tree) <= set(killed)
    assert not [pid for pid in tree if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert monitor.failure() == "cancelled by the user"
    assert sorted(p.name for p in tmp_path.iterdir()) == [INPUT_FILE]  # nothing written, nothing half-written


def test_kill_process_tree_takes_the_grandchildren(tmp_path):
    script = ("import subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              "print(child.pid, flush=True)\n"
              "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child_pid = int(parent.stdout.readline())
    assert psutil.Process(child_pid).ppid() == parent.pid
    killed = kill_process_tree(parent.pid, timeout_s=2.0)
    assert set(killed) == {parent.pid, child_pid}
    parent.wait(2)
    assert not psutil.pid_exists(child_pid) or psutil.Process(child_pid).status() == psutil.STATUS_ZOMBIE
    assert kill_process_tree(parent.pid) == []  # already gone: nothing to do, no error


@pytest.mark.slow
def test_batch_worker_and_its_preprocessing_processes_are_cancelled_together(tmp_path):
    """processFiles' worker runs run_batch with preprocessing processes of its own: Cancel takes them too."""
    heads = []
    for name in ("a", "b", "c"):
        heads.append(tmp_path / f"{name}.nii.gz")
        shutil.copy(SAMPLE, heads[-1])
    out = tmp_path / "out"
    monitor = WorkerMonitor(start(batch_command(sys.executable, heads, out, "demo", "cpu")))
    deadline = time.monotonic() + 120
    children = []
    while len(children) < 1:
        assert time.monotonic() < deadline and not monitor.finished, [m.text for m in monitor.drain()]
        time.sleep(0.2)
        children = psutil.Process(monitor.process.pid).children(recursive=True)
    tree = [monitor.process.pid] + [c.pid for c in children]
    tic = time.monotonic()
    killed = monitor.cancel()
    assert monitor.wait(2.0) is not None and time.monotonic() - tic < 2.0
    assert set(tree) <= set(killed)
    assert not [pid for pid in tree if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not (out / "predictions.csv").exists() or (out / "predictions.csv").read_text().count("\n") <= 1 + len(heads)


@pytest.mark.slow
def test_batch_worker_predicts_a_list_of_files(tmp_path):
    head = tmp_path / "sample.nii.gz"
    shutil.copy(SAMPLE, head)
    out = tmp_path / "out"
    progress = []
    monitor = WorkerMonitor(start(batch_command(sys.executable, [head], out, "demo", "cpu")),
                            progress=lambda fraction, text: progress.append((fraction, text)))
    assert monitor.poll_until_finished(0.1) is None, monitor.final
    assert progress[-1][0] == 1.0 and progress[-1][1].startswith("Batch finished: 1 done, 0 failed")
    rows = (out / "predictions.csv").read_text().splitlines()
    assert len(rows) == 2 and "sample" in rows[1]


@pytest.mark.slow
def test_cancel_while_writing_leaves_only_complete_files(tmp_path):
    """Killed while it writes its outputs, the worker leaves whole files under their names (atomic writes)
    and no result file, so the folder is never read as a result; staging files are hidden (dot names)."""
    import nibabel as nib
    from PIL import Image

    shutil.copy(SAMPLE, tmp_path / INPUT_FILE)
    monitor = WorkerMonitor(start(worker_command(sys.executable, tmp_path / INPUT_FILE, tmp_path, "F", 67.0, "demo",
                                                 "cpu")))
    deadline = time.monotonic() + 180
    while not any(m.text.startswith("Writing the attention map") for m in monitor.drain()):
        assert time.monotonic() < deadline and not monitor.finished, "the worker never started writing"
        time.sleep(0.005)
    time.sleep(0.3)  # part-way through the files
    monitor.cancel()
    monitor.wait(2.0)
    visible = sorted(p for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert tmp_path / RESULT_FILE not in visible
    with pytest.raises(BrainAgeError, match="no result file"):
        read_worker_outputs(tmp_path)
    for path in visible:
        if path.name.endswith(".nii.gz"):
            assert np.asarray(nib.load(str(path)).dataobj).size > 0, path
        elif path.suffix == ".png":
            with Image.open(path) as image:
                image.load()
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".ctbl":
            assert path.read_text().endswith("\n")


@pytest.mark.slow
def test_worker_without_matplotlib_writes_everything_slicer_loads(tmp_path, monkeypatch, capsys):
    """Slicer does not install matplotlib: the worker still writes the map, the labelmap with the bundled
    colours and the mask, leaves out only the two PNGs, and says so."""
    from BrainAgeLib import slicer_worker
    from BrainAgeLib.explain.labelmap import DEFAULT_LEVELS, attention_colors

    colors = attention_colors(DEFAULT_LEVELS)
    shutil.copy(SAMPLE, tmp_path / INPUT_FILE)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    command = worker_command(sys.executable, tmp_path / INPUT_FILE, tmp_path, "F", 67.0, "demo", "cpu",
                             levels=DEFAULT_LEVELS)
    assert slicer_worker.main(command[3:]) == 0
    assert "matplotlib is not installed" in capsys.readouterr().out
    outputs = read_worker_outputs(tmp_path)
    assert {"attention", "labelmap", "color_table", "brain_mask"} <= set(outputs.paths)
    assert not {"montage", "qc_figure"} & set(outputs.paths) and not list(tmp_path.glob("*.png"))
    result, labelmap = load_worker_result(tmp_path)
    assert labelmap.colors == colors and int(np.asarray(labelmap.volume.array).max()) == DEFAULT_LEVELS



@pytest.mark.slow
def test_the_report_of_a_finished_worker_folder_is_the_panels_save_report(finished_worker, tmp_path, capsys):
    """Save report: a worker writes the subject's HTML from the estimate's folder (result, maps, input)."""
    from html.parser import HTMLParser

    from BrainAgeLib import slicer_worker
    from BrainAgeLib.worker_protocol import report_command

    out = finished_worker[0]
    command = report_command(sys.executable, out, tmp_path / "report.html", "demo", subject="sample F67")
    assert slicer_worker.main(command[3:]) == 0
    lines = [parse_worker_line(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[-1].kind == "done" and lines[-1].text == str(tmp_path / "report.html")
    text = (tmp_path / "report.html").read_text(encoding="utf-8")
    HTMLParser().feed(text)
    result = json.loads((out / RESULT_FILE).read_text())
    assert f"{result['predicted_age']:.1f}" in text and "sample F67" in text
    assert text.count("data:image/png;base64,") >= 2  # the QC picture and the attention montage, embedded
    assert "synthetic" in text  # the demo model's disclaimer
