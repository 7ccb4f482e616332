"""The published BrainRotViT model, fetched and imported in one step.

The authors publish their trained checkpoints in github.com/wjalal/BrainRotViT, folder
``best_checkpoints/``, as a 7-Zip archive split into 17 volumes ``best_checkpoints.7z.001`` ...
``.017`` (their README: ``7z x best_checkpoints.7z.001``; the ViT goes in ``model_dumps/``, the
CNN in ``model_dumps/mix/``). The recipe here, pinned to one commit:

1. download each volume into ``<cache>/downloads/<name>/`` from
   ``https://github.com/wjalal/BrainRotViT/raw/<commit>/best_checkpoints/<volume>`` (or a mirror:
   ``base_url`` or ``$BRAINAGE_BRAINROTVIT_URL``), resuming an interrupted volume with an HTTP
   Range request, and verify it by its git blob id (SHA-1 of ``b"blob <size>\\0" + content``, what
   git itself stores for the file at that commit); a volume that does not match is deleted;
2. extract the archive into a temporary folder with py7zr (``multivolumefile`` joins the
   volumes), or with a ``7z`` program on PATH when py7zr cannot read the archive's method;
3. delete the volumes once extracted (unless ``keep_downloads``), so that the disk never holds
   the volumes, the extracted checkpoints and the model at once;
4. find the two checkpoints and convert them with :func:`import_official.import_official`,
   which writes the model file atomically, recording the repository, commit, volumes and their
   blob ids, the extraction tool and the licence in the model card;
5. delete the extracted pickles (unless ``keep_downloads``).

An interrupted download leaves verified volumes and a partial one (resumed next time) in the
downloads folder, and never a half-written model; a run stopped after the extraction downloads
again. ``checkpoint.REGISTRY`` names the model
(``"brainrotvit"``); ``load_model("brainrotvit")`` runs this recipe once and then loads the
cached file without touching the network.
"""
from __future__ import annotations

import http.client
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple, Union

from ..digests import git_blob_id
from ..errors import ModelDownloadError
from ..resources import cache_dir as default_cache_dir

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
#: ``progress(fraction, message)``: fraction of the whole job done, in [0, 1].
Progress = Callable[[float, str], None]

_CHUNK = 1 << 20
#: Share of the progress bar for the downloads; extraction and import share the rest.
_DOWNLOAD_SHARE = 0.8
_EXTRACT_SHARE = 0.1
_LFS_POINTER = b"version https://git-lfs.github.com/spec/"


@dataclass(frozen=True)
class PublishedArchive:
    """Where the authors' split 7z archive lives and what each of its volumes must be."""

    repository: str
    commit: str
    folder: str
    archive: str
    parts: Tuple[Tuple[str, str], ...]  # (volume file name, git blob id)
    licence: str
    base_url_env: str

    def default_base_url(self) -> str:
        return f"https://github.com/{self.repository}/raw/{self.commit}/{self.folder}/"

    def base_url(self, override: Optional[str] = None) -> str:
        """``override``, else ``$<base_url_env>``, else the repository's raw URL; ends with ``/``."""
        url = override or os.environ.get(self.base_url_env) or self.default_base_url()
        return url if url.endswith("/") else url + "/"

    def urls(self, base_url: Optional[str] = None) -> List[str]:
        base = self.base_url(base_url)
        return [base + name for name, _ in self.parts]


BRAINROTVIT = PublishedArchive(
    repository="wjalal/BrainRotViT",
    commit="559af438ad7a1e59949cdc97bdc56757af895b5f",
    folder="best_checkpoints",
    archive="best_checkpoints.7z",
    parts=(
        ("best_checkpoints.7z.001", "bb1a07337472580ac5ae469978653ca00fa91b62"),
        ("best_checkpoints.7z.002", "8d30399ca28dd76780bf04ae34e2da52cd182bab"),
        ("best_checkpoints.7z.003", "9d4eaf1f4912dd5fb7725f220fdb5da3bb266b94"),
        ("best_checkpoints.7z.004", "5add82ced408e4d08f98c86a3168e1ca025c8a9e"),
        ("best_checkpoints.7z.005", "a7cd5293befa936da876c7843dd32bb6e0b572c8"),
        ("best_checkpoints.7z.006", "c83c44825073616dea4dc4e861d1ac9402cb15bf"),
        ("best_checkpoints.7z.007", "6c354f964854e84a73c0c91c258f2619edf72f9c"),
        ("best_checkpoints.7z.008", "32219fd9308de9808c9e859597464eef755563b7"),
        ("best_checkpoints.7z.009", "84decc6019e73f6fba4bf0bb2663821c6668c68e"),
        ("best_checkpoints.7z.010", "cb1af923ea4b2eaf0d592ca8b3b1340a331abbb7"),
        ("best_checkpoints.7z.011", "3e7047b1b229d412ce2d1eb53a6223d0c6a2a11f"),
        ("best_checkpoints.7z.012", "7f57576a36acd3aee59f80a1743c3cdb5043facd"),
        ("best_checkpoints.7z.013", "743d7b978f8f8ab6f8c3db0dbbd1d51e914aeac9"),
        ("best_checkpoints.7z.014", "88bc92632c59628e861914e0d062b8d638d0a977"),
        ("best_checkpoints.7z.015", "93c39a1e0022578dad5e29a0964a3d72d0f3a3db"),
        ("best_checkpoints.7z.016", "aa80fdfde71a7a4da5ad9946fb01774b85c5ab3f"),
        ("best_checkpoints.7z.017", "660b7a32674cea1bf2dca42ec2c53342497f28ae"),
    ),
    # The repository carries no LICENSE file (none in the copy this recipe was written from).
    licence="none stated by the authors (no LICENSE file in wjalal/BrainRotViT); use under their "
            "terms and cite Jalal et al. 2025 (arXiv:2511.15188)",
    base_url_env="BRAINAGE_BRAINROTVIT_URL",
)


# ------------------------------------------------------------------------------- downloading
class _Unreachable(Exception):
    """No byte came from the server: offline, refused, no such host."""


def download_part(
    url: str,
    destination: PathLike,
    blob_id: str,
    *,
    timeout_s: float = 60.0,
    attempts: int = 3,
    progress: Optional[Callable[[int, Optional[int]], None]] = None,
) -> Path:
    """Fetch one volume to ``destination`` and verify its git blob id; returns the path.

    A verified file already there is kept. Bytes arrive in a hidden ``.<name>.partial`` beside
    it; a connection that drops is resumed from the partial's size with a Range request, up to
    ``attempts`` connections in all (a partial left by an earlier run is resumed the same way).
    ``progress(bytes_so_far, total_or_None)`` follows the transfer. A complete file whose blob id
    differs is deleted and named in the :class:`ModelDownloadError`.
    """
    destination = Path(destination)
    name = destination.name
    if destination.is_file():
        if git_blob_id(destination) == blob_id:
            return destination
        logger.warning("%s does not match its git blob id %s; downloading it again", destination, blob_id)
        destination.unlink()
    partial = destination.with_name(f".{name}.partial")
    last_problem = ""
    for _ in range(max(1, attempts)):
        have = partial.stat().st_size if partial.is_file() else 0
        try:  # an unreachable server (_Unreachable) is not retried: the caller reports it
            _fetch_into(url, partial, have, timeout_s, progress)
            break
        except _Interrupted as problem:
            last_problem = str(problem)
            logger.info("download of %s interrupted (%s); resuming", url, problem)
    else:
        size = partial.stat().st_size if partial.is_file() else 0
        raise ModelDownloadError(
            f"the download of {name} from {url} was interrupted {attempts} times ({last_problem}); "
            f"{size} bytes are kept in {partial}: run the same command again to resume")
    actual = git_blob_id(partial)
    if actual != blob_id:
        with open(partial, "rb") as handle:
            lfs_pointer = handle.read(len(_LFS_POINTER)) == _LFS_POINTER
        partial.unlink()
        if lfs_pointer:
            raise ModelDownloadError(
                f"{url} served a Git LFS pointer (a small text file naming the real content), not volume {name}; "
                "use a URL that serves the file itself (--base-url / the BRAINAGE_BRAINROTVIT_URL environment "
                "variable), or fetch it with `git lfs pull`", destination)
        raise ModelDownloadError(
            f"volume {name} downloaded from {url} has git blob id {actual}, expected {blob_id}: damaged or "
            "tampered, deleted; run again to download it afresh (if it fails again, the server or mirror "
            "serves a different file)", destination)
    os.replace(partial, destination)
    return destination


class _Interrupted(Exception):
    """The connection broke after some bytes (or before the first of a resumed range)."""


def _fetch_into(url: str, partial: Path, have: int, timeout_s: float,
                progress: Optional[Callable[[int, Optional[int]], None]]) -> None:
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as error:
        if error.code == 416 and have:  # nothing after what we have: the partial is complete
            return
        raise ModelDownloadError(f"the server answered HTTP {error.code} ({error.reason}) for {url}") from None
    except (urllib.error.URLError, socket.timeout, ConnectionError, http.client.HTTPException) as error:
        reason = getattr(error, "reason", error)
        raise _Unreachable(f"{reason}") from None
    with response:
        resumed = bool(have) and response.status == 206
        if have and not resumed:
            have = 0  # the server ignored the Range header: start this volume over
        length = response.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else None
        done = have
        try:
            handle = open(partial, "ab" if resumed else "wb")
        except OSError as error:
            raise _disk_error(partial.parent, error) from None
        with handle:
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except (http.client.IncompleteRead, socket.timeout, ConnectionError, OSError) as error:
                    raise _Interrupted(f"{type(error).__name__}: {error}") from None
                if not chunk:
                    break
                try:
                    handle.write(chunk)
                except OSError as error:
                    raise _disk_error(partial.parent, error) from None
                done += len(chunk)
                if progress:
                    progress(done, total)
        if total is not None and done < total:
            raise _Interrupted(f"{done} of {total} bytes")


def _disk_error(folder: Path, error: OSError) -> ModelDownloadError:
    return ModelDownloadError(
        f"cannot write in {folder} ({error.strerror or error}); free some space or choose another cache "
        "folder (--cache-dir, or the BRAINAGE_CACHE environment variable)", folder)


def offline_message(archive: PublishedArchive, base_url: Optional[str], reason: str, destination: Path) -> str:
    """The error text for an unreachable server: every URL, and the manual route."""
    urls = "\n  ".join(archive.urls(base_url))
    return (
        f"cannot reach {archive.base_url(base_url)} ({reason}). To install the published BrainRotViT "
        f"model without this machine downloading it, fetch these {len(archive.parts)} files elsewhere:\n  {urls}\n"
        f"put them in one folder, extract them with `7z x {archive.parts[0][0]}`, and convert the result with "
        f"`brainage import-official FOLDER --out {destination}` (or set {archive.base_url_env} to a mirror "
        "holding the same files)"
    )


def download_parts(
    archive: PublishedArchive,
    folder: PathLike,
    *,
    base_url: Optional[str] = None,
    timeout_s: float = 60.0,
    attempts: int = 3,
    progress: Optional[Progress] = None,
    destination_hint: Optional[Path] = None,
) -> List[Path]:
    """Every volume of ``archive`` in ``folder``, downloaded (or found) and verified."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _disk_error(folder, error) from None
    paths = []
    count = len(archive.parts)
    for index, ((name, blob_id), url) in enumerate(zip(archive.parts, archive.urls(base_url))):
        message = f"downloading {name} ({index + 1}/{count})"

        def on_bytes(done: int, total: Optional[int], index: int = index, message: str = message) -> None:
            if progress:
                within = done / total if total else 0.0
                size = f"{done / 1e6:.1f} of {total / 1e6:.1f} MB" if total else f"{done / 1e6:.1f} MB"
                progress(_DOWNLOAD_SHARE * (index + min(within, 1.0)) / count, f"{message}: {size}")

        if progress:
            progress(_DOWNLOAD_SHARE * index / count, message)
        try:
            paths.append(download_part(url, folder / name, blob_id, timeout_s=timeout_s, attempts=attempts,
                                       progress=on_bytes))
        except _Unreachable as problem:
            raise ModelDownloadError(offline_message(
                archive, base_url, str(problem), destination_hint or folder / "MODEL.safetensors")) from None
    return paths


# -------------------------------------------------------------------------------- extracting
def extract_archive(first_volume: PathLike, destination: PathLike) -> str:
    """Extract a (split) 7z archive into ``destination``; returns the tool used.

    py7zr reads the volumes joined by multivolumefile; if it cannot (a compression method it
    lacks, or py7zr not installed) a ``7z``/``7zz``/``7za`` program on PATH does it.
    """
    first_volume = Path(first_volume)
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    stem = first_volume.with_suffix("") if first_volume.suffix[1:].isdigit() else first_volume
    try:
        import multivolumefile
        import py7zr
        from py7zr.exceptions import UnsupportedCompressionMethodError
    except ImportError as missing:
        reason = f"{missing.name} is not installed (pip install py7zr multivolumefile)"
    else:
        try:
            if stem != first_volume:
                with multivolumefile.open(stem, mode="rb") as joined, py7zr.SevenZipFile(joined, "r") as archive:
                    archive.extractall(path=destination)
            else:
                with py7zr.SevenZipFile(first_volume, "r") as archive:
                    archive.extractall(path=destination)
            return f"py7zr {py7zr.__version__}"
        except UnsupportedCompressionMethodError as error:
            reason = f"py7zr cannot decompress it ({error})"
        except OSError as error:
            raise _disk_error(destination, error) from None
        except Exception as error:  # py7zr raises Bad7zFile, CrcError, ... for damaged archives
            raise ModelDownloadError(
                f"the 7z archive is damaged or not a 7z archive ({type(error).__name__}: {error})", first_volume
            ) from None
    program = next((found for found in map(shutil.which, ("7z", "7zz", "7za")) if found), None)
    if program is None:
        raise ModelDownloadError(
            f"cannot extract the archive: {reason}, and no 7z program is on PATH (Debian/Ubuntu: "
            "apt install p7zip-full; macOS: brew install sevenzip)", first_volume)
    logger.info("extracting %s with %s (%s)", first_volume, program, reason)
    done = subprocess.run([program, "x", "-y", f"-o{destination}", str(first_volume)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        tail = done.stdout.strip().splitlines()[-3:]
        raise ModelDownloadError(f"{program} could not extract the archive: {' '.join(tail)}", first_volume)
    return f"7z program {program} ({reason})"


# -------------------------------------------------------------------------------- installing
def downloads_folder(name: str, cache_dir: Optional[PathLike] = None) -> Path:
    """Where the volumes of model ``name`` wait until it is imported (and stay with keep_downloads)."""
    return _cache(cache_dir) / "downloads" / name


def install_published_model(
    destination: Optional[PathLike] = None,
    *,
    name: str = "brainrotvit",
    archive: Optional[PublishedArchive] = None,
    cache_dir: Optional[PathLike] = None,
    base_url: Optional[str] = None,
    keep_downloads: bool = False,
    timeout_s: float = 60.0,
    attempts: int = 3,
    progress: Optional[Progress] = None,
) -> Path:
    """Download, verify, extract and import the published BrainRotViT model; returns the model file.

    ``destination`` defaults to ``<cache>/<name>.safetensors`` (``cache_dir``, else
    ``$BRAINAGE_CACHE``, else ``~/.cache/brainage``). ``base_url`` (or ``$BRAINAGE_BRAINROTVIT_URL``)
    points at a mirror holding the same volumes. ``progress(fraction, message)`` follows the
    whole job. Raises :class:`ModelDownloadError` (offline: the message lists every URL and the
    manual route), or :class:`CheckpointError` if the extracted files cannot be converted.
    """
    from .import_official import find_official_files, import_official

    archive = archive or BRAINROTVIT
    cache = _cache(cache_dir)
    destination = Path(destination) if destination else cache / f"{name}.safetensors"
    downloads = downloads_folder(name, cache)
    parts = download_parts(archive, downloads, base_url=base_url, timeout_s=timeout_s, attempts=attempts,
                           progress=progress, destination_hint=destination)
    report = progress or (lambda fraction, message: None)
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{name}-extract-", dir=destination.parent))
    except OSError as error:
        raise _disk_error(destination.parent, error) from None
    try:
        report(_DOWNLOAD_SHARE, f"extracting {archive.archive}")
        extracted = work / "extracted"
        method = extract_archive(parts[0], extracted)
        vit, cnn = find_official_files(extracted)
        volumes = [{"file": path.name, "git_blob_id": blob, "bytes": path.stat().st_size}
                   for path, (_, blob) in zip(parts, archive.parts)]
        if not keep_downloads:  # extracted: the volumes go now, so the disk never holds volumes, pickles and model
            shutil.rmtree(downloads, ignore_errors=True)
            _remove_if_empty(downloads.parent)
        report(_DOWNLOAD_SHARE + _EXTRACT_SHARE, f"importing {vit.name} and {cnn.name}")
        card = {
            "source": {"download": {
                "repository": f"github.com/{archive.repository}",
                "commit": archive.commit,
                "folder": archive.folder,
                "url": archive.base_url(base_url),
                "volumes": volumes,
                "extracted_with": method,
                "files_in_archive": [str(vit.relative_to(extracted)), str(cnn.relative_to(extracted))],
            }},
            "licence": archive.licence,
        }
        try:
            model_path = import_official(vit, cnn, destination, name=name, metadata=card)
        except OSError as error:
            raise _disk_error(destination.parent, error) from None
        if keep_downloads:
            kept = downloads / "extracted"
            shutil.rmtree(kept, ignore_errors=True)
            shutil.move(str(extracted), str(kept))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(1.0, f"installed {model_path}")
    logger.info("installed the published model %r at %s (extracted with %s)", name, model_path, method)
    return model_path


def remove_downloads(name: str, cache_dir: Optional[PathLike] = None) -> List[Path]:
    """Delete what a (possibly interrupted) install of ``name`` left: volumes, partials, extracted
    files, temporary extraction folders. Returns what was removed."""
    cache = _cache(cache_dir)
    removed = []
    downloads = downloads_folder(name, cache)
    candidates = [downloads, *cache.glob(f".{name}-extract-*")] if cache.is_dir() else []
    for path in candidates:
        if path.exists():
            shutil.rmtree(path)
            removed.append(path)
    _remove_if_empty(downloads.parent)
    return removed


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def _cache(cache_dir: Optional[PathLike]) -> Path:
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
