"""Synthetic ageing phantoms: anatomy changes with age as the lifespan curves say, seeds are
reproducible, the ageing map marks the ageing regions, and cohorts are written and readable.

Heads are made at 2 mm (the template is then worked at 2 mm too) so the file runs in seconds.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from BrainAgeLib.synth import lifespan
from BrainAgeLib.synth.phantoms import (FIELD_OF_VIEW_MM, HEAD_SCALE, SynthError, aging_region_map, cohort_specs,
                               draw_subject, make_cohort, make_phantom, template_dir)

SPACING = 2.0
AAL = Path("/usr/share/mricron/templates/aal.nii.gz")


@pytest.fixture(scope="module")
def young():
    return make_phantom(25, "F", seed=11, spacing=SPACING, skull=False)


@pytest.fixture(scope="module")
def old():
    return make_phantom(85, "F", seed=11, spacing=SPACING, skull=False)


def dark_interior_ml(phantom) -> float:
    """CSF volume deep inside the brain, measured on the image alone: voxels darker than halfway
    between CSF and grey matter, at least 10 mm inside the skull-stripped brain."""
    image = phantom.volume.array
    brain = ndi.binary_fill_holes(image > 0)
    deep = ndi.binary_erosion(brain, iterations=int(round(10 / SPACING)))
    white = np.percentile(image[brain], 90)
    return float(np.count_nonzero(deep & (image < 0.55 * white))) * SPACING**3 / 1000.0


def test_older_head_has_larger_ventricles_and_less_grey_matter(young, old):
    young_csf, old_csf = dark_interior_ml(young), dark_interior_ml(old)
    assert young_csf > 5.0  # the young ventricles are there and visible
    assert old_csf > 1.6 * young_csf
    young_gm = young.tissue["gm"].array.sum()
    old_gm = old.tissue["gm"].array.sum()
    assert old_gm < 0.85 * young_gm
    # The image follows the tissue maps: grey matter darker than white matter, CSF darkest.
    image = old.volume.array
    means = {name: image[old.tissue[name].array > 0.9].mean() for name in ("csf", "gm", "wm")}
    assert means["csf"] < means["gm"] < means["wm"]


def test_volumes_follow_the_lifespan_curves(young, old):
    ventricle_ratio = old.volumes_ml["ventricles_ml"] / young.volumes_ml["ventricles_ml"]
    expected = lifespan.ventricle_growth(85) / lifespan.ventricle_growth(25)
    assert ventricle_ratio == pytest.approx(expected, rel=0.15)
    gm_ratio = old.volumes_ml["gm_ml"] / young.volumes_ml["gm_ml"]
    assert gm_ratio == pytest.approx((1 - lifespan.gm_loss_fraction(85)) / (1 - lifespan.gm_loss_fraction(25)), abs=0.05)
    # White matter: an inverted U with its peak in mid-life.
    middle = make_phantom(45, "F", seed=11, spacing=SPACING, skull=False, with_tissue=False)
    assert middle.volumes_ml["wm_ml"] > young.volumes_ml["wm_ml"]
    assert middle.volumes_ml["wm_ml"] > old.volumes_ml["wm_ml"] * 1.05
    # Atrophy happens inside a skull that does not shrink.
    assert old.volumes_ml["brain_ml"] == pytest.approx(young.volumes_ml["brain_ml"], rel=0.01)


def test_the_curves_have_the_published_shapes():
    ages = np.arange(20, 91, 10)
    growth = lifespan.ventricle_growth(ages)
    assert np.all(np.diff(growth) > 0) and np.diff(growth)[-1] > 2 * np.diff(growth)[0]  # accelerates
    assert np.all(np.diff(lifespan.gm_loss_fraction(ages)) > 0)
    wm = lifespan.wm_relative_to_peak(ages)
    assert ages[np.argmax(wm)] in (40, 50)
    assert np.all(np.diff(lifespan.contrast_factor(ages)) < 0)
    assert lifespan.ventricle_growth(20) == 1.0 and lifespan.gm_loss_fraction(20) == 0.0


def test_same_seed_gives_the_same_head_bit_for_bit(old):
    again = make_phantom(85, "F", seed=11, spacing=SPACING, skull=False)
    assert np.array_equal(again.volume.array, old.volume.array)
    assert np.array_equal(again.aging_map.array, old.aging_map.array)
    assert np.array_equal(again.volume.affine, old.volume.affine)
    other = make_phantom(85, "F", seed=12, spacing=SPACING, skull=False, with_tissue=False)
    assert not np.array_equal(other.volume.array, old.volume.array)


def test_age_does_not_change_the_person(young, old):
    assert young.params["scale"] == old.params["scale"]
    assert young.params["translation_mm"] == old.params["translation_mm"]
    assert young.volume.shape == old.volume.shape


def test_aging_map_marks_where_ageing_was_applied(young, old):
    assert young.aging_map.shape == young.volume.shape
    assert np.array_equal(young.aging_map.affine, young.volume.affine)
    aging = old.aging_map.array
    # The template is the 20-year-old: at 25 little has happened, at 85 much more.
    assert float(young.aging_map.array.max()) < 0.3
    assert float(young.aging_map.array.mean()) < 0.2 * float(aging.mean())
    assert make_phantom(20, "F", seed=11, spacing=SPACING, with_tissue=False).aging_map.array.max() == 0.0
    assert aging.min() >= 0.0 and aging.max() <= 1.0
    # Cortex away from the ventricles: faster GM loss, and a brighter map, inside the regions.
    far = ~ndi.binary_dilation(old.tissue["ventricles"].array > 0.5, iterations=10)
    grey = (young.tissue["gm"].array > 0.4) & far
    regions = old.tissue["aging_regions"].array
    inside, outside = grey & (regions > 0.9), grey & (regions < 0.1)
    loss = lambda where: 1 - old.tissue["gm"].array[where].sum() / young.tissue["gm"].array[where].sum()  # noqa: E731
    assert loss(inside) > 1.5 * loss(outside)
    assert aging[inside].mean() > 0.25
    assert aging[inside].mean() > 1.4 * aging[outside].mean()
    # Around the enlarged ventricles too.
    near_ventricles = ndi.binary_dilation(old.tissue["ventricles"].array > 0.5, iterations=2)
    assert aging[near_ventricles].mean() > 0.3


def test_geometry_spacing_and_skull():
    head = make_phantom(60, "M", seed=3, spacing=2.5, skull=True)
    assert head.volume.spacing == pytest.approx((2.5, 2.5, 2.5))
    assert head.volume.shape == tuple(int(round(f / 2.5)) for f in FIELD_OF_VIEW_MM)
    assert head.volume.orientation == ("R", "A", "S")
    image = head.volume.array
    assert image.dtype == np.float32 and np.array_equal(image, np.round(image)) and image.min() >= 0
    tissue = sum(head.tissue[n].array for n in ("gm", "wm", "csf"))
    outside_brain = tissue < 0.01
    # Scalp and bone marrow are bright outside the brain; a stripped head is zero there.
    assert np.count_nonzero(image[outside_brain] > 0.5 * np.percentile(image[tissue > 0.5], 90)) > 2000
    stripped = make_phantom(60, "M", seed=3, spacing=2.5, skull=False, with_tissue=False)
    assert np.count_nonzero(stripped.volume.array[outside_brain & ~ndi.binary_dilation(~outside_brain, iterations=2)]) == 0


def test_subject_draws_pose_and_head_size():
    draws = {sex: [draw_subject(seed, sex) for seed in range(300)] for sex in ("F", "M")}
    for sex, values in draws.items():
        assert all(abs(d.rotation_deg) <= 10.0 for d in values)
        assert all(np.all(np.abs(d.translation_mm) <= 8.0) for d in values)
        scales = np.array([d.scale for d in values])
        assert scales.mean() == pytest.approx(HEAD_SCALE[sex][0], abs=0.01)
    assert np.mean([d.scale for d in draws["M"]]) - np.mean([d.scale for d in draws["F"]]) > 0.025


def test_bad_requests_are_refused():
    with pytest.raises(SynthError, match="age"):
        make_phantom(-3, "F", seed=1, spacing=SPACING)
    with pytest.raises(SynthError, match="sex"):
        make_phantom(40, "unknown", seed=1, spacing=SPACING)
    with pytest.raises(SynthError, match="spacing"):
        make_phantom(40, "F", seed=1, spacing=10.0)
    with pytest.raises(SynthError, match="age range"):
        cohort_specs(3, seed=1, age_range=(80, 20))


def test_missing_nilearn_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "nilearn", None)  # makes `import nilearn` fail
    with pytest.raises(SynthError, match="pip install nilearn"):
        template_dir()


def test_cohort_is_written_readable_and_resumes(tmp_path):
    from BrainAgeLib.cohort.tables import read_cohort
    from BrainAgeLib.io import load_volume

    table = make_cohort(3, tmp_path / "cohort", seed=5, spacing=3.0, skull_fraction=0.5, progress=False)
    assert table == tmp_path / "cohort" / "cohort.csv"
    subjects = read_cohort(table)
    specs = cohort_specs(3, seed=5, spacing=3.0)
    assert [s.id for s in subjects] == [spec.id for spec in specs]
    assert [s.age for s in subjects] == [spec.age for spec in specs]
    assert [s.sex for s in subjects] == [spec.sex for spec in specs]
    for subject in subjects:
        assert 20 <= subject.age <= 90 and subject.sex in ("F", "M")
        image = load_volume(subject.path)
        aging = load_volume(table.parent / subject.extra["aging_map"])
        assert image.shape == aging.shape and np.allclose(image.affine, aging.affine)
        assert image.spacing == pytest.approx((3.0, 3.0, 3.0))
        assert 0.0 <= aging.array.min() and aging.array.max() <= 1.0
        assert float(subject.extra["gm_ml"]) > 300
    # The written head is the one make_phantom makes for that member.
    spec = specs[1]
    phantom = make_phantom(spec.age, spec.sex, spec.seed, spacing=spec.spacing, skull=spec.has_skull,
                           with_tissue=False)
    assert np.array_equal(load_volume(subjects[1].path).array, phantom.volume.array)
    # A rerun resumes: finished members are not made again; nothing temporary is left behind.
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "cohort" / "images").iterdir()}
    make_cohort(3, tmp_path / "cohort", seed=5, spacing=3.0, progress=False)
    assert stamps == {p: p.stat().st_mtime_ns for p in (tmp_path / "cohort" / "images").iterdir()}
    assert not [p for p in (tmp_path / "cohort").rglob("*") if p.name.startswith(".")]
    # A member whose image went missing is made again, identical.
    before = subjects[2].path.read_bytes()
    subjects[2].path.unlink()
    make_cohort(3, tmp_path / "cohort", seed=5, spacing=3.0, progress=False)
    assert subjects[2].path.read_bytes() == before


def test_age_independent_region_map_in_mni_space():
    regions = aging_region_map(spacing=2.0)
    assert 0.0 <= regions.array.min() and regions.array.max() <= 1.0

    def value_at(x, y, z):
        i, j, k = np.round(np.linalg.inv(regions.affine) @ [x, y, z, 1])[:3].astype(int)
        return float(regions.array[i, j, k])

    assert value_at(0, -62, -22) > 0.5  # cerebellar vermis
    assert value_at(-40, -22, 56) > 0.3  # left precentral gyrus
    assert value_at(0, -100, 6) == pytest.approx(0.0, abs=1e-3)  # occipital pole: not an ageing region


def test_synth_command_line(tmp_path, capsys):
    from BrainAgeLib.cli import main

    assert main(["synth", "--n", "2", "--out", str(tmp_path / "c"), "--seed", "9", "--spacing", "3",
                 "--age-range", "60", "70", "--skull-fraction", "0", "--no-progress"]) == 0
    assert "cohort table" in capsys.readouterr().out
    lines = (tmp_path / "c" / "cohort.csv").read_text().splitlines()
    assert lines[0].startswith("id,path,age,sex,site,seed,has_skull")
    rows = [line.split(",") for line in lines[1:]]
    assert len(rows) == 2 and all(60 <= float(r[2]) <= 70 and r[6] == "0" for r in rows)
    assert main(["synth", "--n", "0", "--out", str(tmp_path / "d"), "--seed", "1"]) == 2


@pytest.mark.skipif(not AAL.exists(), reason="AAL atlas (Debian mricron-data) not installed")
def test_aging_regions_lie_on_their_aal_labels():
    import nibabel as nib

    image = nib.load(str(AAL))
    labels = np.asarray(image.dataobj).astype(int)[::2, ::2, ::2]  # 2 mm is plenty here
    affine = image.affine.copy()
    affine[:3, :3] *= 2
    ijk = np.indices(labels.shape).reshape(3, -1).T
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    brain = labels.ravel() > 0
    region = lifespan.region_labels(xyz[brain])
    aal = labels.ravel()[brain]
    expected = {  # AAL label numbers (aal.nii.txt)
        "cerebellar_vermis": range(109, 117), "precentral_gyrus": (1, 2), "postcentral_gyrus": (57, 58),
        "temporal_lobe": (79, 80, 81, 82, 83, 84, 85, 86, 87, 88, 89, 90),
        "medial_superior_frontal_gyrus": (23, 24),
    }
    sensorimotor = np.isin(aal, [1, 2, 57, 58])
    for index, (name, wanted) in enumerate(expected.items(), start=1):
        ours, theirs = region == index, np.isin(aal, list(wanted))
        on_target = sensorimotor if name.endswith("central_gyrus") else theirs
        assert np.mean(on_target[ours]) > 0.7, name  # our region lies on the labelled structure
        assert np.mean(ours[theirs]) > 0.45, name  # and covers a good part of it


def test_ellipsoid_head_is_a_ras_head_with_brain_inside_skull():
    """The template-free stand-in head (bench and the Slicer self-test fall back to it)."""
    from BrainAgeLib.synth.phantoms import ellipsoid_head

    head = ellipsoid_head(3.0)
    assert head.shape == (64, 75, 64) and head.orientation == ("R", "A", "S")
    assert head.array[32, 37, 32] == 800.0                  # white matter in the middle
    profile = head.array[32, 37, 32:]
    assert 60.0 in profile and profile[-1] == 0.0          # dark skull between brain and scalp, air outside
    np.testing.assert_allclose(head.voxel_to_world((np.array(head.shape) - 1) / 2), 0.0, atol=1e-9)


def test_young_sulcal_csf_opens_sulci_and_keeps_the_person(young):
    """sulcal_csf turns grey matter into CSF whatever the age, each seed its own amount; the
    other draws (size, pose, ...) stay; 0 is the default recipe's head bit for bit."""
    from BrainAgeLib.synth.phantoms import young_sulcal_csf

    same = make_phantom(25, "F", seed=11, spacing=SPACING, skull=False, sulcal_csf=0.0)
    assert np.array_equal(same.volume.array, young.volume.array)
    opened = make_phantom(25, "F", seed=11, spacing=SPACING, skull=False, sulcal_csf=0.2)
    drawn = young_sulcal_csf(11, 0.2)
    assert 0.0 < drawn <= 0.2 and opened.params["sulcal_csf"] == drawn
    assert opened.volumes_ml["csf_ml"] > young.volumes_ml["csf_ml"] + 10
    assert opened.volumes_ml["gm_ml"] < young.volumes_ml["gm_ml"] - 10
    assert opened.params["scale"] == young.params["scale"]
    assert opened.params["rotation_deg"] == young.params["rotation_deg"]
    amounts = {round(young_sulcal_csf(seed, 0.2), 6) for seed in range(20)}
    assert len(amounts) == 20 and min(amounts) >= 0.0 and max(amounts) <= 0.2
    with pytest.raises(SynthError, match="sulcal_csf"):
        make_phantom(25, "F", seed=11, spacing=SPACING, skull=False, sulcal_csf=0.5)


def test_a_cohort_with_sulcal_csf_records_it_and_remakes_other_recipes(tmp_path):
    import json

    folder = tmp_path / "cohort"
    make_cohort(2, folder, seed=5, spacing=3.0, progress=False)
    plain = {p.name: p.read_bytes() for p in (folder / "images").iterdir()}
    make_cohort(2, folder, seed=5, spacing=3.0, progress=False, sulcal_csf=0.15)
    rows = [json.loads(p.read_text()) for p in sorted((folder / "rows").iterdir())]
    assert all(row["sulcal_csf_most"] == 0.15 and 0.0 <= row["sulcal_csf"] <= 0.15 for row in rows)
    assert {p.name: p.read_bytes() for p in (folder / "images").iterdir()} != plain  # made again
    assert cohort_specs(2, seed=5, spacing=3.0, sulcal_csf=0.15)[0].sulcal_csf == 0.15
