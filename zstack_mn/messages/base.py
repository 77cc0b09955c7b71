"""Typed messages: the base models, a registry of type names, and the reply model.

A message type is a pydantic model subclassing ``Message`` (a request to a service) or
``Event`` (broadcast on the event exchange). Its class name is its type name on the wire.
``RESOURCE_FIELD`` names the field holding the uuid the ring routes by; without it the
message is handled by the sending node (non-resource messages). A creational message names the
uuid of the resource it creates, so it is routed like the others.

    class StartVmInstanceMsg(Message):
        SERVICE = "vmInstance"; RESOURCE_FIELD = "uuid"
        uuid: ResourceUuid
"""

from __future__ import annotations

from typing import Any, ClassVar, Self, cast

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

from zstack_mn.messages.errors import ErrorCode, ZStackError
from zstack_mn.messages.types import Uuid

ResourceUuid = Uuid


class WireModel(BaseModel):
    """camelCase on the wire, snake_case in Python, unknown fields refused."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class Message(WireModel):
    """A request handled by one service."""

    SERVICE: ClassVar[str] = ""
    RESOURCE_FIELD: ClassVar[str | None] = None
    TARGET: ClassVar[type[Message] | None] = None
    RECORDS_OUTCOME: ClassVar[bool] = False
    """True when the handler itself records the outcome under the message id (the op record) and
    answers a copy of the message from it, so the portal keeps no reply of its own."""
    type_name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.type_name = cls.__name__

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if cls.SERVICE:
            registry.register(cls)

    @classmethod
    def api(cls, name: str | None = None) -> type[Self]:
        """The API twin of this message (``API<Name>``): same fields, sent to the portal, which
        validates it and routes ``TARGET`` on by the ring. Nothing is written twice."""
        api_name = name or f"API{cls.__name__}"
        twin = type(
            api_name, (cls,), {"SERVICE": "api", "RESOURCE_FIELD": None, "TARGET": cls, "__module__": cls.__module__}
        )
        return cast("type[Self]", twin)

    def resource_uuid(self) -> str | None:
        return getattr(self, self.RESOURCE_FIELD) if self.RESOURCE_FIELD else None


class Event(WireModel):
    """A broadcast: lifecycle events and canonical resource events. ``TOPIC`` is its routing key."""

    TOPIC: ClassVar[str] = ""
    type_name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.type_name = cls.__name__

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if cls.TOPIC:
            registry.register(cls)

    def topic(self) -> str:
        return self.TOPIC


class Registry:
    """Maps a wire type name to its model."""

    def __init__(self) -> None:
        self._types: dict[str, type[Message] | type[Event]] = {}

    def register(self, cls: type[Message] | type[Event]) -> None:
        existing = self._types.get(cls.type_name)
        if existing is not None and existing is not cls and existing.__module__ != cls.__module__:
            raise ValueError(f"message type {cls.type_name} is registered twice")
        self._types[cls.type_name] = cls

    def get(self, type_name: str) -> type[Message] | type[Event]:
        try:
            return self._types[type_name]
        except KeyError:
            raise ZStackError(ErrorCode.UNKNOWN_MESSAGE_TYPE, f"unknown message type {type_name!r}") from None

    def __contains__(self, type_name: str) -> bool:
        return type_name in self._types


registry = Registry()
