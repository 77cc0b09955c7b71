"""ZStack's own API on three real nodes (RabbitMQ, PostgreSQL): the ZStack-style clients of
``tests/zstack_sdk.py`` run a VM's lifecycle over REST and RPC, a job accepted by one node is
answered by the others, and a job whose node is killed mid-operation is finished by another."""

from __future__ import annotations

import signal
import uuid

import httpx
import pytest

from tests.zstack_scenarios import HEX32, MB, NOTHING, rest_lifecycle, rpc_lifecycle
from tests.zstack_sdk import RestClient, RpcClient
from zstack_mn.agent.protocol import AgentFault
from zstack_mn.cluster.ring import HashRing
from zstack_mn.messages.ids import resource_uuid_for
from zstack_mn.testing.cluster import ClusterHarness, Proc, agent_in_flight, agent_stats, set_agent_faults
from zstack_mn.web.zstack.jobs import request_id_of

pytestmark = [pytest.mark.integration, pytest.mark.cluster, pytest.mark.timeout(300)]

ADMIN_PASSWORD = "not-zstacks-default"


@pytest.fixture
async def zstack_cluster(harness: ClusterHarness) -> tuple[ClusterHarness, str, list[Proc]]:
    agent = await harness.start_agent()
    harness.extra_env.update(
        ZSTACK_MN_ADMIN_PASSWORD=ADMIN_PASSWORD, ZSTACK_MN_KVM_AGENT_URL=f"{agent}/hosts/{{managementIp}}"
    )
    nodes = await harness.start_nodes(3)
    await harness.wait_rings_agree(nodes, 10)
    return harness, agent, nodes


async def test_zstack_clients_drive_three_nodes(zstack_cluster: tuple[ClusterHarness, str, list[Proc]]) -> None:
    _, _, nodes = zstack_cluster
    rest, rpc, other = RestClient(nodes[0].url), RpcClient(nodes[1].url), RestClient(nodes[2].url)
    try:
        refused = await rest.call("LogInByAccount", accountName="admin", password="0" * 128)
        assert refused.error is not None
        assert '"ID.1000"' in refused.error["details"]
        await rest_lifecycle(rest, "rest", password=ADMIN_PASSWORD)
        await rpc_lifecycle(rpc, "rpc", password=ADMIN_PASSWORD)

        # a session opened on one node is valid on every node; a job accepted by one is answered by all
        await rest.login(password=ADMIN_PASSWORD)
        other.session_id = rest.session_id
        nodes_seen = (await other.query("QueryManagementNode")).unwrap()["inventories"]
        assert sorted(n["uuid"] for n in nodes_seen) == sorted(p.uuid.replace("-", "") for p in nodes)
        host = (await rest.call("AddKVMHost", name="x-h", managementIp="10.5.0.1", username="u", password="p")).unwrap()
        job = uuid.uuid4().hex
        first = await rest.send(
            "CreateVmInstance",
            job_uuid=job,
            name="x-vm",
            cpuNum=1,
            memorySize=MB,
            hostUuid=host["inventory"]["uuid"],
            **NOTHING,
        )
        assert first.status_code == 202
        assert first.json()["location"].endswith(f"/zstack/v1/api-jobs/{job}")
        done = (await other.poll(f"{nodes[2].url}/zstack/v1/api-jobs/{job}")).unwrap()
        assert HEX32.match(done["inventory"]["uuid"])
        assert done["inventory"]["state"] == "Running"
        async with httpx.AsyncClient(timeout=10) as h:
            via_rpc = (await h.get(f"{nodes[1].url}/zstack/api/result/{job}")).json()
        assert via_rpc["state"] == "Done"
        assert '"success":true' in via_rpc["result"]
    finally:
        for c in (rest, rpc, other):
            await c.close()


def _job_for_a_vm_owned_by(node: Proc, ring: HashRing) -> str:
    """A job uuid whose create gives a VM that ``node`` owns (the VM's uuid derives from it)."""
    while True:
        job = uuid.uuid4().hex
        if ring.owner_of(resource_uuid_for(request_id_of(job))) == node.uuid:
            return job


async def test_a_job_whose_node_is_killed_mid_operation_is_finished_by_another_node(
    zstack_cluster: tuple[ClusterHarness, str, list[Proc]],
) -> None:
    harness, agent, nodes = zstack_cluster
    victim, survivor = nodes[0], nodes[1]
    ring = HashRing({n.uuid for n in nodes})
    c = RestClient(victim.url, polling_timeout=90)
    s = RestClient(survivor.url, polling_timeout=90)
    try:
        await c.login(password=ADMIN_PASSWORD)
        s.session_id = c.session_id
        host = (await c.call("AddKVMHost", name="k-h", managementIp="10.6.0.1", username="u", password="p")).unwrap()
        created = await c.call(
            "CreateVmInstance",
            job_uuid=_job_for_a_vm_owned_by(victim, ring),
            name="k-vm",
            cpuNum=1,
            memorySize=MB,
            hostUuid=host["inventory"]["uuid"],
            **NOTHING,
        )
        vm = created.unwrap()["inventory"]["uuid"]
        await set_agent_faults(agent, [AgentFault(host_id="10.6.0.1", op="stop", latency=3.0)])
        first = await c.send("StopVmInstance", uuid=vm)
        assert first.status_code == 202
        location = first.json()["location"]

        async def victim_stop_at_agent() -> bool:
            return await agent_in_flight(agent, victim.uuid) > 0

        await harness.wait_until(victim_stop_at_agent, 10, "the victim's stop reaches the agent")
        victim.signal(signal.SIGKILL)
        result = await s.poll(location.replace(victim.url, survivor.url))
        assert result.unwrap()["inventory"]["state"] == "Stopped"
        assert result.polls >= 2, "the job was still running when the survivor was first asked"
        stats = await agent_stats(agent)
        assert stats["vms"][str(uuid.UUID(vm))]["state"] == "Stopped"
        assert max(stats["effects"].values()) == 1, "an operation was applied twice on the agent"
    finally:
        await c.close()
        await s.close()
