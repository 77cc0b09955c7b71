"""The hypervisor-agent protocol (HTTP + JSON): request and response models shared by the client
and the simulated agent. Every VM operation carries an ``opId``; an agent applies one opId once."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from zstack_mn.messages import WireModel

VM_RUNNING, VM_STOPPED, VM_DESTROYED = "Running", "Stopped", "Destroyed"
OP_APPLIED, OP_IN_FLIGHT, OP_UNKNOWN = "applied", "in_flight", "unknown"


class HostFacts(WireModel):
    host_id: str
    hostname: str
    cpu_num: int = Field(ge=1)
    memory_size: int = Field(ge=1)


class VmOp(WireModel):
    """One VM operation. ``fence`` is the VM's version when the sending node began or took over
    the operation: an agent refuses a fence lower than one it has seen for the VM (409), which
    stops a node that lost the VM, but does not know it yet, from acting on it."""

    op_id: str = Field(min_length=1, max_length=128)
    fence: int = Field(0, ge=0)
    cpu_num: int = Field(1, ge=1)
    memory_size: int = Field(1, ge=1)
    target_host_id: str | None = None


class VmStatus(WireModel):
    uuid: str
    state: str


class VmList(WireModel):
    vms: list[VmStatus]


class OpState(WireModel):
    """What an agent knows of one operation id: a node taking over a half-done operation asks
    before it re-sends, so that its request never overlaps the previous owner's."""

    op_id: str
    state: Literal["applied", "in_flight", "unknown"]


class AgentFault(WireModel):
    """Failure injection for the simulator: per host (or ``*``) and operation (or ``*``)."""

    host_id: str = "*"
    op: str = "*"
    latency: float = Field(0.0, ge=0, le=600)
    fail: bool = False
    down: bool = False
