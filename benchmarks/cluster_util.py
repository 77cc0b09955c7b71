"""Helpers for the cluster benchmarks: a harness on a fresh database, a toggling VM workload, and
probes of a running node (RSS, metrics) and of the simulated agent (latency). Log records:
``zstack_mn.testing.cluster.log_events``."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import psutil

from benchmarks.common import percentile
from zstack_mn.agent.protocol import AgentFault
from zstack_mn.client import Client
from zstack_mn.db.engine import Database
from zstack_mn.testing import servers
from zstack_mn.testing.cluster import ClusterHarness, Proc, add_hosts_and_vms, set_agent_faults


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
            await h.wait_rings_agree(await h.start_nodes(nodes), 60)
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


async def make_vms(
    client: Client, agent_url: str, count: int, hosts: int = 1, concurrency: int = 32
) -> list[dict[str, Any]]:
    """Add ``hosts`` simulated hosts and create ``count`` Running VMs (1 CPU, 64M) on them."""
    return await add_hosts_and_vms(client, agent_url, count, hosts=hosts, concurrency=concurrency, prefix="bench-")


def node_rss(proc: Proc) -> int:
    """Resident set size of a node process in bytes (0 once it has exited)."""
    try:
        return int(psutil.Process(proc.popen.pid).memory_info().rss)
    except psutil.Error:
        return 0


async def metric(http: httpx.AsyncClient, node_url: str, name: str, timeout: float = 2.0) -> float | None:
    """The value of an unlabelled gauge or counter on a node's ``/metrics``; None when unreadable."""
    try:
        resp = await http.get(f"{node_url}/metrics", timeout=timeout)
    except httpx.HTTPError:
        return None
    for line in resp.text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


async def set_agent_latency(agent_url: str, latency: float, ops: tuple[str, ...] = ("start", "stop")) -> None:
    """Make every simulated host of the agent take ``latency`` seconds per VM operation in ``ops``."""
    await set_agent_faults(agent_url, [AgentFault(op=op, latency=latency) for op in ops] if latency else [])


def error_key(exc: BaseException) -> str:
    """A short label of a failed call: the error code for a ZStackError, else the exception type."""
    code = getattr(exc, "code", None)
    return code.name if code is not None and hasattr(code, "name") else type(exc).__name__


class Failures:
    """Failed calls by error code, with the first description seen for each code."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.samples: dict[str, str] = {}

    def add(self, exc: BaseException) -> None:
        key = error_key(exc)
        self.counts[key] += 1
        self.samples.setdefault(key, str(getattr(exc, "description", None) or exc)[:200])

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def percentiles(values: list[float]) -> dict[str, float]:
    """p50, p99 and max of ``values`` (milliseconds in, milliseconds out)."""
    ordered = sorted(values)
    return {
        "p50Ms": round(percentile(ordered, 0.5), 2),
        "p99Ms": round(percentile(ordered, 0.99), 2),
        "maxMs": round(ordered[-1], 2) if ordered else float("nan"),
    }
