"""Inventories: what the API returns for a host, a VM and a management node."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import AfterValidator

from zstack_mn.messages.base import WireModel
from zstack_mn.messages.states import HostState, HostStatus, VmState


def _aware(value: datetime) -> datetime:
    """A time with its offset: SQLite hands back naive UTC times, and RFC 3339 (the OpenAPI
    ``date-time`` format) needs the offset."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


Timestamp = Annotated[datetime, AfterValidator(_aware)]


class HostInventory(WireModel):
    uuid: str
    name: str
    agent_url: str
    state: HostState
    status: HostStatus
    total_cpu_capacity: int
    available_cpu_capacity: int
    total_memory_capacity: int
    available_memory_capacity: int
    create_date: Timestamp | None = None
    last_op_date: Timestamp | None = None


class VmInventory(WireModel):
    uuid: str
    name: str
    state: VmState
    host_uuid: str | None = None
    last_host_uuid: str | None = None
    cpu_num: int
    memory_size: int
    create_date: Timestamp | None = None
    last_op_date: Timestamp | None = None


class ManagementNodeInventory(WireModel):
    uuid: str
    host_name: str
    http_address: str
    state: str
    heartbeat_age: float
    ring_share: float
    ring_digest: str


class VmReply(WireModel):
    """The answer to a VM action or a VM read."""

    inventory: VmInventory


class HostReply(WireModel):
    """The answer to a host action or a host read."""

    inventory: HostInventory


class VmPage(WireModel):
    """A VM query: ``inventories`` (none with ``count``), and ``total`` only when asked for."""

    inventories: list[VmInventory] | None = None
    total: int | None = None


class HostPage(WireModel):
    """A host query: ``inventories`` (none with ``count``), and ``total`` only when asked for."""

    inventories: list[HostInventory] | None = None
    total: int | None = None


class ManagementNodePage(WireModel):
    """The management nodes (a handful, so always with their ``total``)."""

    inventories: list[ManagementNodeInventory]
    total: int


class Deleted(WireModel):
    uuid: str
    deleted: bool


class DeletedReply(WireModel):
    """The answer to a host deletion: the host is gone, so its uuid alone."""

    inventory: Deleted
