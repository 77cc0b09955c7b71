"""Field types shared by the message models."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BeforeValidator, Field

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGTP]?)(?:i?B)?\s*$", re.I)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(value: str) -> int:
    """``"1073741824"``, ``"1G"``, ``"512M"``, ``"2GiB"`` → bytes; ValueError for anything else."""
    m = _SIZE.match(value)
    if m is None:
        raise ValueError("must be a size such as 1073741824, 512M or 1G")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def _size_or_value(value: object) -> object:
    """A size string in bytes; any other value is left for the int validation to judge."""
    return parse_size(value) if isinstance(value, str) else value


ByteSize = Annotated[int, BeforeValidator(_size_or_value), Field(gt=0, le=1 << 50)]
Name = Annotated[str, Field(min_length=1, max_length=255)]
