"""Canonical resource events on the event exchange; outside programs may bind their own queue."""

from __future__ import annotations

from typing import ClassVar

from zstack_mn.messages.base import Event
from zstack_mn.messages.names import TOPIC_HOST_STATUS_CHANGED, TOPIC_VM_STATE_CHANGED
from zstack_mn.messages.states import HostStatus, VmState


class VmStateChangedEvent(Event):
    TOPIC: ClassVar[str] = TOPIC_VM_STATE_CHANGED
    vm_uuid: str
    old_state: VmState | None
    new_state: VmState
    host_uuid: str | None = None


class HostStatusChangedEvent(Event):
    TOPIC: ClassVar[str] = TOPIC_HOST_STATUS_CHANGED
    host_uuid: str
    old_status: HostStatus | None
    new_status: HostStatus
