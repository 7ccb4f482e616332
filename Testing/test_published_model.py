"""The published BrainRotViT model in one step: download the volumes, verify, extract, import, use.

A synthetic archive in the authors' layout (their DoRA ViT with 18 classes in ``model_dumps/``,
their pickled CNN in ``model_dumps/mix/``, built as test_import_official builds them) is
compressed with py7zr into numbered volumes and served from a loopback HTTP server with Range
support, which can also drop a connection mid-volume or serve a damaged volume. The recipe's
volume list is swapped for the synthetic volumes and their git blob ids.
"""
from __future__ import annotations

import dataclasses
import hashlib
import http.server
import socket
import threading

import pytest

from BrainAgeLib.cli import main as brainage
from BrainAgeLib.digests import weights_digest
from BrainAgeLib.errors import ModelDownloadError
from BrainAgeLib.model import published
from BrainAgeLib.model.checkpoint import load_model, read_metadata
from BrainAgeLib.model.import_official import OFFICIAL_CNN_FILENAME, OFFICIAL_VIT_FILENAME, import_official

from test_import_official import (
    SMALL_SLICES, pickle_their_cnn, save_their_vit, small_vit_config, their_cnn, their_dora_vit,
)

VOLUMES = 4


def blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


# ------------------------------------------------------------------------ the authors' archive
@pytest.fixture(scope="module")
def authors_archive(tmp_path_factory):
    """Their two files, 7z-compressed and split into VOLUMES numbered volumes."""
    import multivolumefile
    import py7zr

    root = tmp_path_factory.mktemp("authors")
    tree = root / "tree"
    (tree / "model_dumps" / "mix").mkdir(parents=True)
    vit = their_dora_vit(small_vit_config(num_labels=18), seed=21)
    vit_path = save_their_vit(vit, tree / "model_dumps" / OFFICIAL_VIT_FILENAME, train_step=False)
    cnn = their_cnn((1, SMALL_SLICES, 128), seed=22)
    cnn_path = pickle_their_cnn(cnn, tree / "model_dumps" / "mix" / OFFICIAL_CNN_FILENAME, train_step=False)

    single = root / "single.7z"  # compress once to learn the size, then write the split volumes
    filters = [{"id": py7zr.FILTER_LZMA2, "preset": 1}]
    with py7zr.SevenZipFile(single, "w", filters=filters) as archive:
        archive.writeall(tree / "model_dumps", arcname="model_dumps")
    volume_bytes = single.stat().st_size // VOLUMES + 1
    served = root / "served"
    served.mkdir()
    with multivolumefile.MultiVolume(served / "best_checkpoints.7z", mode="wb", volume=volume_bytes,
                                     ext_digits=3) as target:
        with py7zr.SevenZipFile(target, "w", filters=filters) as archive:
            archive.writeall(tree / "model_dumps", arcname="model_dumps")
    files = {p.name: p.read_bytes() for p in sorted(served.glob("best_checkpoints.7z.*"))}
    assert list(files) == [f"best_checkpoints.7z.{i:03d}" for i in range(1, VOLUMES + 1)]

    direct = root / "direct.safetensors"
    with pytest.warns(UserWarning, match="18 classes"):
        import_official(vit_path, cnn_path, direct, name="brainrotvit")
    return {"files": files, "parts": tuple((name, blob_id(data)) for name, data in files.items()),
            "direct": direct, "vit_path": vit_path, "cnn_path": cnn_path}


class ArchiveServer:
    """A loopback HTTP server for the volumes: Range requests, a dropped connection, a bad volume."""

    def __init__(self, files):
        self.files = dict(files)
        self.drop_once = set()  # volumes whose next response stops half way
        self.damaged = {}  # volume -> bytes served instead
        self.requests = []  # (volume, Range header or None)
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                outer.requests.append((name, self.headers.get("Range")))
                if name not in outer.files:
                    self.send_error(404)
                    return
                data = outer.damaged.get(name, outer.files[name])
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if name in outer.drop_once:
                    outer.drop_once.discard(name)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/BrainRotViT/best_checkpoints/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(authors_archive, monkeypatch):
    """The synthetic volumes served and put in the recipe; the mirror URL set by environment."""
    running = ArchiveServer(authors_archive["files"])
    monkeypatch.setattr(published, "BRAINROTVIT",
                        dataclasses.replace(published.BRAINROTVIT, parts=authors_archive["parts"]))
    monkeypatch.setenv("BRAINAGE_BRAINROTVIT_URL", running.url)
    yield running
    running.stop()


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/best_checkpoints/"


def same_prediction(model_a, model_b, mni_3mm):
    """Both models' ages on the same prepared scan (cheap preprocessing: no skull strip, no N4)."""
    from BrainAgeLib.inference import predict_prepared
    from BrainAgeLib.presets import PreprocessConfig
    from BrainAgeLib.preprocess.pipeline import prepare

    config = PreprocessConfig(skull_strip="none", n4_bias_correction=False, n_slices=SMALL_SLICES, image_size=32)
    prepared = prepare(mni_3mm, config, skull_stripped=True)
    ages = [predict_prepared(m, prepared, "F", age=60.0, device="cpu", precision="fp32").predicted_age
            for m in (model_a, model_b)]
    return ages


# ------------------------------------------------------------------------------------ tests
def test_the_recipe_names_17_volumes_with_their_urls():
    archive = published.BRAINROTVIT
    urls = archive.urls(archive.default_base_url())
    assert len(archive.parts) == 17 and len(urls) == 17
    assert urls[0] == ("https://github.com/wjalal/BrainRotViT/raw/559af438ad7a1e59949cdc97bdc56757af895b5f/"
                       "best_checkpoints/best_checkpoints.7z.001")
    assert urls[-1].endswith("best_checkpoints.7z.017")
    assert all(len(blob) == 40 for _, blob in archive.parts)


def test_git_blob_id_is_what_git_computes(tmp_path):
    path = tmp_path / "hello"
    path.write_bytes(b"hello\n")
    assert published.git_blob_id(path) == "ce013625030ba8dba906f756967f9e9ca394464a"  # git hash-object


def test_download_extract_import_predicts_as_the_direct_import(server, authors_archive, tmp_path, mni_3mm):
    fractions = []
    with pytest.warns(UserWarning, match="18 classes"):
        path = published.install_published_model(cache_dir=tmp_path, progress=lambda f, m: fractions.append((f, m)))
    assert path == tmp_path / "brainrotvit.safetensors"
    assert [name for name, _ in server.requests] == [name for name, _ in authors_archive["parts"]]
    assert fractions[-1][0] == 1.0 and all(a[0] <= b[0] for a, b in zip(fractions, fractions[1:]))
    assert any("extracting" in m for _, m in fractions) and any("importing" in m for _, m in fractions)

    ours, direct = load_model(path), load_model(authors_archive["direct"])
    assert weights_digest(ours) == weights_digest(direct)
    age_ours, age_direct = same_prediction(ours, direct, mni_3mm)
    assert age_ours == pytest.approx(age_direct, abs=1e-6)
    assert 0.0 < age_ours < 150.0  # their CNN's output bias is 45 y: an age, not a NaN or a logit

    card = read_metadata(path)
    download = card["source"]["download"]
    assert download["commit"] == published.BRAINROTVIT.commit
    assert [v["git_blob_id"] for v in download["volumes"]] == [b for _, b in authors_archive["parts"]]
    assert download["extracted_with"].startswith("py7zr")
    assert download["url"] == server.url
    assert "LICENSE" in card["licence"]
    assert card["class_labels_known"] is False
    assert {f["role"] for f in card["source"]["files"]} == {"stage-1 ViT", "stage-2 CNN"}
    # volumes and extracted pickles are gone; only the model is left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["brainrotvit.safetensors"]


def test_a_dropped_connection_resumes_with_a_range_request(server, authors_archive, tmp_path):
    second = authors_archive["parts"][1][0]
    server.drop_once.add(second)
    with pytest.warns(UserWarning):
        path = published.install_published_model(cache_dir=tmp_path)
    ranges = [header for name, header in server.requests if name == second]
    assert ranges[0] is None and ranges[1] == f"bytes={len(authors_archive['files'][second]) // 2}-"
    assert weights_digest(load_model(path)) == weights_digest(load_model(authors_archive["direct"]))


def test_an_interrupted_run_is_resumed_by_the_next(server, authors_archive, tmp_path):
    third = authors_archive["parts"][2][0]
    server.drop_once.add(third)
    with pytest.raises(ModelDownloadError, match="interrupted") as error:
        published.install_published_model(cache_dir=tmp_path, attempts=1)
    assert "run the same command again" in str(error.value)
    downloads = published.downloads_folder("brainrotvit", tmp_path)
    partial = downloads / f".{third}.partial"
    assert partial.stat().st_size == len(authors_archive["files"][third]) // 2
    assert not (tmp_path / "brainrotvit.safetensors").exists()  # never half a model

    server.requests.clear()
    with pytest.warns(UserWarning):
        path = published.install_published_model(cache_dir=tmp_path)
    # the two verified volumes are not fetched again; the third resumes where it stopped
    assert server.requests[0] == (third, f"bytes={partial_size(authors_archive, third)}-")
    assert weights_digest(load_model(path)) == weights_digest(load_model(authors_archive["direct"]))


def partial_size(authors_archive, name):
    return len(authors_archive["files"][name]) // 2


def test_a_damaged_volume_is_refused_named_and_deleted(server, authors_archive, tmp_path):
    third = authors_archive["parts"][2][0]
    good = authors_archive["files"][third]
    server.damaged[third] = good[:100] + bytes([good[100] ^ 0xFF]) + good[101:]
    with pytest.raises(ModelDownloadError, match=third) as error:
        published.install_published_model(cache_dir=tmp_path)
    assert "deleted" in str(error.value) and authors_archive["parts"][2][1] in str(error.value)
    downloads = published.downloads_folder("brainrotvit", tmp_path)
    assert not (downloads / third).exists() and not list(downloads.glob(f".{third}*"))
    assert not (tmp_path / "brainrotvit.safetensors").exists()


def test_a_git_lfs_pointer_instead_of_a_volume_is_named_as_such(server, authors_archive, tmp_path):
    first = authors_archive["parts"][0][0]
    server.damaged[first] = (b"version https://git-lfs.github.com/spec/v1\n"
                             b"oid sha256:" + b"0" * 64 + b"\nsize 52428800\n")
    with pytest.raises(ModelDownloadError, match="Git LFS pointer"):
        published.install_published_model(cache_dir=tmp_path)
    assert not list(published.downloads_folder("brainrotvit", tmp_path).iterdir())


def test_a_cache_folder_that_cannot_be_made_is_named(server, tmp_path, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache should go")
    with pytest.raises(ModelDownloadError, match="cannot write in") as error:
        published.install_published_model(cache_dir=blocker / "cache")
    assert str(blocker / "cache" / "downloads" / "brainrotvit") in str(error.value)
    assert brainage(["models", "download", "brainrotvit", "--cache-dir", str(blocker / "cache")]) == 2
    assert "--cache-dir" in capsys.readouterr().err


def test_offline_gives_every_url_and_the_manual_route(authors_archive, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BRAINAGE_BRAINROTVIT_URL", closed_port_url())
    with pytest.raises(ModelDownloadError) as error:
        published.install_published_model(cache_dir=tmp_path)
    message = str(error.value)
    for url in published.BRAINROTVIT.urls():
        assert url in message
    assert "7z x best_checkpoints.7z.001" in message and "brainage import-official" in message

    code = brainage(["models", "download", "brainrotvit", "--cache-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "best_checkpoints.7z.017" in err and "import-official" in err


def test_load_model_fetches_once_then_needs_no_network(server, authors_archive, tmp_path, monkeypatch):
    monkeypatch.setenv("BRAINAGE_CACHE", str(tmp_path))
    with pytest.warns(UserWarning):
        first = load_model("brainrotvit")
    assert len(server.requests) == VOLUMES
    server.stop()
    monkeypatch.setenv("BRAINAGE_BRAINROTVIT_URL", closed_port_url())
    second = load_model("brainrotvit")
    assert weights_digest(second) == weights_digest(first) == weights_digest(load_model(authors_archive["direct"]))
    server.httpd = _StoppedStub()  # the fixture's stop() has nothing left to stop


class _StoppedStub:
    def shutdown(self):
        pass

    def server_close(self):
        pass


def test_cli_models_list_download_path_remove(server, tmp_path, capsys):
    cache = ["--cache-dir", str(tmp_path)]
    assert brainage(["models", "list", *cache]) == 0
    listing = capsys.readouterr().out
    row = next(line for line in listing.splitlines() if line.startswith("brainrotvit"))
    assert " no " in row and "wjalal/BrainRotViT" in row and "4,086" in row
    assert brainage(["models", "path", "brainrotvit", *cache]) == 2
    capsys.readouterr()

    assert brainage(["models", "download", "brainrotvit", "--keep-downloads", *cache]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("WARNING:") == 1 and "downloading best_checkpoints.7z.001" in captured.err
    model = tmp_path / "brainrotvit.safetensors"
    assert str(model) in captured.out and model.is_file()
    kept = published.downloads_folder("brainrotvit", tmp_path)
    assert len(list(kept.glob("best_checkpoints.7z.*"))) == VOLUMES
    assert (kept / "extracted" / "model_dumps" / "mix" / OFFICIAL_CNN_FILENAME).is_file()

    assert brainage(["models", "list", *cache]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("brainrotvit"))
    assert " yes " in row and (" MB " in row or " KB " in row)
    assert brainage(["models", "path", "brainrotvit", *cache]) == 0
    assert capsys.readouterr().out.strip() == str(model)

    assert brainage(["models", "remove", "brainrotvit", *cache]) == 0
    assert [p for p in tmp_path.rglob("*")] == []  # nothing left behind
    assert brainage(["models", "remove", "demo", *cache]) == 2


def test_no_extractor_gives_a_clear_error(server, tmp_path, monkeypatch):
    """py7zr unable to read the method and no 7z program: the error says what to install."""
    import py7zr
    from py7zr.exceptions import UnsupportedCompressionMethodError

    def unsupported(self, *args, **kwargs):
        raise UnsupportedCompressionMethodError(b"\x03\x03\x01\x1b", "BCJ2")

    monkeypatch.setattr(py7zr.SevenZipFile, "extractall", unsupported)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(ModelDownloadError, match="no 7z program") as error:
        published.install_published_model(cache_dir=tmp_path)
    assert "py7zr cannot decompress" in str(error.value) and "p7zip" in str(error.value)
    assert not (tmp_path / "brainrotvit.safetensors").exists()
    assert not list(tmp_path.glob(".brainrotvit-extract-*"))  # the temporary folder is gone


def test_the_worker_downloads_with_protocol_progress_and_names_the_model(server, tmp_path, capsys):
    """What the Slicer panel's Download button runs (worker_protocol.download_command), in this process
    so the served recipe applies: progress lines that only go forward, then the model's file."""
    from BrainAgeLib import slicer_worker
    from BrainAgeLib.registry import is_cached
    from BrainAgeLib.worker_protocol import download_command, parse_worker_line

    command = download_command("python", "brainrotvit", cache_dir=tmp_path)
    assert command[1:4] == ["-m", "BrainAgeLib.slicer_worker", "download"]
    with pytest.warns(UserWarning):  # the 18 stage-1 classes do not name their labels
        assert slicer_worker.main(command[3:]) == 0
    messages = [parse_worker_line(line) for line in capsys.readouterr().out.splitlines()]
    fractions = [m.fraction for m in messages if m.kind == "progress"]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    steps = [m.text for m in messages if m.kind == "progress"]
    assert any(f"(2/{VOLUMES}): " in text and " MB" in text for text in steps), steps  # volume and bytes so far
    assert messages[-1].kind == "done" and messages[-1].text == str(tmp_path / "brainrotvit.safetensors")
    assert is_cached("brainrotvit", tmp_path)
    assert slicer_worker.main(command[3:]) == 0  # a second run finds it cached: no request
    assert len(server.requests) == VOLUMES
    assert "already downloaded" in capsys.readouterr().out


def test_unknown_model_to_download_is_a_bad_input(tmp_path, capsys):
    from BrainAgeLib import slicer_worker
    from BrainAgeLib.worker_protocol import EXIT_BAD_INPUT

    assert slicer_worker.main(["download", "no-such-model", "--cache-dir", str(tmp_path)]) == EXIT_BAD_INPUT
    assert "unknown model 'no-such-model'" in capsys.readouterr().out
