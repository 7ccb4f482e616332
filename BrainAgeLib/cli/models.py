"""``brainage models``: the registered models, and fetching or removing the downloaded ones."""
from __future__ import annotations

import argparse
import warnings

COMMAND = "models"
HELP = "list the registered models; download, remove or locate one (e.g. the published BrainRotViT)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Models known by name: 'demo' (bundled) and 'brainrotvit', the authors' published model, "
        "which `brainage models download brainrotvit` fetches from github.com/wjalal/BrainRotViT "
        "(17 volumes of a 7z archive, each verified by its git blob id), extracts and imports "
        "into the cache. Any command taking --model NAME fetches it on first use too."
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    listing = actions.add_parser("list", help="name, source, training data, size, whether cached, path")
    download = actions.add_parser("download", help="fetch (and import) a registered model into the cache")
    download.add_argument("name", help="registered model name (e.g. brainrotvit)")
    download.add_argument("--base-url", default=None, metavar="URL",
                          help="a mirror holding the archive's volumes (default: the GitHub repository, "
                               "or $BRAINAGE_BRAINROTVIT_URL)")
    download.add_argument("--keep-downloads", action="store_true",
                          help="keep the downloaded volumes and the extracted checkpoints in the cache")
    download.add_argument("--force", action="store_true", help="fetch again even if the model is cached")
    remove = actions.add_parser("remove", help="delete a cached model and whatever its download left")
    remove.add_argument("name", help="registered model name")
    path = actions.add_parser("path", help="print where a registered model's file is")
    path.add_argument("name", help="registered model name")
    for sub in (listing, download, remove, path):
        sub.add_argument("--cache-dir", default=None, metavar="FOLDER",
                         help="model cache (default: $BRAINAGE_CACHE, else ~/.cache/brainage)")


def run(args: argparse.Namespace) -> int:
    return {"list": _list, "download": _download, "remove": _remove, "path": _path}[args.action](args)


def _entry(name: str):
    from ..errors import CheckpointError
    from ..model.checkpoint import REGISTRY

    if name not in REGISTRY:
        raise CheckpointError(f"unknown model {name!r} (registered: {', '.join(REGISTRY)})")
    return REGISTRY[name]


def _size(path) -> str:
    if not path.is_file():
        return "-"
    size = path.stat().st_size
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000.0
    return "-"


def _list(args: argparse.Namespace) -> int:
    from ..model.checkpoint import available_models

    rows = [("NAME", "SOURCE", "TRAINED ON", "SIZE", "CACHED", "PATH")]
    for entry in available_models():
        path = entry.local_path(args.cache_dir)
        state = "bundled" if entry.bundled else ("yes" if path.is_file() else "no")
        if entry.bundled and not path.is_file():
            state = "missing"
        source = entry.source or entry.url or ""
        rows.append((entry.name, source, entry.trained_on or "-", _size(path), state, str(path)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    return 0


def _download(args: argparse.Namespace) -> int:
    from ..model.checkpoint import resolve_checkpoint

    entry = _entry(args.name)
    path = entry.local_path(args.cache_dir)
    if entry.bundled:
        print(f"{entry.name} is bundled with BrainAge: {path}")
        return 0
    if path.is_file() and not args.force:
        print(f"{entry.name} is already cached: {path}")
        return 0
    if entry.recipe == "published":
        from ..model.import_official import UnknownClassLabelsWarning
        from ..model.published import install_published_model
        from ._common import TerminalProgress, report_warnings

        with TerminalProgress() as progress, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UnknownClassLabelsWarning)
            out = install_published_model(path, name=entry.name, cache_dir=args.cache_dir, base_url=args.base_url,
                                          keep_downloads=args.keep_downloads, progress=progress)
        report_warnings(caught, UnknownClassLabelsWarning)
    else:
        if path.is_file():
            path.unlink()
        out = resolve_checkpoint(entry.name, cache_dir=args.cache_dir)
    print(f"{entry.name}: {out}")
    return 0


def _remove(args: argparse.Namespace) -> int:
    from ..model.checkpoint import remove_cached_model

    removed = remove_cached_model(args.name, cache_dir=args.cache_dir)
    if not removed:
        print(f"{args.name} is not in the cache ({_entry(args.name).local_path(args.cache_dir)}); nothing removed")
    for path in removed:
        print(f"removed {path}")
    return 0


def _path(args: argparse.Namespace) -> int:
    from ..errors import CheckpointError

    entry = _entry(args.name)
    path = entry.local_path(args.cache_dir)
    if not path.is_file():
        raise CheckpointError(f"model {entry.name!r} is not downloaded yet (brainage models download {entry.name})",
                              path)
    print(path)
    return 0
