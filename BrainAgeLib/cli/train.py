"""``brainage train COHORT --out DIR --preset NAME``: train both BrainRotViT stages on a labelled cohort.

COHORT is a CSV or a BIDS participants.tsv (path, age, sex, optional id/site). The run folder
holds caches, per-epoch training state and the final checkpoint, so a rerun resumes where an
interrupted one stopped. For several processes or GPUs::

    torchrun --nproc-per-node 2 -m BrainAgeLib train COHORT --out DIR --preset demo
"""
from __future__ import annotations

import argparse
import os

from ..presets import PRESETS
from ._common import check_device, writable_folder

COMMAND = "train"
HELP = "train the two-stage model (ViT classifier, then residual CNN) on a labelled cohort"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("cohort", help="cohort CSV or BIDS participants.tsv (path, age, sex[, id, site])")
    parser.add_argument("--out", required=True, help="run folder (created; reused to resume)")
    parser.add_argument("--preset", default="paper", choices=sorted(PRESETS), help="model preset (default paper)")
    parser.add_argument("--stage", default="all", choices=["1", "embed", "2", "all"],
                        help="run one stage alone, or all (skipping finished ones); default all")
    parser.add_argument("--dora", action="store_true", help="stage 1 with DoRA adapters (r=8, alpha=16) instead of full fine-tuning")
    parser.add_argument("--epochs1", type=int, default=None, help="stage-1 epochs (default 10)")
    parser.add_argument("--epochs2", type=int, default=None, help="stage-2 epochs (default 50)")
    parser.add_argument("--batch-size1", type=int, default=None, help="stage-1 global batch (default 8)")
    parser.add_argument("--batch-size2", type=int, default=None, help="stage-2 global batch (default 16)")
    parser.add_argument("--lr1", type=float, default=None, help="stage-1 AdamW learning rate (default 1e-4)")
    parser.add_argument("--lr2", type=float, default=None, help="stage-2 Adam learning rate (default 5e-4)")
    parser.add_argument("--warmup1", type=int, default=None, help="stage-1 linear warm-up steps (default 0)")
    parser.add_argument("--schedule1", choices=["constant", "cosine"], default=None, help="stage-1 learning-rate schedule")
    parser.add_argument("--augment1", action="store_true",
                        help="stage 1: random small rotation/scale/shift and gamma of each training slice")
    parser.add_argument("--label-sigma1", type=float, default=None,
                        help="stage 1: soft age-bin targets, a Gaussian of this SD (years) around the exact age (default 0: one-hot)")
    parser.add_argument("--val-fraction", type=float, default=None, help="fraction of subjects for validation (0.15)")
    parser.add_argument("--test-fraction", type=float, default=None, help="fraction of subjects held out for testing (0.15)")
    parser.add_argument("--init-encoder", default=None, help="start stage 1 from this encoder: a run folder, its stage1/encoder.safetensors, or a checkpoint")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: cuda:LOCAL_RANK)")
    parser.add_argument("--seed", type=int, default=0, help="split and initialisation seed")
    parser.add_argument("--workers", type=int, default=1, help="processes preparing volumes")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per process (default: torch's choice; 1 on a busy shared CPU)")
    parser.add_argument("--cache", default=None, help="slice/embedding cache folder (default OUT/cache)")
    parser.add_argument("--name", default=None, help="model name stored in the checkpoint")
    parser.add_argument("--intended-use", default=None, help="intended use stored in the checkpoint")
    parser.add_argument("--demo", action="store_true", help="mark the checkpoint as a demo model (synthetic data)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from ..errors import BrainAgeError
    from ..train.config import TrainConfig
    from ..train.pipeline import run_training

    overrides = {
        "epochs1": args.epochs1, "epochs2": args.epochs2, "batch_size1": args.batch_size1,
        "batch_size2": args.batch_size2, "lr1": args.lr1, "lr2": args.lr2, "warmup_steps1": args.warmup1,
        "schedule1": args.schedule1, "label_sigma1": args.label_sigma1, "val_fraction": args.val_fraction, "test_fraction": args.test_fraction,
    }
    try:
        config = TrainConfig(
            preset=args.preset, seed=args.seed, dora=args.dora, augment1=args.augment1, device=args.device,
            workers=args.workers, threads=args.threads, cache_dir=args.cache, init_encoder=args.init_encoder,
            **{k: v for k, v in overrides.items() if v is not None},
        )
    except ValueError as error:
        raise BrainAgeError(f"invalid training options: {error}") from None
    if "LOCAL_RANK" not in os.environ:  # under torchrun each rank gets its own device later
        check_device(args.device)
    writable_folder(args.out)
    if args.cache:
        writable_folder(args.cache, "--cache")
    metadata = {}
    if args.name:
        metadata["name"] = args.name
    if args.intended_use:
        metadata["intended_use"] = args.intended_use
    if args.demo:
        metadata["is_demo"] = True
    result = run_training(args.cohort, args.out, config, args.stage, metadata=metadata, progress=not args.no_progress)
    if result.checkpoint is not None:
        print(f"model: {result.checkpoint}")
    return 0
