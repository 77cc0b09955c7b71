"""The envelope every message travels in, and its JSON codec with a size limit.

One JSON object per AMQP message body. Deadlines travel as the time left (``ttlMs``), never as a
wall-clock instant, so node clocks never matter; each receiver turns it into a local monotonic
deadline. Replies carry ``ok`` with ``body`` or ``error`` and the uuid of the node that handled it.

    raw = encode(Envelope.request(msg, ttl_ms=30_000, reply_to=q), limit=1 << 20)
    env = decode(raw, limit=1 << 20)
"""

from __future__ import annotations

import uuid
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from zstack_mn.messages.base import Event, Message, WireModel, registry
from zstack_mn.messages.errors import ErrorCode, ErrorInfo, ZStackError

M = TypeVar("M", bound=WireModel)

REPLY_TYPE = "Reply"


def new_id() -> str:
    return str(uuid.uuid4())


class Envelope(BaseModel):
    """Wire form of a request, a reply or an event."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    id: str = Field(min_length=1, max_length=128)
    type: str = Field(min_length=1, max_length=128)
    service: str = Field("", max_length=64)
    resource_uuid: str | None = Field(None, max_length=64)
    ttl_ms: int | None = Field(None, ge=0)
    correlation_id: str | None = Field(None, max_length=128)
    reply_to: str | None = Field(None, max_length=255)
    hops: int = Field(0, ge=0, le=255)
    headers: dict[str, str] = Field(default_factory=dict)
    body: dict[str, Any] = Field(default_factory=dict)
    ok: bool | None = None
    error: ErrorInfo | None = None
    handled_by: str | None = None

    @classmethod
    def request(
        cls,
        msg: Message,
        *,
        ttl_ms: int | None,
        reply_to: str | None = None,
        msg_id: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Envelope:
        mid = msg_id or new_id()
        return cls._fast(
            id=mid,
            type=msg.type_name,
            service=msg.SERVICE,
            resource_uuid=msg.resource_uuid(),
            ttl_ms=ttl_ms,
            correlation_id=mid if reply_to else None,
            reply_to=reply_to,
            headers=headers or {},
            body=msg.to_wire(),
        )

    @classmethod
    def _fast(cls, **values: Any) -> Envelope:
        """Build from trusted values without validation. Every field is given, because pydantic's
        ``model_construct`` inspects each default factory on every call (≈100 µs)."""
        return cls.model_construct(**{**_DEFAULTS, "headers": {}, "body": {}, **values})

    @classmethod
    def event(cls, evt: Event) -> Envelope:
        return cls._fast(id=new_id(), type=evt.type_name, body=evt.to_wire())

    @classmethod
    def reply_ok(cls, correlation_id: str, body: dict[str, Any], handled_by: str) -> Envelope:
        return cls._fast(
            id=new_id(), type=REPLY_TYPE, correlation_id=correlation_id, ok=True, body=body, handled_by=handled_by
        )

    @classmethod
    def reply_error(cls, correlation_id: str, error: ZStackError, handled_by: str) -> Envelope:
        return cls._fast(
            id=new_id(),
            type=REPLY_TYPE,
            correlation_id=correlation_id,
            ok=False,
            error=error.to_info(),
            handled_by=handled_by,
        )

    @property
    def is_reply(self) -> bool:
        return self.type == REPLY_TYPE

    def parse_message(self) -> Message:
        """The typed request inside; ZStackError names the bad field."""
        cls = registry.get(self.type)
        if not issubclass(cls, Message):
            raise ZStackError(ErrorCode.UNKNOWN_MESSAGE_TYPE, f"{self.type} is not a request")
        return validate_body(cls, self.body)

    def parse_event(self) -> Event:
        cls = registry.get(self.type)
        if not issubclass(cls, Event):
            raise ZStackError(ErrorCode.UNKNOWN_MESSAGE_TYPE, f"{self.type} is not an event")
        return validate_body(cls, self.body)


_DEFAULTS: dict[str, Any] = {
    name: None if field.default_factory is not None else field.default for name, field in Envelope.model_fields.items()
}


def validation_error(exc: ValidationError, what: str) -> ZStackError:
    """A ZStackError naming the first bad field of ``exc`` (camelCase, dotted)."""
    problems = [
        {"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors(include_url=False)
    ]
    first = problems[0] if problems else {"field": "", "message": "invalid"}
    name = first["field"] or what
    return ZStackError(ErrorCode.INVALID_ARGUMENT, f"{name}: {first['message']}", field=first["field"], errors=problems)


def validate_body(cls: type[M], body: dict[str, Any]) -> M:
    try:
        return cls.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc, cls.__name__) from None


def encode(env: Envelope, limit: int) -> bytes:
    raw = env.model_dump_json(by_alias=True, exclude_none=True).encode()
    if len(raw) > limit:
        raise ZStackError(ErrorCode.MESSAGE_TOO_LARGE, f"message of {len(raw)} bytes exceeds the limit of {limit}")
    return raw


def decode(raw: bytes, limit: int) -> Envelope:
    """Parse an envelope; ZStackError (too large / malformed) for anything else."""
    if len(raw) > limit:
        raise ZStackError(ErrorCode.MESSAGE_TOO_LARGE, f"message of {len(raw)} bytes exceeds the limit of {limit}")
    try:
        return Envelope.model_validate_json(raw)
    except ValidationError as exc:
        if any(e["type"] == "json_invalid" for e in exc.errors()):
            raise ZStackError(ErrorCode.MALFORMED_MESSAGE, "message body is not valid JSON") from None
        err = validation_error(exc, "envelope")
        raise ZStackError(ErrorCode.MALFORMED_MESSAGE, f"bad envelope: {err.description}", **err.details) from None
