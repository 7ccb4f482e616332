"""``brainage import-official``: turn the authors' published BrainRotViT checkpoints into a BrainAge model."""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from ._common import report_warnings, writable_folder

COMMAND = "import-official"
HELP = "convert the authors' published BrainRotViT checkpoints (.pth ViT + .pkl CNN) into a BrainAge .safetensors model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Convert the published BrainRotViT checkpoints (github.com/wjalal/BrainRotViT, "
        "best_checkpoints/, extracted with `7z x best_checkpoints.7z.001`) into one BrainAge "
        "model file. DoRA adapters are merged into the ViT; nothing in the files is executed "
        "(weights-only torch.load and a restricted unpickler). Use the result with "
        "`brainage predict --model MODEL.safetensors` or pick it as the model file in Slicer."
    )
    parser.add_argument(
        "folder", nargs="?", default=None,
        help="folder holding the extracted archive (both files are found in it); or give --vit and --cnn",
    )
    parser.add_argument("--vit", metavar="VIT.pth", help="stage-1 ViT checkpoint (vit_dora_train_checkpoint.pth)")
    parser.add_argument(
        "--cnn", metavar="CNN.pkl",
        help="stage-2 CNN checkpoint (cnn_mx_bigdo_ch_sw_res_best_model_with_metadata.pkl)",
    )
    parser.add_argument("--out", required=True, metavar="MODEL.safetensors", help="BrainAge model file to write")
    parser.add_argument("--name", default=None, help="model name shown in results (default: brainrotvit-official)")
    parser.add_argument(
        "--class-labels", default=None, metavar="LABELS",
        help="the authors' stage-1 class labels in their sorted order, comma-separated (e.g. 010F,010M,...); "
             "only 20 classes identify themselves; without labels other counts import with generic "
             "ones ('class 0', ...), which ages and maps do not use",
    )
    parser.add_argument("--lora-alpha", type=float, default=16.0, help="DoRA lora_alpha used in training (default: 16)")
    parser.add_argument("--num-heads", type=int, default=None, help="ViT attention heads (default: embed_dim / 64)")
    parser.add_argument("--no-precision-record", dest="record_precisions", action="store_false", default=None,
                        help="skip measuring how far int8/bf16 move the age (minutes on a CPU); without the "
                             "record, precision auto stays fp32 on the CPU")


def run(args: argparse.Namespace) -> int:
    from ..errors import CheckpointError
    from ..model.import_official import UnknownClassLabelsWarning, find_official_files, import_official

    if args.folder is not None:
        if args.vit or args.cnn:
            raise CheckpointError("give either a folder or --vit and --cnn, not both")
        vit, cnn = find_official_files(args.folder)
    elif args.vit and args.cnn:
        vit, cnn = args.vit, args.cnn
    else:
        raise CheckpointError("give the folder of the extracted archive, or both --vit VIT.pth and --cnn CNN.pkl")
    writable_folder(Path(args.out).resolve().parent, "--out file's")
    labels = [label.strip() for label in args.class_labels.split(",")] if args.class_labels else None
    print(f"ViT: {vit}\nCNN: {cnn}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UnknownClassLabelsWarning)
        out = import_official(
            vit, cnn, args.out, name=args.name,
            lora_alpha=args.lora_alpha, num_heads=args.num_heads, class_labels=labels,
            record_precisions=args.record_precisions,
        )
    report_warnings(caught, UnknownClassLabelsWarning)
    print(f"wrote {out}")
    return 0
