"""B6: RSS of one node with 100 vs 100,000 VMs in the database (stateless: it should be flat).
Rows are inserted directly; the node is measured after its reconcile and tracker passes and a
page of queries."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import psutil
from sqlalchemy import insert

from benchmarks.cluster_util import cluster
from zstack_mn.db.engine import Database
from zstack_mn.db.models import Host, VmInstance

SMALL, LARGE, QUICK_LARGE = 100, 100_000, 20_000
STEPS = 2


async def seed(database_url: str, count: int) -> None:
    db = Database(database_url)
    host = str(uuid.uuid4())
    try:
        async with db.begin() as conn:
            await conn.execute(
                insert(Host).values(
                    uuid=host,
                    name="seed",
                    agent_url="http://127.0.0.1:9/hosts/seed",
                    state="Enabled",
                    status="Connected",
                    cpu_total=10**6,
                    cpu_available=10**6 - count,
                    memory_total=1 << 50,
                    memory_available=1 << 49,
                    version=1,
                )
            )
            batch = []
            for i in range(count):
                batch.append(
                    {
                        "uuid": str(uuid.uuid4()),
                        "name": f"m{i}",
                        "state": "Running",
                        "host_uuid": host,
                        "cpu_num": 1,
                        "memory_size": 1 << 26,
                        "version": 1,
                    }
                )
                if len(batch) == 5000:
                    await conn.execute(insert(VmInstance), batch)
                    batch = []
            if batch:
                await conn.execute(insert(VmInstance), batch)
    finally:
        await db.close()


async def measure(url: str, prefix: str, count: int) -> float:
    async with cluster(url, prefix, 0) as h:
        await seed(h.database_url, count)
        node = await h.start_node()
        async with httpx.AsyncClient(timeout=30, headers=await h.auth_headers()) as http:
            for start in range(0, 1000, 100):
                page = await http.get(f"{node.url}/v1/vm-instances", params={"limit": 100, "start": start})
                page.raise_for_status()
        await asyncio.sleep(8)
        return psutil.Process(node.popen.pid).memory_info().rss / (1 << 20)


async def run(url: str, prefix: str, seconds: float, progress: Any, quick: bool = False) -> dict[str, Any]:
    large = QUICK_LARGE if quick else LARGE
    small_rss = await measure(url, f"{prefix}s", SMALL)
    progress.update(1)
    large_rss = await measure(url, f"{prefix}l", large)
    progress.update(1)
    return {
        "small": SMALL,
        "large": large,
        "rssSmallMiB": round(small_rss, 1),
        "rssLargeMiB": round(large_rss, 1),
        "ratio": round(large_rss / small_rss, 3),
    }
