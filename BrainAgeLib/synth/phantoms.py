"""Synthetic ageing phantoms: labelled T1-weighted heads made from the MNI152 template.

No labelled MRI can be downloaded where BrainAge is built, so the demo model learns from heads
made here. A phantom of age *t* (years, 20-90) and sex is the MNI152 2009a template (nilearn's
1 mm T1 and GM/WM probability maps; CSF = brain - GM - WM) with its anatomy changed the way
the lifespan curves of :mod:`BrainAgeLib.synth.lifespan` say (sources are listed there):

- **Ventricles widen**: a smooth radial displacement field around the lateral and third
  ventricles (the gradient of the Gaussian-smoothed ventricle mask) pushes periventricular
  tissue outwards; its strength follows ``ventricle_growth`` (accelerating after ~60).
- **Grey matter thins, sulci widen**: GM turns into CSF from the pial side (weighted by how
  near the voxel is to CSF), brain-wide by ``gm_loss_fraction`` and :data:`REGIONAL_GM_FACTOR`
  times faster in the ageing regions (vermis, pre/postcentral gyri, temporal lobes, medial
  superior frontal gyrus).
- **White matter follows its inverted U**: GM at the GM/WM border turns into WM before the
  peak at 45 and WM at the border into GM after it (``wm_change_fraction``); periventricular
  WM is also compressed by the ventricles.
- **Grey/white contrast falls** (``contrast_factor``): WM signal falls, GM signal rises.

The template stands for a 20-year-old, so a 20-year-old phantom carries no ageing. Around the
ageing, each head gets subject variability drawn from its seed: head size (males ~4.5% larger
linearly, i.e. ~14% by volume), a random smooth deformation (~2 mm), pose (rotation up to 10
degrees about a random axis, translation up to 8 mm), a smooth multiplicative bias field, Rician
noise, voxel spacing, intensity gain, and optionally a synthetic CSF/skull/scalp shell.

Everything age-independent is computed once per process and working resolution (1 mm for 1 mm
heads, else 1.5 or 2 mm; a few seconds); a phantom is then arithmetic on the voxels inside the
closed brain plus one trilinear warp of all channels onto the head's grid with
``torch.nn.functional.grid_sample`` (deterministic on CPU: the same seed gives a bit-identical
head). One head takes ~0.15 s of CPU at 2 mm, ~0.3 s at 1.5 mm and ~1.2 s at 1 mm.

Alongside the image each phantom returns a ground-truth **ageing map** on the head's grid, in
[0, 1] (steps of 1/256): the fraction of tissue probability that ageing moved in each voxel
(GM->CSF, GM<->WM) or the local volume change from the ventricular push (|1 - Jacobian| to
first order), whichever is larger. The global contrast change is not in the map.
:func:`aging_region_map` gives the age-independent region weight in MNI space.
"""
from __future__ import annotations

import csv
import functools
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
from scipy import ndimage as ndi

from . import lifespan
from ..atomic_files import write_text_atomic
from ..errors import BrainAgeError
from ..geometry import resample_array
from ..volume import Volume

#: Output field of view (mm, R-L x A-P x S-I), centred on the world origin.
FIELD_OF_VIEW_MM = (200.0, 232.0, 200.0)
#: MNI point (mm) placed at the world origin before the pose is applied: the head's centre.
HEAD_CENTRE_MNI = (0.0, -18.0, 5.0)
#: Spacing (mm) of the coarse grid on which the deformation is computed before upsampling.
COARSE_SPACING_MM = 5.0
#: Template files inside nilearn's wheel.
TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
#: Smoothness (mm, Gaussian sigma) of the ventricular displacement field.
VENTRICLE_SIGMA_MM = 9.0
#: Head scale (linear, relative to MNI152) by sex: mean and standard deviation.
HEAD_SCALE = {"F": (0.89, 0.03), "M": (0.93, 0.03)}
#: Target signal (before gain) of young white matter in the written images.
WM_SIGNAL = 800.0

SexLike = str


class SynthError(BrainAgeError, ValueError):
    """The phantom generator cannot run (template missing) or was asked for something invalid."""


@dataclass
class Phantom:
    """One synthetic head.

    ``volume`` is the T1-weighted image (float32 holding integers, RAS affine in mm);
    ``aging_map`` is on the same grid, float32 in [0, 1] (where ageing changed the anatomy);
    ``tissue`` holds, on that grid, the GM/WM/CSF probability maps, the template's ventricle
    mask and the ageing-region weight (``"aging_regions"``, in [0, 1]), or None when not
    requested; ``volumes_ml`` the brain/GM/WM/CSF/ventricle volumes in millilitres.
    """

    volume: Volume
    aging_map: Volume
    age: float
    sex: str
    seed: int
    has_skull: bool
    spacing: float
    tissue: Optional[Dict[str, Volume]] = None
    volumes_ml: Dict[str, float] = field(default_factory=dict)
    params: Dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------
# The template, once per process and working spacing
# ----------------------------------------------------------------------------------------


def template_dir() -> Path:
    """Folder of nilearn's bundled MNI152 2009a files."""
    try:
        import nilearn
    except ImportError:
        raise SynthError(
            "the phantom generator needs the MNI152 template that ships with nilearn: "
            "pip install nilearn") from None
    folder = Path(nilearn.__file__).parent / "datasets" / "data"
    missing = [name for name in TEMPLATE_FILES.values() if not (folder / name).exists()]
    if missing:
        raise SynthError(f"{folder}: this nilearn installation lacks {', '.join(missing)}; "
                         "reinstall it with pip install --force-reinstall nilearn")
    return folder


@dataclass
class _Template:
    """Age-independent fields on the working grid (MNI mm, axis-aligned, RAS)."""

    spacing: float
    origin: np.ndarray  # MNI mm of voxel (0, 0, 0)
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray  # soft brain mask of the skull-stripped template
    residual: np.ndarray  # template T1 minus the tissue model: texture, deep-GM shading
    mu: Tuple[float, float, float]  # GM, WM, CSF signal of the template
    ventricles: np.ndarray
    push: np.ndarray  # [3, ...] unit outward ventricular displacement (mm per mm of push)
    push_divergence: np.ndarray  # its divergence (1/mm): local volume change per mm of push
    gm_loss_weight: np.ndarray  # GM-weighted mean 1: where GM turns into CSF
    gm_to_wm_weight: np.ndarray  # sums to 1: where GM turns into WM (before the WM peak)
    wm_to_gm_weight: np.ndarray  # sums to 1: where WM turns into GM (after the peak)
    regions: np.ndarray  # ageing-region weight in [0, 1]
    head_distance: np.ndarray  # mm outside the closed brain surface (<= 0 inside)
    closed: np.ndarray  # 1 inside the closed brain surface (brain + sulcal CSF)
    shell_band: np.ndarray  # flat indices of voxels where a CSF/skull/scalp shell may lie
    gm_total: float  # template GM, in probability-voxels of this grid
    wm_total: float
    index: np.ndarray = None  # flat indices of the voxels ageing can touch (the closed brain)
    flat: Dict[str, np.ndarray] = None  # per-voxel fields at ``index``: where phantoms compute

    def __post_init__(self) -> None:
        inside = (self.closed > 0) | (self.brain > 0) | (self.gm > 0) | (self.wm > 0)
        self.index = np.flatnonzero(inside)
        self.flat = {name: getattr(self, name).reshape(-1)[self.index] for name in (
            "gm", "wm", "csf", "brain", "closed", "residual", "gm_loss_weight", "gm_to_wm_weight",
            "wm_to_gm_weight", "push_divergence")}

    @property
    def shape(self) -> Tuple[int, int, int]:
        return tuple(self.gm.shape)  # type: ignore[return-value]

    def mni_coordinates(self) -> np.ndarray:
        grids = [self.origin[a] + self.spacing * np.arange(n) for a, n in enumerate(self.shape)]
        return np.stack(np.meshgrid(*grids, indexing="ij"), axis=-1)


def _normalise_gm(array: np.ndarray) -> np.ndarray:
    return (array.astype(np.float32) / 255.0).astype(np.float32)


@functools.lru_cache(maxsize=3)
def _template(spacing: float) -> _Template:
    import nibabel as nib

    folder = template_dir()
    images = {key: nib.load(str(folder / name)) for key, name in TEMPLATE_FILES.items()}
    affine = images["t1"].affine
    t1 = np.asarray(images["t1"].dataobj, dtype=np.float32)
    gm = _normalise_gm(np.asarray(images["gm"].dataobj))
    wm = _normalise_gm(np.asarray(images["wm"].dataobj))
    brain = (t1 > 0).astype(np.float32)

    if spacing != 1.0:
        factor = spacing / float(affine[0, 0])
        shape = tuple(int(math.floor((n - 1) / factor)) + 1 for n in t1.shape)
        sigma = 0.42 * factor if factor > 1 else 0.0

        def resample(array: np.ndarray) -> np.ndarray:
            if sigma:
                array = ndi.gaussian_filter(array, sigma, mode="constant")
            return resample_array(array, np.diag([factor, factor, factor, 1.0]), shape, order=1).astype(np.float32)

        t1, gm, wm, brain = (resample(a) for a in (t1, gm, wm, brain))
    origin = affine[:3, 3].astype(np.float64)
    csf = np.clip(brain - gm - wm, 0.0, 1.0).astype(np.float32)

    inside = brain > 0.5
    design = np.stack([gm[inside], wm[inside], csf[inside]], axis=1)
    mu = np.linalg.lstsq(design, t1[inside], rcond=None)[0]
    residual = np.where(brain > 0.05, t1 - (gm * mu[0] + wm * mu[1] + csf * mu[2]), 0.0)

    def mm(sigma_mm: float) -> float:
        return sigma_mm / spacing

    # Lateral + third ventricles: the large CSF components in a central box.
    coords = np.stack(np.meshgrid(*[origin[a] + spacing * np.arange(n) for a, n in enumerate(gm.shape)],
                                  indexing="ij"), axis=-1)
    x, y, z = coords[..., 0], coords[..., 1], coords[..., 2]
    box = (np.abs(x) < 32) & (y > -52) & (y < 36) & (z > -12) & (z < 36)
    labels, count = ndi.label((csf > 0.5) & box)
    sizes = np.bincount(labels.ravel())[1:]
    lateral = labels == (int(np.argmax(sizes)) + 1)
    third = (np.abs(x) < 4) & (y > -30) & (y < 2) & (z > -8) & (z < 14) & (csf > 0.5)
    ventricles = (lateral | third).astype(np.float32)
    smooth = ndi.gaussian_filter(ventricles, mm(VENTRICLE_SIGMA_MM))
    push = -np.stack(np.gradient(smooth), axis=0)  # points away from the ventricles
    push /= np.sqrt(np.sum(push**2, axis=0)).max()
    push = push.astype(np.float32)

    xyz = coords.reshape(-1, 3)
    regions = lifespan.region_weight(xyz).reshape(gm.shape).astype(np.float32)

    # Grey matter is lost where it touches CSF (the pial side, around the ventricles), faster
    # in the ageing regions.
    exposure = ndi.gaussian_filter(csf + (1.0 - brain), mm(2.0))
    # Exposure only decides which GM goes first within a neighbourhood (pial before deep);
    # the regions alone set the large-scale rate.
    local_mean = ndi.gaussian_filter(exposure * gm, mm(15.0)) / np.maximum(ndi.gaussian_filter(gm, mm(15.0)), 1e-3)
    exposure = exposure / np.maximum(local_mean, 1e-3)
    weight = (1.0 + (lifespan.REGIONAL_GM_FACTOR - 1.0) * regions) * exposure * (gm > 0.02)
    weight = weight / (np.sum(weight * gm) / np.sum(gm))
    # The GM/WM border: GM that sees WM nearby, WM that sees GM nearby.
    gm_to_wm = gm * ndi.gaussian_filter(wm, mm(1.5)) * (wm > 0.02)
    wm_to_gm = wm * ndi.gaussian_filter(gm, mm(1.5)) * (gm > 0.02)

    closed = ndi.gaussian_filter(brain, mm(4.0)) > 0.35
    closed = ndi.binary_fill_holes(closed)
    outside = ndi.distance_transform_edt(~closed, sampling=spacing)
    inside_depth = ndi.distance_transform_edt(closed, sampling=spacing)
    head_distance = np.where(closed, -inside_depth, outside).astype(np.float32)

    return _Template(
        spacing=float(spacing), origin=origin, gm=gm, wm=wm, csf=csf, brain=brain,
        residual=residual.astype(np.float32), mu=tuple(float(m) for m in mu),
        ventricles=ventricles, push=push,
        push_divergence=sum(np.gradient(push[a], spacing, axis=a) for a in range(3)).astype(np.float32), gm_loss_weight=weight.astype(np.float32),
        gm_to_wm_weight=(gm_to_wm / gm_to_wm.sum()).astype(np.float32),
        wm_to_gm_weight=(wm_to_gm / wm_to_gm.sum()).astype(np.float32),
        regions=regions, head_distance=head_distance, closed=closed.astype(np.float32),
        shell_band=np.flatnonzero((head_distance > -1.5) & (head_distance < 22.0)),
        gm_total=float(gm.sum()), wm_total=float(wm.sum()))


def aging_region_map(spacing: float = 2.0) -> Volume:
    """The age-independent susceptibility map: ageing-region weight times GM probability,
    in [0, 1], on the MNI152 grid at ``spacing`` mm (world coordinates = MNI mm)."""
    template = _template(float(spacing))
    affine = np.diag([template.spacing] * 3 + [1.0])
    affine[:3, 3] = template.origin
    return Volume((template.regions * template.gm).astype(np.float32), affine)


# ----------------------------------------------------------------------------------------
# Ageing on the template grid
# ----------------------------------------------------------------------------------------


@dataclass
class _AgedTissue:
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    moved: np.ndarray  # tissue probability moved by ageing, in [0, 1]


def _age_tissue(template: _Template, age: float, sulcal_csf: float = 0.0) -> _AgedTissue:
    """The aged tissue maps at ``template.index`` (flat arrays). ``sulcal_csf``: a fraction of
    the grey matter turned into CSF from the pial side whatever the age (see :func:`make_phantom`)."""
    flat = template.flat
    gm, wm, csf = flat["gm"], flat["wm"], flat["csf"]
    wm_change = float(lifespan.wm_change_fraction(age)) * template.wm_total
    gm_loss = float(lifespan.gm_loss_fraction(age))
    if wm_change >= 0:
        to_wm = np.minimum(wm_change * flat["gm_to_wm_weight"], 0.5 * gm)
        gm_aged, wm_aged = gm - to_wm, wm + to_wm
        extra_gm_loss = -float(to_wm.sum()) / template.gm_total  # myelination is part of GM loss
    else:
        to_gm = np.minimum(-wm_change * flat["wm_to_gm_weight"], 0.6 * wm)
        gm_aged, wm_aged = gm + to_gm, wm - to_gm
        extra_gm_loss = float(to_gm.sum()) / template.gm_total  # keeps net GM on its curve
    fraction = np.minimum(max(0.0, gm_loss + extra_gm_loss + sulcal_csf) * flat["gm_loss_weight"], 0.9)
    to_csf = gm_aged * fraction
    gm_aged = gm_aged - to_csf
    csf_aged = csf + to_csf
    moved = 0.5 * (np.abs(gm_aged - gm) + np.abs(wm_aged - wm) + np.abs(csf_aged - csf))
    return _AgedTissue(gm_aged.astype(np.float32), wm_aged.astype(np.float32),
                       csf_aged.astype(np.float32), np.clip(moved, 0, 1).astype(np.float32))


#: Calibration of the ventricular push: peak wall displacement (mm) -> relative ventricle volume
#: gain, measured on phantoms (2 mm and 1.5 mm heads agree within 2%).
_PUSH_CALIBRATION_MM = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0)
_PUSH_CALIBRATION_GAIN = (0.0, 0.14, 0.30, 0.485, 0.69, 0.925, 1.17, 1.43, 1.69, 1.95)


def ventricle_push_mm(age: float) -> float:
    """Peak ventricular displacement (mm) that makes the ventricles ``ventricle_growth(age)``
    times their age-20 volume."""
    gain = float(lifespan.ventricle_growth(age)) - 1.0
    return float(np.interp(gain, _PUSH_CALIBRATION_GAIN, _PUSH_CALIBRATION_MM)) if gain > 0 else 0.0


# ----------------------------------------------------------------------------------------
# One head
# ----------------------------------------------------------------------------------------


def _rotation(axis: np.ndarray, angle_rad: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle_rad) * k + (1 - math.cos(angle_rad)) * (k @ k)


def _working_spacing(spacing: float) -> float:
    """Working resolution of the template for an output spacing (mm): 1 mm for 1 mm heads,
    1.5 mm below 1.9 mm, else 2 mm (the anatomy is then resampled trilinearly)."""
    if spacing <= 1.0:
        return 1.0
    return 1.5 if spacing < 1.9 else 2.0


@dataclass(frozen=True)
class SubjectDraws:
    """Everything about a phantom that its seed decides (not its age): the person and the scan."""

    scale: float  # linear head size relative to MNI152
    anisotropy: np.ndarray  # [3] extra per-axis scale
    rotation_axis: np.ndarray  # [3]
    rotation_deg: float  # in [-10, 10]
    translation_mm: np.ndarray  # [3], each in [-8, 8]
    deformation_control: np.ndarray  # [3, 8, 9, 8] standard-normal control points
    deformation_sd_mm: float
    bias_coefficients: np.ndarray  # [10] quadratic log-bias polynomial
    noise_fraction: float  # Rician noise sigma / WM signal
    gain: float
    tissue_jitter: np.ndarray  # [3] GM, WM, CSF signal factors
    shell: np.ndarray  # CSF gap, skull, scalp thickness (mm), marrow and fat signal (x WM)
    noise_seed: int


def draw_subject(seed: int, sex: SexLike) -> SubjectDraws:
    """The subject- and scan-level draws of phantom ``seed`` (always drawn in this order, so age
    and skull never change the person). Males get larger heads on average (:data:`HEAD_SCALE`)."""
    from ..sex import parse_sex

    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED]))
    scale_mean, scale_sd = HEAD_SCALE[parse_sex(sex)]
    return SubjectDraws(
        scale=scale_mean + scale_sd * float(np.clip(rng.standard_normal(), -2.5, 2.5)),
        anisotropy=1.0 + 0.02 * np.clip(rng.standard_normal(3), -2, 2),
        rotation_axis=rng.standard_normal(3),
        rotation_deg=float(rng.uniform(-10.0, 10.0)),
        translation_mm=rng.uniform(-8.0, 8.0, size=3),
        deformation_control=rng.standard_normal((3, 8, 9, 8)).astype(np.float32),
        deformation_sd_mm=float(rng.uniform(1.0, 2.5)),
        bias_coefficients=rng.normal(0.0, 0.08, size=10),
        noise_fraction=float(rng.uniform(0.01, 0.04)),
        gain=float(rng.uniform(0.8, 1.25)),
        tissue_jitter=1.0 + 0.03 * np.clip(rng.standard_normal(3), -2, 2),
        shell=rng.uniform([1.0, 4.0, 4.0, 0.55, 0.75], [3.0, 8.0, 8.0, 0.85, 1.05]),
        noise_seed=int(rng.integers(2**63 - 1)),
    )


def _check_inputs(age: float, sex: str, spacing: float) -> str:
    from ..sex import parse_sex

    if not (isinstance(age, (int, float)) and math.isfinite(age)) or not 0 < age < 120:
        raise SynthError(f"phantom age must be a number of years in (0, 120), got {age!r}")
    parsed = parse_sex(sex)
    if parsed == "unknown":
        raise SynthError("a phantom needs a sex, F or M")
    if not (0.5 <= float(spacing) <= 4.0):
        raise SynthError(f"phantom spacing must be 0.5-4 mm, got {spacing!r}")
    return parsed


def young_sulcal_csf(seed: int, most: float) -> float:
    """Phantom ``seed``'s age-independent sulcal CSF (a fraction of its grey matter), uniform in
    [0, ``most``]; drawn from its own stream, so every other draw of the seed stays as it was."""
    if most <= 0:
        return 0.0
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5C5F]))
    return float(rng.uniform(0.0, float(most)))


#: Largest ``sulcal_csf`` :func:`make_phantom` accepts (the lifespan curve's loss at ~65 years).
MAX_SULCAL_CSF = 0.2


def make_phantom(age: float, sex: SexLike, seed: int, spacing: float = 1.0, skull: bool = True,
                 *, with_tissue: bool = True, work_spacing: Optional[float] = None,
                 sulcal_csf: float = 0.0) -> Phantom:
    """A synthetic T1-weighted head of ``age`` years and ``sex`` ("F"/"M").

    ``seed`` fixes every subject-level draw (head size, deformation, pose, bias, noise, gain,
    shell thickness), independently of age: the same seed at two ages is the same person
    aged. ``spacing`` is the isotropic voxel size in mm; ``skull`` adds a CSF/skull/scalp
    shell (else the head is skull-stripped, zero outside the brain). ``work_spacing`` (mm)
    overrides the template resolution the anatomy is computed at (default: from spacing).

    ``sulcal_csf`` (0 to :data:`MAX_SULCAL_CSF`): the most grey matter, as a fraction, that is
    turned into sulcal CSF whatever the age; each seed draws its own amount in [0, sulcal_csf]
    (:func:`young_sulcal_csf`). The MNI152 average the phantoms come from has almost no sulcal
    CSF (averaging closes the sulci): its CSF is 5% of the deepbet mask, real young adults have
    about 17% (Colin27), and without this a phantom reaches that only at ~70 years, so a model
    trained on them reads real young brains as old (``scripts/phantom_cues.py``). 0 (the
    default) makes the phantoms of earlier releases, bit for bit.
    """
    import torch
    import torch.nn.functional as F

    if not 0.0 <= float(sulcal_csf) <= MAX_SULCAL_CSF:
        raise SynthError(f"sulcal_csf must be 0-{MAX_SULCAL_CSF}, got {sulcal_csf!r}")

    sex = _check_inputs(age, sex, spacing)
    spacing = float(spacing)
    if work_spacing is not None and not 1.0 <= float(work_spacing) <= 3.0:
        raise SynthError(f"work_spacing must be 1-3 mm, got {work_spacing!r}")
    template = _template(float(work_spacing) if work_spacing else _working_spacing(spacing))
    draws = draw_subject(seed, sex)
    scale, anisotropy, translation = draws.scale, draws.anisotropy, draws.translation_mm
    axis, angle = draws.rotation_axis, math.radians(draws.rotation_deg)
    control, deformation_sd = draws.deformation_control, draws.deformation_sd_mm
    bias_coefficients, noise_fraction, gain = draws.bias_coefficients, draws.noise_fraction, draws.gain
    tissue_jitter, shell, noise_seed = draws.tissue_jitter, draws.shell, draws.noise_seed

    # --- anatomy on the template grid
    extra_csf = young_sulcal_csf(seed, sulcal_csf)
    aged = _age_tissue(template, age, extra_csf)
    contrast = float(lifespan.contrast_factor(age))
    mu_gm, mu_wm, mu_csf = (float(m * j) for m, j in zip(template.mu, tissue_jitter))
    middle, half = 0.5 * (mu_gm + mu_wm), 0.5 * (mu_wm - mu_gm) * contrast
    mu_gm, mu_wm = middle - half, middle + half
    flat, index = template.flat, template.index
    texture = flat["residual"] * np.clip(1.0 - (aged.csf - flat["csf"]), 0.0, 1.0)
    tissue_signal = aged.gm * mu_gm + aged.wm * mu_wm + aged.csf * mu_csf + texture
    push_mm = ventricle_push_mm(age)
    # Skull-stripped heads are masked by the warped brain mask (channel 2), on the head grid.
    source = np.zeros((2 if skull else 3, template.gm.size), dtype=np.float32)
    if skull:
        # Inside the closed brain surface but outside the stripped brain: CSF.
        source[0, index] = tissue_signal * flat["brain"] + flat["closed"] * (1.0 - flat["brain"]) * mu_csf
        band = template.shell_band
        d = template.head_distance.reshape(-1)[band]
        gap, bone, scalp, marrow, fat = (float(v) for v in shell)
        ramp = lambda edge: np.clip((d - edge) * (1.0 / 1.2) + 0.5, 0.0, 1.0)  # noqa: E731
        in_gap, in_bone, in_scalp, in_air = ramp(0.0), ramp(gap), ramp(gap + bone), ramp(gap + bone + scalp)
        diploe = np.clip(1.0 - np.abs(d - gap - 0.5 * bone) / (0.3 * bone), 0.0, 1.0)
        shell_signal = ((in_gap - in_bone) * (mu_csf * 0.8)
                        + (in_bone - in_scalp) * (mu_wm * 0.12 + mu_wm * marrow * diploe)
                        + (in_scalp - in_air) * (mu_wm * fat))
        source[0, band] = source[0, band] * (1.0 - in_gap) + shell_signal
    else:
        source[0, index] = tissue_signal * flat["brain"]
        source[2] = template.brain.reshape(-1)
    # Ageing map: tissue moved between classes, or volume change (|1 - Jacobian|, to first
    # order) from the ventricular push.
    source[1, index] = np.maximum(aged.moved, np.minimum(push_mm * np.abs(flat["push_divergence"]), 1.0))
    source = torch.from_numpy(source.reshape((-1,) + template.shape))[None]
    tissue_source = np.zeros((6 if with_tissue else 5, template.gm.size), dtype=np.float32)
    tissue_source[0] = template.brain.reshape(-1)
    tissue_source[1, index], tissue_source[2, index], tissue_source[3, index] = aged.gm, aged.wm, aged.csf
    tissue_source[4] = template.ventricles.reshape(-1)
    if with_tissue:
        tissue_source[5] = template.regions.reshape(-1)
    tissue_source = torch.from_numpy(tissue_source.reshape((-1,) + template.shape))[None]

    # --- geometry: output voxel -> world -> MNI (pose, size) -> deformations -> template voxel
    out_shape = tuple(int(round(f / spacing)) for f in FIELD_OF_VIEW_MM)
    out_affine = np.diag([spacing, spacing, spacing, 1.0])
    out_affine[:3, 3] = -0.5 * spacing * (np.array(out_shape) - 1)
    coarse_shape = tuple(max(2, int(math.ceil((n - 1) * spacing / COARSE_SPACING_MM)) + 1) for n in out_shape)
    index_axes = [np.linspace(0, n - 1, m) for n, m in zip(out_shape, coarse_shape)]
    ijk = np.stack(np.meshgrid(*index_axes, indexing="ij"), axis=-1)
    world = ijk * spacing + out_affine[:3, 3]
    rotation = _rotation(axis, angle)
    linear = rotation @ np.diag(scale * anisotropy)  # MNI offset -> world offset
    mni = (world - translation) @ np.linalg.inv(linear).T + np.asarray(HEAD_CENTRE_MNI)

    # Smooth subject deformation: random control points ~25 mm apart, cubic B-spline.
    extent_lo = np.asarray(HEAD_CENTRE_MNI) - 0.5 * np.asarray(FIELD_OF_VIEW_MM) / 0.85
    extent_hi = np.asarray(HEAD_CENTRE_MNI) + 0.5 * np.asarray(FIELD_OF_VIEW_MM) / 0.85
    control_index = (mni - extent_lo) / (extent_hi - extent_lo) * (np.array(control.shape[1:]) - 1)
    subject_shift = np.stack([ndi.map_coordinates(c, np.moveaxis(control_index, -1, 0), order=3,
                                                  mode="nearest") for c in control], axis=-1)
    mni = mni + deformation_sd * subject_shift

    # Ventricular enlargement (backward map: sample nearer to the ventricles).
    template_index = (mni - template.origin) / template.spacing
    push = np.stack([ndi.map_coordinates(p, np.moveaxis(template_index, -1, 0), order=1, mode="constant")
                     for p in template.push], axis=-1)
    template_index = template_index - push_mm * push / template.spacing

    # Bias field: exp of a random quadratic polynomial over the field of view.
    u = world / (0.5 * np.asarray(FIELD_OF_VIEW_MM))
    terms = [u[..., 0], u[..., 1], u[..., 2], u[..., 0] * u[..., 1], u[..., 0] * u[..., 2],
             u[..., 1] * u[..., 2], u[..., 0] ** 2, u[..., 1] ** 2, u[..., 2] ** 2, np.ones_like(u[..., 0])]
    log_bias = sum(c * t for c, t in zip(bias_coefficients, terms))

    size = np.array(template.shape, dtype=np.float64)
    normalised = template_index / (size - 1) * 2.0 - 1.0  # grid_sample: align_corners=True
    coarse = np.concatenate([normalised[..., ::-1], log_bias[..., None]], axis=-1)
    coarse_t = torch.from_numpy(np.moveaxis(coarse, -1, 0).astype(np.float32))[None]
    fine = F.interpolate(coarse_t, size=out_shape, mode="trilinear", align_corners=True)[0]
    grid = fine[:3].permute(1, 2, 3, 0)[None].contiguous()
    warped = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    # Tissue maps: on the head grid when asked for, else on every other voxel (for volumes).
    tissue_grid = grid if with_tissue else grid[:, ::2, ::2, ::2].contiguous()
    tissue_warped = F.grid_sample(tissue_source, tissue_grid, mode="bilinear", padding_mode="zeros",
                                  align_corners=True)[0].clamp_(0.0, 1.0)

    # --- the scan: bias, noise, gain, integer signal
    signal = warped[0] * torch.exp(fine[3])
    generator = torch.Generator().manual_seed(noise_seed)
    sigma = float(noise_fraction * mu_wm)
    real = signal + sigma * torch.randn(out_shape, generator=generator)
    imaginary = sigma * torch.randn(out_shape, generator=generator)
    image = torch.sqrt(real * real + imaginary * imaginary)
    if not skull:
        image = image * (warped[2] > 0.5)
    image = torch.round(image * (gain * WM_SIGNAL / template.mu[1])).clamp_(0, 32767)
    # Steps of 1/256: exact in float32 (disk = memory) and ~3x smaller once gzipped.
    aging = torch.round(warped[1].clamp_(0.0, 1.0) * 256.0) / 256.0

    volume = Volume(image.numpy().astype(np.float32), out_affine)
    aging_map = Volume(aging.numpy().astype(np.float32), out_affine.copy())
    names = ("brain", "gm", "wm", "csf", "ventricles")
    voxel_ml = spacing**3 / 1000.0 * (1 if with_tissue else 8)  # every other voxel counts 8x
    volumes = {f"{n}_ml": float(tissue_warped[i].sum()) * voxel_ml for i, n in enumerate(names)}
    tissue = None
    if with_tissue:
        tissue = {n: Volume(tissue_warped[i].numpy().copy(), out_affine.copy())
                  for i, n in enumerate(names + ("aging_regions",)) if n != "brain"}
    params = {"scale": float(scale), "rotation_deg": math.degrees(angle),
              "translation_mm": [float(t) for t in translation], "deformation_sd_mm": float(deformation_sd),
              "noise_fraction": float(noise_fraction), "gain": float(gain),
              "ventricle_push_mm": float(push_mm), "contrast_factor": contrast, "sulcal_csf": extra_csf}
    return Phantom(volume=volume, aging_map=aging_map, age=float(age), sex=sex, seed=int(seed),
                   has_skull=bool(skull), spacing=spacing, tissue=tissue, volumes_ml=volumes, params=params)


# ----------------------------------------------------------------------------------------
# A cohort on disk
# ----------------------------------------------------------------------------------------

#: Columns of the cohort table written by :func:`make_cohort`.
COHORT_COLUMNS = ("id", "path", "age", "sex", "site", "seed", "has_skull", "spacing_mm", "aging_map",
                  "brain_ml", "gm_ml", "wm_ml", "csf_ml", "ventricles_ml")


@dataclass(frozen=True)
class PhantomSpec:
    """What one cohort member is: enough to regenerate it bit for bit."""

    index: int
    id: str
    age: float
    sex: str
    seed: int
    has_skull: bool
    spacing: float
    sulcal_csf: float = 0.0  # make_phantom's (the most; each seed draws its own)


def cohort_specs(n: int, seed: int, age_range: Tuple[float, float] = lifespan.AGE_RANGE,
                 spacing: Union[float, Tuple[float, float]] = (1.0, 1.5),
                 skull_fraction: float = 0.5, sulcal_csf: float = 0.0) -> List[PhantomSpec]:
    """The members of a cohort of ``n`` phantoms: ages uniform in ``age_range`` (years, 0.1 y
    steps), sexes balanced at random, a skull on ``skull_fraction`` of heads, spacing fixed
    (mm) or uniform in a (low, high) range (0.05 mm steps), ``sulcal_csf`` as
    :func:`make_phantom` has it. Member i's seed depends only on (``seed``, i), so a larger
    cohort with the same seed extends a smaller one."""
    if n < 1:
        raise SynthError(f"a cohort needs at least one phantom, got n={n}")
    low, high = (float(a) for a in age_range)
    if not (0 < low <= high < 120):
        raise SynthError(f"age range must satisfy 0 < low <= high < 120 years, got {age_range}")
    if not 0.0 <= skull_fraction <= 1.0:
        raise SynthError(f"skull fraction must be in [0, 1], got {skull_fraction}")
    spacing_range = (float(spacing), float(spacing)) if np.isscalar(spacing) else tuple(float(s) for s in spacing)
    if len(spacing_range) != 2 or not 0.5 <= spacing_range[0] <= spacing_range[1] <= 4.0:
        raise SynthError(f"spacing must be 0.5-4 mm or a (low, high) range within it, got {spacing}")
    if not 0.0 <= float(sulcal_csf) <= MAX_SULCAL_CSF:
        raise SynthError(f"sulcal CSF must be 0-{MAX_SULCAL_CSF}, got {sulcal_csf}")
    specs = []
    for index in range(n):
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), index, 0xC0407]))
        age = round(float(rng.uniform(low, high)), 1)
        sex = "F" if rng.random() < 0.5 else "M"
        has_skull = bool(rng.random() < skull_fraction)
        step = round(float(rng.uniform(*spacing_range)) / 0.05) * 0.05
        member_seed = int(np.random.SeedSequence([int(seed), index]).generate_state(1)[0])
        specs.append(PhantomSpec(index, f"phantom-s{seed}-{index:05d}", age, sex, member_seed, has_skull,
                                 round(min(max(step, spacing_range[0]), spacing_range[1]), 2), float(sulcal_csf)))
    return specs


def write_phantom(spec: PhantomSpec, out_dir: Union[str, Path]) -> Dict[str, object]:
    """Make and save one cohort member (image + ageing map, atomically); return its table row.

    A member whose row sidecar already exists is not made again (an interrupted run resumes).
    """
    from ..io import save_volume

    out_dir = Path(out_dir)
    row_path = out_dir / "rows" / f"{spec.id}.json"
    if row_path.exists():
        try:
            row = json.loads(row_path.read_text())
            if (out_dir / row["path"]).exists() and (out_dir / row["aging_map"]).exists() \
                    and float(row.get("sulcal_csf_most", 0.0)) == spec.sulcal_csf:
                return row
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged sidecar or a missing image: make the member again
    phantom = make_phantom(spec.age, spec.sex, spec.seed, spacing=spec.spacing, skull=spec.has_skull,
                           with_tissue=False, sulcal_csf=spec.sulcal_csf)
    image_rel = Path("images") / f"{spec.id}_T1w.nii.gz"
    aging_rel = Path("aging_maps") / f"{spec.id}_aging.nii.gz"
    for folder in ("images", "aging_maps", "rows"):
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
    save_volume(Volume(phantom.volume.array.astype(np.int16), phantom.volume.affine), out_dir / image_rel)
    save_volume(phantom.aging_map, out_dir / aging_rel)
    row: Dict[str, object] = {
        "id": spec.id, "path": image_rel.as_posix(), "age": spec.age, "sex": spec.sex, "site": "synthetic",
        "seed": spec.seed, "has_skull": int(spec.has_skull), "spacing_mm": spec.spacing,
        "aging_map": aging_rel.as_posix(),
        **{key: round(value, 2) for key, value in phantom.volumes_ml.items()},
    }
    if spec.sulcal_csf:  # rows of the default recipe stay as earlier releases wrote them
        row.update(sulcal_csf_most=spec.sulcal_csf, sulcal_csf=round(phantom.params["sulcal_csf"], 4))
    write_text_atomic(row_path, json.dumps(row))
    return row




def _write_phantom_job(job: Tuple[PhantomSpec, str]) -> Dict[str, object]:
    return write_phantom(*job)


def make_cohort(n: int, out_dir: Union[str, Path], seed: int, *,
                age_range: Tuple[float, float] = lifespan.AGE_RANGE,
                spacing: Union[float, Tuple[float, float]] = (1.0, 1.5),
                skull_fraction: float = 0.5, workers: int = 1, progress: bool = True,
                sulcal_csf: float = 0.0) -> Path:
    """Write ``n`` phantoms under ``out_dir`` and return the path of ``out_dir/cohort.csv``.

    Layout: ``images/<id>_T1w.nii.gz`` (int16), ``aging_maps/<id>_aging.nii.gz`` (float32,
    [0, 1]), ``rows/<id>.json`` (one sidecar per finished member, so a rerun resumes) and
    ``cohort.csv`` with :data:`COHORT_COLUMNS` (paths relative to the CSV's folder). ``workers``
    > 1 makes phantoms in that many processes (one CPU thread each); the result is the same.
    ``sulcal_csf``: :func:`make_phantom`'s (a member written with another value is made again).
    """
    specs = cohort_specs(n, seed, age_range=age_range, spacing=spacing, skull_fraction=skull_fraction,
                         sulcal_csf=sulcal_csf)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    template_dir()  # fail early, with the install hint, before any worker starts
    jobs = [(spec, str(out_dir)) for spec in specs]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="phantoms", unit="head")
    rows: List[Dict[str, object]] = []
    try:
        if workers <= 1:
            for job in jobs:
                rows.append(_write_phantom_job(job))
                if bar is not None:
                    bar.update(1)
        else:
            from ..parallel import worker_pool

            with worker_pool(workers, threads=1) as pool:
                for row in pool.map(_write_phantom_job, jobs, chunksize=1):
                    rows.append(row)
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    csv_path = out_dir / "cohort.csv"
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=COHORT_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(csv_path, table.getvalue())
    return csv_path


def ellipsoid_head(spacing_mm: float = 1.0, rotation_deg: float = 0.0) -> Volume:
    """A template-free stand-in head (for when the MNI template is not installed): nested
    ellipsoids of scalp, skull (dark), CSF, grey and white matter with T1-like intensities, on a
    192 x 224 x 192 mm grid rotated ``rotation_deg`` about S (0: RAS-aligned), centred at RAS 0."""
    shape = tuple(int(round(extent / spacing_mm)) for extent in (192.0, 224.0, 192.0))
    centre = (np.array(shape) - 1) / 2.0
    grid = np.indices(shape, dtype=np.float32)
    radius = np.sqrt(sum(((grid[axis] - centre[axis]) / (0.42 * shape[axis])) ** 2 for axis in range(3)))
    head = np.zeros(shape, np.float32)
    for limit, intensity in ((1.0, 300.0), (0.92, 60.0), (0.85, 120.0), (0.8, 600.0), (0.55, 800.0)):
        head[radius < limit] = intensity  # outside-in: scalp, skull, CSF, grey matter, white matter
    angle = np.radians(rotation_deg)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = rotation * spacing_mm
    ijk_to_ras[:3, 3] = -rotation @ (centre * spacing_mm)
    return Volume(head, ijk_to_ras)
