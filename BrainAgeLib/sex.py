"""Sex as the model sees it: "F", "M" or "unknown".

The regressor fuses sex at its last layer as a number (M = 0, F = 1, the paper's coding). When
sex is unknown the prediction is the mean of the female and male predictions, and the result
says so.
"""
from __future__ import annotations

from typing import Optional, Union

from .errors import BrainAgeError

#: The value the regressor's last layer receives for each sex.
SEX_CODES = {"M": 0.0, "F": 1.0}

_ALIASES = {
    "f": "F", "female": "F",
    "m": "M", "male": "M",
    "unknown": "unknown",
}


class InvalidSexError(BrainAgeError, ValueError):
    """A sex value that is none of F, M, female, male or unknown."""


def parse_sex(value: Optional[Union[str, "object"]]) -> str:
    """Normalise ``value`` to "F", "M" or "unknown" (case-insensitive; None means unknown)."""
    if value is None:
        return "unknown"
    if isinstance(value, str):
        key = value.strip().lower()
        if key in _ALIASES:
            return _ALIASES[key]
    raise InvalidSexError(f"sex must be F, M, female, male or unknown (any case), got {value!r}")


def sex_code(sex: str) -> float:
    """The regressor's input for a parsed sex: M -> 0.0, F -> 1.0."""
    try:
        return SEX_CODES[parse_sex(sex)]
    except KeyError:
        raise InvalidSexError("an unknown sex has no single code; predict both and average") from None
