"""B2: VM start/stop end to end, through HTTP and through ``api.portal`` (AMQP client), on 1 and 3
nodes, at c = 1, 16, 64 and 256, each beside the raw aio-pika request/reply rate measured in the
same run at the same concurrency.

Every worker flips its own VM (the pool holds at least two VMs per worker), so operations on one
VM never overlap and every call is a valid transition. The targets (docs/BENCH.md): ≥ 0.4× raw
through HTTP on 1 node, ≥ 0.5× through ``api.portal``, p99 ≤ 4× p50, and throughput not falling
as concurrency rises."""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import subprocess
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from benchmarks.b1_bus import raw_client, start_server
from benchmarks.cluster_util import Toggler, cluster, make_vms
from benchmarks.common import LoadResult
from zstack_mn.client import Client
from zstack_mn.testing.cluster import ClusterHarness, free_port, spawn, wait_http

CONCURRENCY = (1, 16, 64, 256)
NODE_COUNTS = (1, 3)
QUORUM_PATH = "HTTP, quorum queues"
AMQP_PATH = "AMQP api.portal"
PATHS = ("HTTP", AMQP_PATH, QUORUM_PATH)
VMS = 2 * max(CONCURRENCY)
WORKERS_PER_HTTP_CLIENT = 64
FALL_TOLERANCE = 0.9
WARMUP_S = 1.0
WARMUP_S_PER_WORKER = 0.01
CALL_TIMEOUT = 60.0
EMBEDDED_PATH = "HTTP embedded (SQLite, in-process bus)"
EMBEDDED_C = 16
EMBEDDED_VMS = 32
EMBEDDED_START_S = 60.0
STEPS = 3 + len(NODE_COUNTS) * 2


async def window_load(call: Callable[[int], Awaitable[Any]], concurrency: int, seconds: float) -> LoadResult:
    """``concurrency`` workers call ``call`` in a loop; after a warm-up that grows with the
    concurrency (the first calls of a large burst all queue together), the calls that finish inside
    the ``seconds`` window count (rate = completions ÷ window, the steady-state throughput), so calls
    still open at its end, whose latency can approach the window at c=256, do not inflate it."""
    latencies: list[float] = []
    errors = 0
    loop = asyncio.get_running_loop()
    begin = loop.time() + WARMUP_S + WARMUP_S_PER_WORKER * concurrency
    end = begin + seconds

    async def worker(w: int) -> None:
        nonlocal errors
        i = w
        while (started := loop.time()) < end:
            try:
                await call(i)
                ok = True
            except Exception:
                ok = False
            finished = loop.time()
            if begin <= finished <= end:
                if ok:
                    latencies.append((finished - started) * 1000)
                else:
                    errors += 1
            i += concurrency

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return LoadResult(len(latencies), errors, seconds, latencies)


async def measure_raw(url: str, prefix: str, seconds: float) -> dict[int, float]:
    """Raw aio-pika request/reply calls/s at each concurrency, one echo server for all points."""
    server = start_server("raw", url, f"{prefix}raw")
    try:
        call, conn = await raw_client(url, f"{prefix}raw")
        try:
            return {c: (await window_load(call, c, seconds)).rate for c in CONCURRENCY}
        finally:
            await conn.close()
    finally:
        server.kill()
        server.wait()


async def http_sweep(h: ClusterHarness, toggler: Toggler, seconds: float) -> dict[int, LoadResult]:
    """HTTP load at each concurrency; enough clients per node that no httpx pool (100) caps c."""
    out = {}
    for c in CONCURRENCY:
        per_node = max(1, math.ceil(c / WORKERS_PER_HTTP_CLIENT))
        clients = [h.client([u], timeout=CALL_TIMEOUT) for u in h.urls() for _ in range(per_node)]
        try:
            out[c] = await window_load(_spread(toggler, clients), c, seconds)
        finally:
            for client in clients:
                await client.close()
    return out


async def amqp_sweep(h: ClusterHarness, url: str, toggler: Toggler, seconds: float) -> dict[int, LoadResult]:
    """``api.portal`` load at each concurrency through one AMQP client."""
    client = await h.amqp_client(timeout=CALL_TIMEOUT)
    try:
        return {c: await window_load(lambda i: toggler.flip(client), c, seconds) for c in CONCURRENCY}
    finally:
        await client.close()


async def measure_embedded(seconds: float) -> LoadResult:
    """The embedded node as a newcomer runs it (``zstack-mn start`` with no broker or database
    configured: in-process bus, SQLite, the simulated agent with its default host), at c = 16."""
    workdir = Path(tempfile.mkdtemp(prefix="zstack-bench-embedded-"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZSTACK_MN_")}
    env.update(
        ZSTACK_MN_HTTP_PORT=str(port),
        ZSTACK_MN_DATABASE_URL=f"sqlite:///{workdir}/mn.db",
        ZSTACK_MN_LOG_LEVEL="warning",
    )
    node = spawn("embedded", ["start"], env, workdir / "node.log", port)
    try:
        await wait_http(node, "/readyz", EMBEDDED_START_S)
        async with Client.http([node.url], timeout=CALL_TIMEOUT) as client:
            vms = [await client.create_vm(f"embedded-{i}", cpu_num=1, memory_size="64M") for i in range(EMBEDDED_VMS)]
            toggler = Toggler(vms)
            return await window_load(lambda i: toggler.flip(client), EMBEDDED_C, seconds)
    finally:
        node.popen.terminate()
        try:
            node.popen.wait(15)
        except subprocess.TimeoutExpired:
            node.popen.kill()
            node.popen.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def _spread(toggler: Toggler, clients: list[Client]) -> Callable[[int], Awaitable[Any]]:
    return lambda i: toggler.flip(clients[i % len(clients)])


async def run(url: str, prefix: str, seconds: float, progress: Any) -> dict[str, Any]:
    raw = await measure_raw(url, prefix, seconds)
    progress.update(1)
    rows = []
    for n in NODE_COUNTS:
        async with cluster(url, f"{prefix}n{n}", n) as h:
            agent = await h.start_agent(cpu=4 * VMS, memory="1T")
            async with h.client(h.urls(), timeout=CALL_TIMEOUT) as setup:
                toggler = Toggler(await make_vms(setup, agent, VMS))
            for c, res in (await http_sweep(h, toggler, seconds)).items():
                rows.append(_row("HTTP", n, c, res, raw[c]))
            progress.update(1)
            for c, res in (await amqp_sweep(h, url, toggler, seconds)).items():
                rows.append(_row(AMQP_PATH, n, c, res, raw[c]))
            progress.update(1)
    async with cluster(url, f"{prefix}q", 1, env={"ZSTACK_MN_QUEUE_TYPE": "quorum"}) as h:
        agent = await h.start_agent(cpu=4 * VMS, memory="1T")
        async with h.client(h.urls(), timeout=CALL_TIMEOUT) as setup:
            toggler = Toggler(await make_vms(setup, agent, VMS))
        for c, res in (await http_sweep(h, toggler, seconds)).items():
            rows.append(_row(QUORUM_PATH, 1, c, res, raw[c]))
    progress.update(1)
    rows.append(_row(EMBEDDED_PATH, 1, EMBEDDED_C, await measure_embedded(seconds), raw[EMBEDDED_C]))
    progress.update(1)
    return {
        "concurrency": list(CONCURRENCY),
        "rawCallsPerSecond": {str(c): round(r, 1) for c, r in raw.items()},
        "rows": rows,
        "notFalling": not_falling(rows),
        "vmPool": VMS,
    }


def _row(path: str, nodes: int, c: int, res: LoadResult, raw: float) -> dict[str, Any]:
    p50, p99 = res.pct(0.5), res.pct(0.99)
    return {
        "path": path,
        "nodes": nodes,
        "c": c,
        "opsPerSecond": round(res.rate, 1),
        "p50Ms": round(p50, 2),
        "p99Ms": round(p99, 2),
        "p99OverP50": round(p99 / p50, 2) if p50 else float("nan"),
        "errors": res.errors,
        "rawCallsPerSecond": round(raw, 1),
        "ratioToRaw": round(res.rate / max(raw, 1e-9), 3),
    }


def not_falling(rows: list[dict[str, Any]]) -> dict[str, bool]:
    """Per path and node count: does every concurrency reach ≥ FALL_TOLERANCE × the best rate of
    any lower concurrency (the tolerance absorbs run-to-run drift on a shared machine)?"""
    out = {}
    for path in PATHS:
        for n in NODE_COUNTS:
            rates = [
                r["opsPerSecond"] for r in sorted(rows, key=lambda r: r["c"]) if r["path"] == path and r["nodes"] == n
            ]
            out[f"{path} / {n}"] = all(rate >= FALL_TOLERANCE * max(rates[:i]) for i, rate in enumerate(rates) if i)
    return out
