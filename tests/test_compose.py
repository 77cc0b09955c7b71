"""The project's own docker-compose.yml on a real Docker engine.

``.ci/docker-up`` installs Docker and docker-compose when missing and starts dockerd; the stand-in
images (tests/compose/) replace the official ones no registry serves here. The stack comes up with
its published ports on free ports of 127.0.0.1, and the checks go through those ports: a host, the
VM lifecycle through each node, ring agreement, ``zstack-mn status``; then ``docker kill`` of one
node under load, after which its VMs must be served again with nothing lost. ``docker-compose
down -v`` removes everything the test started, whatever happened.

Without an engine the tests are skipped with a red banner at the end of the run; under
``ZSTACK_MN_REQUIRE_INTEGRATION=1`` (CI) that is a failure. ``-m "not compose"`` leaves them out.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.compose.load import Churned, check_nothing_lost, churn, until_served_again
from tests.compose.stack import (
    COMPOSE_FILE,
    NODES,
    PORT_VARIABLES,
    SERVICES,
    TEST_IMAGE,
    Stack,
    run,
    running_stack,
)
from zstack_mn.client import Client
from zstack_mn.cluster.ring import HashRing

pytestmark = [pytest.mark.compose, pytest.mark.timeout(300)]

LONG_RUNNING = tuple(s for s in SERVICES if s != "migrate")
AGENT = "http://agent:9100"  # as the nodes see it, on the compose network
ADMIN_PASSWORD = "zstack"  # the compose file's default ZSTACK_MN_ADMIN_PASSWORD
HEALTHY_WITHIN = 180.0


@pytest.fixture(scope="module")
def stack(standin_images: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack("test", standin_images, tmp_path_factory.mktemp("compose"), healthy_within=HEALTHY_WITHIN) as s:
        yield s


async def _node_uuid(url: str) -> str:
    async with httpx.AsyncClient(timeout=5) as http:
        node: str = (await http.get(url + "/healthz")).json()["node"]
        return node


async def _status(stack: Stack) -> dict[str, Any]:
    """``zstack-mn status --json`` of this checkout, against the stack's published PostgreSQL."""
    cli = Path(sys.executable).parent / "zstack-mn"
    proc = await asyncio.create_subprocess_exec(
        str(cli),
        "status",
        "--json",
        "--database-url",
        stack.database_url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    report: dict[str, Any] = json.loads(out)
    return report


async def _wait_status(stack: Stack, nodes: set[str], within: float) -> dict[str, Any]:
    """Poll ``zstack-mn status`` until exactly ``nodes`` run and their rings agree."""
    deadline = time.monotonic() + within
    while True:
        report = await _status(stack)
        running = {n["uuid"] for n in report["nodes"] if n["state"] == "RUNNING"}
        if running == nodes and report["ringsAgree"]:
            return report
        assert time.monotonic() < deadline, f"status never showed {nodes} agreeing: {report}"
        await asyncio.sleep(0.5)


def _resolved(env: dict[str, str]) -> tuple[set[str], set[tuple[str, int]]]:
    """``docker-compose config`` under ``env``: the images it names (build arguments included) and
    its published (address, port) pairs."""
    done = run(["docker-compose", "-f", str(COMPOSE_FILE), "config"], timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    images: set[str] = set()
    published: set[tuple[str, int]] = set()
    for line in done.stdout.splitlines():
        if m := re.fullmatch(r"\s*(?:image|PYTHON_IMAGE): (\S+)", line):
            images.add(m[1])
        elif m := re.fullmatch(r"\s*- (\S+?):(\d+):\d+/tcp", line):
            published.add((m[1], int(m[2])))
    return images, published


@pytest.mark.timeout(1800)  # a cold run builds the stand-ins (minutes) before the first assertion
def test_compose_file_defaults_to_the_official_images_and_takes_overrides(standin_images: dict[str, str]) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ZSTACK_MN_")}
    images, published = _resolved(clean)
    assert images == {"python:3.11-slim", "rabbitmq:3.12-management", "postgres:15", "zstack-mn:latest"}
    assert published == {("127.0.0.1", p) for p in (8081, 8082, 8083, 9100, 5672, 15672, 5432)}

    ports = {v: 20001 + i for i, v in enumerate(PORT_VARIABLES.values())}
    images, published = _resolved(
        {**clean, **standin_images, "ZSTACK_MN_IMAGE": TEST_IMAGE, **{v: str(p) for v, p in ports.items()}}
    )
    assert images == {*standin_images.values(), TEST_IMAGE}
    assert published == {("127.0.0.1", p) for p in ports.values()}


@pytest.mark.timeout(1800)  # the first build of the zstack-mn image downloads its dependencies
def test_every_service_healthy_and_published_on_loopback_only(stack: Stack) -> None:
    for service in LONG_RUNNING:
        info = stack.inspect(service)
        assert info["State"]["Health"]["Status"] == "healthy", service
        bindings = [b for spec in (info["HostConfig"]["PortBindings"] or {}).values() for b in spec]
        assert bindings, f"{service} publishes nothing"
        assert {b["HostIp"] for b in bindings} == {"127.0.0.1"}, (service, bindings)
    assert stack.inspect("migrate")["State"]["ExitCode"] == 0


async def test_cluster_through_every_node(stack: Stack) -> None:
    nodes = {n: await _node_uuid(stack.url(n)) for n in NODES}
    assert len(set(nodes.values())) == 3
    async with Client.http(stack.urls, password=ADMIN_PASSWORD) as client:
        host = await client.add_host("compose-h1", f"{AGENT}/hosts/compose-h1")
    assert host["status"] == "Connected"
    ring = HashRing(nodes.values())
    for node in NODES:
        async with Client.http(stack.url(node), password=ADMIN_PASSWORD) as client:
            vm = await client.create_vm(f"compose-{node}", cpu_num=1, memory_size="64M")
            assert (vm["state"], vm["hostUuid"]) == ("Running", host["uuid"])
            assert (await client.stop_vm(vm["uuid"]))["state"] == "Stopped"
            # Whichever node took the call, the VM's owner on the ring ran it (across containers).
            assert client.last_handled_by == ring.owner_of(vm["uuid"]), node
            assert (await client.start_vm(vm["uuid"]))["state"] == "Running"
            assert (await client.reboot_vm(vm["uuid"]))["state"] == "Running"
            listed = await client.management_nodes()
        assert {n["uuid"] for n in listed["inventories"]} == set(nodes.values()), node
        assert abs(sum(n["ringShare"] for n in listed["inventories"]) - 1.0) < 0.01
        auth = {"Authorization": f"OAuth {await client.login()}"}
        for other in NODES:  # every node reads what this one wrote
            async with httpx.AsyncClient(timeout=10, headers=auth) as http:
                got = await http.get(f"{stack.url(other)}/v1/vm-instances/{vm['uuid']}")
            assert got.json()["inventory"]["state"] == "Running", other
        async with Client.http(stack.url(node), password=ADMIN_PASSWORD) as client:
            assert (await client.destroy_vm(vm["uuid"]))["state"] == "Destroyed"

    # ZStack's API: the admin account the compose file sets up logs in through any node
    async with Client.zstack(stack.urls, password=ADMIN_PASSWORD) as zclient:
        listed = await zclient.management_nodes()
    assert {n["uuid"] for n in listed["inventories"]} == {u.replace("-", "") for u in nodes.values()}

    report = await _wait_status(stack, set(nodes.values()), 15)
    assert len(report["nodes"]) == 3
    inside = stack.compose("exec", "-T", "node1", "zstack-mn", "status", timeout=60)
    assert "3 node(s); rings agree: yes" in inside.stdout, inside.stdout


async def test_docker_kill_a_node_under_load(stack: Stack) -> None:
    victim = "node2"
    nodes = {n: await _node_uuid(stack.url(n)) for n in NODES}
    async with Client.http(stack.urls, password=ADMIN_PASSWORD) as setup:
        host = await setup.add_host("kill-h1", f"{AGENT}/hosts/kill-h1")
        created = await asyncio.gather(
            *(setup.create_vm(f"kill-{i}", cpu_num=1, memory_size="16M", host_uuid=host["uuid"]) for i in range(24))
        )
    ring = HashRing(nodes.values())
    owned = {vm["uuid"] for vm in created if ring.owner_of(vm["uuid"]) == nodes[victim]}
    assert owned, "the victim owns none of the VMs"

    vms = [Churned(vm["uuid"], vm["name"]) for vm in created]
    stop = asyncio.Event()
    async with Client.http(stack.urls, password=ADMIN_PASSWORD) as client:
        workers = [asyncio.create_task(churn(client, vm, stop)) for vm in vms]
        try:
            await until_served_again(vms, time.monotonic(), "the load to run on every VM", 30)
            done = run(["docker", "kill", stack.container(victim)], timeout=30)
            assert done.returncode == 0, done.stderr
            killed_at = time.monotonic()
            before = sum(len(vm.acked_after(0.0)) for vm in vms)
            # Served again: two operations of every VM acknowledged after the kill (the second was
            # sent after it, so the victim cannot have served it).
            await until_served_again(vms, killed_at, "every VM served again", 60)
            served_again = max(vm.acked_after(killed_at)[1].acked or 0.0 for vm in vms if vm.uuid in owned) - killed_at
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*workers), 60)
    total = sum(len(vm.acked_after(0.0)) for vm in vms)
    print(
        f"compose: {total} operations on {len(vms)} VMs ({before} before the kill); the victim's "
        f"{len(owned)} VMs were all served again {served_again:.2f} s after it"
    )
    assert [(vm.name, vm.failed) for vm in vms if vm.failed] == []

    # Nothing lost: the database and the agent both hold each VM in the state its last
    # acknowledged operation left it in.
    await check_nothing_lost(stack, "kill-h1", vms, ADMIN_PASSWORD)

    # The victim's row is gone and the survivors' rings agree. (`docker kill` is a manual stop:
    # the restart policy does not bring the container back.)
    assert stack.inspect(victim)["State"]["Running"] is False
    report = await _wait_status(stack, {nodes[n] for n in NODES if n != victim}, 30)
    assert len(report["nodes"]) == 2
