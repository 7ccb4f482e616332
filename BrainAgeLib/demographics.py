"""The chronological age and sex a prediction is made with: checked, and taken from the image's
DICOM header when the user gives none.

Torch-free (like ``sex``), so the command line can check them before any slow import.
The header's values are only defaults: an age or sex the user gives is never replaced, and one
taken from the header is said in the result's warnings.
"""
from __future__ import annotations

import math
from typing import Any, List, Mapping, Optional, Tuple

from .errors import BrainAgeError
from .sex import parse_sex

#: Largest chronological age (years) BrainAge accepts.
MAX_AGE_YEARS = 130.0


def check_age(age: Optional[float]) -> Optional[float]:
    """``age`` as a float of years (None stays None); BrainAgeError unless it is 0-130."""
    if age is None:
        return None
    try:
        value = float(age)
    except (TypeError, ValueError):
        raise BrainAgeError(f"chronological age must be a number of years, got {age!r}") from None
    if not math.isfinite(value) or not 0 <= value <= MAX_AGE_YEARS:
        raise BrainAgeError(f"chronological age must be between 0 and {MAX_AGE_YEARS:g} years, got {age!r}")
    return value


def with_header_defaults(age: Optional[float], sex: Optional[str],
                         header: Optional[Mapping[str, Any]]) -> Tuple[Optional[float], str, List[str]]:
    """``(age, sex, notes)`` to predict with.

    ``age``/``sex`` are what the user gave (None: not given; a sex the user gave as "unknown" is
    kept). ``header`` is what ``io.load_volume(..., dicom_header=...)`` read from a DICOM series
    (``age`` in years with its ``age_text``, ``sex`` F/M), or None. Each value taken from the
    header adds a note saying so, for the result's warnings.
    """
    header = header or {}
    notes: List[str] = []
    if age is None and header.get("age") is not None:
        age = check_age(header["age"])
        notes.append(f"age {age:.4g} years from the DICOM header (PatientAge {header.get('age_text', '?')}); "
                     "give the age to override it")
    if sex is None and header.get("sex") is not None:
        sex = parse_sex(header["sex"])
        notes.append(f"sex {sex} from the DICOM header (PatientSex); give the sex to override it")
    return age, parse_sex(sex), notes
