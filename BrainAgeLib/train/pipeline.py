"""The whole training run: cohort -> split -> prepared slices -> stage 1 -> embeddings -> stage 2 -> checkpoint.

A run lives in one folder (``--out``)::

    run.json                 config, split and which stages are finished (resume bookkeeping)
    cache/                   prepared slices, tissue features, embeddings (see slice_cache)
    stage1/                  training_state.pt (per epoch), encoder.safetensors (frozen encoder)
    stage2/                  training_state.pt (per epoch)
    model.safetensors        the trained model + metadata (bias correction, metrics, data summary)
    predictions.csv          every subject: split, age, sex, predicted age, BAG, corrected BAG
    heldout_predictions.csv  the val and test rows (for `brainage evaluate`: val is its reference)
    metrics.json             test metrics, baselines, timings

``stage="all"`` skips finished stages and resumes an interrupted one; naming one stage
(``"1"``, ``"embed"``, ``"2"``) reruns just that stage (from scratch if it had finished, from
its last epoch if it had been interrupted). Under ``torchrun`` every rank runs this function;
rank 0 writes the run files.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from .. import __version__
from ..atomic_files import atomic_path
from ..cohort.tables import Subject, read_cohort
from ..errors import BrainAgeError, CohortError
from ..model.checkpoint import save_checkpoint
from ..parallel import RankContext
from ..presets import get_preset
from ..sex import SEX_CODES
from .config import TrainConfig
from .distributed import init_distributed
from .resume import RunState, stage_settings
from .slice_cache import SliceCache, atomic_write_text
from .split import SPLITS, SubjectSplit, split_subjects

STAGES = ("1", "embed", "2", "all")


@dataclass
class TrainResult:
    """What a finished run produced (test metrics are None until stage 2 has run)."""

    run_dir: Path
    checkpoint: Optional[Path]
    metrics: Optional[Dict[str, Any]]
    baselines: Optional[Dict[str, Any]]
    timings: Dict[str, float] = field(default_factory=dict)


def load_training_subjects(cohort_path: "str | os.PathLike") -> List[Subject]:
    """Cohort rows usable for training: each needs a readable path, an age (years) and a known
    sex (F/M). ``participant`` names the person (splits keep people whole), ``extra`` the other
    cohort columns (e.g. tissue volumes in mL)."""
    subjects = []
    for subject in read_cohort(cohort_path):
        sid = str(subject.id)
        if subject.age is None or not np.isfinite(float(subject.age)):
            raise CohortError(f"{cohort_path}: subject {sid!r} has no age; training needs every subject's age")
        if subject.sex not in SEX_CODES:
            raise CohortError(f"{cohort_path}: subject {sid!r} has no sex (F/M); stage-1 classes need it")
        if not subject.path.exists():
            raise CohortError(f"{cohort_path}: subject {sid!r}: image {subject.path} does not exist")
        subjects.append(subject)
    if len(subjects) < 3:
        raise CohortError(f"{cohort_path}: training needs at least 3 subjects, found {len(subjects)}")
    return subjects


def initial_encoder_weights(source: "str | os.PathLike") -> Dict[str, torch.Tensor]:
    """Encoder weights to start stage 1 from: a run folder (its stage-1 encoder), a stage-1
    ``encoder.safetensors``, or a model checkpoint (name or path, via ``load_model``)."""
    from safetensors import safe_open

    path = Path(source)
    if path.is_dir():
        path = path / "stage1" / "encoder.safetensors"
        if not path.exists():
            raise BrainAgeError(f"{source}: no finished stage 1 in this run folder")
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as handle:
                keys = list(handle.keys())
                if keys and all(k.startswith("vit.") for k in keys):
                    return {k: handle.get_tensor(k) for k in keys}
        except Exception:  # noqa: BLE001 - not a safetensors file: load_model says what is wrong with it
            pass
    from ..model.checkpoint import load_model

    return load_model(source).encoder.state_dict()


def _printer(context: RankContext) -> Callable[[str], None]:
    def log(message: str) -> None:
        if context.is_main:
            print(message, flush=True)
    return log


def run_training(
    cohort_path: "str | os.PathLike",
    out_dir: "str | os.PathLike",
    config: TrainConfig,
    stage: str = "all",
    *,
    metadata: Optional[Dict[str, Any]] = None,
    progress: bool = True,
    log: Optional[Callable[[str], None]] = None,
) -> TrainResult:
    """Train (or resume training) the preset's model on a cohort; see the module docstring."""
    from tqdm import tqdm

    if stage not in STAGES:
        raise BrainAgeError(f"unknown stage {stage!r}; use one of {', '.join(STAGES)}")
    context = init_distributed(config.device)
    if config.threads:
        # On a shared or oversubscribed CPU one thread per process avoids OpenMP threads
        # waiting on each other; several processes (workers, torchrun ranks) use the cores.
        torch.set_num_threads(config.threads)
    log = log or _printer(context)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed % (2 ** 32))
    preset = get_preset(config.preset)
    # read before any slow work, so a wrong file fails in seconds, not after preparing slices
    initial_encoder = initial_encoder_weights(config.init_encoder) if config.init_encoder else None
    run_dir = Path(out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cache = SliceCache(Path(config.cache_dir) if config.cache_dir else run_dir / "cache", preset)
    timings: Dict[str, float] = {}

    # ---------------------------------------------------------------- cohort and split
    subjects = load_training_subjects(cohort_path)
    by_id: Dict[str, List[Subject]] = {}
    for s in subjects:
        by_id.setdefault(s.participant, []).append(s)
    state = RunState(run_dir)
    settings = {name: stage_settings(config, name, cohort_digest(subjects)) for name in ("1", "2")}
    split, restart = None, ()
    if "split" in state.data:
        split = SubjectSplit.from_dict(state.data["split"])
        if set(split.train + split.val + split.test) != set(by_id) or split.seed != config.seed:
            log("cohort or seed changed since this run folder was made: splitting again and restarting all stages")
            split, restart = None, RESTART_FROM["1"]
    restart = restart or _stages_to_restart(state, settings, log)
    if context.is_main and restart:
        _discard_training_states(run_dir, restart)
        state.reset(*restart)
    if split is None:
        split = split_subjects([s.participant for s in subjects], [s.age for s in subjects], config.seed,
                               config.val_fraction, config.test_fraction)
    if context.is_main:
        state.data.update({"split": split.to_dict(), "config": config.to_dict(), "preset": preset.to_dict(),
                           "cohort": str(Path(cohort_path).resolve()), "library_version": __version__})
        state.save()
    groups = {name: [s for sid in getattr(split, name) for s in by_id[sid]] for name in SPLITS}
    log(f"{len(subjects)} scans of {len(by_id)} subjects: " + ", ".join(
        f"{name} {len(groups[name])}" for name in SPLITS) + f" (split seed {config.seed})")

    # ---------------------------------------------------------------- prepared slices (cached)
    tic = time.perf_counter()
    ordered = [s for name in SPLITS for s in groups[name]]
    mine = context.shard(ordered)
    bar = tqdm(total=len(mine), desc="preparing volumes", disable=not (progress and context.is_main), mininterval=2.0)

    def advance(done: int, total: int) -> None:
        bar.n = done
        bar.refresh()

    cache.prepare_all([(s.id, s.path) for s in mine], workers=config.workers, progress=advance)
    bar.close()
    context.barrier()
    entries = {id(s): cache.entry(s.id, s.path) for s in ordered}
    timings["prepare"] = time.perf_counter() - tic
    log(f"prepared slices ready ({timings['prepare']:.0f} s; cache {cache.root})")

    # ---------------------------------------------------------------- model
    from ..model import build_model

    model = build_model(preset, seed=config.seed)
    if initial_encoder is not None:
        try:
            model.encoder.load_state_dict(initial_encoder)
        except RuntimeError as error:
            raise BrainAgeError(f"{config.init_encoder}: its encoder does not fit the {preset.name} preset ({error})") from None
        del initial_encoder
        log(f"stage 1 starts from the encoder of {config.init_encoder}")
    encoder_file = run_dir / "stage1" / "encoder.safetensors"

    # ---------------------------------------------------------------- stage 1
    run_stage1 = stage == "1" or (stage == "all" and not state.is_done("1"))
    if run_stage1:
        if context.is_main:
            # a finished stage 1 named again starts over; a later stage never outlives it
            _discard_training_states(run_dir, ("1", "2") if state.is_done("1") else ("2",))
            state.reset(*RESTART_FROM["1"])
            state.start("1", settings["1"])
        context.barrier()
        tic = time.perf_counter()
        result1 = _stage1(model, groups, entries, config, run_dir, context, log, progress)
        timings["stage1"] = time.perf_counter() - tic
        if context.is_main:
            from safetensors.torch import save_file

            with atomic_path(encoder_file) as temporary:
                save_file({k: v.contiguous() for k, v in model.encoder.state_dict().items()}, str(temporary))
            state.mark_done("1", best_epoch=result1.best_epoch + 1, best_val_loss=result1.best_val_loss,
                            best_val_accuracy=result1.best_val_accuracy, epochs=result1.epochs,
                            history=result1.history, seconds=timings["stage1"], dora=config.dora)
        context.barrier()
        if stage == "1":
            return TrainResult(run_dir, None, None, None, timings)
    else:
        if not encoder_file.exists():
            raise BrainAgeError(f"{run_dir}: stage 1 has not finished; run --stage 1 (or all) first")
        from safetensors.torch import load_file

        model.encoder.load_state_dict(load_file(str(encoder_file)))
    for parameter in model.encoder.parameters():
        parameter.requires_grad_(False)
    model.encoder.eval()

    # ---------------------------------------------------------------- embeddings (cached)
    from .embedding import embed_cohort, encoder_key

    key = encoder_key(model.encoder)
    if stage in ("embed", "all"):
        tic = time.perf_counter()
        model.encoder.to(context.device)
        mine = context.shard(ordered)
        bar = tqdm(total=len(mine), desc="embedding slices", disable=not (progress and context.is_main), mininterval=2.0)
        made = embed_cohort(model.encoder, cache, [entries[id(s)] for s in mine], context.device,
                            config.embed_batch_size, on_subject=bar.update)
        bar.close()
        context.barrier()
        timings["embed"] = time.perf_counter() - tic
        log(f"embeddings ready: {len(made)} computed on this rank, the rest cached ({timings['embed']:.0f} s)")
        if context.is_main:
            state.mark_done("embed", encoder_key=key, seconds=timings["embed"])
        if stage == "embed":
            return TrainResult(run_dir, None, None, None, timings)
    missing = [s.id for s in ordered if not cache.embedding_path(entries[id(s)], key).exists()]
    if missing:
        raise BrainAgeError(f"{run_dir}: {len(missing)} subjects lack embeddings of this encoder "
                            f"(e.g. {missing[0]!r}); run --stage embed first")

    # ---------------------------------------------------------------- stage 2
    if stage == "2" and state.is_done("2") and context.is_main:
        _discard_training_states(run_dir, ("2",))
    context.barrier()
    if stage == "all" and state.is_done("2") and (run_dir / "model.safetensors").exists():
        log("all stages already finished; nothing to do (name a --stage to rerun it)")
        metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else {}
        return TrainResult(run_dir, run_dir / "model.safetensors", metrics.get("test"), metrics.get("baselines"), timings)
    from .stage2 import predict_ages, train_stage2

    sets = {name: _embedding_set(groups[name], entries, cache, key) for name in SPLITS}
    if context.is_main:
        state.start("2", settings["2"])
    tic = time.perf_counter()
    torch.manual_seed(config.seed + 2)
    result2 = train_stage2(model.regressor, sets["train"], sets["val"], config, run_dir / "stage2",
                           context, log, progress)
    timings["stage2"] = time.perf_counter() - tic

    checkpoint = None
    metrics = baselines = None
    if context.is_main:
        predictions = {name: predict_ages(model.regressor, sets[name], context.device) for name in SPLITS}
        metrics, baselines, checkpoint = _finish(model, groups, sets, predictions, entries, cache, config,
                                                 state, result2, timings, run_dir, cohort_path, metadata, log)
    context.barrier()
    return TrainResult(run_dir, checkpoint, metrics, baselines, timings)


#: The stages that start again when a stage's settings change: a new encoder invalidates the
#: embeddings and the regressor trained on them.
RESTART_FROM = {"1": ("1", "embed", "2"), "2": ("2",)}


def cohort_digest(subjects: Sequence[Subject]) -> str:
    """SHA-256 of what a run learns from the cohort: each scan's id, person, file, age and sex."""
    rows = sorted((s.id, s.participant, str(s.path), float(s.age), s.sex) for s in subjects)
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def _stages_to_restart(state: RunState, settings: Dict[str, Dict[str, Any]],
                       log: Callable[[str], None]) -> Sequence[str]:
    """The stages to train again because their recorded settings differ from this command's."""
    for stage in ("1", "2"):
        recorded = state.settings(stage)
        if recorded is not None and recorded != settings[stage]:
            changed = sorted(k for k in set(recorded) | set(settings[stage]) if recorded.get(k) != settings[stage].get(k))
            log(f"stage {stage} of this run folder was trained with other settings ({', '.join(changed)} changed): "
                f"stage {stage} and what follows it start again")
            return RESTART_FROM[stage]
    return ()


def _discard_training_states(run_dir: Path, stages: Sequence[str]) -> None:
    """Delete the per-epoch resume state of the given stages ("1", "2"; others are ignored)."""
    for stage in stages:
        path = run_dir / f"stage{stage}" / "training_state.pt"
        if stage in ("1", "2") and path.exists():
            path.unlink()


def _stage1(model, groups, entries, config, run_dir, context, log, progress):
    from ..model import class_index
    from .stage1 import LabelledVolume, SliceClassificationDataset, train_stage1, training_slice_indices

    preset = model.config
    indices = training_slice_indices(preset.n_slices, preset.n_train_slices)

    def dataset(name: str) -> SliceClassificationDataset:
        volumes = [LabelledVolume(s.id, entries[id(s)].slices_path, class_index(s.age, s.sex, preset), s.age)
                   for s in groups[name]]
        return SliceClassificationDataset(volumes, indices)

    train_set, val_set = dataset("train"), dataset("val")
    log(f"stage 1: {len(train_set)} training slices ({len(groups['train'])} subjects x {len(indices)}), "
        f"{len(val_set)} validation slices; {'DoRA' if config.dora else 'full fine-tuning'}, "
        f"{config.epochs1} epochs, batch {config.batch_size1}, lr {config.lr1:g}")
    return train_stage1(model.encoder, train_set, val_set, config, run_dir / "stage1", context, log, progress)


def _embedding_set(subjects, entries, cache: SliceCache, key: str):
    from .stage2 import EmbeddingSet

    if not subjects:
        raise CohortError("a split is empty; use more subjects or other split fractions")
    embeddings = torch.from_numpy(np.stack([cache.load_embeddings(entries[id(s)], key) for s in subjects]).astype(np.float32))
    return EmbeddingSet(
        [s.id for s in subjects], embeddings,
        torch.tensor([SEX_CODES[s.sex] for s in subjects], dtype=torch.float32),
        torch.tensor([s.age for s in subjects], dtype=torch.float32),
    )


def _finish(model, groups, sets, predictions, entries, cache, config, state, result2, timings, run_dir,
            cohort_path, metadata, log):
    from datetime import date

    from ..bias_correction import BiasCorrection
    from ..cohort.evaluate import compute_metrics
    from ..conformal import ConformalCalibration
    from .baselines import cohort_volume_features, run_baselines

    correction = BiasCorrection.fit(sets["val"].age.numpy(), predictions["val"])
    # prediction intervals and gap z from the same validation subjects (split conformal)
    val_age = sets["val"].age.numpy().astype(np.float64)
    calibration = ConformalCalibration.fit(val_age, predictions["val"], correction, source={
        "cohort": f"validation split of {Path(cohort_path).name}", "n": int(val_age.size),
        "age_range": [float(val_age.min()), float(val_age.max())], "date": date.today().isoformat(),
        "how": "brainage train (validation split)"})
    test_age = sets["test"].age.numpy().astype(np.float64)
    test_pred = predictions["test"].astype(np.float64)
    test_sex = [s.sex for s in groups["test"]]
    metrics = _jsonable(compute_metrics(test_age, test_pred, sex=test_sex))
    metrics["corrected_mae"] = float(np.mean(np.abs(correction.corrected_gap(test_pred, test_age))))
    baseline = run_baselines(*[
        {"age": sets[name].age.numpy(), "sex": sets[name].sex.numpy(),
         "features": [cache.load_features(entries[id(s)]) for s in groups[name]],
         "volumes": [cohort_volume_features(s.extra or {}) for s in groups[name]]}
        for name in SPLITS
    ]).to_dict()
    log(f"test ({len(test_age)} subjects): MAE {metrics.get('mae', float('nan')):.2f} years, "
        f"Pearson r {metrics.get('pearson_r', float('nan')):.3f}; baselines: training mean MAE "
        f"{baseline['mean_age_mae']:.2f}, ridge on tissue volumes MAE {baseline['ridge_mae']:.2f}"
        + (f", ridge on the cohort table's volumes MAE {baseline['cohort_volumes_ridge_mae']:.2f}"
           if baseline.get("cohort_volumes_ridge_mae") is not None else ""))

    rows = []
    for name in SPLITS:
        for s, predicted in zip(groups[name], predictions[name]):
            rows.append({
                "id": s.id, "split": name, "path": str(s.path), "age": f"{s.age:.4f}", "sex": s.sex,
                "predicted_age": f"{predicted:.4f}", "brain_age_gap": f"{predicted - s.age:.4f}",
                "corrected_brain_age_gap": f"{float(correction.corrected_gap(predicted, s.age)):.4f}",
            })
    _write_csv(run_dir / "predictions.csv", rows)
    # held-out rows only: `brainage evaluate` fits the bias correction on "val", scores "test"
    _write_csv(run_dir / "heldout_predictions.csv", [r for r in rows if r["split"] != "train"])

    ages = np.array([s.age for name in SPLITS for s in groups[name]])
    sexes = [s.sex for name in SPLITS for s in groups[name]]
    stage1 = state.facts("1")
    summary = {
        "name": f"{model.config.name} trained on {Path(cohort_path).name}",
        "preset": model.config.name,
        "intended_use": "research",
        "is_demo": False,
        "trained": True,
        "library_version": __version__,
        "training_data": {
            "cohort": Path(cohort_path).name,
            "n_subjects": int(sum(len(g) for g in groups.values())),
            "n_train": len(groups["train"]), "n_val": len(groups["val"]), "n_test": len(groups["test"]),
            "age_range": [float(ages.min()), float(ages.max())],
            "n_female": int(sum(s == "F" for s in sexes)), "n_male": int(sum(s == "M" for s in sexes)),
            "split_seed": config.seed,
            "skull_strip": model.config.preprocess.skull_strip,
        },
        "bias_correction": correction.to_dict(),
        "calibration": calibration.to_dict(),
        "metrics": {"test": metrics, "baselines": baseline, "validation_mae": result2.best_val_mae},
        "training": {
            "config": config.to_dict(),
            "stage1": {k: stage1.get(k) for k in ("best_epoch", "best_val_loss", "best_val_accuracy", "epochs", "dora")},
            "stage2": {"best_epoch": result2.best_epoch + 1, "best_val_mae": result2.best_val_mae, "epochs": result2.epochs},
            "seconds": {k: round(v, 1) for k, v in timings.items()},
        },
    }
    _deep_update(summary, metadata or {})
    checkpoint = run_dir / "model.safetensors"
    save_checkpoint(model, checkpoint, summary, record_precisions=None)  # BRAINAGE_PRECISION_RECORD=0: no record
    atomic_write_text(run_dir / "metrics.json", json.dumps(
        {"test": metrics, "baselines": baseline, "bias_correction": correction.to_dict(),
         "validation_mae": result2.best_val_mae, "stage2_history": result2.history,
         "timings": timings}, indent=2))
    state.mark_done("2", best_epoch=result2.best_epoch + 1, best_val_mae=result2.best_val_mae,
                    seconds=timings.get("stage2"), test_mae=metrics.get("mae"))
    log(f"wrote {checkpoint} and {run_dir / 'predictions.csv'}")
    return metrics, baseline, checkpoint


def _deep_update(target: Dict[str, Any], changes: Dict[str, Any]) -> None:
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_update(target[key], value)
        else:
            target[key] = value


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _write_csv(path: Path, rows: List[Dict[str, str]]) -> None:
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())
