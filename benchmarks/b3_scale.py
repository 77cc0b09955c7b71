"""B3: 10,000 VMs created concurrently on 3 nodes with the simulated agent, once with 1 host and once
with 100 hosts (each ``{agent}/hosts/<name>`` is a separate simulated host). Reported per run:
seconds, errors by code, each node's share (by the X-Handled-By header) and the create latency
of one VM (p50/p99/max, from sending its request to its answer, at CONCURRENCY requests open),
and what the database's sessions waited on meanwhile (``benchmarks.wait_events``).

Every simulated host gets the agent's capacity, sized so that a single host holds every VM
(1 CPU, 16M each). Target (docs/BENCH.md): ≤ 30 s, 0 errors, with 1 host and with 100 hosts."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import aiohttp
import orjson

from benchmarks.cluster_util import cluster, percentiles
from benchmarks.wait_events import WaitEvents

VMS = 10_000
QUICK_VMS = 1_000
HOST_COUNTS = (1, 100)
CONCURRENCY = 192
HOST_CPU = 16_384
HOST_MEMORY = "1T"
VM_MEMORY = "16M"
TARGET_S = 30.0
STEPS = len(HOST_COUNTS)


class Creator:
    """Creates VMs over HTTP, round-robin over the nodes, and keeps the per-VM outcome. aiohttp:
    an httpx request costs the load generator about 2 ms of CPU here, which the nodes would lose
    on the same two cores."""

    def __init__(self, http: aiohttp.ClientSession, urls: list[str]) -> None:
        self.http = http
        self.urls = urls
        self.sem = asyncio.Semaphore(CONCURRENCY)
        self.shares: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.latencies_ms: list[float] = []

    async def create(self, i: int) -> None:
        body = {"params": {"name": f"s{i}", "cpuNum": 1, "memorySize": VM_MEMORY}}
        async with self.sem:
            started = time.perf_counter()
            try:
                async with self.http.post(f"{self.urls[i % len(self.urls)]}/v1/vm-instances", json=body) as resp:
                    status, content = resp.status, await resp.read()
                    handled_by = resp.headers.get("X-Handled-By", "?")
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.errors[type(exc).__name__] += 1
                return
            self.latencies_ms.append((time.perf_counter() - started) * 1000)
        if status == 200:
            self.shares[handled_by] += 1
        else:
            self.errors[_error_code(status, content)] += 1


def _error_code(status: int, content: bytes) -> str:
    try:
        return str(orjson.loads(content).get("error", {}).get("code", status))
    except (orjson.JSONDecodeError, AttributeError):
        return f"HTTP {status}"


async def one_run(url: str, prefix: str, total: int, hosts: int) -> dict[str, Any]:
    async with cluster(url, prefix, 3) as h:
        agent = await h.start_agent(cpu=HOST_CPU, memory=HOST_MEMORY)
        async with h.client(h.urls()) as c:
            for i in range(hosts):
                await c.add_host(f"big{i}", f"{agent}/hosts/big{i}")
        connector = aiohttp.TCPConnector(limit=CONCURRENCY)
        auth = await h.auth_headers()
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=120), headers=auth
        ) as http:
            creator = Creator(http, h.urls())
            waits = WaitEvents.of_url(h.database_url)
            async with waits.sampling():
                started = time.perf_counter()
                await asyncio.gather(*(creator.create(i) for i in range(total)))
                elapsed = time.perf_counter() - started
    return {
        "hosts": hosts,
        "vms": total,
        "seconds": round(elapsed, 2),
        "errors": sum(creator.errors.values()),
        "errorCodes": dict(creator.errors),
        "shareByNode": {k[:8]: round(v / max(total, 1), 3) for k, v in creator.shares.items()},
        "createLatency": percentiles(creator.latencies_ms),
        "waitEvents": waits.summary(),
        "met": elapsed <= TARGET_S and not creator.errors,
    }


async def run(url: str, prefix: str, seconds: float, progress: Any, quick: bool = False) -> dict[str, Any]:
    total = QUICK_VMS if quick else VMS
    runs = []
    for hosts in HOST_COUNTS:
        runs.append(await one_run(url, f"{prefix}h{hosts}", total, hosts))
        progress.update(1)
    return {"vms": total, "concurrency": CONCURRENCY, "targetSeconds": TARGET_S, "runs": runs}
