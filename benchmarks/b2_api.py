"""B2: VM start/stop end to end, through HTTP and through ``api.portal`` (AMQP client), on 1 and 3
nodes, beside raw aio-pika request/reply (c=16) measured in the same run."""

from __future__ import annotations

from typing import Any

from benchmarks.b1_bus import raw_client, start_server
from benchmarks.cluster_util import Toggler, cluster, make_vms
from benchmarks.common import run_load
from zstack_mn.client import Client

CONCURRENCY = 16
STEPS = 5


async def run(url: str, prefix: str, seconds: float, progress: Any) -> dict[str, Any]:
    server = start_server("raw", url, f"{prefix}raw")
    try:
        call, conn = await raw_client(url, f"{prefix}raw")
        raw = (await run_load(call, CONCURRENCY, seconds)).rate
        await conn.close()
    finally:
        server.kill()
        server.wait()
    progress.update(1)
    rows = []
    for n in (1, 3):
        async with cluster(url, f"{prefix}n{n}", n) as h:
            agent = await h.start_agent()
            async with Client.http(h.urls(), timeout=60) as setup:
                vms = await make_vms(setup, agent, 4 * CONCURRENCY)
            toggler = Toggler(vms)
            http_clients = [Client.http([u], timeout=60) for u in h.urls()]
            res = await run_load(lambda i: toggler.flip(http_clients[i % len(http_clients)]), CONCURRENCY, seconds)
            rows.append(_row("HTTP", n, res, raw))
            progress.update(1)
            for c in http_clients:
                await c.close()
            amqp = await Client.amqp(url, h.queue_prefix, timeout=60)
            res = await run_load(lambda i: toggler.flip(amqp), CONCURRENCY, seconds)
            rows.append(_row("AMQP api.portal", n, res, raw))
            await amqp.close()
            progress.update(1)
    return {"rawCallsPerSecond": raw, "concurrency": CONCURRENCY, "rows": rows}


def _row(path: str, nodes: int, res: Any, raw: float) -> dict[str, Any]:
    return {
        "path": path,
        "nodes": nodes,
        "opsPerSecond": round(res.rate, 1),
        "p50Ms": round(res.pct(0.5), 2),
        "p99Ms": round(res.pct(0.99), 2),
        "errors": res.errors,
        "ratioToRaw": round(res.rate / max(raw, 1e-9), 3),
    }
