"""Host and VM services on an embedded node (the behaviour; the cluster tests repeat what matters
on RabbitMQ and PostgreSQL)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import delete, func, select

from tests.embedded import embedded_node, session_headers
from zstack_mn.agent.protocol import AgentFault
from zstack_mn.client import Client
from zstack_mn.db.models import Base, Host, VmInstance
from zstack_mn.db.results import OPERATION_PREFIX
from zstack_mn.messages import ErrorCode, Event, ZStackError
from zstack_mn.messages.api import APIDeleteHostMsg
from zstack_mn.messages.events import HostStatusChangedEvent, VmStateChangedEvent
from zstack_mn.messages.ids import request_id_for_key
from zstack_mn.messages.vm import StartVmInstanceMsg, StopVmInstanceMsg
from zstack_mn.node import Node

pytestmark = pytest.mark.timeout(60)
MISSING = "6f1c7d0e-5ad4-4f3e-8b3a-1e0b7e6e1c11"


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    async with embedded_node(tmp_path) as n:
        yield n


@pytest.fixture
async def client(node: Node) -> AsyncIterator[Client]:
    async with Client.http(node.http_url, timeout=15) as c:
        yield c


def faults(node: Node, *items: AgentFault) -> None:
    assert node.simulated_agent is not None
    node.simulated_agent.faults = list(items)


async def count(node: Node, model: type[Base], **where: object) -> int:
    """Rows of ``model``'s table whose columns equal ``where``."""
    assert node.db is not None
    async with node.db.begin() as conn:
        return int((await conn.execute(select(func.count()).select_from(model).filter_by(**where))).scalar_one())


class EventLog:
    """Every event the node publishes on the topics subscribed, kept, so a test awaits the one
    it expects whatever arrived first."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._arrived = asyncio.Event()

    async def record(self, event: Event) -> None:
        self.events.append(event)
        self._arrived.set()

    async def wait_for(self, what: str, predicate: Callable[[Event], bool], timeout: float = 10.0) -> Event:
        try:
            async with asyncio.timeout(timeout):
                while (found := next((e for e in self.events if predicate(e)), None)) is None:
                    self._arrived.clear()
                    await self._arrived.wait()
                return found
        except TimeoutError:
            raise AssertionError(f"no event {what} within {timeout:g}s; seen: {self.events}") from None


async def test_vm_lifecycle_and_invalid_transitions(node: Node, client: Client):
    vm = await client.create_vm("web1", cpu_num=2, memory_size="1G")
    assert vm["state"] == "Running"
    assert vm["memorySize"] == 1 << 30
    with pytest.raises(ZStackError) as err:
        await client.start_vm(vm["uuid"])
    assert err.value.code is ErrorCode.INVALID_STATE
    assert "Running" in err.value.description
    assert (await client.stop_vm(vm["uuid"]))["state"] == "Stopped"
    with pytest.raises(ZStackError) as err:
        await client.reboot_vm(vm["uuid"])
    assert err.value.code is ErrorCode.INVALID_STATE
    assert (await client.start_vm(vm["uuid"]))["state"] == "Running"
    assert (await client.reboot_vm(vm["uuid"]))["state"] == "Running"
    destroyed = await client.destroy_vm(vm["uuid"])
    assert destroyed["state"] == "Destroyed"
    assert destroyed.get("hostUuid") is None
    host = (await client.query_hosts())["inventories"][0]
    assert host["availableCpuCapacity"] == host["totalCpuCapacity"]


async def test_unknown_uuid_is_not_found(client: Client):
    with pytest.raises(ZStackError) as err:
        await client.stop_vm(MISSING)
    assert err.value.code is ErrorCode.RESOURCE_NOT_FOUND


async def test_agent_error_gives_the_capacity_back(node: Node, client: Client):
    faults(node, AgentFault(op="start", fail=True))
    with pytest.raises(ZStackError) as err:
        await client.create_vm("doomed", cpu_num=4, memory_size="2G")
    assert err.value.code is ErrorCode.AGENT_ERROR
    host = (await client.query_hosts())["inventories"][0]
    assert host["availableCpuCapacity"] == host["totalCpuCapacity"]
    vms = (await client.query_vms(name="doomed"))["inventories"]
    assert [v["state"] for v in vms] == ["Stopped"]


async def test_agent_timeout_is_a_clear_error_and_the_vm_settles(node: Node, client: Client):
    assert node.bus is not None
    assert node.simulated_agent is not None
    vm = await client.create_vm("slow", cpu_num=1, memory_size="128M")
    faults(node, AgentFault(op="stop", latency=1.5))
    with pytest.raises(ZStackError) as err:
        await node.bus.call(StopVmInstanceMsg(uuid=vm["uuid"]), msg_id="slow-stop-1")
    assert err.value.code is ErrorCode.AGENT_TIMEOUT
    assert err.value.retryable
    assert (await client.query_vms(uuid=vm["uuid"]))["inventories"][0]["state"] in ("Running", "Unknown")
    faults(node)
    retried = await node.bus.call(StopVmInstanceMsg(uuid=vm["uuid"]), msg_id="slow-stop-1")
    assert retried["state"] == "Stopped"
    assert node.simulated_agent.effects["slow-stop-1"] == 1


async def test_same_message_id_is_applied_once(node: Node, client: Client):
    assert node.bus is not None
    assert node.simulated_agent is not None
    vm = await client.create_vm("dup", cpu_num=1, memory_size="128M")
    await client.stop_vm(vm["uuid"])
    msg_id = "start-once-0001"
    first: dict[str, Any] | BaseException
    second: dict[str, Any] | BaseException
    first, second = await asyncio.gather(
        node.bus.call(StartVmInstanceMsg(uuid=vm["uuid"]), msg_id=msg_id),
        node.bus.call(StartVmInstanceMsg(uuid=vm["uuid"]), msg_id=msg_id + "-other"),
        return_exceptions=True,
    )
    assert isinstance(first, dict)
    assert first["state"] == "Running"
    assert isinstance(second, ZStackError)
    assert second.code is ErrorCode.INVALID_STATE
    again = await node.bus.call(StartVmInstanceMsg(uuid=vm["uuid"]), msg_id=msg_id)
    assert again["state"] == "Running"
    assert node.simulated_agent.effects[msg_id] == 1


async def test_idempotency_key_returns_the_first_result(node: Node, client: Client):
    assert node.simulated_agent is not None
    first = await client.create_vm("keyed", cpu_num=1, memory_size="64M", key="create-keyed-1")
    await client.stop_vm(first["uuid"])
    again = await client.create_vm("keyed", cpu_num=1, memory_size="64M", key="create-keyed-1")
    assert again == first
    assert len((await client.query_vms(name="keyed"))["inventories"]) == 1


async def test_delete_host_refused_while_vms_live(client: Client):
    vm = await client.create_vm("pin", cpu_num=1, memory_size="64M")
    with pytest.raises(ZStackError) as err:
        await client.send(APIDeleteHostMsg(uuid=vm["hostUuid"]))
    assert err.value.code is ErrorCode.HOST_IN_USE


async def test_unreachable_agent_disconnects_host_and_vms_come_back(node: Node, client: Client):
    assert node.bus is not None
    log = EventLog()
    await node.bus.subscribe(VmStateChangedEvent.TOPIC, log.record)
    await node.bus.subscribe(HostStatusChangedEvent.TOPIC, log.record)
    vm = await client.create_vm("tracked", cpu_num=1, memory_size="64M")
    host = vm["hostUuid"]

    def host_went(old: str, new: str) -> Callable[[Event], bool]:
        want = (host, old, new)
        return lambda e: isinstance(e, HostStatusChangedEvent) and (e.host_uuid, e.old_status, e.new_status) == want

    def vm_went(old: str, new: str) -> Callable[[Event], bool]:
        want = (vm["uuid"], old, new)
        return lambda e: isinstance(e, VmStateChangedEvent) and (e.vm_uuid, e.old_state, e.new_state) == want

    faults(node, AgentFault(op="ping", down=True))
    await log.wait_for("host Connected → Disconnected", host_went("Connected", "Disconnected"))
    await log.wait_for("vm Running → Unknown", vm_went("Running", "Unknown"))
    assert (await client.query_hosts(uuid=host))["inventories"][0]["status"] == "Disconnected"
    assert (await client.query_vms(uuid=vm["uuid"]))["inventories"][0]["state"] == "Unknown"
    faults(node)
    await log.wait_for("host Disconnected → Connected", host_went("Disconnected", "Connected"))
    await log.wait_for("vm Unknown → Running", vm_went("Unknown", "Running"))
    assert (await client.query_hosts(uuid=host))["inventories"][0]["status"] == "Connected"
    assert (await client.query_vms(uuid=vm["uuid"]))["inventories"][0]["state"] == "Running"


async def test_stop_of_a_vm_on_a_missing_host_is_clean(node: Node, client: Client):
    """The VM's host row is gone (removed behind the API's back): a stop finishes without an
    agent to ask, leaves the VM Stopped and on no host, and recreates nothing."""
    assert node.bus is not None
    assert node.db is not None
    assert node.simulated_agent is not None
    vm = await client.create_vm("x", cpu_num=1, memory_size="64M")
    host = vm["hostUuid"]
    async with node.db.begin() as conn:
        assert (await conn.execute(delete(Host).where(Host.uuid == host))).rowcount == 1
    reply = await node.bus.call(StopVmInstanceMsg(uuid=vm["uuid"]), msg_id="stop-hostless-1")
    assert reply["state"] == "Stopped"
    assert reply.get("hostUuid") is None
    assert reply["lastHostUuid"] == host
    assert "stop-hostless-1" not in node.simulated_agent.effects, "a stop was sent for a host that is gone"
    assert await count(node, VmInstance, uuid=vm["uuid"], state="Stopped", host_uuid=None) == 1
    assert await count(node, Host) == 0, "the missing host came back"
    with pytest.raises(ZStackError) as err:
        await client.start_vm(vm["uuid"])
    assert err.value.code is ErrorCode.NO_CAPACITY


async def test_http_errors_name_the_field_and_write_nothing(node: Node):
    hosts_before = await count(node, Host)
    async with httpx.AsyncClient(base_url=node.http_url, headers=await session_headers(node.http_url)) as http:
        cases = [
            ("POST", "/v1/vm-instances", {"params": {"name": "a", "cpuNum": 1, "memorySize": -1}}, 400, "memorySize"),
            ("POST", "/v1/vm-instances", {"params": {"name": "a", "cpuNum": "two", "memorySize": 1}}, 400, "cpuNum"),
            ("POST", "/v1/vm-instances", {"params": {"cpuNum": 1, "memorySize": 1}}, 400, "name"),
            ("POST", "/v1/vm-instances", {"params": {"name": "a", "cpuNum": 1, "memorySize": 1, "x": 1}}, 400, "x"),
            ("PUT", "/v1/vm-instances/not-a-uuid/actions", {"startVmInstance": {}}, 400, "uuid"),
            ("PUT", f"/v1/vm-instances/{MISSING}/actions", {"fly": {}}, 400, "fly"),
            ("PUT", f"/v1/vm-instances/{MISSING}/actions", {"startVmInstance": {}}, 404, MISSING),
            ("GET", "/v1/vm-instances?limit=0", None, 400, "limit"),
            ("POST", "/v1/hosts", {"params": {"name": "h", "agentUrl": "ftp://x"}}, 400, "agentUrl"),
        ]
        for method, path, body, status, field in cases:
            resp = await http.request(method, path, json=body)
            assert resp.status_code == status, (path, body, resp.text)
            err = resp.json()["error"]
            assert err["code"]
            assert err["description"]
            assert field in err["description"] or field in str(err["details"]), (field, err)
        big = await http.post(
            "/v1/vm-instances", content=b"{" + b" " * (70 * 1024) + b"}", headers={"content-type": "application/json"}
        )
        assert big.status_code == 413
        assert (await http.get("/readyz")).json()["ready"] is True
    assert await count(node, VmInstance) == 0
    assert await count(node, Host) == hosts_before


async def test_a_session_guards_the_api_but_not_health(node: Node):
    """Every /v1 call needs a live session; a logout ends it at once on the node that served it,
    and the metrics and health endpoints stay open."""
    async with httpx.AsyncClient(base_url=node.http_url) as http:
        denied = await http.get("/v1/vm-instances")
        assert denied.status_code == 401
        assert denied.json()["error"]["code"] == ErrorCode.INVALID_SESSION.value
        auth = await session_headers(node.http_url)
        assert (await http.get("/v1/vm-instances", headers=auth)).status_code == 200
        session = auth["Authorization"].removeprefix("OAuth ")
        out = await http.delete(f"/zstack/v1/accounts/sessions/{session}", headers=auth)
        assert out.status_code == 200, out.text
        after = await http.get("/v1/vm-instances", headers=auth)
        assert after.status_code == 401
        assert after.json()["error"]["code"] == ErrorCode.INVALID_SESSION.value
        assert (await http.get("/healthz")).status_code == 200
        metrics = (await http.get("/metrics")).text
        assert "zstack_messages_handled_total" in metrics
        assert "zstack_heartbeat_age_seconds" in metrics


async def test_stored_replies_expire(node: Node, client: Client):
    assert node.portal is not None
    await client.create_vm("kept", cpu_num=1, memory_size="64M", key="expiring-key")
    request_id = request_id_for_key("expiring-key")
    assert await node.portal.results.get(request_id) is None, "a VM operation's reply is its op record, not a copy"
    assert await node.portal.results.get(OPERATION_PREFIX + request_id) is not None
    assert await node.portal.results.expire(3600) == 0
    await asyncio.sleep(2.1)
    assert await node.portal.results.expire(1) >= 1


async def test_a_stale_copy_of_a_finished_operation_is_answered_not_reapplied(node: Node, client: Client):
    assert node.bus is not None
    assert node.simulated_agent is not None
    vm = await client.create_vm("stale", cpu_num=1, memory_size="64M")
    stopped = await node.bus.call(StopVmInstanceMsg(uuid=vm["uuid"]), msg_id="stop-then-start-1")
    assert stopped["state"] == "Stopped"
    assert (await node.bus.call(StartVmInstanceMsg(uuid=vm["uuid"]), msg_id="start-after-stop-1"))["state"] == "Running"
    late = await node.bus.call(StopVmInstanceMsg(uuid=vm["uuid"]), msg_id="stop-then-start-1")
    assert late["state"] == "Stopped"
    now = (await client.query_vms(uuid=vm["uuid"]))["inventories"][0]
    assert now["state"] == "Running", "a stale copy of a finished stop stopped the VM again"
    assert node.simulated_agent.effects["stop-then-start-1"] == 1
