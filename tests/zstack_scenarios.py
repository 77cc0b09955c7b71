"""A VM's whole lifecycle and the error cases, driven by the ZStack-style clients of
``tests/zstack_sdk.py`` over REST and over RPC; the embedded and the cluster tests run these."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from tests.zstack_sdk import RestClient, RpcClient
from zstack_mn.web.zstack.builtins import NO_IMAGE_UUID, NO_NETWORK_UUID

HEX32 = re.compile(r"^[0-9a-f]{32}$")
MB = 1 << 20
NOTHING: dict[str, Any] = {"imageUuid": NO_IMAGE_UUID, "l3NetworkUuids": [NO_NETWORK_UUID]}
"""The image and network a ZStack SDK must name in a create: zstack-mn's built-in "none"."""


def _uuid() -> str:
    return uuid.uuid4().hex


async def rest_lifecycle(c: RestClient, tag: str, password: str = "password") -> None:
    """Login, hosts, create, stop, start, reboot, migrate, query with conditions, destroy, and the
    error cases (bad session, unknown uuid, invalid state, a refused field), over REST."""
    bad = await c.call("LogInByAccount", accountName="admin", password="0" * 128)
    assert bad.error is not None
    assert '"ID.1000"' in bad.error["details"]
    session = await c.login(password=password)
    assert HEX32.match(session)
    assert (await c.call("ValidateSession", sessionUuid=session)).unwrap() == {"valid": True}

    hosts = []
    for i in (1, 2):
        added = await c.call(
            "AddKVMHost",
            name=f"{tag}-h{i}",
            managementIp=f"10.{i}.0.1",
            username="root",
            password="secret",
            sshPort=22,
            clusterUuid=_uuid(),
        )
        assert added.polls >= 1, "AddKVMHost is asynchronous: answered 202 and polled"
        inv = added.unwrap()["inventory"]
        assert HEX32.match(inv["uuid"])
        assert inv["managementIp"] == f"10.{i}.0.1"
        assert inv["status"] == "Connected"
        assert inv["hypervisorType"] == "KVM"
        hosts.append(inv["uuid"])
    h1, h2 = hosts

    # the SDK insists on an image and a network: zstack-mn offers one built-in entry of each, meaning none
    images = (await c.query("QueryImage")).unwrap()["inventories"]
    networks = (await c.query("QueryL3Network", ["state=Enabled"])).unwrap()["inventories"]
    assert len(images) == len(networks) == 1
    image, l3 = images[0]["uuid"], networks[0]["uuid"]
    created = await c.call(
        "CreateVmInstance",
        name=f"{tag}-vm",
        cpuNum=1,
        memorySize=256 * MB,
        hostUuid=h1,
        imageUuid=image,
        l3NetworkUuids=[l3],
        strategy="InstantStart",
        systemTags=[],
    )
    assert created.polls >= 1
    vm = created.unwrap()["inventory"]
    assert HEX32.match(vm["uuid"])
    assert vm["state"] == "Running"
    assert vm["hostUuid"] == h1
    assert vm["memorySize"] == 256 * MB
    assert vm["cpuNum"] == 1
    v = vm["uuid"]

    assert (await c.call("StopVmInstance", uuid=v)).unwrap()["inventory"]["state"] == "Stopped"
    again = await c.call("StopVmInstance", uuid=v)
    assert again.error is not None
    assert again.error["code"] == "VM.1001", again.error
    assert (await c.call("StartVmInstance", uuid=v)).unwrap()["inventory"]["state"] == "Running"
    assert (await c.call("RebootVmInstance", uuid=v)).unwrap()["inventory"]["state"] == "Running"
    moved = (await c.call("MigrateVm", vmInstanceUuid=v, hostUuid=h2)).unwrap()["inventory"]
    assert moved["hostUuid"] == h2
    assert moved["lastHostUuid"] == h1

    # queries with conditions, paging, count, sort and projection
    found = (await c.query("QueryVmInstance", [f"name={tag}-vm", "state=Running", f"hostUuid={h2}"])).unwrap()
    assert [i["uuid"] for i in found["inventories"]] == [v]
    assert "total" not in found
    like = (await c.query("QueryVmInstance", [f"name~={tag}-%", "cpuNum>=1", "memorySize<1073741824"])).unwrap()
    assert v in [i["uuid"] for i in like["inventories"]]
    none = (await c.query("QueryVmInstance", [f"name={tag}-vm", "state!=Running"])).unwrap()
    assert none["inventories"] == []
    inn = (await c.query("QueryVmInstance", [f"uuid?={v},{_uuid()}"], replyWithCount=True)).unwrap()
    assert inn["total"] == 1
    assert inn["inventories"][0]["uuid"] == v
    counted = (await c.query("QueryVmInstance", [f"name={tag}-vm"], count=True)).unwrap()
    assert counted == {"total": 1}
    projected = (await c.query("QueryVmInstance", [f"uuid={v}"], fields=["uuid", "state"])).unwrap()
    assert projected["inventories"] == [{"uuid": v, "state": "Running"}]
    hosts_desc = (await c.query("QueryHost", [f"name~={tag}-h%"], sortBy="name", sortDirection="desc")).unwrap()
    assert [h["uuid"] for h in hosts_desc["inventories"]] == [h2, h1]
    page = (await c.query("QueryHost", [f"name~={tag}-h%"], limit=1, start=1, sortBy="name")).unwrap()
    assert [h["uuid"] for h in page["inventories"]] == [h2]
    nulls = (await c.query("QueryVmInstance", [f"uuid={v}", "lastHostUuid not null"])).unwrap()
    assert len(nulls["inventories"]) == 1
    bad_q = await c.query("QueryVmInstance", ["nosuchfield=1"])
    assert bad_q.error is not None
    assert bad_q.error["status"] == 400
    assert "nosuchfield" in bad_q.error["details"]
    nodes = (await c.query("QueryManagementNode")).unwrap()["inventories"]
    assert nodes
    assert all(HEX32.match(n["uuid"]) and n["state"] == "RUNNING" for n in nodes)

    # error cases: unknown uuid, a refused field, a bad session; none of them writes anything
    unknown = await c.call("StartVmInstance", uuid=_uuid())
    assert unknown.error is not None
    assert unknown.error["code"] == "SYS.1006"
    refused = await c.call(
        "CreateVmInstance", name=f"{tag}-img", cpuNum=1, memorySize=MB, imageUuid=_uuid(), l3NetworkUuids=[l3]
    )
    assert refused.error is not None
    assert refused.error["status"] == 400
    assert "imageUuid" in refused.error["details"]
    assert "image service" in refused.error["details"]
    stranger = await c.call(
        "CreateVmInstance",
        name=f"{tag}-bad",
        cpuNum=1,
        memorySize=MB,
        imageUuid=image,
        l3NetworkUuids=[l3],
        sessionId=_uuid(),
    )
    assert stranger.error is not None
    assert stranger.error["status"] == 401
    assert '"ID.1001"' in stranger.error["details"]
    left = (await c.query("QueryVmInstance", [f"name?={tag}-img,{tag}-bad"], count=True)).unwrap()
    assert left == {"total": 0}

    assert (await c.call("DestroyVmInstance", uuid=v)).unwrap()["inventory"]["state"] == "Destroyed"
    for h in (h1, h2):
        disabled = (await c.call("ChangeHostState", uuid=h, stateEvent="disable")).unwrap()["inventory"]
        assert disabled["state"] == "Disabled"
        assert (await c.call("DeleteHost", uuid=h)).error is None

    assert (await c.call("LogOut", sessionUuid=session)).error is None
    assert (await c.call("ValidateSession", sessionUuid=session)).unwrap() == {"valid": False}
    after = await c.query("QueryVmInstance")
    assert after.error is not None
    assert '"ID.1001"' in after.error["details"]


async def rpc_lifecycle(r: RpcClient, tag: str, password: str = "password") -> None:
    """The same over the RPC endpoint, as apibinding speaks it."""
    name, reply = await r.sync_call("LogInByAccount", accountName="admin", password="f" * 128)
    assert name == "org.zstack.header.identity.APILogInReply"
    assert not reply["success"]
    assert reply["error"]["code"] == "ID.1000"
    session = await r.login(password=password)
    _, valid = await r.sync_call("ValidateSession", sessionUuid=session)
    assert valid["validSession"] is True

    hosts = []
    for i in (1, 2):
        name, reply, polls = await r.async_call(
            "AddKVMHost", name=f"{tag}-h{i}", managementIp=f"10.{i}.9.1", username="root", password="x", sshPort=22
        )
        assert name == "org.zstack.header.host.APIAddHostEvent"
        assert reply["success"], reply
        assert polls >= 1
        hosts.append(reply["inventory"]["uuid"])
    h1, h2 = hosts

    _, images = await r.sync_call("QueryImage", conditions=[{"name": "name", "op": "like", "value": "%no-image"}])
    _, networks = await r.sync_call("QueryL3Network", conditions=[])
    image, l3 = images["inventories"][0]["uuid"], networks["inventories"][0]["uuid"]
    name, reply, polls = await r.async_call(
        "CreateVmInstance",
        name=f"{tag}-vm",
        cpuNum=1,
        memorySize=128 * MB,
        hostUuid=h1,
        imageUuid=image,
        l3NetworkUuids=[l3],
        timeout=30000,
    )
    assert name == "org.zstack.header.vm.APICreateVmInstanceEvent"
    assert reply["success"], reply
    assert polls >= 1
    v = reply["inventory"]["uuid"]
    assert HEX32.match(v)
    assert reply["inventory"]["hostUuid"] == h1
    for api, state in (("StopVmInstance", "Stopped"), ("StartVmInstance", "Running"), ("RebootVmInstance", "Running")):
        name, reply, _ = await r.async_call(api, uuid=v)
        assert reply["success"], (api, reply)
        assert reply["inventory"]["state"] == state, (api, reply)
    # apibinding sends every field of its message class, null when unset
    _, reply, _ = await r.async_call(
        "StartVmInstance", uuid=v, hostUuid=None, clusterUuid=None, systemTags=None, userTags=None, timeout=1800000
    )
    assert not reply["success"]
    assert reply["error"]["code"] == "VM.1001"
    nulls = dict.fromkeys(("limit", "start", "count", "replyWithCount", "sortBy", "sortDirection", "fields", "groupBy"))
    _, reply = await r.sync_call("QueryVmInstance", conditions=[], filterName=None, systemTags=None, **nulls)
    assert reply["success"], reply
    assert v in [i["uuid"] for i in reply["inventories"]]
    name, reply, _ = await r.async_call("MigrateVm", vmInstanceUuid=v, hostUuid=h2)
    assert name == "org.zstack.header.vm.APIMigrateVmEvent"
    assert reply["inventory"]["hostUuid"] == h2

    name, reply = await r.sync_call(
        "QueryVmInstance",
        conditions=[
            {"name": "name", "op": "like", "value": f"{tag}-%"},
            {"name": "state", "op": "in", "value": "Running,Stopped"},
            {"name": "hostUuid", "op": "=", "value": h2},
        ],
        replyWithCount=True,
    )
    assert name == "org.zstack.header.vm.APIQueryVmInstanceReply"
    assert reply["success"]
    assert reply["total"] == 1
    assert reply["inventories"][0]["uuid"] == v
    _, reply = await r.sync_call("QueryVmInstance", conditions=[{"name": "state", "op": "??", "value": "x"}])
    assert not reply["success"]
    assert reply["error"]["code"] == "SYS.1001"

    _, reply, _ = await r.async_call("StopVmInstance", uuid=_uuid())
    assert not reply["success"]
    assert reply["error"]["code"] == "SYS.1006"
    _, reply, _ = await r.async_call("StopVmInstance", uuid=v, session={"uuid": _uuid()})
    assert not reply["success"]
    assert reply["error"]["code"] == "ID.1001"
    _, reply, _ = await r.async_call(
        "CreateVmInstance", name=f"{tag}-x", cpuNum=1, memorySize=MB, imageUuid=image, l3NetworkUuids=[_uuid()]
    )
    assert not reply["success"]
    assert reply["error"]["opaque"]["field"] == "l3NetworkUuids"
    _, reply = await r.sync_call("QueryHost", conditions=[], session={"uuid": "x"})
    assert not reply["success"]
    assert reply["error"]["code"] == "ID.1001"
    unknown = (await r.http.post(r.api_url, json={"org.zstack.header.image.APIAddImageMsg": {}})).json()
    assert unknown["state"] == "Done"
    ((_, reply),) = json.loads(unknown["result"]).items()
    assert not reply["success"]
    assert reply["error"]["code"] == "SYS.1003"

    _, reply, _ = await r.async_call("DestroyVmInstance", uuid=v)
    assert reply["success"]
    assert reply["inventory"]["state"] == "Destroyed"
    _, reply = await r.sync_call("LogOut", sessionUuid=session)
    assert reply["success"]
    _, valid = await r.sync_call("ValidateSession", sessionUuid=session)
    assert valid["validSession"] is False
