"""Inventories: what the API returns for a host, a VM and a management node."""

from __future__ import annotations

from datetime import datetime

from zstack_mn.messages.base import WireModel
from zstack_mn.messages.states import HostState, HostStatus, VmState


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
    create_date: datetime | None = None
    last_op_date: datetime | None = None


class VmInventory(WireModel):
    uuid: str
    name: str
    state: VmState
    host_uuid: str | None = None
    last_host_uuid: str | None = None
    cpu_num: int
    memory_size: int
    create_date: datetime | None = None
    last_op_date: datetime | None = None


class ManagementNodeInventory(WireModel):
    uuid: str
    host_name: str
    http_address: str
    state: str
    heartbeat_age: float
    ring_share: float
    ring_digest: str
