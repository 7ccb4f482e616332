#!/usr/bin/env bash
# Reproduce the bundled demo model, Resources/Models/brainage_demo.safetensors, from nothing:
#
#   bash scripts/train_demo_model.sh [WORK_DIR]        (default WORK_DIR: build/demo_model, git-ignored)
#
# 1. `brainage synth`: 640 synthetic ageing phantoms (MNI152-based, ages 20-90, half with a
#    skull, 1.5-2 mm voxels), cohort seed 2026;
# 2. `brainage train --preset demo`: subject-level split 70/15/15 (seed 0), stage 1 (ViT-Tiny-like
#    classifier from random weights, full training with augmentation and soft age-bin targets),
#    embeddings, stage 2 (residual CNN);
# 3. `brainage evaluate` on the held-out phantoms (bias correction fitted on the validation split);
# 4. copies the checkpoint into Resources/Models, writes its model card (brainage_demo.md) from
#    the run's metrics, and the bundled sample head the `brainage demo` command reads;
# 5. the prediction intervals: the shipped model run on its validation phantoms as `brainage predict`
#    prepares them (scripts/demo_calibration.py, metadata only), and their coverage on the test
#    phantoms (scripts/interval_coverage.py, recorded for Testing/test_demo_intervals.py).
#
# Experiments (issue 19): SULCAL_CSF=F passes `--sulcal-csf F` to `brainage synth` (default 0, the
# shipped recipe); SHIP=0 stops after step 3, leaving Resources/Models alone (the model is
# WORK_DIR/run/model.safetensors); N_PHANTOMS, EPOCHS1, WARMUP1 and EPOCHS2 shorten a run.
#
# Runs offline (needs nilearn for the MNI152 template) in under 90 minutes on 2 CPU cores; every step
# resumes if interrupted (rerun the same command). Timings go to WORK_DIR/timings.json.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${1:-$REPO/build/demo_model}"
N_PHANTOMS="${N_PHANTOMS:-640}"
COHORT_SEED=2026
SPLIT_SEED=0
WORKERS="${WORKERS:-2}"
SULCAL_CSF="${SULCAL_CSF:-0}"
SHIP="${SHIP:-1}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
mkdir -p "$WORK"
cd "$WORK"
BRAINAGE=(python -m BrainAgeLib)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

now() { date +%s; }
t0=$(now)
"${BRAINAGE[@]}" synth --n "$N_PHANTOMS" --out phantoms --seed "$COHORT_SEED" --spacing 1.5 2.0 \
    --skull-fraction 0.5 --workers "$WORKERS" --sulcal-csf "$SULCAL_CSF"
t1=$(now)
# Two DDP processes with one torch thread each (torchrun, gloo): both cores busy without OpenMP
# threads waiting on each other; the ranks share preparing, embedding and the batches.
# Stage 1 trains the ViT from random weights (no pretrained weights offline) with slice
# augmentation and soft age-bin targets (BrainAgeLib/train/augment.py): without them a ViT
# this small memorises the training heads within a dozen epochs.
torchrun --nproc-per-node 2 -m BrainAgeLib train phantoms/cohort.csv --preset demo \
    --seed "$SPLIT_SEED" --workers 1 --threads 1 --cache cache --out run \
    --epochs1 "${EPOCHS1:-30}" --lr1 5e-4 --warmup1 "${WARMUP1:-300}" --schedule1 cosine --batch-size1 32 \
    --augment1 --label-sigma1 5 \
    --epochs2 "${EPOCHS2:-100}" --lr2 5e-4 --batch-size2 32 \
    --name "BrainAge demo (synthetic phantoms)" --demo \
    --intended-use "demonstration and software testing only; trained on synthetic phantoms, NOT for clinical use or for research on real people"
t2=$(now)
"${BRAINAGE[@]}" evaluate run/heldout_predictions.csv --out evaluation
t3=$(now)
if [ "$SHIP" = "0" ]; then
    echo "SHIP=0: not shipped; the model is $WORK/run/model.safetensors"
    exit 0
fi

python - "$REPO" "$t0" "$t1" "$t2" "$t3" <<'PY'
import json, shutil, sys
from pathlib import Path

repo, t0, t1, t2, t3 = Path(sys.argv[1]), *map(int, sys.argv[2:])
run = json.loads(Path("run/run.json").read_text())
metrics = json.loads(Path("run/metrics.json").read_text())
timings = {
    "synth_s": t1 - t0, "train_s": t2 - t1, "evaluate_s": t3 - t2, "total_s": t3 - t0,
    **{f"train.{k}_s": round(v, 1) for k, v in metrics["timings"].items()},
}
Path("timings.json").write_text(json.dumps(timings, indent=2))

models = repo / "Resources" / "Models"
models.mkdir(parents=True, exist_ok=True)
shutil.copyfile("run/model.safetensors", models / "brainage_demo.safetensors")

sys.path.insert(0, str(repo))
from BrainAgeLib.cli.demo import SAMPLE_AGE, SAMPLE_FILE, SAMPLE_SEED, SAMPLE_SEX
from BrainAgeLib.io import save_volume
from BrainAgeLib.synth import make_phantom
from BrainAgeLib.volume import Volume
sample = make_phantom(SAMPLE_AGE, SAMPLE_SEX, SAMPLE_SEED, spacing=2.0, skull=True, with_tissue=False)
sample_path = repo / "Resources" / Path(*SAMPLE_FILE)
sample_path.parent.mkdir(parents=True, exist_ok=True)
save_volume(Volume(sample.volume.array.astype("int16"), sample.volume.affine), sample_path)

# the held-out test phantoms with the ages this run predicted: Testing/test_demo_model.py
# regenerates some of them (cohort_specs) and checks the shipped model still predicts these ages
import csv
with open("phantoms/cohort.csv", newline="") as handle:
    cohort = {row["id"]: row for row in csv.DictReader(handle)}
with open("run/predictions.csv", newline="") as handle:
    heldout = [{"id": row["id"], "cohort_seed": 2026, "n_phantoms": len(cohort), "age": float(row["age"]),
                "sex": row["sex"], "spacing_mm": float(cohort[row["id"]]["spacing_mm"]),
                "has_skull": cohort[row["id"]]["has_skull"] == "1", "predicted_age": float(row["predicted_age"])}
               for row in csv.DictReader(handle) if row["split"] == "test"]
(models / "brainage_demo_heldout.json").write_text(json.dumps(heldout, indent=1))

test, base, stages = metrics["test"], metrics["baselines"], run["stages"]
ci = test.get("mae_ci95") or [float("nan"), float("nan")]
cfg = run["config"]
size_mb = (models / "brainage_demo.safetensors").stat().st_size / 1e6
card = """# BrainAge demo model (`load_model("demo")`)

> **Trained on synthetic phantoms, not on people. For demonstration and software testing only;
> NOT for clinical use, and its numbers say nothing about real brains.**

## What it is
The `demo` preset of BrainRotViT (see `BrainAgeLib/presets.py`): a ViT with 192-d embeddings,
4 layers, 3 heads, 12-px patches (an 8 x 8 grid) over 96x96 px sagittal slices (64 slices per
head), trained from random
weights as an age-decade x sex classifier, then a residual CNN with a pooled head regressing
age from the 64x192 embedding matrix and sex. File: `brainage_demo.safetensors`
({size_mb:.1f} MB, safetensors + JSON metadata, including the bias-correction fit).

## Training data
{N} synthetic T1-weighted heads from `brainage synth --n {N} --seed {seed} --spacing 1.5 2.0
--skull-fraction 0.5` (`BrainAgeLib/synth.py`): the MNI152 2009a template aged along published
lifespan curves (ventricular and sulcal widening, global and regional grey-matter thinning,
inverted-U white matter, falling grey/white contrast; sources in `BrainAgeLib/lifespan.py`), with
per-subject head size (larger in males), smooth deformation, pose, bias field, noise, gain and
voxel size (1.5-2 mm), half with a synthetic skull and scalp. Ages uniform 20-90 years, sexes
balanced at random. Brain extraction as at prediction: the phantoms with a skull went through
deepbet (`BrainAgeLib/brain_extraction.py`, the default of every preset), whose masks of such
phantoms score Dice 0.97-0.98 against the phantoms' own brain (grey + white matter + CSF): a
synthetic skull does not fool it; the others were detected as skull-stripped and kept
(checkpoint card: `training_data.skull_strip` = "{skull_strip}"). Split by subject (seed {split_seed}): {ntr} training, {nva} validation,
{nte} held-out test phantoms; every phantom has its own seed, so the test heads are people
(seeds) the model never saw.

## Training
`bash scripts/train_demo_model.sh` (one command; it also writes this card), as two DDP
processes (torchrun, gloo) with one thread each. Stage 1, full training from random weights
(no pretrained ViT offline), AdamW, batch {b1}, 32 slices per subject, {e1} epochs at lr {lr1:g}
({warm} warm-up steps, cosine decay), cross-entropy over {ncls} age-decade x sex classes with
soft age targets (a Gaussian of SD {sigma:g} years around the exact age, spread over the decades)
and random slice augmentation (rotation <= 8 deg, scale +-8%, shift +-6%, gamma); best epoch
{s1best} (validation slice accuracy {s1acc:.3f}). Stage 2: {e2} epochs, Adam lr {lr2:g}, batch
{b2}, MSE; best epoch {s2best} by validation MAE ({s2mae:.2f} years). Bias correction (de Lange &
Cole) fitted on the validation split: slope {slope:+.3f}, intercept {intercept:+.2f} years.

## Metrics on the {nte} held-out phantoms
| | MAE (years) | Pearson r |
|---|---|---|
| **demo model** | **{mae:.2f}** (95% CI {ci0:.2f}-{ci1:.2f}) | **{r:.3f}** |
| predict the training mean ({mean_age:.1f} y) | {mean_mae:.2f} | - |
| ridge regression on tissue volumes (CSF/GM/WM from the prepared slices, sex) | {ridge_mae:.2f} | - |
{oracle_row}

{target_line}

The held-out phantoms (cohort index, age, sex, voxel size, skull) and the age this build predicted for
each are in `brainage_demo_heldout.json`; `Testing/test_demo_model.py` regenerates some and checks
that the shipped model still predicts those ages.

RMSE {rmse:.2f} years, mean error {me:+.2f} years, Spearman rho {rho:.3f}, R^2 {r2:.3f};
after bias correction the mean absolute corrected gap is {cmae:.2f} years.

Reproduction time of this build: {total:.0f} min in all (phantoms {ts:.0f} min, training
{tt:.0f} min of which preparing volumes {tp:.0f}, stage 1 {t1s:.0f}, embedding {te:.0f},
stage 2 {t2s:.0f}; evaluation {tev:.1f} min).

## Intended use
Showing what the software does (`brainage demo`, the Slicer module's sample) and testing it.
Not for clinical decisions, not for research on real scans: real brains differ from these
phantoms in every way the phantoms do not model. For real data, train on your own cohort
(`brainage train`) or import the authors' published checkpoints (`brainage import-official`).

## Sample head
`Resources/Samples/{sample}`: a phantom of age {sage:g}, sex {ssex}, seed {sseed}, 2 mm, with skull
(not in the training set); `brainage demo` predicts its age.
""".format(
    N=sum(len(run["split"][k]) for k in ("train", "val", "test")),
    seed=2026, skull_strip=run["preset"]["preprocess"]["skull_strip"], split_seed=run["split"]["seed"], ntr=len(run["split"]["train"]), nva=len(run["split"]["val"]),
    nte=len(run["split"]["test"]), e1=cfg["epochs1"], lr1=cfg["lr1"], warm=cfg["warmup_steps1"], b1=cfg["batch_size1"], sigma=cfg["label_sigma1"],
    s1best=stages["1"]["best_epoch"], s1acc=stages["1"]["best_val_accuracy"], ncls=2 * (len(run["preset"]["age_bin_edges"]) - 1),
    e2=cfg["epochs2"], lr2=cfg["lr2"], b2=cfg["batch_size2"], s2best=stages["2"]["best_epoch"], s2mae=stages["2"]["best_val_mae"],
    slope=metrics["bias_correction"]["slope"], intercept=metrics["bias_correction"]["intercept"],
    mae=test["mae"], ci0=ci[0], ci1=ci[1], r=test["pearson_r"], mean_age=base["mean_age"], mean_mae=base["mean_age_mae"],
    ridge_mae=base["ridge_mae"], rmse=test["rmse"], me=test["mean_error"], rho=test["spearman_rho"], r2=test["r2"],
    cmae=test["corrected_mae"], total=timings["total_s"] / 60, ts=timings["synth_s"] / 60, tt=timings["train_s"] / 60,
    tp=timings.get("train.prepare_s", 0) / 60, t1s=timings.get("train.stage1_s", 0) / 60, te=timings.get("train.embed_s", 0) / 60,
    t2s=timings.get("train.stage2_s", 0) / 60, tev=timings["evaluate_s"] / 60,
    sample=SAMPLE_FILE[-1], sage=SAMPLE_AGE, ssex=SAMPLE_SEX, sseed=SAMPLE_SEED, size_mb=size_mb,
    oracle_row=("| ridge on the generator's exact tissue volumes from cohort.csv (an upper bound: an image "
                f"never gives these) | {base['cohort_volumes_ridge_mae']:.2f} | - |"
                if base.get("cohort_volumes_ridge_mae") is not None else ""),
    target_line=("The issue's targets (MAE <= 3.0 years, r >= 0.95 on held-out phantoms) are "
                 + ("met." if test["mae"] <= 3.0 and test["pearson_r"] >= 0.95 else
                    f"**not met** by this build (MAE {test['mae']:.2f} years, r {test['pearson_r']:.3f}): "
                    "stage 1, a ViT trained from random weights on a CPU budget, is the bottleneck.")),
)
(models / "brainage_demo.md").write_text(card)
print(json.dumps(timings, indent=2))
print(f"demo model: {models / 'brainage_demo.safetensors'} ({size_mb:.1f} MB); held-out MAE {test['mae']:.2f} y, r {test['pearson_r']:.3f}")
PY
python "$REPO/scripts/demo_calibration.py" --work "$WORK/calibration" --workers "$WORKERS"
python "$REPO/scripts/interval_coverage.py" --work "$WORK/calibration" --workers "$WORKERS" --record --card
