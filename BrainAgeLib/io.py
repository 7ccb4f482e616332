"""Reading and writing 3D MRI volumes: one loader for every format, RAS everywhere.

``load_volume`` reads NIfTI (.nii, .nii.gz), FreeSurfer MGH (.mgz, .mgh), NRRD (.nrrd, .nhdr),
MetaImage (.mha, .mhd) and a folder holding a DICOM series (or one .dcm file of it), and
returns a :class:`Volume`: a float32 array [I, J, K] with a 4x4 voxel -> RAS (mm) affine.
NIfTI and MGH go through nibabel, whose affines are already RAS. NRRD, MetaImage and DICOM go
through SimpleITK, whose geometry is LPS; it is converted exactly: the array SimpleITK gives is
indexed [k, j, i] and is transposed to [i, j, k], and the affine is
``diag(-1, -1, 1, 1) @ [direction * spacing | origin]`` (``geometry.sitk_affine``).

Every loaded volume passes :func:`validate_volume`, which rejects what cannot be a head MRI
with an :class:`InvalidVolumeError` naming the file and the problem:

- dimensionality: 2D images (or a single slice), 4D images with more than one volume, vector
  or colour voxels. A 4D image holding exactly one volume is accepted and squeezed to 3D.
- geometry: a non-finite or singular affine; voxel spacing outside 0.2-8 mm along any axis;
  fewer than 16 voxels, or a field of view under 50 mm, along any axis (too small for a head).
- intensities: all voxels zero, or all voxels equal. NaN/Inf voxels are *cleaned* (set to 0,
  with a logged warning giving their number) when they are fewer than 1% of the voxels, and
  *rejected* above that, since then they are part of the image rather than a few bad voxels.

``save_volume`` writes NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr) or MetaImage (.mha, .mhd),
chosen by extension, atomically: the file is written under a temporary name in the target
folder and then moved into place with ``os.replace``, so a reader never sees half a file.
"""
from __future__ import annotations

import gzip
import logging
import os
import re
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import nibabel as nib
import numpy as np

from .errors import InvalidVolumeError
from .geometry import itk_setting, sitk_affine, volume_to_sitk
from .volume import Volume

__all__ = [
    "Volume", "load_volume", "check_image_path", "save_volume", "validate_volume", "image_stem",
    "READ_EXTENSIONS", "WRITE_EXTENSIONS",
    "MIN_SPACING_MM", "MAX_SPACING_MM", "MIN_EXTENT_MM", "MIN_VOXELS_PER_AXIS", "MAX_NONFINITE_FRACTION",
]

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

NIBABEL_EXTENSIONS = (".nii.gz", ".nii", ".mgz", ".mgh")
SITK_EXTENSIONS = (".nrrd", ".nhdr", ".mha", ".mhd")
DICOM_EXTENSIONS = (".dcm", ".ima")
READ_EXTENSIONS = NIBABEL_EXTENSIONS + SITK_EXTENSIONS + DICOM_EXTENSIONS
WRITE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
#: Extensions ``image_stem`` strips: every readable one, plus the Analyze .img/.hdr pair.
STEM_EXTENSIONS = READ_EXTENSIONS + (".img", ".hdr")

# Limits of what can be a head MRI (see the module docstring).
MIN_SPACING_MM = 0.2
MAX_SPACING_MM = 8.0
MIN_EXTENT_MM = 50.0
MIN_VOXELS_PER_AXIS = 16
MAX_NONFINITE_FRACTION = 0.01


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_volume(path: PathLike, *, series_uid: Optional[str] = None, notes: Optional[List[str]] = None,
                dicom_header: Optional[Dict[str, Any]] = None) -> Volume:
    """Read a 3D image file (or DICOM series folder) as a validated RAS :class:`Volume`.

    ``path`` is a .nii/.nii.gz/.mgz/.mgh/.nrrd/.nhdr/.mha/.mhd file, a folder with one DICOM
    series, or one .dcm file of a series (the whole series in its folder is read). Where a
    folder holds several series, ``series_uid`` picks one (the error lists them).
    The array is float32 [I, J, K]; the affine maps voxel indices to RAS mm.
    Raises :class:`InvalidVolumeError` for anything that is not a usable 3D head image.
    ``notes``, when given, receives what was repaired on the way (see :func:`validate_volume`).
    ``dicom_header``, when given (a dict), receives what a DICOM series says of the person (see
    :func:`_dicom_demographics`): ``age`` in years with its ``age_text`` (PatientAge, e.g. "039Y")
    and ``sex`` ("F" or "M", PatientSex), each only where the tag holds a usable value.
    """
    path = check_image_path(path)
    if path.is_dir():
        array, affine = _read_dicom_series(path, path, series_uid, notes, dicom_header)
    else:
        ext = _extension(path)
        if ext in NIBABEL_EXTENSIONS:
            array, affine = _read_with_nibabel(path, notes)
        elif ext in SITK_EXTENSIONS:
            array, affine = _read_with_simpleitk(path)
        else:
            array, affine = _read_dicom_series(path.parent, path, series_uid, notes, dicom_header)
    return validate_volume(Volume(array, affine), path, notes=notes)


def check_image_path(path: PathLike) -> Path:
    """``path`` as a Path if it can be an image :func:`load_volume` reads, checked without
    reading it: it exists, this user may read it, it is a folder or a file of a supported type,
    and a file is not empty. Cheap (a few system calls), so a command can run it before any slow
    import. Raises :class:`InvalidVolumeError` naming the file and the problem.
    """
    path = Path(path)
    if not path.exists():
        raise InvalidVolumeError("file not found", path)
    if not os.access(path, os.R_OK) or (path.is_dir() and not os.access(path, os.X_OK)):
        raise InvalidVolumeError("permission denied: the file cannot be read by this user", path)
    if path.is_dir():
        return path
    ext = _extension(path)
    if ext not in READ_EXTENSIONS:
        raise InvalidVolumeError(
            f"unsupported file type {ext or '(no extension)'!r}; BrainAge reads "
            f"{', '.join(READ_EXTENSIONS)} files and DICOM series folders", path)
    if path.stat().st_size == 0:
        raise InvalidVolumeError("the file is empty (0 bytes)", path)
    return path


def image_stem(path: PathLike) -> str:
    """The file name without its image extension (any case): sub-01_T1w.nii.gz -> sub-01_T1w.

    Names without a known extension (a DICOM folder, say) come back whole.
    """
    name = Path(path).name
    for ext in STEM_EXTENSIONS:
        if name.lower().endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)]
    return name


def _extension(path: Path) -> str:
    name = path.name.lower()
    for ext in (".nii.gz",):
        if name.endswith(ext):
            return ext
    return path.suffix.lower()


def _read_with_nibabel(path: Path, notes: Optional[List[str]] = None) -> Tuple[np.ndarray, np.ndarray]:
    try:
        image = _open_with_nibabel(path)
    except InvalidVolumeError:
        raise
    except PermissionError as error:
        raise InvalidVolumeError(f"permission denied ({error.strerror})", path) from None
    except Exception as error:  # nibabel raises many types for a file that is not an image
        raise InvalidVolumeError(
            f"not a readable {_format_name(path)} image (the header could not be parsed: "
            f"{_short(error)})", path) from None
    try:
        array = image.get_fdata(dtype=np.float32)
    except MemoryError:
        raise InvalidVolumeError(f"too large to load: shape {image.shape}", path) from None
    except Exception as error:
        raise InvalidVolumeError(
            f"truncated or corrupt file: the voxel data could not be read ({_short(error)})", path) from None
    array = _to_3d(array, path, time_axis_first=False)
    header = image.header
    if isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        if not (header["qform_code"] or header["sform_code"]):
            # No orientation in the header: nibabel builds the affine from pixdim, and silently
            # takes 1 mm for a pixdim of 0 (it fixes the header as it loads it, so the stored one
            # is read again); a guessed voxel size would give a wrong brain size.
            opener = gzip.open if path.name.lower().endswith(".gz") else open
            with opener(path, "rb") as stream:
                stored = type(header).from_fileobj(stream, check=False)
            pixdim = np.asarray(stored["pixdim"][1:4], dtype=np.float64)
            if not np.all(np.isfinite(pixdim) & (pixdim > 0)):
                raise InvalidVolumeError(
                    f"the header gives no voxel size (pixdim {', '.join(f'{v:g}' for v in pixdim)}) and no "
                    "orientation (qform and sform codes are 0); fix the header, e.g. by re-exporting the image", path)
        elif header["qform_code"] and header["sform_code"]:
            _note_qform_sform_conflict(image, path, notes)
    return array, np.asarray(image.affine, dtype=np.float64)


def _note_qform_sform_conflict(image, path: Path, notes: Optional[List[str]]) -> None:
    """Say so when a NIfTI's sform and qform place the image differently: BrainAge (like nibabel
    and FSL) uses the sform, while ITK-based tools such as 3D Slicer may use the qform."""
    sform, qform = image.get_sform(), image.get_qform()
    corners = np.array([[i, j, k, 1.0] for i in (0, image.shape[0] - 1) for j in (0, image.shape[1] - 1)
                        for k in (0, image.shape[2] - 1)]).T
    apart = float(np.max(np.linalg.norm((sform @ corners - qform @ corners)[:3], axis=0)))
    if apart > 1.0:
        note = (f"{path}: the NIfTI header's sform and qform disagree (the image's corners up to {apart:.1f} mm "
                "apart); BrainAge uses the sform, as nibabel and FSL do; ITK-based tools such as 3D Slicer may "
                "place the image by its qform")
        log.warning("%s", note)
        if notes is not None:
            notes.append(note)


def _open_with_nibabel(path: Path):
    """nibabel image of ``path``. Gzipped files are decompressed here, in one pass that also
    checks gzip's CRC and length, so a truncated or corrupted .nii.gz/.mgz is caught rather
    than read as silently wrong voxels (nibabel stops reading before the checksum)."""
    if _extension(path) not in (".nii.gz", ".mgz"):
        return nib.load(str(path), mmap=False)
    with open(path, "rb") as stream:
        if stream.read(2) != b"\x1f\x8b":
            raise InvalidVolumeError(
                f"not a readable {_format_name(path)} image (the file is not gzip-compressed, "
                f"as {_extension(path)} files are)", path)
    try:
        with gzip.open(path, "rb") as stream:
            raw = stream.read()
    except EOFError:
        raise InvalidVolumeError("truncated file: the compressed data ends early", path) from None
    except (gzip.BadGzipFile, zlib.error) as error:
        raise InvalidVolumeError(f"corrupt file: the compressed data is damaged ({_short(error)})", path) from None
    classes = (nib.MGHImage,) if _extension(path) == ".mgz" else (nib.Nifti1Image, nib.Nifti2Image)
    problems = []
    for image_class in classes:
        try:
            return image_class.from_bytes(raw)
        except Exception as error:
            problems.append(_short(error))
    raise InvalidVolumeError(
        f"not a readable {_format_name(path)} image (the header could not be parsed: {problems[-1]})", path)


def _read_with_simpleitk(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    try:
        with _quiet_itk():
            image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        if "Unable to determine ImageIO reader" in str(error):
            raise InvalidVolumeError(
                f"not a readable {_format_name(path)} image (no image reader recognises its contents)", path) from None
        raise InvalidVolumeError(
            f"truncated or corrupt {_format_name(path)} file: the image could not be read ({_itk_reason(error)})",
            path) from None
    return _from_sitk(image, path)


def _read_dicom_series(folder: Path, path: Path, series_uid: Optional[str], notes: Optional[List[str]] = None,
                       header: Optional[Dict[str, Any]] = None) -> Tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    try:
        with _quiet_itk():
            series = list(reader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError as error:
        raise InvalidVolumeError(f"could not scan the folder for DICOM files ({_itk_reason(error)})", path) from None
    if path != folder:  # one file of a series: read the series that file belongs to
        own = _dicom_series_of_file(path)
        if own is None or own not in series:
            raise InvalidVolumeError("not a readable DICOM image file", path)
        if series_uid is not None and series_uid != own:
            raise InvalidVolumeError(f"belongs to DICOM series {own!r}, not to the requested {series_uid!r}", path)
        series_uid = own
    if not series:
        images = sorted(item.name for item in folder.iterdir()
                        if item.is_file() and _extension(item) in NIBABEL_EXTENSIONS + SITK_EXTENSIONS)
        if images:
            shown = ", ".join(images[:3]) + (", ..." if len(images) > 3 else "")
            raise InvalidVolumeError(
                f"no DICOM series found in this folder, which holds {len(images)} image file"
                f"{'s' if len(images) > 1 else ''} ({shown}); give one image file, or run "
                "`brainage batch FOLDER` for a folder of images", path)
        raise InvalidVolumeError("no DICOM series found in this folder", path)
    if series_uid is None:
        if len(series) > 1:
            listing = "; ".join(
                f"{uid} ({len(reader.GetGDCMSeriesFileNames(str(folder), uid))} files)" for uid in series)
            raise InvalidVolumeError(
                f"the folder holds {len(series)} DICOM series; choose one with series_uid: {listing}", path)
        series_uid = series[0]
    elif series_uid not in series:
        raise InvalidVolumeError(f"no DICOM series {series_uid!r} here (found: {', '.join(series)})", path)
    files = reader.GetGDCMSeriesFileNames(str(folder), series_uid)
    _check_slice_spacing(files, path)
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()  # the first slice's tags: the person's age and sex
    try:
        with _quiet_itk():
            image = reader.Execute()
    except RuntimeError as error:
        raise InvalidVolumeError(f"the DICOM series could not be read ({_itk_reason(error)})", path) from None
    if header is not None:
        tags = {key: reader.GetMetaData(0, key) for key in (PATIENT_AGE_TAG, PATIENT_SEX_TAG)
                if reader.HasMetaDataKey(0, key)}
        header.update(_dicom_demographics(tags, path, notes))
    return _from_sitk(image, path)


PATIENT_AGE_TAG = "0010|1010"  # PatientAge, an "age string": nnnD, nnnW, nnnM or nnnY
PATIENT_SEX_TAG = "0010|0040"  # PatientSex: M, F or O (other)
#: Years per unit of a DICOM age string.
DICOM_AGE_UNITS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


def _dicom_demographics(tags: Dict[str, str], path: Path, notes: Optional[List[str]]) -> Dict[str, Any]:
    """``{"age": years, "age_text": "039Y", "sex": "F"|"M"}`` from the PatientAge and PatientSex
    tags, leaving out what is blank; a value that is there but unusable is left out with a note."""
    from .demographics import MAX_AGE_YEARS

    found: Dict[str, Any] = {}
    age_text = tags.get(PATIENT_AGE_TAG, "").strip().rstrip("\x00").strip()
    if age_text:
        match = re.fullmatch(r"(\d{1,3})\s*([DWMY])", age_text.upper())
        years = int(match.group(1)) * DICOM_AGE_UNITS[match.group(2)] if match else None
        if years is not None and 0 <= years <= MAX_AGE_YEARS:
            found.update(age=years, age_text=age_text)
        else:
            _note(notes, f"{path}: PatientAge {age_text!r} in the DICOM header is not an age of 0-{MAX_AGE_YEARS:g} "
                         "years written as nnnD, nnnW, nnnM or nnnY; not used")
    sex_text = tags.get(PATIENT_SEX_TAG, "").strip().rstrip("\x00").strip()
    if sex_text.upper() in ("F", "M"):
        found["sex"] = sex_text.upper()
    elif sex_text:
        _note(notes, f"{path}: PatientSex {sex_text!r} in the DICOM header is neither F nor M; not used")
    return found


def _note(notes: Optional[List[str]], note: str) -> None:
    log.warning("%s", note)
    if notes is not None:
        notes.append(note)


#: Largest departure of a DICOM slice gap from the median gap (as a fraction of it) that is
#: taken for rounding; more means a missing or extra slice, which ITK would silently stretch over.
MAX_SLICE_GAP_DEVIATION = 0.1


def _check_slice_spacing(files: Sequence[str], path: Path) -> None:
    """Refuse a series whose slices are not evenly spaced along their normal (a missing slice:
    ITK's reader would spread the others evenly and misplace every slice after the gap)."""
    import SimpleITK as sitk

    if len(files) < 3:
        return
    positions = []
    normal = None
    for name in files:
        header = sitk.ImageFileReader()
        header.SetFileName(name)
        try:
            with _quiet_itk():
                header.ReadImageInformation()
            position = [float(v) for v in header.GetMetaData("0020|0032").split("\\")]
            if normal is None:
                row_col = [float(v) for v in header.GetMetaData("0020|0037").split("\\")]
                normal = np.cross(row_col[:3], row_col[3:])
        except (RuntimeError, ValueError):
            return  # no usable geometry tags: nothing to check here (ITK decides)
        positions.append(float(np.dot(position, normal)))
    gaps = np.abs(np.diff(np.sort(positions)))
    median = float(np.median(gaps))
    if median <= 0:
        raise InvalidVolumeError("two or more DICOM slices of the series lie at the same position", path)
    worst = float(np.max(np.abs(gaps - median)))
    if worst > MAX_SLICE_GAP_DEVIATION * median:
        where = int(np.argmax(np.abs(gaps - median)))
        raise InvalidVolumeError(
            f"the DICOM slices are not evenly spaced: gap {gaps[where]:.2f} mm after slice {where + 1} of "
            f"{len(files)}, where the others are {median:.2f} mm; is a slice missing?", path)


def _dicom_series_of_file(path: Path) -> Optional[str]:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        return reader.GetMetaData("0020|000e").strip().rstrip("\x00").strip()
    except RuntimeError:
        return None


def _from_sitk(image, path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """SimpleITK image (LPS, array [k, j, i]) -> array [i, j, k] and voxel -> RAS affine."""
    import SimpleITK as sitk

    components = image.GetNumberOfComponentsPerPixel()
    if components != 1:
        raise InvalidVolumeError(
            f"has {components} values per voxel (a colour or vector image); BrainAge needs a "
            "grey-scale T1-weighted volume", path)
    dim = image.GetDimension()
    if dim < 3:
        raise InvalidVolumeError(f"is a {dim}D image of size {image.GetSize()}; BrainAge needs a 3D volume", path)
    try:
        array = sitk.GetArrayFromImage(image)  # [(t,) k, j, i]
    except RuntimeError as error:
        raise InvalidVolumeError(f"the voxel data could not be read ({_itk_reason(error)})", path) from None
    array = _to_3d(array.astype(np.float32, copy=False), path, time_axis_first=True)
    array = np.ascontiguousarray(array.transpose(2, 1, 0))  # [k, j, i] -> [i, j, k]
    return array, sitk_affine(image)


def _to_3d(array: np.ndarray, path: Path, *, time_axis_first: bool) -> np.ndarray:
    """Squeeze a single-volume 4D (or 5D) array to 3D; reject 2D and multi-volume data.

    nibabel puts extra axes last ([i, j, k, t]); SimpleITK's arrays put them first ([t, k, j, i]).
    """
    if array.ndim < 3:
        raise InvalidVolumeError(f"is a {array.ndim}D image of shape {array.shape}; BrainAge needs a 3D volume", path)
    if array.ndim > 3:
        extra = array.shape[: array.ndim - 3] if time_axis_first else array.shape[3:]
        volumes = int(np.prod(extra))
        if volumes != 1:
            raise InvalidVolumeError(
                f"is a {array.ndim}D image of shape {array.shape} holding {volumes} volumes; "
                "BrainAge needs a single 3D volume (extract one first)", path)
        array = array.reshape(array.shape[array.ndim - 3:] if time_axis_first else array.shape[:3])
    return array


def _format_name(path: Path) -> str:
    return {
        ".nii.gz": "NIfTI", ".nii": "NIfTI", ".mgz": "MGH", ".mgh": "MGH", ".nrrd": "NRRD",
        ".nhdr": "NRRD", ".mha": "MetaImage", ".mhd": "MetaImage",
    }.get(_extension(path), "image")


def _short(error: BaseException, limit: int = 160) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _itk_reason(error: BaseException) -> str:
    """The useful line of an ITK exception, without source locations, object addresses or a
    stale errno ("Reason: No such file or directory" is printed for files that do exist)."""
    lines = []
    for line in str(error).splitlines():
        line = line.strip()
        if not line or line.startswith(("Exception thrown in", "Reason:")) or line.endswith(":"):
            continue
        line = re.sub(r"^(ITK ERROR: \w+\(0x[0-9a-f]+\): |sitk::ERROR: )", "", line)
        line = re.sub(r"^\[\w+\] \w+: ", "", line)
        lines.append(line)
    return _short(lines[-1] if lines else error)


def _quiet_itk():
    """Silence ITK's warnings on stderr (e.g. "No Series were found"); errors still raise."""
    return itk_setting("GlobalWarningDisplay", False)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def validate_volume(volume: Volume, path: Optional[PathLike] = None, *, notes: Optional[List[str]] = None) -> Volume:
    """Check that ``volume`` can be a head MRI; return it as float32, NaN/Inf cleaned.

    ``path`` only names the source in error messages (an MRML node name works too).
    Raises :class:`InvalidVolumeError` for a singleton (2D) axis, too few voxels or too small a
    field of view (< 16 voxels or < 50 mm along an axis), a non-finite or singular affine,
    spacing outside 0.2-8 mm, more than 1% NaN/Inf voxels, all-zero or constant intensities.
    Up to 1% NaN/Inf voxels are set to 0 with a logged warning, also appended to ``notes`` when
    given (so a result can carry it). The input is never modified.
    """
    array = np.asarray(volume.array)
    affine = np.asarray(volume.affine, dtype=np.float64)
    shape = tuple(int(n) for n in array.shape)
    if array.ndim != 3:
        raise InvalidVolumeError(f"is a {array.ndim}D array of shape {shape}; BrainAge needs a 3D volume", path)
    if min(shape) == 1:
        raise InvalidVolumeError(f"is a 2D image (a single slice, shape {shape}); BrainAge needs a 3D volume", path)
    if min(shape) < MIN_VOXELS_PER_AXIS:
        raise InvalidVolumeError(
            f"is too small to be a head: shape {shape} has fewer than {MIN_VOXELS_PER_AXIS} voxels along an axis", path)

    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise InvalidVolumeError("has a non-finite (NaN/Inf) voxel-to-world affine", path)
    linear = affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing == 0) or abs(np.linalg.det(linear)) <= 1e-6 * float(np.prod(spacing)):
        raise InvalidVolumeError(
            "has a singular voxel-to-world affine (voxel axes of zero length or parallel to each other)", path)
    spacing_text = " x ".join(f"{s:.3g}" for s in spacing)
    if np.any(spacing < MIN_SPACING_MM) or np.any(spacing > MAX_SPACING_MM):
        raise InvalidVolumeError(
            f"has an implausible voxel spacing of {spacing_text} mm (expected {MIN_SPACING_MM:g}-"
            f"{MAX_SPACING_MM:g} mm along every axis)", path)
    extent = spacing * np.asarray(shape)
    if np.any(extent < MIN_EXTENT_MM):
        extent_text = " x ".join(f"{e:.3g}" for e in extent)
        raise InvalidVolumeError(
            f"is too small to be a head: the field of view is {extent_text} mm (at least "
            f"{MIN_EXTENT_MM:g} mm needed along every axis)", path)

    data = array.astype(np.float32, copy=False)  # values beyond float32's range become Inf here
    finite = np.isfinite(data)
    bad = int(finite.size - np.count_nonzero(finite))
    if bad:
        fraction = bad / finite.size
        if fraction > MAX_NONFINITE_FRACTION:
            raise InvalidVolumeError(
                f"has {bad} NaN/Inf voxels ({100 * fraction:.3g}% of {finite.size}); at most "
                f"{100 * MAX_NONFINITE_FRACTION:g}% are cleaned to 0", path)
        data = np.where(finite, data, np.float32(0))
        note = f"{path or 'volume'}: set {bad} NaN/Inf voxels ({100 * fraction:.3g}% of the volume) to 0"
        log.warning("%s", note)
        if notes is not None:
            notes.append(note)
    low, high = float(data.min()), float(data.max())
    if low == high == 0.0:
        raise InvalidVolumeError("is empty: every voxel is zero", path)
    if low == high:
        raise InvalidVolumeError(f"is constant: every voxel equals {low:g}", path)
    return Volume(data, affine.copy())


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def save_volume(volume: Volume, path: PathLike) -> Path:
    """Write ``volume`` to ``path`` as NIfTI, NRRD or MetaImage by extension, atomically.

    The file(s) are written with their final names in a temporary folder beside ``path`` and
    moved into place with ``os.replace`` (for detached-header formats, .nhdr/.mhd, the data file
    first and the header last). Float arrays are written as float32; integer arrays (labelmaps)
    keep an integer type. Returns the path written.
    """
    path = Path(path)
    ext = _extension(path)
    if ext not in WRITE_EXTENSIONS:
        raise InvalidVolumeError(
            f"cannot write {ext or '(no extension)'!r} files; use one of {', '.join(WRITE_EXTENSIONS)}", path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InvalidVolumeError(f"the output folder {str(folder)!r} does not exist", path)
    array = _array_for_disk(np.asarray(volume.array))
    affine = np.asarray(volume.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) == 0:
        raise InvalidVolumeError("cannot write a volume whose affine is singular or non-finite", path)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder))
    except OSError as error:
        raise InvalidVolumeError(f"cannot write to the output folder ({error.strerror})", path) from None
    try:
        target = staging / path.name
        if ext in (".nii", ".nii.gz"):
            _write_nifti(array, affine, target)
        else:
            _write_with_simpleitk(array, affine, target)
        written = sorted(staging.iterdir(), key=lambda p: p.name == path.name)  # header last
        for item in written:
            os.replace(item, folder / item.name)
    except OSError as error:
        raise InvalidVolumeError(f"could not write the file ({error.strerror or error})", path) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _array_for_disk(array: np.ndarray) -> np.ndarray:
    """float32 for real data; integer data keeps an integer type readers understand."""
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        if array.dtype.itemsize == 8:  # int64 is poorly supported; shrink when the values fit
            low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
            if np.iinfo(np.int32).min <= low and high <= np.iinfo(np.int32).max:
                return array.astype(np.int32)
        return array
    return array.astype(np.float32, copy=False)


def _write_nifti(array: np.ndarray, affine: np.ndarray, target: Path) -> None:
    image = nib.Nifti1Image(array, affine, dtype=array.dtype)
    image.set_sform(affine, code=1)  # scanner-anatomical
    image.set_qform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, str(target))


def _write_with_simpleitk(array: np.ndarray, affine: np.ndarray, target: Path) -> None:
    import SimpleITK as sitk

    # the affine's directions as they are (a sheared affine is written sheared)
    image = volume_to_sitk(Volume(array, affine), dtype=None, orthonormal_directions=False)
    try:
        sitk.WriteImage(image, str(target), useCompression=True)
    except RuntimeError as error:
        raise OSError(_itk_reason(error)) from None
