"""Helpers shared by the cluster tests (real processes on RabbitMQ and PostgreSQL)."""

from __future__ import annotations

import asyncio

import httpx

from zstack_mn.client import Client
from zstack_mn.cluster.ring import HashRing
from zstack_mn.testing.cluster import ClusterHarness, Proc, add_hosts_and_vms


async def setup_vms(harness: ClusterHarness, count: int, hosts: int = 2) -> tuple[Client, list[str]]:
    """An agent with ``hosts`` hosts and ``count`` Running VMs; a client of every node (the
    caller closes it)."""
    agent = await harness.start_agent()
    client = harness.client(harness.urls(), timeout=60)
    vms = await add_hosts_and_vms(client, agent, count, hosts=hosts, concurrency=count)
    assert [vm["state"] for vm in vms] == ["Running"] * count
    return client, [vm["uuid"] for vm in vms]


async def three_nodes_with_vms(harness: ClusterHarness, count: int) -> tuple[list[Proc], set[str], Client, list[str]]:
    """Three nodes whose rings agree, an agent with two hosts, and ``count`` running VMs."""
    nodes = await harness.start_nodes(3)
    uuids = {n.uuid for n in nodes}
    await harness.wait_rings_agree(nodes, 10)
    client, vms = await setup_vms(harness, count)
    return nodes, uuids, client, vms


def owned(vms: list[str], ring_nodes: set[str], node: str) -> list[str]:
    ring = HashRing(ring_nodes)
    return [v for v in vms if ring.owner_of(v) == node]


async def until_answered(http: httpx.AsyncClient, location: str, bound: float = 60.0) -> tuple[int, httpx.Response]:
    """Poll a job (``Location`` of a 202) as a client would, within ``bound``: (how many polls
    answered 202 with the job still Processing, the answer)."""
    waiting = 0
    async with asyncio.timeout(bound):
        while (resp := await http.get(location)).status_code == 202:
            assert resp.json()["job"]["state"] == "Processing"
            waiting += 1
            await asyncio.sleep(0.1)
    return waiting, resp
