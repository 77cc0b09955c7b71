"""Lifecycle events broadcast on the event exchange."""

from __future__ import annotations

from typing import ClassVar

from zstack_mn.messages import Event
from zstack_mn.messages.names import TOPIC_NODE_JOINED, TOPIC_NODE_LEFT


class NodeJoinedEvent(Event):
    TOPIC: ClassVar[str] = TOPIC_NODE_JOINED
    node_uuid: str
    http_address: str = ""


GRACEFUL_STOP = "graceful stop"
"""The reason of a node that leaves by itself: it is still alive, draining what it has in flight."""


class NodeLeftEvent(Event):
    TOPIC: ClassVar[str] = TOPIC_NODE_LEFT
    node_uuid: str
    reason: str

    @property
    def draining(self) -> bool:
        return self.reason == GRACEFUL_STOP
