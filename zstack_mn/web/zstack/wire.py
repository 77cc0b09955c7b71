"""ZStack's wire conventions, one place for each: uuids, dates and the error body.

* uuids: ZStack writes them as 32 lowercase hex characters; zstack-mn stores and routes the dashed
  form. The ZStack adapters accept either on input (``internal_uuid``) and answer the 32-hex form
  (``zstack_uuid``); the ring always sees the dashed form, so one resource has one owner whichever
  form a client sent.
* dates: ZStack's Gson writes ``java.util.Date`` as ``Nov 27, 2026 1:02:03 AM`` (its default
  US pattern), which ZStack's SDKs parse back; an ISO string would break them.
* errors: ``{"error": {"code", "description", "details", "opaque"}}`` where ``details`` is a
  string (ZStack's ``ErrorCode.details``) and ``opaque`` carries this project's structured details.
"""

from __future__ import annotations

import re
import uuid as uuidlib
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from zstack_mn.messages import ErrorCode, ZStackError

UUID_PATTERN = r"^(?:[0-9a-fA-F]{32}|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})$"
"""A uuid as the adapters accept it: 32 hex characters or the dashed form (``/openapi.json`` says
the same)."""
_UUID = re.compile(UUID_PATTERN)


class ZStackErrorBody(BaseModel):
    """ZStack's ``ErrorCode`` JSON, as ``error_body`` writes it (for ``/openapi.json``)."""

    code: str
    description: str
    details: str
    opaque: dict[str, Any] | None = None


class ZStackErrorReply(BaseModel):
    error: ZStackErrorBody


def internal_uuid(value: object, field: str) -> str:
    """The dashed form of a uuid given in either form; INVALID_ARGUMENT naming ``field`` otherwise."""
    if isinstance(value, str) and _UUID.fullmatch(value):
        return str(uuidlib.UUID(value))
    raise ZStackError(ErrorCode.INVALID_ARGUMENT, f"{field}: must be a uuid (32 hex characters)", field=field)


def zstack_uuid(value: str | None) -> str | None:
    """The 32-hex form of a stored (dashed) uuid."""
    return None if value is None else value.replace("-", "")


def new_uuid() -> str:
    return uuidlib.uuid4().hex


def zstack_date(value: datetime | str | None) -> str | None:
    """A date as ZStack's Gson writes it (UTC)."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return value
        return zstack_date(parsed)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    v = value.astimezone(UTC)
    hour = v.hour % 12 or 12
    return f"{v:%b} {v.day}, {v.year} {hour}:{v:%M:%S} {'AM' if v.hour < 12 else 'PM'}"


_DASHED = re.compile(r"\b([0-9a-f]{8})-([0-9a-f]{4})-([0-9a-f]{4})-([0-9a-f]{4})-([0-9a-f]{12})\b")


def _hex_uuids(value: Any) -> Any:
    """Every dashed uuid inside ``value`` in its 32-hex form (an error names resources as a
    ZStack client knows them)."""
    if isinstance(value, str):
        return _DASHED.sub(lambda m: "".join(m.groups()), value)
    if isinstance(value, dict):
        return {k: _hex_uuids(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_hex_uuids(v) for v in value]
    return value


def internal_error(exc: Exception) -> ZStackError:
    """An unexpected failure as ZStack's error (its clients read only ZStack's error shape)."""
    return ZStackError(ErrorCode.INTERNAL_ERROR, f"internal error: {type(exc).__name__}")


def error_body(err: ZStackError) -> dict[str, Any]:
    """ZStack's ``ErrorCode`` JSON for an error."""
    description = _hex_uuids(err.description)
    body: dict[str, Any] = {"code": err.code.value, "description": description, "details": description}
    if err.details:
        body["opaque"] = _hex_uuids(err.details)
    return body
