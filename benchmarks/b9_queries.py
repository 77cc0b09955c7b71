"""B9: VM queries over HTTP at 10⁴ and 10⁶ VMs in PostgreSQL, one node: the first page, a deep
page (``after``, keyset), a filter by name, and a filter by state and host; target ≤ 10 ms median
for each at 10⁶. For comparison, and without a target: a deep page by ``start`` (an offset scan)
and the total (``count=true``), the two forms whose cost grows with the table.

The rows are written by PostgreSQL itself (``generate_series``), on 100 hosts, half the VMs
Running and half Stopped. The hosts are seeded Disconnected at an address with no agent, so the
node's trackers leave their VMs alone while the queries are timed."""

from __future__ import annotations

import random
import time
from typing import Any

import httpx
from sqlalchemy import text

from benchmarks.cluster_util import cluster
from benchmarks.common import percentile
from zstack_mn.db.engine import Database

SIZES = (10_000, 1_000_000)
QUICK_SIZES = (10_000, 100_000)
HOSTS = 100
SAMPLES = 200
SEED_TIMEOUT = 900.0
SLOW_SAMPLES = 10
PAGE = 100
TARGET_MS = 10.0
STEPS = 2

SEED_HOSTS = text(
    """
    INSERT INTO host (uuid, name, agent_url, state, status, cpu_total, cpu_available,
                      memory_total, memory_available, version)
    SELECT gen_random_uuid()::text, 'h' || g, 'http://127.0.0.1:9/hosts/h' || g, 'Enabled', 'Disconnected',
           1000000, 1000000, 1125899906842624, 1125899906842624, 1
    FROM generate_series(1, :hosts) AS g
    """
)
SEED_VMS = text(
    """
    INSERT INTO vm_instance (uuid, name, state, host_uuid, last_host_uuid, cpu_num, memory_size, version)
    SELECT gen_random_uuid()::text, 'vm-' || g, CASE WHEN g % 2 = 0 THEN 'Running' ELSE 'Stopped' END,
           CASE WHEN g % 2 = 0 THEN hosts.list[1 + g % :hosts] END, hosts.list[1 + g % :hosts], 1, 67108864, 1
    FROM generate_series(1, :count) AS g,
         (SELECT array_agg(uuid ORDER BY name) AS list FROM host) AS hosts
    """
)


async def seed(database_url: str, count: int) -> dict[str, Any]:
    """Write ``count`` VMs on ``HOSTS`` hosts; returns what the queries need (a host, the uuid
    ``PAGE * 2`` rows from the end in uuid order)."""
    db = Database(database_url, timeout=SEED_TIMEOUT)
    try:
        async with db.begin() as conn:
            await conn.execute(SEED_HOSTS, {"hosts": HOSTS})
            await conn.execute(SEED_VMS, {"hosts": HOSTS, "count": count})
        async with db.engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.execute(text("VACUUM ANALYZE vm_instance"))
            await conn.execute(text("VACUUM ANALYZE host"))
        async with db.begin() as conn:
            host = (await conn.execute(text("SELECT uuid FROM host ORDER BY name LIMIT 1"))).scalar_one()
            deep = (
                await conn.execute(
                    text("SELECT uuid FROM vm_instance ORDER BY uuid OFFSET :n LIMIT 1"), {"n": count - 2 * PAGE}
                )
            ).scalar_one()
    finally:
        await db.close()
    return {"host": host, "deep": deep}


async def timed(http: httpx.AsyncClient, url: str, params: Any, samples: int) -> dict[str, float]:
    """Median and p99 of ``samples`` sequential GETs (after two untimed ones), in ms. ``params``
    is a dict, or a function of the sample number giving one."""
    latencies: list[float] = []
    for i in range(samples + 2):
        query = params(i) if callable(params) else params
        started = time.perf_counter()
        resp = await http.get(url, params=query)
        elapsed = (time.perf_counter() - started) * 1000
        resp.raise_for_status()
        if i >= 2:
            latencies.append(elapsed)
    latencies.sort()
    return {"p50Ms": round(percentile(latencies, 0.5), 2), "p99Ms": round(percentile(latencies, 0.99), 2)}


async def measure(url: str, prefix: str, count: int) -> dict[str, Any]:
    async with cluster(url, prefix, 0) as h:
        seeded = await seed(h.database_url, count)
        node = await h.start_node()
        vms = f"{node.url}/v1/vm-instances"
        rng = random.Random(9)
        async with httpx.AsyncClient(timeout=60, headers=await h.auth_headers()) as http:
            queries = {
                "page1": await timed(http, vms, {"limit": PAGE}, SAMPLES),
                "deepPage": await timed(http, vms, {"limit": PAGE, "after": seeded["deep"]}, SAMPLES),
                "byName": await timed(http, vms, lambda _: {"name": f"vm-{rng.randint(1, count)}"}, SAMPLES),
                "byStateAndHost": await timed(
                    http, vms, {"limit": PAGE, "state": "Running", "hostUuid": seeded["host"]}, SAMPLES
                ),
                "deepPageByStart": await timed(http, vms, {"limit": PAGE, "start": count - 2 * PAGE}, SLOW_SAMPLES),
                "count": await timed(http, vms, {"count": "true"}, SLOW_SAMPLES),
            }
    return {"vms": count, "queries": queries}


async def run(url: str, prefix: str, seconds: float, progress: Any, quick: bool = False) -> dict[str, Any]:
    rows = []
    for i, count in enumerate(QUICK_SIZES if quick else SIZES):
        rows.append(await measure(url, f"{prefix}{i}", count))
        progress.update(1)
    largest = rows[-1]["queries"]
    targeted = ("page1", "deepPage", "byName", "byStateAndHost")
    return {
        "rows": rows,
        "targetMs": TARGET_MS,
        "met": all(largest[q]["p50Ms"] <= TARGET_MS for q in targeted),
        "targeted": list(targeted),
    }
