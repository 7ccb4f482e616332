"""Reading cohorts: CSV/TSV tables, BIDS datasets (sessions too) and plain image folders.

Only the files' existence matters to the reader, so the "images" here are empty files.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from BrainAgeLib.cohort.tables import Subject, parse_age, parse_cohort_sex, read_cohort
from BrainAgeLib.errors import CohortError


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_csv_with_relative_paths_sex_codes_site_and_extra_columns(tmp_path):
    for name in ("a.nii.gz", "b.nii.gz", "c.nii", "d.nrrd"):
        touch(tmp_path / "images" / name)
    table = write(tmp_path / "cohort.csv",
                  "ID,Path,Age,Sex,Site,scanner\n"
                  "s1,images/a.nii.gz,34.5,F,oxford,prisma\n"
                  "s2,images/b.nii.gz,71,male,oxford,prisma\n"
                  "s3,images/c.nii,,1,leeds,trio\n"
                  f"s4,{tmp_path / 'images' / 'd.nrrd'},58.25,0,,\n")
    subjects = read_cohort(table)
    assert [s.id for s in subjects] == ["s1", "s2", "s3", "s4"]
    assert [s.age for s in subjects] == [34.5, 71.0, None, 58.25]
    assert [s.sex for s in subjects] == ["F", "M", "F", "M"]  # 1 = female, 0 = male (M=0, F=1)
    assert [s.site for s in subjects] == ["oxford", "oxford", "leeds", None]
    assert subjects[0].path == (tmp_path / "images" / "a.nii.gz").resolve() and subjects[0].path.is_absolute()
    assert subjects[0].extra == {"scanner": "prisma"}
    assert subjects[1].participant == "s2"


def test_tsv_semicolon_csv_and_column_aliases(tmp_path):
    touch(tmp_path / "x_T1w.nii.gz")
    touch(tmp_path / "y.mgz")
    tsv = read_cohort(write(tmp_path / "t.tsv", "participant_id\tt1\tage\tsex\nsub-x\tx_T1w.nii.gz\t40\tn/a\n"))
    assert (tsv[0].id, tsv[0].age, tsv[0].sex) == ("sub-x", 40.0, "unknown")
    semicolon = read_cohort(write(tmp_path / "s.csv", "subject;image;age;sex\nq;y.mgz;22;FEMALE\n"))
    assert (semicolon[0].id, semicolon[0].sex) == ("q", "F")
    no_id = read_cohort(write(tmp_path / "n.csv", "filename,age,sex\nx_T1w.nii.gz,90+,M\n"))
    assert (no_id[0].id, no_id[0].age) == ("x_T1w", 90.0)  # id from the file name; "90+" -> 90


def test_values_convention():
    values = ("F", "f", "Female", "M", "MALE", "1", "0", "1.0", "", "NA", None, "unknown")
    assert [parse_cohort_sex(v) for v in values] == \
        ["F", "F", "F", "M", "M", "F", "M", "F", "unknown", "unknown", "unknown", "unknown"]
    assert parse_cohort_sex(" female ") == "F" and parse_cohort_sex("n/a") == "unknown"
    with pytest.raises(ValueError, match="ambiguous"):
        parse_cohort_sex("2")
    with pytest.raises(ValueError, match="not F, M"):
        parse_cohort_sex("x")
    assert parse_age(" 63.5 ") == 63.5 and parse_age("") is None and parse_age("89+") == 89.0
    with pytest.raises(ValueError, match="outside"):
        parse_age("-4")
    with pytest.raises(ValueError, match="not a number"):
        parse_age("sixty")


def make_bids(root: Path) -> Path:
    touch(root / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    touch(root / "sub-02" / "ses-1" / "anat" / "sub-02_ses-1_run-1_T1w.nii.gz")
    touch(root / "sub-02" / "ses-1" / "anat" / "sub-02_ses-1_run-2_T1w.nii.gz")
    touch(root / "sub-02" / "ses-2" / "anat" / "sub-02_ses-2_T1w.nii")
    touch(root / "sub-02" / "ses-2" / "func" / "sub-02_ses-2_bold.nii.gz")
    write(root / "sub-02" / "sub-02_sessions.tsv", "session_id\tage\nses-1\t60\nses-2\t64.5\n")
    write(root / "dataset_description.json", '{"Name": "toy", "BIDSVersion": "1.8.0"}')
    return write(root / "participants.tsv",
                 "participant_id\tage\tsex\tsite\thandedness\nsub-01\t25\tF\tA\tR\nsub-02\t59\tM\tB\tL\n")


def test_bids_participants_and_sessions(tmp_path):
    participants = make_bids(tmp_path / "bids")
    for source in (participants, tmp_path / "bids"):
        subjects = read_cohort(source)
        assert [s.id for s in subjects] == ["sub-01", "sub-02_ses-1", "sub-02_ses-2"]
        assert [s.participant for s in subjects] == ["sub-01", "sub-02", "sub-02"]
        assert [s.age for s in subjects] == [25.0, 60.0, 64.5]  # session ages override
        assert [s.sex for s in subjects] == ["F", "M", "M"]
        assert [s.site for s in subjects] == ["A", "B", "B"]
        assert subjects[1].path.name == "sub-02_ses-1_run-1_T1w.nii.gz"  # run-1 before run-2
        assert subjects[0].extra == {"handedness": "R"}


def test_bids_folder_without_participants_table(tmp_path):
    touch(tmp_path / "sub-a" / "anat" / "sub-a_T1w.nii.gz")
    touch(tmp_path / "sub-b" / "anat" / "sub-b_acq-mprage_T1w.nii.gz")
    subjects = read_cohort(tmp_path)
    assert [(s.id, s.age, s.sex) for s in subjects] == [("sub-a", None, "unknown"), ("sub-b", None, "unknown")]


def test_plain_folder_of_images(tmp_path):
    for name in ("b.nii.gz", "a.nrrd", "c.mha", "notes.txt", ".hidden.nii"):
        touch(tmp_path / name)
    subjects = read_cohort(tmp_path)
    assert [s.id for s in subjects] == ["a", "b", "c"]
    assert all(isinstance(s, Subject) and s.age is None and s.sex == "unknown" for s in subjects)


def test_folder_of_dicom_series_folders_and_images(tmp_path):
    """Each subfolder holding DICOM files (by extension, or by the DICM marker of extension-less
    files, as scanners write them) is one subject named after the folder."""
    import numpy as np

    from test_io import write_dicom_series

    write_dicom_series(tmp_path / "patient01", np.zeros((4, 6, 6)), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0),
                       (1, 0, 0, 0, 1, 0, 0, 0, 1))
    plain = tmp_path / "patient02"
    plain.mkdir()
    for k, source in enumerate(sorted((tmp_path / "patient01").iterdir())):
        (plain / f"IM{k:04d}").write_bytes(source.read_bytes())      # no extension
    touch(tmp_path / "notes" / "readme.txt")                          # a folder of no images
    touch(tmp_path / "patient03.nii.gz")
    subjects = read_cohort(tmp_path)
    assert [s.id for s in subjects] == ["patient01", "patient02", "patient03"]
    assert subjects[0].path == (tmp_path / "patient01").resolve() and subjects[0].path.is_dir()


@pytest.mark.parametrize("text, message", [
    ("age,sex\n30,F\n", "no image column"),
    ("path,age,sex\nimg.nii,thirty,F\n", "line 2: age 'thirty' is not a number"),
    ("id,path,age,sex\na,img.nii,30,F\nb,img.nii,40,2\n", "line 3: numeric sex '2' is ambiguous"),
    ("path,age,sex\nimg.nii,30,F\nimg.nii,31,M\n", "line 3: id 'img' already used on line 2"),
    ("path,age,sex\nmissing.nii,30,F\n", "line 2: image .*missing.nii does not exist"),
    ("path,age,sex\n", "no rows"),
    ("", "empty"),
    ("path,age,sex\nimg.nii,30,F,extra,cells\n", "line 2: 5 cells"),
    ("path,age,age\nimg.nii,30,31\n", "more than once"),
])
def test_bad_tables_name_the_file_line_and_problem(tmp_path, text, message):
    touch(tmp_path / "img.nii")
    table = write(tmp_path / "bad.csv", text)
    with pytest.raises(CohortError, match=message) as error:
        read_cohort(table)
    assert str(table) in str(error.value)


def test_missing_inputs(tmp_path):
    with pytest.raises(CohortError, match="no such file"):
        read_cohort(tmp_path / "nope.csv")
    with pytest.raises(CohortError, match="nothing to read"):
        read_cohort(tmp_path)
    write(tmp_path / "bids" / "participants.tsv", "participant_id\tage\tsex\nsub-01\t30\tF\n")
    with pytest.raises(CohortError, match="no T1-weighted image"):
        read_cohort(tmp_path / "bids")


def make_infant_bids(root: Path) -> Path:
    """Sessions for several subjects, one subject with only a T2w, one session with only a T2w,
    one participant without a folder, one folder missing from participants.tsv."""
    touch(root / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    for session in ("ses-1", "ses-2"):
        touch(root / "sub-02" / session / "anat" / f"sub-02_{session}_T1w.nii.gz")
    touch(root / "sub-02" / "ses-3" / "anat" / "sub-02_ses-3_T2w.nii.gz")
    write(root / "sub-02" / "sub-02_sessions.tsv", "session_id\tage\nses-1\t0.25\nses-2\tn/a\nses-3\t1.5\n")
    for session in ("ses-a", "ses-b"):
        touch(root / "sub-03" / session / "anat" / f"sub-03_{session}_T1w.nii")
    write(root / "sub-03" / "sub-03_sessions.tsv", "session_id\tage\tscanner\nses-a\t0.5\tprisma\nb\t1.25\ttrio\n")
    touch(root / "sub-04" / "anat" / "sub-04_T2w.nii.gz")
    touch(root / "sub-06" / "ses-1" / "anat" / "sub-06_ses-1_T1w.nii.gz")
    write(root / "sub-06" / "sub-06_sessions.tsv", "session_id\tage\nses-1\t2.0\n")
    return write(root / "participants.tsv",
                 "participant_id\tage\tsex\n"
                 "sub-01\t0.75\tF\nsub-02\t0.2\tM\nsub-03\tn/a\tF\nsub-04\t1\tM\nsub-05\t1\tF\n")


def test_bids_ages_of_every_subject_and_the_skipped_subjects_listed(tmp_path, caplog):
    """Issue 20, item 12: ages from participants.tsv and, per session, from every subject's
    sessions.tsv; a subject with only a T2w (or no folder) is listed with why, not dropped."""
    import logging

    make_infant_bids(tmp_path / "bids")
    for check_files in (True, False):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="BrainAgeLib.cohort.tables"):
            cohort = read_cohort(tmp_path / "bids", check_files=check_files)
        ages = {s.id: s.age for s in cohort}
        assert ages == {"sub-01": 0.75, "sub-02_ses-1": 0.25, "sub-02_ses-2": 0.2,  # n/a: the participant's
                        "sub-03_ses-a": 0.5, "sub-03_ses-b": 1.25,                 # "b" is ses-b
                        "sub-06_ses-1": 2.0}
        assert {s.id: s.sex for s in cohort}["sub-03_ses-b"] == "F"
        assert {s.id: s.extra.get("scanner") for s in cohort}["sub-03_ses-b"] == "trio"
        skipped = dict(entry.split(": ", 1) for entry in cohort.skipped)
        assert sorted(skipped) == ["sub-02_ses-3", "sub-04", "sub-05"]
        assert "T1w" in skipped["sub-04"] and "sub-04_T2w.nii.gz" in skipped["sub-04"]
        assert "sub-02_ses-3_T2w.nii.gz" in skipped["sub-02_ses-3"]
        assert "no folder" in skipped["sub-05"]
        logged = caplog.text
        assert all(subject in logged for subject in skipped) and "sub-06" in logged  # not in participants.tsv


def test_a_bad_session_age_names_the_sessions_table_and_line(tmp_path):
    make_infant_bids(tmp_path / "bids")
    sessions = write(tmp_path / "bids" / "sub-03" / "sub-03_sessions.tsv", "session_id\tage\nses-a\t0.5\nses-b\tsoon\n")
    with pytest.raises(CohortError, match="age 'soon' is not a number") as error:
        read_cohort(tmp_path / "bids")
    assert f"{sessions}, line 3" in str(error.value)
