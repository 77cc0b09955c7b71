"""The REST face of the API messages: which JSON action key means which API message. The HTTP
gateway and the Python client both read it, so the names are written once."""

from __future__ import annotations

from zstack_mn.messages.api import (
    APIChangeHostStateMsg,
    APIMigrateVmMsg,
    APIRebootVmInstanceMsg,
    APIReconnectHostMsg,
    APIStartVmInstanceMsg,
    APIStopVmInstanceMsg,
)
from zstack_mn.messages.base import Message

JOBS_PATH = "/v1/jobs"
"""Where an operation answered with 202 is polled: ``JOBS_PATH/<job uuid>``."""

VM_ACTIONS: dict[str, type[Message]] = {
    "startVmInstance": APIStartVmInstanceMsg,
    "stopVmInstance": APIStopVmInstanceMsg,
    "rebootVmInstance": APIRebootVmInstanceMsg,
    "migrateVm": APIMigrateVmMsg,
}
HOST_ACTIONS: dict[str, type[Message]] = {
    "reconnectHost": APIReconnectHostMsg,
    "changeHostState": APIChangeHostStateMsg,
}
ACTION_PATHS: dict[type[Message], tuple[str, str]] = {
    **{api: ("vm-instances", key) for key, api in VM_ACTIONS.items()},
    **{api: ("hosts", key) for key, api in HOST_ACTIONS.items()},
}
