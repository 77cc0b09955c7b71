"""Every API over both client transports (HTTP with fail-over, AMQP via api.portal) against three
real nodes on RabbitMQ and PostgreSQL; poison bytes on the API queue and a service queue."""

from __future__ import annotations

import asyncio
import signal
import uuid

import httpx
import pytest

from tests.cluster_helpers import until_answered
from zstack_mn.agent.protocol import AgentFault
from zstack_mn.bus.amqp import AmqpTransport
from zstack_mn.bus.topology import Topology
from zstack_mn.bus.transport import Delivery, QueueKind
from zstack_mn.client import Client
from zstack_mn.cluster.ring import HashRing
from zstack_mn.messages import ErrorCode, ZStackError, decode
from zstack_mn.messages.api import APIChangeHostStateMsg, APIDeleteHostMsg, APIReconnectHostMsg
from zstack_mn.testing.cluster import ClusterHarness, agent_stats, set_agent_faults

pytestmark = [pytest.mark.integration, pytest.mark.cluster, pytest.mark.timeout(300)]


@pytest.fixture
async def cluster(harness: ClusterHarness) -> ClusterHarness:
    await harness.wait_rings_agree(await harness.start_nodes(3), 10)
    await harness.start_agent()
    return harness


async def exercise_every_api(client: Client, agent: str, tag: str) -> dict[str, str]:
    """Every API once; returns, per VM, the node that handled its stop (X-Handled-By / handledBy)."""
    handled: dict[str, str] = {}
    h1 = await client.add_host(f"{tag}-h1", f"{agent}/hosts/{tag}-1")
    h2 = await client.add_host(f"{tag}-h2", f"{agent}/hosts/{tag}-2")
    assert h1["status"] == "Connected"
    assert h1["totalCpuCapacity"] == 64
    vms = [
        await client.create_vm(f"{tag}-vm{i}", cpu_num=1, memory_size="256M", host_uuid=h1["uuid"]) for i in range(6)
    ]
    for vm in vms:
        assert vm["state"] == "Running"
        assert vm["hostUuid"] == h1["uuid"]
        assert (await client.stop_vm(vm["uuid"]))["state"] == "Stopped"
        handled[vm["uuid"]] = client.last_handled_by or ""
        assert (await client.start_vm(vm["uuid"]))["state"] == "Running"
        assert (await client.reboot_vm(vm["uuid"]))["state"] == "Running"
        moved = await client.migrate_vm(vm["uuid"], h2["uuid"])
        assert moved["hostUuid"] == h2["uuid"]
        assert moved["lastHostUuid"] == h1["uuid"]
    with pytest.raises(ZStackError) as err:
        await client.send(APIDeleteHostMsg(uuid=h2["uuid"]))
    assert err.value.code is ErrorCode.HOST_IN_USE
    for vm in vms:
        assert (await client.destroy_vm(vm["uuid"]))["state"] == "Destroyed"
    disabled = await client.send(APIChangeHostStateMsg(uuid=h1["uuid"], state_event="disable"))
    assert disabled["inventory"]["state"] == "Disabled"
    with pytest.raises(ZStackError) as err:
        await client.create_vm(f"{tag}-nope", cpu_num=1, memory_size="1M", host_uuid=h1["uuid"])
    assert err.value.code is ErrorCode.NO_CAPACITY
    reconnected = await client.send(APIReconnectHostMsg(uuid=h1["uuid"]))
    assert reconnected["inventory"]["status"] == "Connected"
    page = await client.query_vms(name=f"{tag}-vm0", reply_with_count=True)
    assert page["total"] == 1
    assert page["inventories"][0]["state"] == "Destroyed"
    nodes = await client.management_nodes()
    assert nodes["total"] == 3
    assert abs(sum(n["ringShare"] for n in nodes["inventories"]) - 1.0) < 0.01
    return handled


def assert_handled_by_owners(cluster: ClusterHarness, handled: dict[str, str]) -> None:
    """Each VM's operation ran on the node the ring names as its owner, whichever node took the call."""
    ring = HashRing({n.uuid for n in cluster.nodes})
    assert handled
    assert all(node == ring.owner_of(vm) for vm, node in handled.items()), handled


async def test_every_api_over_http_with_several_urls(cluster: ClusterHarness):
    assert cluster.agent is not None
    async with cluster.client(cluster.urls()) as client:
        handled = await exercise_every_api(client, cluster.agent.url, "http")
    assert_handled_by_owners(cluster, handled)


async def test_every_api_over_amqp(cluster: ClusterHarness):
    assert cluster.agent is not None
    client = await cluster.amqp_client()
    try:
        handled = await exercise_every_api(client, cluster.agent.url, "amqp")
    finally:
        await client.close()
    assert_handled_by_owners(cluster, handled)


async def test_a_job_whose_node_is_killed_is_finished_by_a_poll_on_another_node(cluster: ClusterHarness):
    """A stop answered with a job (Prefer: respond-async) on node 0, node 0 killed at once: a poll
    on node 1 takes the job over and answers the stop's outcome, applied once on the agent."""
    assert cluster.agent is not None
    async with cluster.client(cluster.urls()) as client:
        host = await client.add_host("jobs-h", f"{cluster.agent.url}/hosts/jobs-1")
        vm = await client.create_vm("jobs-vm", cpu_num=1, memory_size="64M", host_uuid=host["uuid"])
    await set_agent_faults(cluster.agent.url, [AgentFault(op="stop", latency=2.0)])
    effects_before = len((await agent_stats(cluster.agent.url))["effects"])
    accepting, poller = cluster.nodes[0], cluster.nodes[1]
    headers = await cluster.auth_headers()
    async with httpx.AsyncClient(headers=headers, timeout=30) as http:
        resp = await http.put(
            f"{accepting.url}/v1/vm-instances/{vm['uuid']}/actions",
            json={"stopVmInstance": {}},
            headers={"Prefer": "respond-async"},
        )
        assert resp.status_code == 202, resp.text
        accepting.signal(signal.SIGKILL)
        _, done = await until_answered(http, poller.url + resp.headers["Location"])
    assert done.status_code == 200, done.text
    assert done.json()["inventory"]["state"] == "Stopped"
    stats = await agent_stats(cluster.agent.url)
    assert stats["vms"][vm["uuid"]]["state"] == "Stopped"
    assert len(stats["effects"]) == effects_before + 1, "the stop was applied under more than one operation id"


async def test_http_client_fails_over_to_a_live_node(cluster: ClusterHarness):
    dead = "http://127.0.0.1:1"
    async with cluster.client([dead, *cluster.urls()]) as client:
        assert (await client.management_nodes())["total"] == 3


async def test_poison_on_the_api_and_a_service_queue(cluster: ClusterHarness):
    topology = Topology(cluster.queue_prefix)
    t = AmqpTransport(cluster.amqp_url, topology, publish_timeout=5, connection_name="poison")
    await t.start()
    replies: asyncio.Queue[Delivery] = asyncio.Queue()
    reply_q = topology.reply_queue(f"poison-{uuid.uuid4()}")
    await t.declare(reply_q, QueueKind.PRIVATE)
    await t.consume(reply_q, replies.put, prefetch=10)
    node = cluster.nodes[0].uuid
    try:
        bodies = [
            b"\xff\xfe not json",
            b'{"id": "1", "type": "APINoSuchMsg", "service": "api"}',
            b'{"id": "2", "type": "APIStartVmInstanceMsg", "service": "api", "body": {"uuid": 7}}',
            b"{" + b" " * (2 << 20) + b"}",
        ]
        for queue in (topology.api_queue, topology.service_queue("vmInstance", node)):
            for i, body in enumerate(bodies):
                corr = f"{queue}-{i}"
                await t.publish(queue, body, message_id=corr, correlation_id=corr, reply_to=reply_q)
                reply = decode((await asyncio.wait_for(replies.get(), 10)).body, 1 << 20)
                assert reply.ok is False
                assert reply.error is not None
                assert reply.correlation_id == corr
        dead = 0
        while (got := await t.take(topology.dead_letter_queue)) is not None:
            await got[1]()
            dead += 1
        assert dead == 2 * len(bodies)
    finally:
        await t.close()
    async with httpx.AsyncClient() as http:
        for n in cluster.nodes:
            assert (await http.get(n.url + "/readyz")).json()["ready"] is True


async def test_api_portal_refuses_a_message_without_a_live_session(cluster: ClusterHarness):
    """Published straight onto ``api.portal`` over the real broker: no session, a made-up one or a
    malformed one is answered with ZStack's invalid-session error, and nothing is created."""
    for session in ("", "0" * 32, "not-a-session"):
        client = await cluster.amqp_client(session=session, timeout=10)
        try:
            with pytest.raises(ZStackError) as err:
                await client.create_vm(f"no-session-{session[:4]}", cpu_num=1, memory_size="64M")
            assert err.value.code is ErrorCode.INVALID_SESSION, session
        finally:
            await client.close()
    async with cluster.client() as client:
        for session in ("", "0" * 32, "not-a-session"):
            assert (await client.query_vms(name=f"no-session-{session[:4]}"))["inventories"] == []


async def test_read_endpoints_metrics_and_openapi_on_every_node(cluster: ClusterHarness):
    assert cluster.agent is not None
    async with cluster.client(cluster.urls()) as client:
        host = await client.add_host("read-h", f"{cluster.agent.url}/hosts/read-1")
        vm = await client.create_vm("read-vm", cpu_num=1, memory_size="64M")
        session = await client.login()
    async with httpx.AsyncClient(timeout=10, headers={"Authorization": f"OAuth {session}"}) as http:
        for node in cluster.nodes:
            got_vm = await http.get(f"{node.url}/v1/vm-instances/{vm['uuid']}")
            assert got_vm.status_code == 200
            assert got_vm.json()["inventory"]["uuid"] == vm["uuid"]
            got_host = await http.get(f"{node.url}/v1/hosts/{host['uuid']}")
            assert got_host.status_code == 200
            assert got_host.json()["inventory"]["name"] == "read-h"
            missing = await http.get(f"{node.url}/v1/hosts/{uuid.uuid4()}")
            assert missing.status_code == 404
            assert missing.json()["error"]["code"] == ErrorCode.RESOURCE_NOT_FOUND.value
            metrics = (await http.get(f"{node.url}/metrics")).text
            assert "zstack_ring_nodes 3.0" in metrics
            assert "zstack_heartbeat_age_seconds" in metrics
            spec = (await http.get(f"{node.url}/openapi.json")).json()
            assert {"/v1/vm-instances", "/v1/vm-instances/{uuid}/actions", "/v1/hosts", "/v1/management-nodes"} <= set(
                spec["paths"]
            )
            assert "APICreateVmInstanceMsg" in spec["components"]["schemas"]
            assert (await http.get(f"{node.url}/docs")).status_code == 200
