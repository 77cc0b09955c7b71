"""Canonical resource events on the event exchange; outside programs may bind their own queue."""

from __future__ import annotations

from typing import ClassVar

from zstack_mn.bus.topology import TOPIC_HOST_STATUS_CHANGED, TOPIC_VM_STATE_CHANGED
from zstack_mn.messages.base import Event


class VmStateChangedEvent(Event):
    TOPIC: ClassVar[str] = TOPIC_VM_STATE_CHANGED
    vm_uuid: str
    old_state: str | None
    new_state: str
    host_uuid: str | None = None


class HostStatusChangedEvent(Event):
    TOPIC: ClassVar[str] = TOPIC_HOST_STATUS_CHANGED
    host_uuid: str
    old_status: str | None
    new_status: str
