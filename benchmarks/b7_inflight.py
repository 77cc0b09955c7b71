"""B7: N VM operations at once on 1 node with a slow agent (L seconds per VM operation).

Per N, one node and one agent with one big host; N VMs are created (latency 0, they end Running).
Per L, the agent is slowed to L per start/stop and N operations, one per VM (stop for a Running
VM, start for a Stopped one), are published at once through the AMQP client, so the back-pressure
is the broker's. Reported: wall time, failed calls by code, the target wall time
2·L + N ÷ rate (rate: B2's 1-node HTTP ops/s at c=16 of the same run, else a 3 s start/stop load
at c=16 measured here), the node's peak messages in flight (``zstack_messages_in_flight``), and
its RSS growth (peak minus just before the burst, sampled every SAMPLE_S) per in-flight message
and per operation. Targets (docs/BENCH.md): wall ≤ the target, 0 failed, ≤ 20 KB RSS per in-flight
operation."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from benchmarks.b2_api import AMQP_PATH
from benchmarks.cluster_util import Failures, Toggler, cluster, make_vms, metric, node_rss, set_agent_latency
from benchmarks.common import run_load
from zstack_mn.client import Client
from zstack_mn.testing.cluster import ClusterHarness, Proc

SIZES = (1_000, 10_000)
LATENCIES = (0.5, 2.0)
QUICK_SIZES = (200, 1_000)
QUICK_LATENCIES = (0.5,)
RATE_CONCURRENCY = 16
AMQP_RATE_CONCURRENCY = 256
RATE_SECONDS = 3.0
SAMPLE_S = 0.1
CALL_TIMEOUT = 600.0
IN_FLIGHT_GAUGE = "zstack_messages_in_flight"
TARGET_BYTES_PER_OP = 20 * 1024
STEPS = len(SIZES)


def node_env(latencies: tuple[float, ...]) -> dict[str, str]:
    """Node settings for a slow agent: agent calls outlive the slowest L, API calls the burst."""
    return {
        "ZSTACK_MN_AGENT_TIMEOUT": str(max(latencies) + 10),
        "ZSTACK_MN_CALL_TIMEOUT": str(CALL_TIMEOUT),
    }


def client_timeout(n: int, latency: float) -> float:
    return 2 * latency + n / 50 + 60


@dataclass
class Sampler:
    """Samples a node's RSS and in-flight gauge every SAMPLE_S until stopped."""

    node: Proc
    rss: list[int] = field(default_factory=list)
    in_flight: list[float] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        async with httpx.AsyncClient() as http:
            while not self._stop.is_set():
                tick = time.monotonic()
                self.rss.append(node_rss(self.node))
                gauge = await metric(http, self.node.url, IN_FLIGHT_GAUGE, timeout=1.0)
                if gauge is not None:
                    self.in_flight.append(gauge)
                await asyncio.sleep(max(0.0, SAMPLE_S - (time.monotonic() - tick)))

    def stop(self) -> None:
        self._stop.set()


async def burst(client: Client, toggler: Toggler) -> Failures:
    """One operation per VM, all at once; the failures by code."""
    failures = Failures()

    async def one(vm: str) -> None:
        try:
            op = client.stop_vm if toggler.state[vm] == "Running" else client.start_vm
            toggler.state[vm] = (await op(vm))["state"]
        except Exception as exc:
            failures.add(exc)

    await asyncio.gather(*(one(vm) for vm in list(toggler.state)))
    return failures


async def one_latency(
    h: ClusterHarness, url: str, agent: str, toggler: Toggler, latency: float, rate: float
) -> dict[str, Any]:
    n = len(toggler.state)
    node = h.nodes[0]
    await set_agent_latency(agent, latency)
    client = await h.amqp_client(timeout=client_timeout(n, latency))
    sampler = Sampler(node)
    sampling = asyncio.create_task(sampler.run())
    try:
        await asyncio.sleep(3 * SAMPLE_S)
        before = node_rss(node)
        started = time.perf_counter()
        failures = await burst(client, toggler)
        wall = time.perf_counter() - started
    finally:
        sampler.stop()
        await sampling
        await client.close()
        await set_agent_latency(agent, 0)
    return _result(n, latency, rate, wall, failures, before, sampler)


def _result(
    n: int, latency: float, rate: float, wall: float, failures: Failures, before: int, sampler: Sampler
) -> dict[str, Any]:
    growth = max(0, max(sampler.rss, default=before) - before)
    peak = max(sampler.in_flight, default=0.0)
    target = 2 * latency + n / max(rate, 1e-9)
    per_in_flight = growth / peak if peak else None
    return {
        "n": n,
        "latencyS": latency,
        "wallS": round(wall, 2),
        "targetWallS": round(target, 2),
        "failed": failures.total,
        "errorCodes": dict(failures.counts),
        "errorSamples": failures.samples,
        "maxInFlight": int(peak),
        "rssBeforeMiB": round(before / (1 << 20), 1),
        "rssGrowthMiB": round(growth / (1 << 20), 1),
        "rssBytesPerInFlight": round(per_in_flight) if per_in_flight is not None else None,
        "rssBytesPerOperation": round(growth / n),
        "samples": len(sampler.rss),
        "met": {
            "wall": wall <= target,
            "failed": not failures.total,
            "rss": per_in_flight is not None and per_in_flight <= TARGET_BYTES_PER_OP,
        },
    }


async def measure_rate(h: ClusterHarness, toggler: Toggler) -> float:
    """One-node HTTP start/stop ops/s at c=RATE_CONCURRENCY for RATE_SECONDS."""
    async with h.client(h.urls(), timeout=60) as client:
        return (await run_load(lambda i: toggler.flip(client), RATE_CONCURRENCY, RATE_SECONDS)).rate


def b2_rate(results: dict[str, Any], path: str = "HTTP", c: int = RATE_CONCURRENCY) -> float | None:
    """B2's 1-node ops/s on ``path`` at ``c`` when B2 ran earlier in this run."""
    for row in results.get("b2", {}).get("rows", []):
        if row.get("path") == path and row.get("nodes") == 1 and row.get("c") == c:
            return float(row["opsPerSecond"])
    return None


def same_path_targets(rows: list[dict[str, Any]], amqp_rate: float | None) -> None:
    """Add to each row the wall time the target formula gives with the rate of B7's own path (B2's
    1-node ``api.portal`` ops/s at c=256, the most B2 asks of it), beside the specified one (the
    HTTP rate at c=16): the part of a miss that is the AMQP path's lower throughput, not the burst."""
    for row in rows:
        row["targetWallSamePathS"] = (
            None if amqp_rate is None else round(2 * row["latencyS"] + row["n"] / max(amqp_rate, 1e-9), 2)
        )


async def one_size(url: str, prefix: str, n: int, latencies: tuple[float, ...], rate: float | None) -> dict[str, Any]:
    async with cluster(url, prefix, 1, env=node_env(latencies)) as h:
        agent = await h.start_agent(cpu=2 * n + 64, memory="4T")
        async with h.client(h.urls(), timeout=120) as setup:
            toggler = Toggler(await make_vms(setup, agent, n, concurrency=64))
        source = "B2 (same run)" if rate else "measured in B7"
        if not rate:
            rate = await measure_rate(h, toggler)
        rows = [await one_latency(h, url, agent, toggler, latency, rate) for latency in latencies]
    return {"rate": round(rate, 1), "rateSource": source, "rows": rows}


async def run(
    url: str, prefix: str, seconds: float, progress: Any, quick: bool = False, results: dict[str, Any] | None = None
) -> dict[str, Any]:
    sizes, latencies = (QUICK_SIZES, QUICK_LATENCIES) if quick else (SIZES, LATENCIES)
    rate = b2_rate(results or {})
    rows, rates = [], {}
    for n in sizes:
        out = await one_size(url, f"{prefix}n{n}", n, latencies, rate)
        rows += out["rows"]
        rates[str(n)] = {"opsPerSecond": out["rate"], "source": out["rateSource"]}
        progress.update(1)
    amqp_rate = b2_rate(results or {}, AMQP_PATH, AMQP_RATE_CONCURRENCY)
    same_path_targets(rows, amqp_rate)
    return {
        "amqpRate": amqp_rate,
        "rows": rows,
        "rate": rates,
        "nodeEnv": node_env(latencies),
        "targetBytesPerInFlight": TARGET_BYTES_PER_OP,
    }
