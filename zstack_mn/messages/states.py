"""The states of the resources, one enum each (ZStack's ``VmInstanceState``, ``HostState``,
``HostStatus``). They are ``str`` enums: a member equals its database and wire spelling.

    if vm.state == VmState.RUNNING: ...
"""

from __future__ import annotations

from enum import Enum


class _Spelled(str, Enum):
    """A state whose ``str()`` and format are its spelling, as stored and sent."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class VmState(_Spelled):
    CREATED = "Created"
    STARTING = "Starting"
    RUNNING = "Running"
    STOPPING = "Stopping"
    STOPPED = "Stopped"
    REBOOTING = "Rebooting"
    MIGRATING = "Migrating"
    DESTROYING = "Destroying"
    DESTROYED = "Destroyed"
    UNKNOWN = "Unknown"

    @property
    def transient(self) -> bool:
        """An operation is under way (its node holds the VM until it finishes or is taken over)."""
        return self in TRANSIENT_VM_STATES


TRANSIENT_VM_STATES = frozenset(
    {VmState.STARTING, VmState.STOPPING, VmState.REBOOTING, VmState.MIGRATING, VmState.DESTROYING}
)


class HostState(_Spelled):
    """What an administrator asked of a host (ZStack's ``HostState``)."""

    ENABLED = "Enabled"
    DISABLED = "Disabled"
    MAINTENANCE = "Maintenance"


class HostStatus(_Spelled):
    """Whether the host's agent answers (ZStack's ``HostStatus``)."""

    CONNECTED = "Connected"
    DISCONNECTED = "Disconnected"
