"""The simulated agent's guarantees the fault checker and the take-over rely on: one effect per
op id, fencing of a replaced owner (on arrival and at the commit point), the fence raise a new
owner sends first, changes made behind the nodes' back, and an audit of who worked on which VM
when. The agent client is tested against the same app served over real HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from zstack_mn.agent.client import NODE_HEADER, AgentClient
from zstack_mn.agent.protocol import AgentFault, FenceReply, VmOp
from zstack_mn.agent.simulator import SimulatedAgent, create_app
from zstack_mn.messages import ErrorCode, ZStackError
from zstack_mn.testing.cluster import free_port
from zstack_mn.web.server import EmbeddedServer

LATENCY = 0.4


@pytest.fixture
async def agent():
    sim = SimulatedAgent()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(sim)), base_url="http://agent") as http:
        yield sim, http


async def start(
    http: httpx.AsyncClient, op_id: str, fence: int, node: str, vm: str = "vm-1", host: str = "h1"
) -> httpx.Response:
    return await http.post(
        f"/hosts/{host}/vms/{vm}/start", json={"opId": op_id, "fence": fence}, headers={NODE_HEADER: node}
    )


async def fence(
    http: httpx.AsyncClient, value: int, op_id: str | None = None, vm: str = "vm-1", node: str = "new-owner"
) -> httpx.Response:
    body: dict[str, object] = {"fence": value}
    if op_id is not None:
        body["opId"] = op_id
    return await http.post(f"/hosts/h1/vms/{vm}/fence", json=body, headers={NODE_HEADER: node})


async def until_in_flight(sim: SimulatedAgent, op_id: str, *, committed: bool) -> None:
    """Wait until the agent holds a request for ``op_id`` in flight (past its commit point or not)."""

    def held() -> bool:
        return any(e.op_id == op_id and e.committed is committed for es in sim._in_flight.values() for e in es)

    async with asyncio.timeout(5):
        while not held():  # noqa: ASYNC110 - the simulator has no event for it
            await asyncio.sleep(0.01)


async def test_an_op_id_is_applied_once(agent):
    sim, http = agent
    assert (await start(http, "op-1", 1, "n1")).json()["state"] == "Running"
    assert (await start(http, "op-1", 1, "n2")).json()["state"] == "Running"
    assert sim.effects == {"op-1": 1}
    assert sim.duplicates == 1
    assert (await http.get("/hosts/h1/ops/op-1")).json()["state"] == "applied"
    assert (await http.get("/hosts/h1/ops/op-2")).json()["state"] == "unknown"


async def test_a_lower_fence_is_refused_and_audited_as_refused(agent):
    sim, http = agent
    assert (await start(http, "op-1", 5, "new-owner")).status_code == 200
    late = await start(http, "op-2", 4, "old-owner")
    assert late.status_code == 409
    assert "stale fence" in late.json()["detail"]
    assert "op-2" not in sim.effects
    audit = (await http.get("/admin/audit")).json()["entries"]
    assert [(e["node"], e["outcome"]) for e in audit] == [
        ("new-owner", "Running"),
        ("old-owner", "rejected:stale-fence"),
    ]


async def test_a_fence_raise_refuses_every_later_op_with_a_lower_fence(agent):
    sim, http = agent
    assert (await fence(http, 7)).status_code == 200
    late = await start(http, "op-old", 6, "old-owner")
    assert late.status_code == 409
    assert "stale fence" in late.json()["detail"]
    assert sim.effects == {}
    assert (await start(http, "op-new", 7, "new-owner")).json()["state"] == "Running"
    assert sim.effects == {"op-new": 1}
    assert (await fence(http, 3, vm="vm-2")).status_code == 200, "fences are per VM"
    assert (await start(http, "op-other", 3, "n1", vm="vm-2")).status_code == 200


async def test_raising_to_a_lower_fence_is_refused_and_to_the_same_one_accepted(agent):
    sim, http = agent
    assert (await fence(http, 5)).status_code == 200
    lower = await fence(http, 4, node="old-owner")
    assert lower.status_code == 409
    assert "stale fence 4" in lower.json()["detail"]
    assert sim.fences["vm-1"] == 5
    assert (await fence(http, 5)).status_code == 200
    assert (await start(http, "op-1", 9, "n2")).status_code == 200
    assert (await fence(http, 8)).status_code == 409, "an operation's fence counts as seen too"
    assert [c.kind for c in sim.control] == ["fence", "fence"], "refused raises change nothing"


async def test_the_fence_reply_reports_an_applied_op_and_the_vms_state(agent):
    sim, http = agent
    assert (await start(http, "op-1", 1, "old-owner")).status_code == 200
    reply = FenceReply.model_validate((await fence(http, 2, "op-1")).json())
    assert reply == FenceReply(
        vm_uuid="vm-1", fence=2, op_id="op-1", op_state="applied", vm_state="Running", host_id="h1"
    )
    unknown = FenceReply.model_validate((await fence(http, 2, "op-never-sent")).json())
    assert unknown.op_state == "unknown"
    assert unknown.in_flight == []
    assert unknown.fenced_out == []
    bare = FenceReply.model_validate((await fence(http, 3, vm="vm-absent")).json())
    assert (bare.op_id, bare.op_state, bare.vm_state, bare.host_id) == (None, None, None, None)
    assert sim.effects == {"op-1": 1}


async def test_an_op_admitted_before_the_raise_but_still_in_its_latency_is_cut_off(agent):
    """Admitted (fence checked on arrival), then waiting in the injected latency when the new
    owner raises the fence: the reply says the op id is not applied and nothing sent so far can
    apply it (unknown, listed as fenced out), and the late request is refused at its commit point."""
    sim, http = agent
    sim.faults = [AgentFault(op="start", latency=LATENCY)]
    late = asyncio.create_task(start(http, "op-1", 1, "old-owner"))
    await until_in_flight(sim, "op-1", committed=False)
    assert (await http.get("/hosts/h1/ops/op-1")).json()["state"] == "in_flight"
    reply = FenceReply.model_validate((await fence(http, 2, "op-1")).json())
    assert reply.op_state == "unknown"
    assert reply.fenced_out == ["op-1"]
    assert reply.in_flight == []
    assert reply.vm_state is None
    assert (await http.get("/hosts/h1/ops/op-1")).json()["state"] == "unknown"
    refused = await late
    assert refused.status_code == 409
    assert "stale fence" in refused.json()["detail"]
    assert sim.effects == {}
    assert sim.locate("vm-1") is None
    sim.faults = []
    assert (await start(http, "op-1", 2, "new-owner")).json()["state"] == "Running"
    assert sim.effects == {"op-1": 1}
    assert sim.duplicates == 0
    audit = (await http.get("/admin/audit")).json()["entries"]
    assert [(e["node"], e["outcome"], e["overlapped_with"]) for e in audit] == [
        ("old-owner", "rejected:stale-fence", []),
        ("new-owner", "Running", []),
    ]


async def test_a_newer_owners_op_cuts_off_an_older_admitted_one_without_overlap(agent):
    """No fence raise: the new owner's operation (higher fence) arrives while the old owner's is
    in its latency. The old one is refused at its commit point and is not counted as overlapping."""
    sim, http = agent
    sim.faults = [AgentFault(op="start", latency=LATENCY)]
    old = asyncio.create_task(start(http, "op-1", 1, "old-owner"))
    await until_in_flight(sim, "op-1", committed=False)
    new = await start(http, "op-1", 2, "new-owner")
    assert new.json()["state"] == "Running"
    assert (await old).status_code == 409
    assert sim.effects == {"op-1": 1}
    assert [(e.node, e.outcome, e.overlapped_with) for e in sim.audit] == [
        ("old-owner", "rejected:stale-fence", []),
        ("new-owner", "Running", []),
    ]


async def test_a_committed_op_is_reported_in_flight_and_finishes(agent):
    """Past its commit point (``applyLatency``) an operation finishes whatever the fence: the
    raise reports it in flight, and the new owner polls until it is applied."""
    sim, http = agent
    sim.faults = [AgentFault(op="start", apply_latency=LATENCY)]
    committed = asyncio.create_task(start(http, "op-1", 1, "old-owner"))
    await until_in_flight(sim, "op-1", committed=True)
    reply = FenceReply.model_validate((await fence(http, 2, "op-1")).json())
    assert reply.op_state == "in_flight"
    assert reply.in_flight == ["op-1"]
    assert reply.fenced_out == []
    assert (await committed).json()["state"] == "Running"
    again = FenceReply.model_validate((await fence(http, 2, "op-1")).json())
    assert (again.op_state, again.in_flight, again.vm_state, again.host_id) == ("applied", [], "Running", "h1")
    assert sim.effects == {"op-1": 1}


async def test_an_op_carrying_the_new_fence_is_in_flight_not_cut_off(agent):
    sim, http = agent
    sim.faults = [AgentFault(op="start", latency=LATENCY)]
    own = asyncio.create_task(start(http, "op-1", 3, "new-owner"))
    await until_in_flight(sim, "op-1", committed=False)
    reply = FenceReply.model_validate((await fence(http, 3, "op-1")).json())
    assert (reply.op_state, reply.in_flight, reply.fenced_out) == ("in_flight", ["op-1"], [])
    assert (await own).json()["state"] == "Running"
    assert sim.effects == {"op-1": 1}


async def test_changes_behind_the_nodes_back_are_audited_apart(agent):
    sim, http = agent
    placed = await http.put("/admin/vms/vm-9", json={"hostId": "h2", "state": "Running"})
    assert placed.json() == {"uuid": "vm-9", "state": "Running"}
    assert (await http.get("/hosts/h2/vms")).json() == {"vms": [{"uuid": "vm-9", "state": "Running"}]}
    await http.put("/admin/vms/vm-9", json={"hostId": "h3", "state": "Stopped"})
    assert (await http.get("/hosts/h2/vms")).json() == {"vms": []}
    assert (await http.get("/hosts/h3/vms")).json() == {"vms": [{"uuid": "vm-9", "state": "Stopped"}]}
    assert (await http.delete("/admin/vms/vm-9")).status_code == 200
    assert (await http.get("/hosts/h3/vms")).json() == {"vms": []}
    assert (await http.delete("/admin/vms/vm-9")).status_code == 404
    assert (await http.put("/admin/vms/vm-9", json={"hostId": "h3", "state": "Paused"})).status_code == 422
    assert (sim.effects, sim.duplicates, len(sim.audit)) == ({}, 0, 0)
    control = (await http.get("/admin/audit")).json()["control"]
    assert [(c["vm"], c["kind"], c["detail"]) for c in control] == [
        ("vm-9", "out-of-band:set", {"hostId": "h2", "state": "Running"}),
        ("vm-9", "out-of-band:set", {"hostId": "h3", "state": "Stopped", "fromHostId": "h2"}),
        ("vm-9", "out-of-band:remove", {"fromHostId": "h3", "state": "Stopped"}),
    ]


@pytest.fixture
async def served() -> AsyncIterator[tuple[SimulatedAgent, str]]:
    sim = SimulatedAgent()
    server = EmbeddedServer(create_app(sim), "127.0.0.1", 0)
    await server.start()
    try:
        yield sim, server.url
    finally:
        await server.stop()


async def test_agent_client_raises_a_fence_and_parses_the_reply(served):
    sim, url = served
    client = AgentClient(5.0, "n-new")
    try:
        await client.vm_op(f"{url}/hosts/h1", "vm-1", "start", VmOp(op_id="op-1", fence=1))
        reply = await client.raise_fence(f"{url}/hosts/h1", "vm-1", 4, "op-1")
        assert reply == FenceReply(
            vm_uuid="vm-1", fence=4, op_id="op-1", op_state="applied", vm_state="Running", host_id="h1"
        )
        assert sim.fences["vm-1"] == 4
        assert sim.control[-1].node == "n-new"
        bare = await client.raise_fence(f"{url}/hosts/h1", "vm-2", 1)
        assert (bare.op_id, bare.op_state, bare.vm_state) == (None, None, None)
        with pytest.raises(ZStackError) as lower:
            await client.raise_fence(f"{url}/hosts/h1", "vm-1", 3, "op-1")
        assert lower.value.code is ErrorCode.AGENT_ERROR
        assert lower.value.details["status"] == 409
        assert "stale fence 3" in lower.value.description
        sim.faults = [AgentFault(op="fence", down=True)]
        with pytest.raises(ZStackError) as down:
            await client.raise_fence(f"{url}/hosts/h1", "vm-1", 5)
        assert down.value.code is ErrorCode.AGENT_UNREACHABLE
        assert sim.fences["vm-1"] == 4
    finally:
        await client.close()
    closed = AgentClient(2.0)
    try:
        with pytest.raises(ZStackError) as unreachable:
            await closed.raise_fence(f"http://127.0.0.1:{free_port()}/hosts/h1", "vm-1", 1)
        assert unreachable.value.code is ErrorCode.AGENT_UNREACHABLE
    finally:
        await closed.close()


async def test_agent_client_fence_raise_takes_no_vm_operation_slot(served):
    """With the only VM-operation slot held by a slow operation, a fence raise still goes out
    at once (it is a control call), and cuts the slow operation off."""
    sim, url = served
    sim.faults = [AgentFault(op="start", latency=1.0)]
    client = AgentClient(5.0, "n1", max_connections=1, pool_timeout=0.2)
    try:
        slow = asyncio.create_task(client.vm_op(f"{url}/hosts/h1", "vm-1", "start", VmOp(op_id="op-1", fence=1)))
        await until_in_flight(sim, "op-1", committed=False)
        reply = await client.raise_fence(f"{url}/hosts/h1", "vm-1", 2, "op-1")
        assert (reply.op_state, reply.fenced_out) == ("unknown", ["op-1"])
        with pytest.raises(ZStackError) as refused:
            await slow
        assert refused.value.details["status"] == 409
    finally:
        await client.close()


async def test_agent_client_lists_a_vm_changed_behind_the_nodes_back(served):
    sim, url = served
    client = AgentClient(5.0)
    try:
        async with httpx.AsyncClient(base_url=url) as admin:
            (await admin.put("/admin/vms/vm-7", json={"hostId": "h4", "state": "Running"})).raise_for_status()
            assert [(v.uuid, v.state) for v in (await client.list_vms(f"{url}/hosts/h4")).vms] == [("vm-7", "Running")]
            (await admin.put("/admin/vms/vm-7", json={"hostId": "h5", "state": "Stopped"})).raise_for_status()
            assert (await client.list_vms(f"{url}/hosts/h4")).vms == []
            assert [(v.uuid, v.state) for v in (await client.list_vms(f"{url}/hosts/h5")).vms] == [("vm-7", "Stopped")]
            (await admin.delete("/admin/vms/vm-7")).raise_for_status()
            assert (await client.list_vms(f"{url}/hosts/h5")).vms == []
        assert sim.effects == {}
    finally:
        await client.close()
