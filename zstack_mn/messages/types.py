"""Field types shared by the message models.

Each type refuses, at validation, whatever the database or an agent call could not take (a string
longer than its column, an integer past the column's range, a control character, a URL without a
host), so a malformed field becomes a 4xx naming it before anything is written or sent. The JSON
schema of each type states the same limits, so the OpenAPI document describes what is accepted.
"""

from __future__ import annotations

import re
import uuid
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import AfterValidator, BeforeValidator, Field, WithJsonSchema

INT32_MAX = 2**31 - 1
"""The largest value of an ``Integer`` column (PostgreSQL ``integer``)."""
INT64_MAX = 2**63 - 1
"""The largest value of a ``BigInteger`` column."""
NAME_LEN = 255
"""Length of the ``name`` columns."""
URL_LEN = 1024
"""Length of ``host.agent_url``."""
MAX_BYTES = 1 << 50

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGTP]?)(?:i?B)?\s*$", re.I)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}

SIZE_PATTERN = (
    r"^([1-9][0-9]{0,14}|[1-9][0-9]{0,11}[Kk]|[1-9][0-9]{0,8}[Mm]|[1-9][0-9]{0,5}[Gg]|[1-9][0-9]{0,2}[Tt]|1[Pp])(i?B)?$"
)
"""A size string on the wire: digits and an optional unit, with as many digits as keep the value
within ``MAX_BYTES`` (1 PiB), so every string the pattern admits is a size the field accepts."""
_WIRE_SIZE = re.compile(SIZE_PATTERN)

UUID_PATTERN = r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$"
"""A uuid with or without its dashes (ZStack writes them without)."""
_UUID = re.compile(UUID_PATTERN)
TEXT_PATTERN = r"^[^\x00-\x1f\x7f]*$"


def parse_size(value: str) -> int:
    """``"1073741824"``, ``"1G"``, ``"512M"``, ``"2GiB"`` → bytes; ValueError for anything else."""
    m = _SIZE.match(value)
    if m is None:
        raise ValueError("must be a size such as 1073741824, 512M or 1G")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def _size_or_value(value: object) -> object:
    """A size string in bytes; any other value is left for the int validation to judge."""
    if isinstance(value, str):
        if _WIRE_SIZE.match(value) is None:
            raise ValueError("must be a size of 1 byte to 1P, such as 1073741824, 512M or 1G")
        return parse_size(value)
    return value


def _check_uuid(value: str) -> str:
    if _UUID.match(value) is None:
        raise ValueError("must be a uuid")
    return str(uuid.UUID(value))


def _check_text(value: str) -> str:
    """Refuse control characters and lone surrogates: neither a log line nor PostgreSQL's UTF-8
    text can hold them (a NUL is an error there, not a 4xx)."""
    for ch in value:
        if ch < " " or ch == "\x7f" or "\ud800" <= ch <= "\udfff":
            raise ValueError("must not contain control characters")
    return value


_PORT = r"(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})"
_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_TOP_LABEL = r"[A-Za-z]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST = rf"({_OCTET}(\.{_OCTET}){{3}}|({_LABEL}\.)*{_TOP_LABEL})"
AGENT_URL_PATTERN = rf"^https?://{_HOST}(:{_PORT})?([/?#][A-Za-z0-9._~:/?#@!$&'()*+,;=%-]*)?$"
"""An agent URL: http or https; a dotted-quad IPv4 address or a DNS name whose last label starts
with a letter (a numeric one would be read as an IPv4 number, as by the agent client's URL
parser, which refuses ``http://0``); a port within 1–65535 if any; then a path of URL
characters. No user info, no IPv6 literal, nothing outside printable ASCII."""


HOST_PATTERN = rf"^{_HOST}$"
"""A host as an agent URL may name it: a dotted-quad IPv4 address or a DNS name."""
_AGENT_URL = re.compile(AGENT_URL_PATTERN)


def check_agent_url(value: str) -> str:
    """The pattern, then the URL parser's reading of it (a second opinion, not a second rule)."""
    if _AGENT_URL.match(value) is None:
        raise ValueError("must be http(s)://host[:port][/path], in printable ASCII without spaces or user info")
    parts = urlsplit(value)
    if not parts.hostname or parts.scheme not in ("http", "https"):
        raise ValueError("must be http(s)://host[:port][/path]")
    parts.port  # noqa: B018  # raises ValueError for a port the parser cannot read
    return value


ByteSize = Annotated[
    int,
    BeforeValidator(_size_or_value),
    Field(gt=0, le=MAX_BYTES),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 1, "maximum": MAX_BYTES},
                {"type": "string", "pattern": SIZE_PATTERN},
            ],
            "description": "Bytes, or a size with a unit: 512M, 1G, 2GiB (at most 1P).",
        }
    ),
]
Name = Annotated[
    str,
    Field(min_length=1, max_length=NAME_LEN, json_schema_extra={"pattern": TEXT_PATTERN}),
    AfterValidator(_check_text),
]
Uuid = Annotated[
    str,
    AfterValidator(_check_uuid),
    WithJsonSchema({"type": "string", "pattern": UUID_PATTERN, "description": "A uuid, with or without dashes."}),
]
"""A resource uuid: 32 hex digits, dashes optional; always written back in the dashed form."""
AgentUrl = Annotated[
    str,
    Field(min_length=8, max_length=URL_LEN, json_schema_extra={"pattern": AGENT_URL_PATTERN}),
    AfterValidator(check_agent_url),
]
Offset = Annotated[int, Field(ge=0, le=INT32_MAX)]
"""A row offset for paging: past the row count a page is merely empty, past the range of the
database's integers it is a 4xx."""
