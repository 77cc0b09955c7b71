"""The ZStack APIs zstack-mn serves: for each, its ZStack names (message and reply classes), its
REST method, path and body key, and how each of its ZStack fields maps onto this project's API
message, is accepted and not used, or is refused because zstack-mn has no service for it.

Both protocols (REST ``/zstack/v1``, RPC ``/zstack/api``) read this table, and both hand the
translated message to the one portal; nothing here runs an API. The REST facts come from the
``@RestRequest`` annotations of ZStack's API message classes (``header/src/main/java/org/zstack/
header/vm/APIStartVmInstanceMsg.java`` and its siblings) and the SDK's action classes
(``sdk/src/main/java/org/zstack/sdk/*Action.java``).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from zstack_mn.messages import ErrorCode, Message, ZStackError
from zstack_mn.messages.api import (
    APIAddHostMsg,
    APIChangeHostStateMsg,
    APICreateVmInstanceMsg,
    APIDeleteHostMsg,
    APIDestroyVmInstanceMsg,
    APIMigrateVmMsg,
    APIRebootVmInstanceMsg,
    APIReconnectHostMsg,
    APIStartVmInstanceMsg,
    APIStopVmInstanceMsg,
)
from zstack_mn.messages.envelope import validation_error
from zstack_mn.messages.types import HOST_PATTERN, check_agent_url
from zstack_mn.web.zstack.builtins import NO_IMAGE_UUID, NO_NETWORK_UUID
from zstack_mn.web.zstack.wire import internal_uuid


class Kind(enum.Enum):
    ACTION = "action"
    """Runs through the portal as a job: REST answers 202 and a location, RPC ``Processing``."""
    QUERY = "query"
    """Answered at once from the database."""
    SESSION = "session"
    """Log in, log out, validate a session: answered at once, no session needed."""


class Inventory(enum.Enum):
    VM = "vm"
    HOST = "host"
    MANAGEMENT_NODE = "managementNode"
    IMAGE = "image"
    L3_NETWORK = "l3Network"
    SESSION = "session"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class Context:
    """What a field conversion may need of the node's settings."""

    kvm_agent_url: str


@dataclass(frozen=True, slots=True)
class To:
    """Copy the field to ``name`` of the project's API message (after ``convert``)."""

    name: str
    convert: Callable[[Any, str, Context], Any] | None = None


@dataclass(frozen=True, slots=True)
class Refuse:
    """A field for something zstack-mn does not have: any value but the harmless ones is refused
    with an error that names the field and what is missing."""

    reason: str
    harmless: tuple[Any, ...] = (None, "", [], {})


@dataclass(frozen=True, slots=True)
class Ignore:
    """Accepted and not used; ``why`` is documented in the README."""

    why: str


Rule = To | Refuse | Ignore

_NO_TAGS = Refuse("zstack-mn has no tag service")
COMMON_FIELDS: dict[str, Rule] = {
    "session": Ignore("the session is checked before the message is built"),
    "sessionId": Ignore("the session is checked before the message is built"),
    "timeout": Ignore("the client's own polling bound; a job's deadline is the node's job_timeout"),
    "pollingInterval": Ignore("a client-side setting"),
    "serviceId": Ignore("ZStack's bus routing; the portal routes by the ring"),
    "id": Ignore("the job uuid (RPC); used as the request id when it is 32 hex characters"),
    "headers": Ignore("ZStack's bus headers"),
    "requestIp": Ignore("audit only"),
    "clientInfo": Ignore("audit only"),
    "systemTags": _NO_TAGS,
    "userTags": _NO_TAGS,
    "tagUuids": _NO_TAGS,
}


def uuid_field(value: Any, name: str, _: Context) -> str:
    return internal_uuid(value, name)


MANAGEMENT_IP = re.compile(HOST_PATTERN)


def agent_url_of(value: Any, name: str, ctx: Context) -> str:
    """AddKVMHost's ``managementIp`` → the host's agent URL (setting ``kvm_agent_url``)."""
    if not isinstance(value, str) or len(value) > 253 or not MANAGEMENT_IP.match(value):
        raise ZStackError(ErrorCode.INVALID_ARGUMENT, f"{name}: must be an IPv4 address or a host name", field=name)
    url = ctx.kvm_agent_url.format(managementIp=value)
    try:
        return check_agent_url(url)
    except ValueError as exc:
        raise ZStackError(
            ErrorCode.INVALID_ARGUMENT, f"{name}: makes the agent URL {url!r}, which {exc}", field=name
        ) from None


@dataclass(frozen=True, slots=True)
class ZApi:
    """One ZStack API as zstack-mn serves it."""

    name: str
    message_class: str
    reply_class: str
    method: str
    path: str
    body_key: str | None
    """The REST body's key: the action name (``startVmInstance``), ``params`` for a create, None
    when the parameters travel in the query string (GET, DELETE)."""
    kind: Kind
    inventory: Inventory
    target: type[Message] | None = None
    fields: Mapping[str, Rule] = field(default_factory=dict)
    defaults: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_async(self) -> bool:
        return self.kind is Kind.ACTION

    def path_vars(self) -> list[str]:
        return re.findall(r"\{(\w+)\}", self.path)

    def build(self, params: Mapping[str, Any], ctx: Context) -> Message:
        """The project's API message for these ZStack parameters (path variables included)."""
        assert self.target is not None
        values: dict[str, Any] = dict(self.defaults)
        given_as: dict[str, str] = {}
        for key, value in params.items():
            if value is None:
                continue  # a field sent as null is a field not given (ZStack's bindings send them)
            rule = self.fields.get(key) or COMMON_FIELDS.get(key)
            if rule is None:
                raise ZStackError(
                    ErrorCode.INVALID_ARGUMENT, f"{key}: not a parameter of {self.name}", field=key, api=self.name
                )
            if isinstance(rule, Refuse):
                if value not in rule.harmless:
                    raise ZStackError(ErrorCode.INVALID_ARGUMENT, f"{key}: {rule.reason}", field=key, api=self.name)
            elif isinstance(rule, To):
                if rule.name in given_as:
                    raise ZStackError(
                        ErrorCode.INVALID_ARGUMENT,
                        f"{key}: give {given_as[rule.name]} or {key}, not both",
                        field=key,
                        api=self.name,
                    )
                given_as[rule.name] = key
                values[rule.name] = rule.convert(value, key, ctx) if rule.convert and value is not None else value
        try:
            return self.target.model_validate(values)
        except ValidationError as exc:
            raise validation_error(exc, self.name) from None


_VM_UUID = {"uuid": To("uuid", uuid_field)}
_HOST_UUID = {"uuid": To("uuid", uuid_field)}
_DELETE_MODE = {"deleteMode": Ignore("zstack-mn checks the same either way")}
_NO_CLUSTER = "zstack-mn has no cluster service: every host is one pool"

VM = "org.zstack.header.vm"
HOST = "org.zstack.header.host"
IDENTITY = "org.zstack.header.identity"

APIS: tuple[ZApi, ...] = (
    ZApi(
        "LogInByAccount",
        f"{IDENTITY}.APILogInByAccountMsg",
        f"{IDENTITY}.APILogInReply",
        "PUT",
        "/accounts/login",
        "logInByAccount",
        Kind.SESSION,
        Inventory.SESSION,
    ),
    ZApi(
        "LogOut",
        f"{IDENTITY}.APILogOutMsg",
        f"{IDENTITY}.APILogOutReply",
        "DELETE",
        "/accounts/sessions/{sessionUuid}",
        None,
        Kind.SESSION,
        Inventory.NONE,
    ),
    ZApi(
        "ValidateSession",
        f"{IDENTITY}.APIValidateSessionMsg",
        f"{IDENTITY}.APIValidateSessionReply",
        "GET",
        "/accounts/sessions/{sessionUuid}/valid",
        None,
        Kind.SESSION,
        Inventory.NONE,
    ),
    ZApi(
        "CreateVmInstance",
        f"{VM}.APICreateVmInstanceMsg",
        f"{VM}.APICreateVmInstanceEvent",
        "POST",
        "/vm-instances",
        "params",
        Kind.ACTION,
        Inventory.VM,
        APICreateVmInstanceMsg,
        {
            "name": To("name"),
            "cpuNum": To("cpuNum"),
            "memorySize": To("memorySize"),
            "hostUuid": To("hostUuid", uuid_field),
            "resourceUuid": To("uuid", uuid_field),
            "description": Ignore("zstack-mn keeps no description"),
            "type": Refuse("zstack-mn has only user VMs", (None, "", "UserVm")),
            "strategy": Refuse("zstack-mn creates every VM started (InstantStart)", (None, "", "InstantStart")),
            "instanceOfferingUuid": Refuse("zstack-mn has no instance-offering service: give cpuNum and memorySize"),
            "imageUuid": Refuse(
                f"zstack-mn has no image service: give its built-in image {NO_IMAGE_UUID} (QueryImage) or none",
                (None, "", NO_IMAGE_UUID),
            ),
            "l3NetworkUuids": Refuse(
                f"zstack-mn has no L3 network service: give [{NO_NETWORK_UUID}] (QueryL3Network) or none",
                (None, [], [NO_NETWORK_UUID]),
            ),
            "defaultL3NetworkUuid": Refuse(
                f"zstack-mn has no L3 network service: give {NO_NETWORK_UUID} or none", (None, "", NO_NETWORK_UUID)
            ),
            "rootDiskOfferingUuid": Refuse("zstack-mn has no disk-offering service"),
            "rootDiskSize": Refuse("zstack-mn has no volume service"),
            "dataDiskOfferingUuids": Refuse("zstack-mn has no disk-offering service"),
            "dataDiskSizes": Refuse("zstack-mn has no volume service"),
            "primaryStorageUuidForRootVolume": Refuse("zstack-mn has no primary-storage service"),
            "rootVolumeSystemTags": Refuse("zstack-mn has no volume service"),
            "dataVolumeSystemTags": Refuse("zstack-mn has no volume service"),
            "dataVolumeSystemTagsOnIndex": Refuse("zstack-mn has no volume service"),
            "zoneUuid": Refuse("zstack-mn has no zone service"),
            "clusterUuid": Refuse(_NO_CLUSTER),
        },
    ),
    ZApi(
        "StartVmInstance",
        f"{VM}.APIStartVmInstanceMsg",
        f"{VM}.APIStartVmInstanceEvent",
        "PUT",
        "/vm-instances/{uuid}/actions",
        "startVmInstance",
        Kind.ACTION,
        Inventory.VM,
        APIStartVmInstanceMsg,
        {
            **_VM_UUID,
            "hostUuid": Refuse("zstack-mn starts a VM on its last host or on any host with room"),
            "clusterUuid": Refuse(_NO_CLUSTER),
        },
    ),
    ZApi(
        "StopVmInstance",
        f"{VM}.APIStopVmInstanceMsg",
        f"{VM}.APIStopVmInstanceEvent",
        "PUT",
        "/vm-instances/{uuid}/actions",
        "stopVmInstance",
        Kind.ACTION,
        Inventory.VM,
        APIStopVmInstanceMsg,
        {
            **_VM_UUID,
            "type": Refuse("zstack-mn stops a VM one way (grace)", (None, "", "grace")),
            "stopHA": Refuse("zstack-mn has no HA service", (None, False)),
        },
    ),
    ZApi(
        "RebootVmInstance",
        f"{VM}.APIRebootVmInstanceMsg",
        f"{VM}.APIRebootVmInstanceEvent",
        "PUT",
        "/vm-instances/{uuid}/actions",
        "rebootVmInstance",
        Kind.ACTION,
        Inventory.VM,
        APIRebootVmInstanceMsg,
        dict(_VM_UUID),
    ),
    ZApi(
        "DestroyVmInstance",
        f"{VM}.APIDestroyVmInstanceMsg",
        f"{VM}.APIDestroyVmInstanceEvent",
        "DELETE",
        "/vm-instances/{uuid}",
        None,
        Kind.ACTION,
        Inventory.VM,
        APIDestroyVmInstanceMsg,
        {**_VM_UUID, **_DELETE_MODE},
    ),
    ZApi(
        "MigrateVm",
        f"{VM}.APIMigrateVmMsg",
        f"{VM}.APIMigrateVmEvent",
        "PUT",
        "/vm-instances/{vmInstanceUuid}/actions",
        "migrateVm",
        Kind.ACTION,
        Inventory.VM,
        APIMigrateVmMsg,
        {
            "vmInstanceUuid": To("uuid", uuid_field),
            "hostUuid": To("hostUuid", uuid_field),
            "migrateFromDestination": Refuse("zstack-mn migrates from the source host", (None, False)),
            "allowUnknown": Refuse("zstack-mn migrates only a Running VM", (None, False)),
            "strategy": Refuse("zstack-mn has one migration strategy"),
            "downTime": Refuse("zstack-mn has one migration strategy"),
            "enableMigrationTls": Refuse("zstack-mn's agent protocol has no migration TLS", (None, False)),
        },
    ),
    ZApi(
        "QueryVmInstance",
        f"{VM}.APIQueryVmInstanceMsg",
        f"{VM}.APIQueryVmInstanceReply",
        "GET",
        "/vm-instances",
        None,
        Kind.QUERY,
        Inventory.VM,
    ),
    ZApi(
        "AddKVMHost",
        "org.zstack.kvm.APIAddKVMHostMsg",
        f"{HOST}.APIAddHostEvent",
        "POST",
        "/hosts/kvm",
        "params",
        Kind.ACTION,
        Inventory.HOST,
        APIAddHostMsg,
        {
            "name": To("name"),
            "managementIp": To("agentUrl", agent_url_of),
            "agentUrl": To("agentUrl"),
            "resourceUuid": To("uuid", uuid_field),
            "username": Ignore("SSH deployment of the agent: zstack-mn talks to an agent already running"),
            "password": Ignore("SSH deployment of the agent: never stored"),
            "sshPort": Ignore("SSH deployment of the agent"),
            "clusterUuid": Ignore("every host is in zstack-mn's one implicit cluster"),
            "description": Ignore("zstack-mn keeps no description"),
        },
    ),
    ZApi(
        "ReconnectHost",
        f"{HOST}.APIReconnectHostMsg",
        f"{HOST}.APIReconnectHostEvent",
        "PUT",
        "/hosts/{uuid}/actions",
        "reconnectHost",
        Kind.ACTION,
        Inventory.HOST,
        APIReconnectHostMsg,
        dict(_HOST_UUID),
    ),
    ZApi(
        "ChangeHostState",
        f"{HOST}.APIChangeHostStateMsg",
        f"{HOST}.APIChangeHostStateEvent",
        "PUT",
        "/hosts/{uuid}/actions",
        "changeHostState",
        Kind.ACTION,
        Inventory.HOST,
        APIChangeHostStateMsg,
        {**_HOST_UUID, "stateEvent": To("stateEvent")},
    ),
    ZApi(
        "DeleteHost",
        f"{HOST}.APIDeleteHostMsg",
        f"{HOST}.APIDeleteHostEvent",
        "DELETE",
        "/hosts/{uuid}",
        None,
        Kind.ACTION,
        Inventory.HOST,
        APIDeleteHostMsg,
        {**_HOST_UUID, **_DELETE_MODE},
    ),
    ZApi(
        "QueryHost",
        f"{HOST}.APIQueryHostMsg",
        f"{HOST}.APIQueryHostReply",
        "GET",
        "/hosts",
        None,
        Kind.QUERY,
        Inventory.HOST,
    ),
    ZApi(
        "QueryImage",
        "org.zstack.header.image.APIQueryImageMsg",
        "org.zstack.header.image.APIQueryImageReply",
        "GET",
        "/images",
        None,
        Kind.QUERY,
        Inventory.IMAGE,
    ),
    ZApi(
        "QueryL3Network",
        "org.zstack.header.network.l3.APIQueryL3NetworkMsg",
        "org.zstack.header.network.l3.APIQueryL3NetworkReply",
        "GET",
        "/l3-networks",
        None,
        Kind.QUERY,
        Inventory.L3_NETWORK,
    ),
    ZApi(
        "QueryManagementNode",
        "org.zstack.header.managementnode.APIQueryManagementNodeMsg",
        "org.zstack.header.managementnode.APIQueryManagementNodeReply",
        "GET",
        "/management-nodes",
        None,
        Kind.QUERY,
        Inventory.MANAGEMENT_NODE,
    ),
)

BY_NAME: dict[str, ZApi] = {a.name: a for a in APIS}
BY_CLASS: dict[str, ZApi] = {a.message_class: a for a in APIS}
