"""B8: 30 nodes on this machine against one PostgreSQL (``max_connections`` 100) and one RabbitMQ.

Nodes run with default-ish timings (heartbeat 2 s, node_timeout 10 s) and a database pool of 1
(+1 overflow), and are started in batches so start-up does not starve the machine. Measured:

* membership cost per node at idle, at 3, 10 and 30 nodes: transactions (commits + rollbacks in
  ``pg_stat_database``) and rows (tup_returned + tup_fetched) of the run's database per node per
  heartbeat, over an idle window;
* a steady load of WORKERS HTTP clients flipping VMs (start ↔ stop), spread over every node, for
  3 × ``--seconds``; during it one node joins and one leaves (SIGTERM). Failed calls by code, and
  the time until every ring agrees after each: by every node's ``zstack_ring_nodes`` gauge (the
  rings themselves) and by the ring digests in the database (what ``zstack-mn status`` sees; a
  node writes its digest with its heartbeat, so this lags up to one heartbeat);
* false evictions: "evicted a dead node" records in any node's log naming a node not stopped;
* peak connections to the run's database (``pg_stat_activity``, every DB_SAMPLE_S) per phase;
* ring lookup cost at 10 and 100 nodes: ``LiveRing.owner_of`` over LOOKUPS lookups of DISTINCT
  uuids, each message looking its uuid up LOOKUPS_PER_MESSAGE times, and ``HashRing.owner_of``
  once per distinct uuid.

Targets (docs/BENCH.md): 0 failed calls, no false eviction, rings agree within one heartbeat, peak
database connections ≤ 80."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx

from benchmarks.cluster_util import Failures, Toggler, cluster, make_vms, metric
from zstack_mn.client import Client
from zstack_mn.cluster.ring import HashRing, LiveRing
from zstack_mn.messages import ErrorCode, ZStackError
from zstack_mn.testing import servers
from zstack_mn.testing.cluster import ADMIN_PASSWORD, ClusterHarness, Proc, log_events
from zstack_mn.testing.uuids import seeded_uuids

NODES = 30
QUICK_NODES = 10
IDLE_POINTS = (3, 10, 30)
BATCH = 5
HEARTBEAT = 2.0
NODE_TIMEOUT = 10.0
DB_POOL_ENV = {"ZSTACK_MN_DB_POOL_SIZE": "1", "ZSTACK_MN_DB_MAX_OVERFLOW": "1"}
IDLE_WINDOW_S = 10.0
SETTLE_S = 2.0
DB_SAMPLE_S = 0.2
RING_POLL_S = 0.1
AGREE_DEADLINE_S = 60.0
WORKERS = 20
VMS = 3 * WORKERS
CALL_TIMEOUT = 30.0
EVICTION_EVENT = "evicted a dead node"
RING_GAUGE = "zstack_ring_nodes"
RING_SIZES = (10, 100)
DISTINCT = 10_000
LOOKUPS = 100_000
LOOKUPS_PER_MESSAGE = 3
TARGET_PEAK_CONNECTIONS = 80
STEPS = 4


def database_name(h: ClusterHarness) -> str:
    return h.database_url.rsplit("/", 1)[1]


@dataclass
class ConnectionSampler:
    """Counts the run database's connections every DB_SAMPLE_S (from the admin database, so the
    sampling itself is not counted), keeping the peak of each phase."""

    conn: asyncpg.Connection
    database: str
    phase: str = "startup"
    peaks: dict[str, int] = field(default_factory=dict)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        sql = "SELECT count(*) FROM pg_stat_activity WHERE datname = $1"
        while not self._stop.is_set():
            count = int(await self.conn.fetchval(sql, self.database, timeout=5))
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), count)
            await asyncio.sleep(DB_SAMPLE_S)

    def stop(self) -> None:
        self._stop.set()


async def db_counters(conn: asyncpg.Connection, database: str) -> tuple[int, int]:
    """(transactions, rows read) of ``database`` so far, from ``pg_stat_database``."""
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    row = await conn.fetchrow(
        "SELECT xact_commit + xact_rollback AS xacts, tup_returned + tup_fetched AS rows "
        "FROM pg_stat_database WHERE datname = $1",
        database,
        timeout=5,
    )
    return int(row["xacts"]), int(row["rows"])


async def grow_to(h: ClusterHarness, total: int) -> None:
    """Start nodes BATCH at a time until ``total`` are alive and every ring agrees."""
    while len(alive(h)) < total:
        await h.start_nodes(min(BATCH, total - len(alive(h))))
    await h.wait_rings_agree(alive(h), AGREE_DEADLINE_S, f"{total} rings agree", interval=0.5)


def alive(h: ClusterHarness) -> list[Proc]:
    return [n for n in h.nodes if n.alive]


async def membership_cost(h: ClusterHarness, conn: asyncpg.Connection, nodes: int) -> dict[str, Any]:
    """Transactions and rows per node per heartbeat over an idle window."""
    await asyncio.sleep(SETTLE_S)
    xacts0, rows0 = await db_counters(conn, database_name(h))
    started = time.monotonic()
    await asyncio.sleep(IDLE_WINDOW_S)
    xacts1, rows1 = await db_counters(conn, database_name(h))
    beats = nodes * (time.monotonic() - started) / HEARTBEAT
    return {
        "nodes": nodes,
        "queriesPerHeartbeatPerNode": round((xacts1 - xacts0) / beats, 2),
        "rowsPerHeartbeatPerNode": round((rows1 - rows0) / beats, 1),
    }


async def ring_sizes_agree(http: httpx.AsyncClient, nodes: list[Proc], size: int) -> bool:
    values = await asyncio.gather(*(metric(http, n.url, RING_GAUGE, timeout=1.0) for n in nodes))
    return all(v == size for v in values)


async def time_agreement(h: ClusterHarness, members: list[Proc], since: float) -> dict[str, float | None]:
    """Seconds from ``since`` until every member's ring gauge shows the members, and until the
    database's ring digests agree; None when not reached within AGREE_DEADLINE_S."""
    expected = {n.uuid for n in members}

    async def until(predicate: Any, interval: float) -> float | None:
        while time.monotonic() - since < AGREE_DEADLINE_S:
            if await predicate():
                return round(time.monotonic() - since, 3)
            await asyncio.sleep(interval)
        return None

    async with httpx.AsyncClient() as http:
        gauges, digests = await asyncio.gather(
            until(lambda: ring_sizes_agree(http, members, len(members)), RING_POLL_S),
            until(lambda: h.rings_agree(expected), RING_POLL_S),
        )
    return {"ringsS": gauges, "databaseS": digests}


@dataclass
class Load:
    """WORKERS HTTP clients flipping VMs until stopped, each starting at a different node."""

    toggler: Toggler
    clients: list[Client]
    ok: int = 0
    failures: Failures = field(default_factory=Failures)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    def over(cls, urls: list[str], toggler: Toggler) -> Load:
        rotated = [urls[i % len(urls) :] + urls[: i % len(urls)] for i in range(WORKERS)]
        return cls(toggler, [Client.http(u, password=ADMIN_PASSWORD, timeout=CALL_TIMEOUT) for u in rotated])

    async def worker(self, client: Client) -> None:
        while not self._stop.is_set():
            vm = await self.toggler.free.get()
            try:
                op = client.stop_vm if self.toggler.state[vm] == "Running" else client.start_vm
                self.toggler.state[vm] = (await op(vm))["state"]
                self.ok += 1
            except Exception as exc:
                self.failures.add(exc)
                await self._resync(client, vm, exc)
            finally:
                self.toggler.free.put_nowait(vm)

    async def _resync(self, client: Client, vm: str, exc: Exception) -> None:
        if isinstance(exc, ZStackError) and exc.code is ErrorCode.INVALID_STATE:
            try:
                self.toggler.state[vm] = (await client.query_vms(uuid=vm))["inventories"][0]["state"]
            except Exception:
                pass

    async def run(self) -> None:
        try:
            await asyncio.gather(*(self.worker(c) for c in self.clients))
        finally:
            for c in self.clients:
                await c.close()

    def stop(self) -> None:
        self._stop.set()


async def churn(h: ClusterHarness, seconds: float) -> dict[str, Any]:
    """A third of the way in, a node joins; two thirds in, one leaves; the agreement times."""
    await asyncio.sleep(seconds / 3)
    joiner = await h.start_node()
    join = await time_agreement(h, alive(h), time.monotonic())
    await asyncio.sleep(seconds / 3)
    leaver = h.nodes[1]
    since = time.monotonic()
    leaver.signal(signal.SIGTERM)
    leave = await time_agreement(h, [n for n in alive(h) if n is not leaver], since)
    return {"join": join, "leave": leave, "joined": joiner.uuid, "left": leaver.uuid}


async def steady_load(h: ClusterHarness, seconds: float) -> dict[str, Any]:
    agent = await h.start_agent()
    async with h.client(h.urls(), timeout=60) as setup:
        toggler = Toggler(await make_vms(setup, agent, VMS))
    load = Load.over(h.urls(), toggler)
    running = asyncio.create_task(load.run())
    started = time.monotonic()
    try:
        events = await churn(h, seconds)
        await asyncio.sleep(max(0.0, seconds - (time.monotonic() - started)))
    finally:
        load.stop()
        await asyncio.wait_for(running, CALL_TIMEOUT + 10)
    return {
        **events,
        "seconds": round(time.monotonic() - started, 1),
        "okCalls": load.ok,
        "failedCalls": load.failures.total,
        "errorCodes": dict(load.failures.counts),
        "errorSamples": load.failures.samples,
    }


def false_evictions(h: ClusterHarness, stopped: set[str]) -> dict[str, Any]:
    records = log_events(h.nodes, EVICTION_EVENT)
    false = [r.get("dead", "?") for r in records if r.get("dead") not in stopped]
    return {"evictions": len(records), "falseEvictions": len(false), "falselyEvicted": sorted(set(false))}


def lookup_cost(ring_nodes: int) -> dict[str, Any]:
    """µs per lookup at ``ring_nodes`` nodes: LiveRing with repeated lookups, HashRing uncached."""
    rnd = random.Random(ring_nodes)
    nodes = seeded_uuids(rnd, ring_nodes)
    keys = seeded_uuids(rnd, DISTINCT)
    sequence = [k for k in rnd.choices(keys, k=LOOKUPS // LOOKUPS_PER_MESSAGE) for _ in range(LOOKUPS_PER_MESSAGE)]
    live = LiveRing(nodes[0], nodes)
    started = time.perf_counter()
    for k in sequence:
        live.owner_of(k)
    live_us = (time.perf_counter() - started) / len(sequence) * 1e6
    ring = HashRing(nodes)
    started = time.perf_counter()
    for k in keys:
        ring.owner_of(k)
    plain_us = (time.perf_counter() - started) / len(keys) * 1e6
    return {"nodes": ring_nodes, "liveRingUs": round(live_us, 3), "hashRingUncachedUs": round(plain_us, 3)}


async def run(url: str, prefix: str, seconds: float, progress: Any, quick: bool = False) -> dict[str, Any]:
    total = QUICK_NODES if quick else NODES
    points = [p for p in IDLE_POINTS if p <= total]
    admin = await asyncpg.connect(servers.pg_admin_dsn(), timeout=10)
    sampling_conn = await asyncpg.connect(servers.pg_admin_dsn(), timeout=10)
    try:
        async with cluster(url, prefix, 0, heartbeat=HEARTBEAT, node_timeout=NODE_TIMEOUT, env=DB_POOL_ENV) as h:
            sampler = ConnectionSampler(sampling_conn, database_name(h))
            sampling = asyncio.create_task(sampler.run())
            try:
                idle = []
                for p in points:
                    sampler.phase = "startup"
                    await grow_to(h, p)
                    sampler.phase = "idle"
                    idle.append(await membership_cost(h, admin, p))
                progress.update(2)
                sampler.phase = "load"
                load = await steady_load(h, 3 * seconds)
                progress.update(1)
                evictions = false_evictions(h, {load["left"]})
            finally:
                sampler.stop()
                await sampling
    finally:
        await admin.close()
        await sampling_conn.close()
    lookups = [lookup_cost(n) for n in RING_SIZES]
    progress.update(1)
    return _summary(total, idle, load, evictions, sampler.peaks, lookups)


def _summary(
    total: int,
    idle: list[dict[str, Any]],
    load: dict[str, Any],
    evictions: dict[str, Any],
    peaks: dict[str, int],
    lookups: list[dict[str, Any]],
) -> dict[str, Any]:
    agree = [load[k]["ringsS"] for k in ("join", "leave")]
    peak = max(peaks.values(), default=0)
    return {
        "nodes": total,
        "heartbeatS": HEARTBEAT,
        "nodeTimeoutS": NODE_TIMEOUT,
        "nodeEnv": DB_POOL_ENV,
        "idle": idle,
        "load": load,
        **evictions,
        "peakDbConnections": peak,
        "peakDbConnectionsByPhase": peaks,
        "ringLookup": lookups,
        "met": {
            "failedCalls": load["failedCalls"] == 0,
            "falseEvictions": evictions["falseEvictions"] == 0,
            "ringsAgreeJoin": agree[0] is not None and agree[0] <= HEARTBEAT,
            "ringsAgreeLeave": agree[1] is not None and agree[1] <= HEARTBEAT,
            "peakDbConnections": peak <= TARGET_PEAK_CONNECTIONS,
        },
    }
