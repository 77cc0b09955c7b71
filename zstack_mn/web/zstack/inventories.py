"""ZStack's inventories from this project's: the fields ZStack clients read
(``VmInstanceInventory``, ``KVMHostInventory``, ``ManagementNodeInventory``, ``SessionInventory``
of ``header/src/main/java/org/zstack/header/...``), with 32-hex uuids and ZStack's date format.

Fields zstack-mn has no value for (zone, cluster, image, NICs, volumes) are left out, or empty
lists where ZStack clients iterate them; the project's own extras (``agentUrl``, ``httpAddress``,
``ringShare``) are kept, since ZStack clients ignore fields they do not know.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from zstack_mn.db.accounts import Session
from zstack_mn.messages.inventory import ManagementNodeInventory
from zstack_mn.web.zstack.builtins import NO_IMAGE_UUID
from zstack_mn.web.zstack.catalog import Inventory
from zstack_mn.web.zstack.wire import zstack_date, zstack_uuid


def _clean(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def vm(inv: dict[str, Any]) -> dict[str, Any]:
    """A VM (the project's wire inventory) as ZStack's ``VmInstanceInventory``."""
    return _clean(
        {
            "uuid": zstack_uuid(inv["uuid"]),
            "name": inv["name"],
            "state": inv["state"],
            "type": "UserVm",
            "hypervisorType": "KVM",
            "imageUuid": NO_IMAGE_UUID,
            "hostUuid": zstack_uuid(inv.get("hostUuid")),
            "lastHostUuid": zstack_uuid(inv.get("lastHostUuid")),
            "cpuNum": inv["cpuNum"],
            "cpuSpeed": 0,
            "memorySize": inv["memorySize"],
            "createDate": zstack_date(inv.get("createDate")),
            "lastOpDate": zstack_date(inv.get("lastOpDate")),
            "vmNics": [],
            "allVolumes": [],
        }
    )


def management_ip(agent_url: str) -> str:
    """The host's ``managementIp``: the last segment of ``/hosts/<id>`` when the agent URL has
    one (the AddKVMHost mapping puts it there), else the URL's host name."""
    parts = urlsplit(agent_url)
    segments = [s for s in parts.path.split("/") if s]
    if len(segments) >= 2 and segments[-2] == "hosts":
        return segments[-1]
    return parts.hostname or ""


def host(inv: dict[str, Any]) -> dict[str, Any]:
    """A host as ZStack's ``KVMHostInventory``."""
    return _clean(
        {
            "uuid": zstack_uuid(inv["uuid"]),
            "name": inv["name"],
            "managementIp": management_ip(inv["agentUrl"]),
            "hypervisorType": "KVM",
            "state": inv["state"],
            "status": inv["status"],
            "totalCpuCapacity": inv["totalCpuCapacity"],
            "availableCpuCapacity": inv["availableCpuCapacity"],
            "cpuNum": inv["totalCpuCapacity"],
            "totalMemoryCapacity": inv["totalMemoryCapacity"],
            "availableMemoryCapacity": inv["availableMemoryCapacity"],
            "createDate": zstack_date(inv.get("createDate")),
            "lastOpDate": zstack_date(inv.get("lastOpDate")),
            "agentUrl": inv["agentUrl"],
        }
    )


def management_node(node: ManagementNodeInventory, now: datetime | None = None) -> dict[str, Any]:
    """A node as ZStack's ``ManagementNodeInventory`` (``heartBeat``: its last heartbeat)."""
    at = (now or datetime.now(UTC)) - timedelta(seconds=node.heartbeat_age)
    return {
        "uuid": zstack_uuid(node.uuid),
        "hostName": node.host_name,
        "state": node.state,
        "heartBeat": zstack_date(at),
        "httpAddress": node.http_address,
        "ringShare": node.ring_share,
    }


def session(s: Session) -> dict[str, Any]:
    """ZStack's ``SessionInventory``: the admin account is also its user."""
    return {
        "uuid": s.uuid,
        "accountUuid": s.account_uuid,
        "userUuid": s.account_uuid,
        "expiredDate": zstack_date(s.expires_at),
        "createDate": zstack_date(s.created_at),
    }


def convert(kind: Inventory, inv: dict[str, Any]) -> dict[str, Any]:
    """An inventory in ZStack's form; a reply that is not a whole inventory (DeleteHost's
    ``{"uuid", "deleted"}``) keeps its fields, with its uuid in the 32-hex form."""
    if kind is Inventory.VM and "cpuNum" in inv:
        return vm(inv)
    if kind is Inventory.HOST and "agentUrl" in inv:
        return host(inv)
    return {k: zstack_uuid(v) if k == "uuid" and isinstance(v, str) else v for k, v in inv.items()}


def reply_body(kind: Inventory, body: dict[str, Any]) -> dict[str, Any]:
    """A portal reply (``{"inventory": ...}``) with its inventory in ZStack's form."""
    out = dict(body)
    if isinstance(body.get("inventory"), dict):
        out["inventory"] = convert(kind, body["inventory"])
    return out
