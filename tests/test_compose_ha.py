"""docker-compose.yml with docker-compose.ha.yml on a real Docker engine: the HA topology.

Three RabbitMQ members in one cluster with quorum queues, a PostgreSQL primary with a synchronous
streaming standby, three management nodes given every member and both servers. The stack comes up
under a project name of its own with every published port on a free port of 127.0.0.1 (stand-in
images as in tests/test_compose.py). Checked: the cluster, the queue types, the synchronous
standby, the VM lifecycle through each node; then, under a stop/start load, ``docker kill`` of the
RabbitMQ member leading ``api.portal`` and a database fail-over (``docker kill`` of the primary,
``pg_ctl promote`` of the standby): after each, every VM has two operations acknowledged, no call
failed, and after both the three nodes still run. The time from each fault until every VM was
served again is printed. ``docker-compose down -v`` removes everything, whatever happened.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.compose.load import Churned, check_nothing_lost, churn, until_served_again
from tests.compose.stack import (
    COMPOSE_FILE,
    NODES,
    REPO,
    Stack,
    run,
    running_stack,
)
from zstack_mn.client import Client

pytestmark = [pytest.mark.compose, pytest.mark.timeout(300)]

HA_FILE = REPO / "docker-compose.ha.yml"
MEMBERS = ("rabbitmq", "rabbitmq2", "rabbitmq3")
HA_SERVICES = (*MEMBERS, "postgres", "postgres-standby", "migrate", *NODES, "agent")
UNPUBLISHED = ("rabbitmq2", "rabbitmq3", "postgres-standby")
PGDATA = "/var/lib/postgresql/data"  # the same in the official image and the stand-in
API_QUEUE = "zstack.message.api.portal"  # zstack_mn/bus/topology.py, default prefix
AGENT = "http://agent:9100"
ADMIN_PASSWORD = "zstack"
HEALTHY_WITHIN = 240.0
SERVED_AGAIN_WITHIN = 90.0
LOAD_VMS = 24


@pytest.fixture(scope="module")
def ha(standin_images: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The HA stack, built and healthy; removed with its volumes at the end of the module."""
    with running_stack(
        "ha",
        standin_images,
        tmp_path_factory.mktemp("compose-ha"),
        files=(COMPOSE_FILE, HA_FILE),
        services=HA_SERVICES,
        healthy_within=HEALTHY_WITHIN,
    ) as s:
        yield s


def _exec(stack: Stack, service: str, *argv: str, user: str | None = None, timeout: float = 60) -> str:
    """``docker exec`` in the service's container; its standard output (a failure fails the test)."""
    as_user = ["-u", user] if user else []
    done = run(["docker", "exec", *as_user, stack.container(service), *argv], timeout=timeout)
    assert done.returncode == 0, f"{service}: {' '.join(argv)} exited {done.returncode}: {done.stderr[-2000:]}"
    return done.stdout


def _rabbit_json(stack: Stack, member: str, *args: str) -> Any:
    """A ``rabbitmqctl`` command's JSON answer, asked of ``member``."""
    return json.loads(_exec(stack, member, "rabbitmqctl", "-q", *args, "--formatter", "json"))


def _queues(stack: Stack, member: str) -> dict[str, dict[str, Any]]:
    listed = _rabbit_json(stack, member, "list_queues", "name", "type", "leader", "members")
    return {q["name"]: q for q in listed}


def _sql(stack: Stack, service: str, sql: str) -> str:
    """One query through ``psql`` in the service's container (unix socket, role zstack); its rows."""
    return _exec(stack, service, "psql", "--no-psqlrc", "-U", "zstack", "-d", "zstack", "-Atc", sql).strip()


def _kill(stack: Stack, service: str) -> float:
    """``docker kill`` of the service's container; the monotonic time just before it."""
    at = time.monotonic()
    done = run(["docker", "kill", stack.container(service)], timeout=30)
    assert done.returncode == 0, done.stderr
    return at


def _status_inside(stack: Stack, node: str) -> dict[str, Any]:
    """``zstack-mn status --json`` in a node's container, over the node's own database URL (both
    servers, the writable one found)."""
    report: dict[str, Any] = json.loads(_exec(stack, node, "zstack-mn", "status", "--json"))
    return report


def test_every_service_healthy_and_only_loopback_published(ha: Stack) -> None:
    for service in (s for s in HA_SERVICES if s != "migrate"):
        info = ha.inspect(service)
        assert info["State"]["Health"]["Status"] == "healthy", service
        bindings = [b for spec in (info["HostConfig"]["PortBindings"] or {}).values() for b in spec]
        if service in UNPUBLISHED:
            assert bindings == [], (service, bindings)
        else:
            assert bindings, f"{service} publishes nothing"
            assert {b["HostIp"] for b in bindings} == {"127.0.0.1"}, (service, bindings)
    assert ha.inspect("migrate")["State"]["ExitCode"] == 0


def test_three_rabbitmq_members_form_one_cluster(ha: Stack) -> None:
    expected = {f"rabbit@{m}" for m in MEMBERS}
    for member in MEMBERS:
        status = _rabbit_json(ha, member, "cluster_status")
        assert set(status["running_nodes"]) == expected, (member, status["running_nodes"])
        assert set(status["disk_nodes"]) == expected, (member, status["disk_nodes"])


def test_durable_queues_are_quorum_queues_on_every_member(ha: Stack) -> None:
    queues = _queues(ha, "rabbitmq2")
    durable = {n: q for n, q in queues.items() if n.startswith("zstack.message.") or n == "zstack.dead-letter"}
    assert API_QUEUE in durable
    assert len(durable) >= 1 + 1 + 2 * len(NODES), sorted(durable)  # portal, dead letters, vmInstance and host
    for name, q in durable.items():
        assert q["type"] == "quorum", (name, q["type"])
        assert set(q["members"]) == {f"rabbit@{m}" for m in MEMBERS}, (name, q["members"])
    transient = {n: q["type"] for n, q in queues.items() if n.startswith(("zstack.reply.", "zstack.event."))}
    assert transient
    assert set(transient.values()) == {"classic"}, transient


def test_standby_streams_synchronously(ha: Stack) -> None:
    rows = _sql(ha, "postgres", "select application_name, state, sync_state from pg_stat_replication")
    assert rows == "standby|streaming|sync", rows
    assert _sql(ha, "postgres-standby", "select pg_is_in_recovery()") == "t"


async def test_vm_lifecycle_through_every_node(ha: Stack) -> None:
    async with Client.http(ha.urls, password=ADMIN_PASSWORD) as client:
        host = await client.add_host("ha-h1", f"{AGENT}/hosts/ha-h1")
    assert host["status"] == "Connected"
    for node in NODES:
        async with Client.http(ha.url(node), password=ADMIN_PASSWORD) as client:
            vm = await client.create_vm(f"ha-{node}", cpu_num=1, memory_size="64M", host_uuid=host["uuid"])
            assert vm["state"] == "Running"
            assert (await client.stop_vm(vm["uuid"]))["state"] == "Stopped"
            assert (await client.start_vm(vm["uuid"]))["state"] == "Running"
            assert (await client.reboot_vm(vm["uuid"]))["state"] == "Running"
            assert (await client.destroy_vm(vm["uuid"]))["state"] == "Destroyed"


def _api_portal_leader(stack: Stack) -> str:
    """The member leading the api.portal quorum queue (the service name)."""
    leader: str = _queues(stack, "rabbitmq2")[API_QUEUE]["leader"]
    return leader.removeprefix("rabbit@")


async def _promote_after_kill(stack: Stack) -> tuple[float, float]:
    """Kill the primary, promote the standby; the kill's time and the promotion's duration."""
    killed = _kill(stack, "postgres")
    started = time.monotonic()
    await asyncio.to_thread(
        _exec, stack, "postgres-standby", "pg_ctl", "promote", "-w", "-D", PGDATA, user="postgres", timeout=60
    )
    return killed, time.monotonic() - started


@pytest.mark.timeout(420)
async def test_broker_member_kill_then_database_failover_under_load(ha: Stack) -> None:
    async with httpx.AsyncClient(timeout=5) as http:
        node_uuids = {(await http.get(ha.url(n) + "/healthz")).json()["node"] for n in NODES}
    async with Client.http(ha.urls, password=ADMIN_PASSWORD) as setup:
        host = await setup.add_host("ha-load", f"{AGENT}/hosts/ha-load")
        created = await asyncio.gather(
            *(setup.create_vm(f"ha-{i}", cpu_num=1, memory_size="16M", host_uuid=host["uuid"]) for i in range(LOAD_VMS))
        )
    vms = [Churned(vm["uuid"], vm["name"]) for vm in created]
    stop = asyncio.Event()
    figures: dict[str, float] = {}
    async with Client.http(ha.urls, password=ADMIN_PASSWORD) as client:
        workers = [asyncio.create_task(churn(client, vm, stop)) for vm in vms]
        try:
            await until_served_again(vms, time.monotonic(), "the load starting", SERVED_AGAIN_WITHIN)
            victim = _api_portal_leader(ha)
            killed = _kill(ha, victim)
            figures[f"kill of {victim} (api.portal leader)"] = await until_served_again(
                vms, killed, "broker kill", SERVED_AGAIN_WITHIN
            )
            survivors = [m for m in MEMBERS if m != victim]
            running = _rabbit_json(ha, survivors[0], "cluster_status")["running_nodes"]
            assert set(running) == {f"rabbit@{m}" for m in survivors}, running

            killed, promotion = await _promote_after_kill(ha)
            figures["database fail-over (kill + promote)"] = await until_served_again(
                vms, killed, "fail-over", SERVED_AGAIN_WITHIN
            )
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*workers), 60)
    assert [(vm.name, vm.failed) for vm in vms if vm.failed] == []
    total = sum(len(vm.ops) for vm in vms)
    for fault, seconds in figures.items():
        print(f"compose-ha: {fault}: every VM served again {seconds:.2f} s after the fault")
    print(f"compose-ha: promotion took {promotion:.2f} s; {total} operations on {len(vms)} VMs")

    assert _sql(ha, "postgres-standby", "select pg_is_in_recovery()") == "f"
    await check_nothing_lost(ha, "ha-load", vms, ADMIN_PASSWORD)
    report = _status_inside(ha, "node1")
    running_nodes = {n["uuid"] for n in report["nodes"] if n["state"] == "RUNNING"}
    assert running_nodes == node_uuids, report
    assert len(report["nodes"]) == 3, report
    assert report["ringsAgree"], report
