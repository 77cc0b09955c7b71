"""The minimal image and L3 network of the ZStack API: one built-in entry each, meaning "none".

zstack-mn has no image or network service: its VMs boot no image and have no NIC. ZStack's own
clients cannot create a VM without naming an image and at least one L3 network (the Java SDK's
``CreateVmInstanceAction`` requires ``imageUuid`` and a non-empty ``l3NetworkUuids``; apibinding
requires a non-empty ``imageUuid``), so ``QueryImage`` and ``QueryL3Network`` answer one entry
each, and ``CreateVmInstance`` accepts exactly these (or nothing) and refuses any other value by
name. Nothing a client gives is dropped: the only accepted values say what zstack-mn does.

Conditions on these one-row lists are evaluated here, in Python, for the operators a client
uses to find them (``=``, ``!=``, ``in``, ``not in``, ``like``, ``not like``, ``is null``,
``not null``); an ordering operator is refused.
"""

from __future__ import annotations

import re
import uuid as uuidlib
from typing import Any

from zstack_mn.messages import ErrorCode, ZStackError
from zstack_mn.web.zstack.conditions import Condition, Op, QuerySpec

NO_IMAGE_UUID = uuidlib.uuid5(uuidlib.NAMESPACE_URL, "zstack-mn:no-image").hex
NO_NETWORK_UUID = uuidlib.uuid5(uuidlib.NAMESPACE_URL, "zstack-mn:no-l3-network").hex

NO_IMAGE: dict[str, Any] = {
    "uuid": NO_IMAGE_UUID,
    "name": "zstack-mn-no-image",
    "description": "zstack-mn has no image service: a VM created from this boots no image",
    "state": "Enabled",
    "status": "Ready",
    "mediaType": "RootVolumeTemplate",
    "format": "raw",
    "platform": "Linux",
    "system": False,
    "size": 0,
    "actualSize": 0,
    "backupStorageRefs": [],
}
NO_NETWORK: dict[str, Any] = {
    "uuid": NO_NETWORK_UUID,
    "name": "zstack-mn-no-network",
    "description": "zstack-mn has no network service: a VM on this has no NIC",
    "type": "L3BasicNetwork",
    "state": "Enabled",
    "category": "Private",
    "system": False,
    "ipVersion": 4,
    "ipRanges": [],
    "networkServices": [],
}


def _like(pattern: str) -> re.Pattern[str]:
    parts = ("." if ch == "_" else ".*" if ch == "%" else re.escape(ch) for ch in pattern)
    return re.compile("^" + "".join(parts) + "$", re.S)


def _holds(c: Condition, inv: dict[str, Any]) -> bool:
    if c.name not in inv or isinstance(inv[c.name], list | dict):
        raise ZStackError(
            ErrorCode.INVALID_ARGUMENT,
            f"{c.name}: cannot be queried; queryable fields: {', '.join(k for k, v in inv.items() if not isinstance(v, list | dict))}",
            field=c.name,
        )
    value = inv[c.name]
    text = str(value).lower() if isinstance(value, bool) else str(value)
    if c.op is Op.IS_NULL:
        return value is None
    if c.op is Op.NOT_NULL:
        return value is not None
    given = c.value or ""
    checks = {
        Op.EQ: lambda: text == given,
        Op.NOT_EQ: lambda: text != given,
        Op.IN: lambda: text in given.split(","),
        Op.NOT_IN: lambda: text not in given.split(","),
        Op.LIKE: lambda: bool(_like(given).match(text)),
        Op.NOT_LIKE: lambda: not _like(given).match(text),
    }
    check = checks.get(c.op)
    if check is None:
        raise ZStackError(ErrorCode.INVALID_ARGUMENT, f"{c.name}: {c.op.value} is not supported here", field=c.name)
    return check()


def query(items: list[dict[str, Any]], spec: QuerySpec) -> dict[str, Any]:
    """ZStack's query reply over a fixed list."""
    found = [i for i in items if all(_holds(c, i) for c in spec.conditions)]
    return spec.reply(len(found), found[spec.start : spec.start + spec.limit])
