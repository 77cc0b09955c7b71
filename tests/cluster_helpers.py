"""Helpers shared by the cluster tests (real processes on RabbitMQ and PostgreSQL)."""

from __future__ import annotations

import asyncio
import json

from zstack_mn.client import Client
from zstack_mn.cluster.ring import HashRing
from zstack_mn.testing.cluster import ClusterHarness


def log_events(procs, event: str) -> list[dict]:
    """The JSON log lines of ``procs`` whose event is ``event``."""
    found = []
    for p in procs:
        for line in p.log.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("event") == event:
                found.append(entry)
    return found


async def setup_vms(harness: ClusterHarness, count: int, hosts: int = 2) -> tuple[Client, list[str]]:
    agent = await harness.start_agent()
    client = Client.http(harness.urls(), timeout=60)
    for i in range(hosts):
        await client.add_host(f"h{i}", f"{agent}/hosts/h{i}")
    vms = await asyncio.gather(*(client.create_vm(f"vm{i}", cpu_num=1, memory_size="64M") for i in range(count)))
    assert all(vm["state"] == "Running" for vm in vms)
    return client, [vm["uuid"] for vm in vms]


async def three_nodes_with_vms(harness: ClusterHarness, count: int) -> tuple[list, set[str], Client, list[str]]:
    """Three nodes whose rings agree, an agent with two hosts, and ``count`` running VMs."""
    nodes = await harness.start_nodes(3)
    uuids = {n.uuid for n in nodes}
    await harness.wait_until(lambda: harness.rings_agree(uuids), 10, "rings agree")
    client, vms = await setup_vms(harness, count)
    return nodes, uuids, client, vms


def owned(vms: list[str], ring_nodes: set[str], node: str) -> list[str]:
    ring = HashRing(ring_nodes)
    return [v for v in vms if ring.owner_of(v) == node]
