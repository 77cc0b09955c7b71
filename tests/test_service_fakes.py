"""Service handlers on fakes (``zstack_mn.testing.services``): no node, no broker, no agent
process. What each handler sends to the agent, writes and publishes, and how it answers when
the agent fails."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import update

from zstack_mn.db.models import VmInstance
from zstack_mn.messages import ErrorCode, ZStackError
from zstack_mn.messages.api import APIAddHostMsg, APICreateVmInstanceMsg, APIQueryVmInstanceMsg
from zstack_mn.messages.events import HostStatusChangedEvent, VmStateChangedEvent
from zstack_mn.messages.host import AddHostMsg, PingHostMsg
from zstack_mn.messages.ids import resource_uuid_for
from zstack_mn.messages.vm import CreateVmInstanceMsg, StartVmInstanceMsg, StopVmInstanceMsg
from zstack_mn.services.api_portal import ApiPortal
from zstack_mn.services.host import HostService
from zstack_mn.services.vm_instance import VmInstanceService
from zstack_mn.testing.services import GIB, AgentCall, Fakes, agent_url_of, service_factory

pytestmark = pytest.mark.timeout(30)
DEAD_NODE = "0f0e0d0c-0b0a-4909-8807-060504030201"


@pytest.fixture
async def vms() -> AsyncIterator[Fakes[VmInstanceService]]:
    async with service_factory(VmInstanceService) as f:
        await f.add_host("h1", cpu=8, memory=8 * GIB)
        yield f


async def create(f: Fakes[VmInstanceService], msg_id: str = "create-1", cpu: int = 2) -> dict[str, Any]:
    return await f.handle(CreateVmInstanceMsg(name="web", cpu_num=cpu, memory_size=GIB), msg_id=msg_id)


def transitions(f: Fakes[Any], vm: str) -> list[tuple[str | None, str]]:
    return [(e.old_state, e.new_state) for e in f.bus.events_of(VmStateChangedEvent) if e.vm_uuid == vm]


async def free_cpu(f: Fakes[Any], host: str) -> int:
    row = await f.host_row(host)
    assert row is not None
    return int(row.cpu_available)


async def test_create_starts_the_vm_on_a_host_under_the_request_id(vms: Fakes[VmInstanceService]):
    vm = await create(vms, "create-1", cpu=2)
    host = vms.hosts["h1"]
    assert vm["uuid"] == resource_uuid_for("create-1")
    assert vm["state"] == "Running"
    assert vm["hostUuid"] == host
    [call] = vms.agents.vm_ops(vm["uuid"])
    assert (call.op, call.agent_url, call.op_id) == ("start", agent_url_of("h1"), "create-1")
    assert call.request is not None
    assert (call.request.cpu_num, call.request.memory_size) == (2, GIB)
    assert vms.agents.state_of(vm["uuid"]) == "Running"
    assert await free_cpu(vms, host) == 6
    assert transitions(vms, vm["uuid"]) == [(None, "Starting"), ("Starting", "Running")]


async def test_the_agent_is_called_with_the_vms_fence_and_op_id_while_it_is_transient(
    vms: Fakes[VmInstanceService],
):
    vm = (await create(vms))["uuid"]
    seen: list[tuple[str, int, str | None, str | None]] = []

    async def read_the_row(call: AgentCall) -> None:
        row = await vms.vm_row(vm)
        assert row is not None
        seen.append((row.state, row.version, row.op_id, row.op_node))

    vms.agents.before = read_the_row
    stopped = await vms.handle(StopVmInstanceMsg(uuid=vm), msg_id="stop-1")
    [call] = vms.agents.vm_ops(vm)[1:]
    assert call.op == "stop"
    assert call.op_id == "stop-1"
    assert seen == [("Stopping", call.fence, "stop-1", vms.ctx.node_uuid)]
    row = await vms.vm_row(vm)
    assert row is not None
    assert call.fence is not None
    assert row.version > call.fence, "the finish did not move the version past the fence"
    assert stopped["state"] == "Stopped"
    assert stopped.get("hostUuid") is None


async def test_a_failed_agent_call_leaves_the_vm_in_the_state_the_agent_reports(vms: Fakes[VmInstanceService]):
    vm = (await create(vms))["uuid"]
    host = vms.hosts["h1"]
    vms.agents.fail("stop", ErrorCode.AGENT_ERROR)
    with pytest.raises(ZStackError) as err:
        await vms.handle(StopVmInstanceMsg(uuid=vm), msg_id="stop-1")
    assert err.value.code is ErrorCode.AGENT_ERROR
    assert vms.agents.calls_of("list_vms"), "the VM was not settled from its agent"
    row = await vms.vm_row(vm)
    assert row is not None
    assert (row.state, row.host_uuid) == ("Running", host)
    assert await free_cpu(vms, host) == 6, "a VM still running gave its capacity back"
    assert transitions(vms, vm)[-2:] == [("Running", "Stopping"), ("Stopping", "Running")]


async def test_a_stop_whose_answer_was_lost_settles_to_stopped_and_frees_the_host(vms: Fakes[VmInstanceService]):
    vm = (await create(vms))["uuid"]
    host = vms.hosts["h1"]
    vms.agents.fail("stop", ErrorCode.AGENT_TIMEOUT, applied=True)
    with pytest.raises(ZStackError) as err:
        await vms.handle(StopVmInstanceMsg(uuid=vm), msg_id="stop-1")
    assert err.value.code is ErrorCode.AGENT_TIMEOUT
    assert err.value.retryable
    assert vms.agents.state_of(vm) == "Stopped"
    row = await vms.vm_row(vm)
    assert row is not None
    assert (row.state, row.host_uuid, row.last_host_uuid) == ("Stopped", None, host)
    assert await free_cpu(vms, host) == 8
    assert transitions(vms, vm)[-1] == ("Stopping", "Stopped")


async def test_a_new_vm_whose_agent_is_unreachable_is_stopped_and_holds_nothing(vms: Fakes[VmInstanceService]):
    vms.agents.down.add(agent_url_of("h1"))
    with pytest.raises(ZStackError) as err:
        await create(vms, "create-1")
    assert err.value.code is ErrorCode.AGENT_UNREACHABLE
    vm = resource_uuid_for("create-1")
    row = await vms.vm_row(vm)
    assert row is not None
    assert (row.state, row.host_uuid) == ("Stopped", None)
    assert await free_cpu(vms, vms.hosts["h1"]) == 8
    assert vms.agents.effects == {}


async def test_a_stale_copy_of_a_finished_operation_is_answered_not_sent_again(vms: Fakes[VmInstanceService]):
    vm = (await create(vms))["uuid"]
    assert (await vms.handle(StopVmInstanceMsg(uuid=vm), msg_id="stop-1"))["state"] == "Stopped"
    assert (await vms.handle(StartVmInstanceMsg(uuid=vm), msg_id="start-1"))["state"] == "Running"
    sent = len(vms.agents.vm_ops(vm))
    late = await vms.handle(StopVmInstanceMsg(uuid=vm), msg_id="stop-1")
    assert late["state"] == "Stopped", "the copy was not answered with the recorded outcome"
    assert len(vms.agents.vm_ops(vm)) == sent, "the copy reached the agent"
    row = await vms.vm_row(vm)
    assert row is not None
    assert row.state == "Running"


async def test_an_invalid_transition_is_refused_before_the_agent(vms: Fakes[VmInstanceService]):
    vm = (await create(vms))["uuid"]
    start = StartVmInstanceMsg(uuid=vm)
    with pytest.raises(ZStackError) as err:
        await vms.service.start_vm(start, vms.request(start))  # the handler itself, no dispatch
    assert err.value.code is ErrorCode.INVALID_STATE
    assert [c.op for c in vms.agents.vm_ops(vm)] == ["start"]
    with pytest.raises(ZStackError) as missing:
        await vms.handle(StopVmInstanceMsg(uuid=resource_uuid_for("nobody")))
    assert missing.value.code is ErrorCode.RESOURCE_NOT_FOUND


async def test_a_fenced_node_answers_node_fenced_and_touches_nothing(vms: Fakes[VmInstanceService]):
    vm = (await create(vms))["uuid"]
    before = await vms.vm_row(vm)
    vms.fenced.on = True
    with pytest.raises(ZStackError) as err:
        await vms.handle(StopVmInstanceMsg(uuid=vm), timeout=0.3)
    assert err.value.code is ErrorCode.NODE_FENCED
    assert err.value.retryable
    assert [c.op for c in vms.agents.vm_ops(vm)] == ["start"]
    assert await vms.vm_row(vm) == before


async def test_no_capacity_is_refused_and_writes_no_vm(vms: Fakes[VmInstanceService]):
    with pytest.raises(ZStackError) as err:
        await create(vms, "too-big", cpu=9)
    assert err.value.code is ErrorCode.NO_CAPACITY
    assert await vms.vm_row(resource_uuid_for("too-big")) is None
    assert vms.agents.calls == []
    assert vms.bus.events == []


async def test_a_dead_nodes_operation_is_finished_by_the_new_owner_under_its_op_id(vms: Fakes[VmInstanceService]):
    vm = (await create(vms))["uuid"]
    running = await vms.vm_row(vm)
    assert running is not None
    dead_fence = running.version + 1
    async with vms.db.begin() as conn:  # a node no longer in the ring had begun a stop
        await conn.execute(
            update(VmInstance)
            .where(VmInstance.uuid == vm)
            .values(state="Stopping", op_id="stop-by-dead", op_node=DEAD_NODE, version=dead_fence)
        )
    assert await vms.service.reconcile_transient() == 1
    [stop] = [c for c in vms.agents.vm_ops(vm) if c.op == "stop"]
    assert stop.op_id == "stop-by-dead"
    assert stop.fence is not None
    assert stop.fence > dead_fence, "the new owner sent the dead node's fence"
    assert vms.agents.fences[vm] > dead_fence, "the agent would still take the dead node's late call"
    assert vms.agents.effects["stop-by-dead"] == 1
    row = await vms.vm_row(vm)
    assert row is not None
    assert (row.state, row.op_node) == ("Stopped", vms.ctx.node_uuid)


# ---------------------------------------------------------------- the API portal


@pytest.fixture
async def portal() -> AsyncIterator[Fakes[ApiPortal]]:
    async with service_factory(ApiPortal) as f:
        yield f


async def test_the_portal_gives_a_create_the_uuid_of_its_request_and_routes_it(portal: Fakes[ApiPortal]):
    portal.bus.route_to(VmInstanceService(portal.ctx))
    await portal.add_host("h1")
    msg = APICreateVmInstanceMsg(name="api", cpu_num=1, memory_size=GIB)
    body, handled_by = await portal.service.handle(msg, request_id="req-1", keyed=False, timeout=5)
    [sent] = portal.bus.sent_of(CreateVmInstanceMsg)
    assert isinstance(sent, CreateVmInstanceMsg)
    assert sent.uuid == resource_uuid_for("req-1")
    assert body["inventory"]["uuid"] == sent.uuid
    assert body["inventory"]["state"] == "Running"
    assert handled_by == portal.ctx.node_uuid
    query = await portal.service.handle(
        APIQueryVmInstanceMsg(state="Running"), request_id="q-1", keyed=False, timeout=5
    )
    assert [v["uuid"] for v in query[0]["inventories"]] == [sent.uuid]


async def test_the_portal_answers_a_retried_key_with_the_stored_reply(portal: Fakes[ApiPortal]):
    answered: list[AddHostMsg] = []

    async def add_host(msg: Any) -> dict[str, Any]:
        assert isinstance(msg, AddHostMsg)
        answered.append(msg)
        return {"uuid": msg.uuid, "name": msg.name}

    portal.bus.answer(AddHostMsg, add_host)
    msg = APIAddHostMsg(name="h1", agent_url=agent_url_of("h1"))
    first = await portal.service.handle(msg, request_id="key-1", keyed=True, timeout=5)
    again = await portal.service.handle(msg, request_id="key-1", keyed=True, timeout=5)
    assert again == first
    assert len(answered) == 1, "a retry with the same key was sent again"
    other = await portal.service.handle(msg, request_id="key-2", keyed=True, timeout=5)
    assert other[0]["inventory"]["uuid"] != first[0]["inventory"]["uuid"]
    assert len(answered) == 2


async def test_the_portal_passes_a_services_error_on(portal: Fakes[ApiPortal]):
    async def refuse(msg: Any) -> dict[str, Any]:
        raise ZStackError(ErrorCode.DUPLICATE_RESOURCE, "exists")

    portal.bus.answer(AddHostMsg, refuse)
    with pytest.raises(ZStackError) as err:
        await portal.service.handle(
            APIAddHostMsg(name="h1", agent_url=agent_url_of("h1")), request_id="k", keyed=True, timeout=5
        )
    assert err.value.code is ErrorCode.DUPLICATE_RESOURCE


# ---------------------------------------------------------------- the host service (what it owns)


@pytest.fixture
async def hosts() -> AsyncIterator[Fakes[HostService]]:
    async with service_factory(HostService) as f:
        yield f


async def test_add_host_records_the_capacity_its_agent_reports(hosts: Fakes[HostService]):
    hosts.agents.cpu_num, hosts.agents.memory_size = 12, 24 * GIB
    inv = await hosts.handle(AddHostMsg(name="h7", agent_url=agent_url_of("h7") + "/"), msg_id="add-7")
    assert [(c.method, c.agent_url) for c in hosts.agents.calls] == [("connect", agent_url_of("h7"))]
    assert inv["uuid"] == resource_uuid_for("add-7")
    assert (inv["totalCpuCapacity"], inv["totalMemoryCapacity"]) == (12, 24 * GIB)
    assert inv["status"] == "Connected"


async def test_a_host_is_disconnected_after_the_configured_missed_pings(hosts: Fakes[HostService]):
    host = await hosts.add_host("h1")
    hosts.agents.down.add(agent_url_of("h1"))
    misses = hosts.ctx.settings.host_ping_failures
    for _ in range(misses - 1):
        assert (await hosts.handle(PingHostMsg(uuid=host)))["status"] == "Connected"
    assert hosts.bus.events_of(HostStatusChangedEvent) == []
    assert (await hosts.handle(PingHostMsg(uuid=host)))["status"] == "Disconnected"
    [event] = hosts.bus.events_of(HostStatusChangedEvent)
    assert (event.host_uuid, event.old_status, event.new_status) == (host, "Connected", "Disconnected")
    assert len(hosts.agents.calls_of("ping")) == misses


async def test_the_tracker_reads_the_host_table_only_after_a_ring_change_or_every_few_runs(
    hosts: Fakes[HostService],
):
    """What a node reads per tracking period follows its own hosts: the table is paged after a
    ring change (and every OWNED_HOSTS_REREAD_RUNS runs, the safety net), not every period; a host
    added through this node is tracked at once; after a change only the hosts it owns are pinged."""
    from zstack_mn.services.host import OWNED_HOSTS_REREAD_RUNS

    first = {await hosts.add_host(f"h{i}") for i in range(6)}

    def pinged_since(mark: int) -> set[str]:
        return {c.agent_url for c in hosts.agents.calls_of("ping")[mark:]}

    await hosts.service._track_once()
    assert hosts.service.owned.reads == 1
    assert pinged_since(0) == {agent_url_of(f"h{i}") for i in range(6)}

    mark = len(hosts.agents.calls_of("ping"))
    added = await hosts.handle(AddHostMsg(name="h6", agent_url=agent_url_of("h6")), msg_id="add-6")
    await hosts.service._track_once()
    assert hosts.service.owned.reads == 1
    assert agent_url_of("h6") in pinged_since(mark)

    all_hosts = first | {added["uuid"]}
    for i in range(256):  # a second node that takes some of the seven hosts, not none or all
        other = f"00000000-0000-4000-8000-{i:012x}"
        hosts.ring.replace([hosts.ctx.node_uuid, other])
        if 0 < sum(hosts.ring.is_mine(h) for h in all_hosts) < len(all_hosts):
            break
    hosts.service.on_ring_changed()
    mark = len(hosts.agents.calls_of("ping"))
    await hosts.service._track_once()
    assert hosts.service.owned.reads == 2
    names = {uuid: name for name, uuid in hosts.hosts.items()} | {added["uuid"]: "h6"}
    mine = {agent_url_of(names[h]) for h in all_hosts if hosts.ring.is_mine(h)}
    assert 0 < len(mine) < 7
    assert pinged_since(mark) == mine

    hosts.ring.replace([hosts.ctx.node_uuid])
    hosts.service.on_ring_changed()
    await hosts.service._track_once()
    late = await hosts.add_host("h7")  # written by another node while rings disagreed: not seen yet
    mark = len(hosts.agents.calls_of("ping"))
    for _ in range(OWNED_HOSTS_REREAD_RUNS - 1):
        await hosts.service._track_once()
    assert hosts.service.owned.reads == 3
    assert agent_url_of("h7") not in pinged_since(mark)
    mark = len(hosts.agents.calls_of("ping"))
    await hosts.service._track_once()
    assert hosts.service.owned.reads == 4
    assert agent_url_of("h7") in pinged_since(mark)
    assert late in hosts.hosts.values()


async def test_a_host_added_while_the_host_table_is_read_is_tracked(hosts: Fakes[HostService]):
    """An add through this node that lands while the tracker pages the table (after a ring
    change) is kept, even when the pages have passed its uuid."""
    await hosts.add_host("h0")
    repo = hosts.service.owned._hosts
    real_page = repo.page
    added: dict[str, Any] = {}

    async def page_then_add(after: str, limit: int) -> Any:
        rows = await real_page(after, limit)
        if not added:  # the first page is read: now an add arrives, before the read ends
            added.update(await hosts.handle(AddHostMsg(name="h9", agent_url=agent_url_of("h9")), msg_id="add-9"))
        return [r for r in rows if r.uuid != added["uuid"]]  # as if the pages had passed its uuid

    repo.page = page_then_add  # type: ignore[method-assign]  # a page read that an add overtakes
    await hosts.service._track_once()
    repo.page = real_page  # type: ignore[method-assign]  # restored
    assert added
    assert agent_url_of("h9") in {c.agent_url for c in hosts.agents.calls_of("ping")}
