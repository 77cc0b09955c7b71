"""Messages of the ``vmInstance`` service."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from zstack_mn.messages.base import Message, ResourceUuid
from zstack_mn.messages.states import VmState
from zstack_mn.messages.types import ByteSize, Name

VM = "vmInstance"


class CreateVmInstanceMsg(Message):
    """Create and start a VM. Creational: the portal fills ``uuid`` from the request id, so the
    ring routes every copy of one request to one node, where they run serially."""

    SERVICE: ClassVar[str] = VM
    RECORDS_OUTCOME: ClassVar[bool] = True
    name: Name
    cpu_num: int = Field(ge=1, le=1024)
    memory_size: ByteSize
    host_uuid: ResourceUuid | None = None
    uuid: ResourceUuid | None = None
    RESOURCE_FIELD: ClassVar[str | None] = "uuid"


class _VmMsg(Message):
    RESOURCE_FIELD: ClassVar[str | None] = "uuid"
    RECORDS_OUTCOME: ClassVar[bool] = True
    uuid: ResourceUuid


class StartVmInstanceMsg(_VmMsg):
    SERVICE: ClassVar[str] = VM


class StopVmInstanceMsg(_VmMsg):
    SERVICE: ClassVar[str] = VM


class RebootVmInstanceMsg(_VmMsg):
    SERVICE: ClassVar[str] = VM


class DestroyVmInstanceMsg(_VmMsg):
    SERVICE: ClassVar[str] = VM


class MigrateVmMsg(_VmMsg):
    SERVICE: ClassVar[str] = VM
    host_uuid: ResourceUuid | None = None


class VmStateChangedOnHostMsg(Message):
    """Sent by a host's tracker to the VM's owner (ZStack's ``VmStateChangedOnHostMsg``): the
    VM's host reports it in ``state``, or, when the host is lost, it is ``Unknown``. The owner
    decides, in the VM's chain; the host side never writes a VM. ``version``: the VM's version
    read before the host was asked; the report is stale, and ignored, once the VM has changed
    since."""

    SERVICE: ClassVar[str] = VM
    RESOURCE_FIELD: ClassVar[str | None] = "uuid"
    uuid: ResourceUuid
    host_uuid: ResourceUuid
    state: Literal[VmState.RUNNING, VmState.STOPPED, VmState.UNKNOWN]
    version: int | None = Field(None, ge=0)


OPERATION_MESSAGES: dict[str, type[_VmMsg]] = {
    "start": StartVmInstanceMsg,
    "stop": StopVmInstanceMsg,
    "reboot": RebootVmInstanceMsg,
    "destroy": DestroyVmInstanceMsg,
    "migrate": MigrateVmMsg,
}
