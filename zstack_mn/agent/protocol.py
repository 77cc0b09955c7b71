"""The hypervisor-agent protocol (HTTP + JSON): request and response models shared by the client
and the simulated agent. Every VM operation carries an ``opId``; an agent applies one opId once."""

from __future__ import annotations

from pydantic import Field

from zstack_mn.messages import WireModel

VM_RUNNING, VM_STOPPED, VM_DESTROYED = "Running", "Stopped", "Destroyed"


class HostFacts(WireModel):
    host_id: str
    hostname: str
    cpu_num: int = Field(ge=1)
    memory_size: int = Field(ge=1)


class VmOp(WireModel):
    op_id: str = Field(min_length=1, max_length=128)
    cpu_num: int = Field(1, ge=1)
    memory_size: int = Field(1, ge=1)
    target_host_id: str | None = None


class VmStatus(WireModel):
    uuid: str
    state: str


class VmList(WireModel):
    vms: list[VmStatus]


class AgentFault(WireModel):
    """Failure injection for the simulator: per host (or ``*``) and operation (or ``*``)."""

    host_id: str = "*"
    op: str = "*"
    latency: float = Field(0.0, ge=0, le=600)
    fail: bool = False
    down: bool = False
