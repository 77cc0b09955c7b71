"""Messages of the ``host`` service."""

from __future__ import annotations

from typing import ClassVar, Literal

from zstack_mn.messages.base import Message, ResourceUuid
from zstack_mn.messages.types import AgentUrl, Name

HOST = "host"


class AddHostMsg(Message):
    """Connect to a host's agent and record its capacity. Creational: the portal fills ``uuid``
    from the request id, so every copy of one request meets on one node."""

    SERVICE: ClassVar[str] = HOST
    name: Name
    agent_url: AgentUrl
    uuid: ResourceUuid | None = None
    RESOURCE_FIELD: ClassVar[str | None] = "uuid"


class ReconnectHostMsg(Message):
    SERVICE: ClassVar[str] = HOST
    RESOURCE_FIELD: ClassVar[str | None] = "uuid"
    uuid: ResourceUuid


class ChangeHostStateMsg(Message):
    SERVICE: ClassVar[str] = HOST
    RESOURCE_FIELD: ClassVar[str | None] = "uuid"
    uuid: ResourceUuid
    state_event: Literal["enable", "disable", "maintain"]


class DeleteHostMsg(Message):
    SERVICE: ClassVar[str] = HOST
    RESOURCE_FIELD: ClassVar[str | None] = "uuid"
    uuid: ResourceUuid


class PingHostMsg(Message):
    """Ping a host now, on its owner, and mark it Connected or Disconnected (for an operator or a
    test: the tracker pings the hosts its node owns directly)."""

    SERVICE: ClassVar[str] = HOST
    RESOURCE_FIELD: ClassVar[str | None] = "uuid"
    uuid: ResourceUuid
