"""Lifecycle events broadcast on the event exchange."""

from __future__ import annotations

from typing import ClassVar

from zstack_mn.messages import Event
from zstack_mn.messages.names import TOPIC_NODE_JOINED, TOPIC_NODE_LEFT


class NodeJoinedEvent(Event):
    TOPIC: ClassVar[str] = TOPIC_NODE_JOINED
    node_uuid: str
    http_address: str = ""


class NodeLeftEvent(Event):
    TOPIC: ClassVar[str] = TOPIC_NODE_LEFT
    node_uuid: str
    reason: str
