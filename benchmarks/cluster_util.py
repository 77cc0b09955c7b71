"""Helpers for the cluster benchmarks: a harness on a fresh database, a toggling VM workload."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from zstack_mn.client import Client
from zstack_mn.db.engine import Database
from zstack_mn.testing import servers
from zstack_mn.testing.cluster import ClusterHarness


@contextlib.asynccontextmanager
async def cluster(url: str, prefix: str, nodes: int, **timing: Any) -> AsyncIterator[ClusterHarness]:
    database = await servers.create_database()
    workdir = Path(tempfile.mkdtemp(prefix="zstack-bench-"))
    h = ClusterHarness(workdir, amqp_url=url, database_url=servers.pg_url(database), queue_prefix=prefix, **timing)
    failed = False
    try:
        db = Database(h.database_url)
        await db.migrate()
        await db.close()
        if nodes:
            await h.start_nodes(nodes)
            expected = {n.uuid for n in h.nodes}
            await h.wait_until(lambda: h.rings_agree(expected), 60, "rings agree")
        yield h
    except BaseException:
        failed = True
        raise
    finally:
        await h.close()
        await servers.drop_database(database)
        if failed:
            print(f"node logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


class Toggler:
    """A pool of VMs each worker takes one at a time and flips (stop ↔ start), so operations on one
    VM never overlap and every call is a valid transition."""

    def __init__(self, vms: list[dict[str, Any]]) -> None:
        self.free: asyncio.Queue[str] = asyncio.Queue()
        self.state = {vm["uuid"]: vm["state"] for vm in vms}
        for vm in vms:
            self.free.put_nowait(vm["uuid"])

    async def flip(self, client: Client) -> dict[str, Any]:
        vm = await self.free.get()
        try:
            if self.state[vm] == "Running":
                inv = await client.stop_vm(vm)
            else:
                inv = await client.start_vm(vm)
            self.state[vm] = inv["state"]
            return inv
        finally:
            self.free.put_nowait(vm)


async def make_vms(client: Client, agent_url: str, count: int, hosts: int = 1) -> list[dict[str, Any]]:
    for i in range(hosts):
        await client.add_host(f"bench-h{i}", f"{agent_url}/hosts/b{i}")
    sem = asyncio.Semaphore(32)

    async def one(i: int) -> dict[str, Any]:
        async with sem:
            return await client.create_vm(f"bench-vm{i}", cpu_num=1, memory_size="64M")

    return list(await asyncio.gather(*(one(i) for i in range(count))))
