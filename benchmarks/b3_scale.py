"""B3: 10,000 VMs created concurrently on 3 nodes with the simulated agent: seconds, errors and
each node's share (by the X-Handled-By header)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import httpx

from benchmarks.cluster_util import cluster
from zstack_mn.client import Client

VMS = 10_000
QUICK_VMS = 1_000
CONCURRENCY = 192
STEPS = 1


async def run(url: str, prefix: str, seconds: float, progress: Any, quick: bool = False) -> dict[str, Any]:
    total = QUICK_VMS if quick else VMS
    async with cluster(url, prefix, 3) as h:
        agent = await h.start_agent(cpu=4096, memory="64T")
        async with Client.http(h.urls()) as c:
            for i in range(4):
                await c.add_host(f"big{i}", f"{agent}/hosts/big{i}")
        urls = h.urls()
        shares: Counter[str] = Counter()
        errors: Counter[str] = Counter()
        sem = asyncio.Semaphore(CONCURRENCY)
        limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
        async with httpx.AsyncClient(timeout=120, limits=limits) as http:

            async def create(i: int) -> None:
                async with sem:
                    body = {"params": {"name": f"s{i}", "cpuNum": 1, "memorySize": "16M"}}
                    try:
                        resp = await http.post(f"{urls[i % len(urls)]}/v1/vm-instances", json=body)
                    except httpx.HTTPError as exc:
                        errors[type(exc).__name__] += 1
                        return
                    if resp.status_code == 200:
                        shares[resp.headers.get("X-Handled-By", "?")] += 1
                    else:
                        errors[resp.json().get("error", {}).get("code", str(resp.status_code))] += 1

            started = time.perf_counter()
            await asyncio.gather(*(create(i) for i in range(total)))
            elapsed = time.perf_counter() - started
    progress.update(1)
    return {
        "vms": total,
        "seconds": round(elapsed, 2),
        "errors": sum(errors.values()),
        "errorCodes": dict(errors),
        "shareByNode": {k[:8]: round(v / max(total, 1), 3) for k, v in shares.items()},
    }
