"""B4: fail-over of one of 3 nodes under load, measured for every VM it affected, with the default
timings (``zstack_mn.config.Settings``: heartbeat 2 s, node_timeout 10 s, agent_timeout 10 s,
call_timeout 30 s; nothing scaled down).

Per fault (SIGKILL; SIGSTOP held past node_timeout until every VM is served, then SIGCONT;
SIGTERM), ROUNDS rounds (``ZSTACK_MN_BENCH_B4_ROUNDS``, default 3; 1 with ``--quick``), each in a
cluster of its own: 3 ``zstack-mn start`` processes on RabbitMQ and PostgreSQL, one
simulated agent with 6 hosts, 120 Running VMs. WORKERS HTTP clients send start, stop or reboot
(at random) to random VMs, so several requests may be in flight on one VM; an INVALID_STATE
answer is fine. Before the fault they use every node; from the fault on, only the survivors.
The fault comes after WARMUP_S, once the cluster is established (three heartbeats after its nodes
started: before that a node does not trust a peer's missing liveness lock, so a young cluster
notices a crash only at the node timeout's pace), at the first moment the victim has at least MIN_IN_FLIGHT
operations under way (polled in the database, for up to FAULT_WAIT_S), so that VMs caught in the
middle of an operation are always among those measured.

The VMs measured are every VM the victim owned by the ring before the fault, and every VM with
an operation in flight on it at the fault: in a transient state with the victim as its
operation's node (read from the database just before the signal, just after it and
IN_FLIGHT_RECHECK_S later, since a statement the victim had sent may still commit), or with a
request from the victim at the agent at that moment (the agent's audit, read just after the
signal). From the fault on, each of them also has a *probe*: a client that sends it random
operations, one at a time, until one is answered, so every measured VM has a request sent right
after the fault whatever the random workers are doing (a VM found only by the re-check, which
the victim did not own, gets its probe IN_FLIGHT_RECHECK_S late; random workers may still serve
it earlier). A VM is *served* at the first answer, to a request (probe or worker) sent after the
fault, that is a success or a definite non-retryable error; its time is from the fault to that
answer. Reported per fault, over every round: the number of VMs measured (owned, in flight at
the fault), the worst, p99 and p50 of their times, the worst of each round, the VMs not served
within SERVE_CAP_S, and the calls of the whole run: ok, answered with a non-retryable error,
failed after the client's own retries, timed out (the client's TIMEOUT at its deadline), and
hung (no answer by the deadline + HUNG_MARGIN_S). Targets (issue 13): SIGKILL ≤ 2 s,
SIGSTOP ≤ node_timeout + 2 s, SIGTERM ≤ 1 s, over every VM measured, none hung.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx

from benchmarks.cluster_util import cluster, make_vms
from zstack_mn.client import Client
from zstack_mn.cluster.membership import LIVENESS_TRUST_ROUNDS
from zstack_mn.cluster.ring import HashRing
from zstack_mn.config import Settings
from zstack_mn.messages import ErrorCode, ZStackError

FAULTS = {"SIGKILL": signal.SIGKILL, "SIGSTOP": signal.SIGSTOP, "SIGTERM": signal.SIGTERM}
ONLY = [f for f in os.environ.get("ZSTACK_MN_BENCH_FAULTS", "").split(",") if f]
STEPS = len(FAULTS)

_DEFAULTS = Settings.model_fields
HEARTBEAT_S = float(_DEFAULTS["heartbeat_interval"].default)
NODE_TIMEOUT_S = float(_DEFAULTS["node_timeout"].default)
AGENT_TIMEOUT_S = float(_DEFAULTS["agent_timeout"].default)
CALL_DEADLINE_S = float(_DEFAULTS["call_timeout"].default)
NODE_ENV = {
    "ZSTACK_MN_AGENT_TIMEOUT": str(AGENT_TIMEOUT_S),
    "ZSTACK_MN_CALL_TIMEOUT": str(CALL_DEADLINE_S),
    "ZSTACK_MN_DRAIN_TIMEOUT": str(_DEFAULTS["drain_timeout"].default),
    "ZSTACK_MN_HOST_PING_INTERVAL": str(_DEFAULTS["host_ping_interval"].default),
}
"""The harness sets a shorter drain timeout and host ping interval for the tests; B4 runs every
setting at its default."""

NODES, HOSTS, VMS, WORKERS = 3, 6, 120, 48
OPERATIONS = ("start", "stop", "reboot")
WARMUP_S = 3.0
SERVE_CAP_S = 45.0
HUNG_MARGIN_S = 1.0
RETRY_PAUSE_S = 0.05
SLOWEST = 5
IN_FLIGHT_RECHECK_S = 0.3
MIN_IN_FLIGHT = 2
FAULT_WAIT_S = 5.0
ROUNDS = int(os.environ.get("ZSTACK_MN_BENCH_B4_ROUNDS", "3"))
TRANSIENT_STATES = ["Starting", "Stopping", "Rebooting", "Migrating", "Destroying"]
TARGETS_S = {"SIGKILL": 2.0, "SIGSTOP": NODE_TIMEOUT_S + 2.0, "SIGTERM": 1.0}

OK, DEFINITE, FAILED, TIMED_OUT, HUNG = "ok", "definite", "failed", "timedOut", "hung"


@dataclass
class Load:
    """The clients of one fault run and what they saw."""

    vms: list[str]
    before: Client
    after: Client
    probes: Client
    t0: float | None = None
    served: dict[str, float] = field(default_factory=dict)
    calls: Counter[str] = field(default_factory=Counter)
    post_fault_calls: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    samples: dict[str, str] = field(default_factory=dict)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def call(self, client: Client, vm: str, op: str) -> str:
        """One request; records its outcome and, for one sent after the fault, whether it served
        its VM. Returns the outcome."""
        t0 = self.t0
        after_fault = t0 is not None
        if after_fault:
            self.post_fault_calls += 1
        try:
            await asyncio.wait_for(getattr(client, f"{op}_vm")(vm), CALL_DEADLINE_S + HUNG_MARGIN_S)
            outcome = OK
        except TimeoutError:
            outcome = HUNG
        except ZStackError as exc:
            outcome = TIMED_OUT if exc.code is ErrorCode.TIMEOUT else FAILED if exc.retryable else DEFINITE
            self._error(exc.code.name, exc.description)
        except Exception as exc:
            outcome = FAILED
            self._error(type(exc).__name__, str(exc))
        answered = time.monotonic()
        self.calls[outcome] += 1
        if t0 is not None and outcome in (OK, DEFINITE) and vm not in self.served:
            self.served[vm] = answered - t0
        return outcome

    def _error(self, code: str, description: str) -> None:
        self.codes[code] += 1
        self.samples.setdefault(code, description[:200])

    async def worker(self, seed: int) -> None:
        """Random operations on random VMs until stopped: every node before the fault, the
        survivors after it."""
        rnd = random.Random(seed)
        while not self.stop.is_set():
            client = self.before if self.t0 is None else self.after
            if await self.call(client, rnd.choice(self.vms), rnd.choice(OPERATIONS)) not in (OK, DEFINITE):
                await asyncio.sleep(RETRY_PAUSE_S)

    async def probe(self, vm: str, seed: int, until: float) -> None:
        """A user of ``vm`` from the fault on: random operations on it, one at a time, until one
        serves it (or ``until``)."""
        rnd = random.Random(seed)
        while vm not in self.served and time.monotonic() < until:
            if await self.call(self.probes, vm, rnd.choice(OPERATIONS)) not in (OK, DEFINITE):
                await asyncio.sleep(RETRY_PAUSE_S)

    async def close(self) -> None:
        for c in (self.before, self.after, self.probes):
            await c.close()


async def operations_on(db: asyncpg.Connection, node: str) -> set[str]:
    """VMs with an operation begun by ``node`` and not finished (a transient state)."""
    rows = await db.fetch(
        "SELECT uuid FROM vm_instance WHERE op_node = $1 AND state = ANY($2::text[])", node, TRANSIENT_STATES
    )
    return {str(r["uuid"]) for r in rows}


async def at_agent(agent_url: str, node: str, at: float) -> set[str]:
    """VMs with a request from ``node`` in flight at the agent at monotonic time ``at`` (the
    agent's audit uses the same machine-wide clock)."""
    async with httpx.AsyncClient(timeout=30) as http:
        resp = await http.get(f"{agent_url}/admin/audit")
        resp.raise_for_status()
    return {
        str(e["vm"])
        for e in resp.json()["entries"]
        if e["node"] == node and e["entered"] <= at and (e["left"] is None or e["left"] >= at)
    }


def nearest_rank(ordered: list[float], q: float) -> float:
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summary(name: str, times: dict[tuple[int, str], float | None], in_flight: set[tuple[int, str]]) -> dict[str, Any]:
    """Worst, p99 and p50 over every (round, VM) measured; unserved VMs leave worst and p99 unset."""
    served = sorted(t for t in times.values() if t is not None)
    not_served = sorted(key for key, t in times.items() if t is None)
    slowest = sorted(times.items(), key=lambda kv: math.inf if kv[1] is None else kv[1], reverse=True)[:SLOWEST]

    def worst(keys: set[tuple[int, str]]) -> float | None:
        picked = [times[k] for k in keys if k in times]
        if not picked or any(t is None for t in picked):
            return None
        return round(max(t for t in picked if t is not None), 3)

    return {
        "vms": len(times),
        "servedVms": len(served),
        "notServed": [{"round": r, "vm": vm} for r, vm in not_served],
        "worstS": round(served[-1], 3) if served and not not_served else None,
        "p99S": round(nearest_rank(served, 0.99), 3) if served and not not_served else None,
        "p50S": round(nearest_rank(served, 0.5), 3) if served and len(not_served) * 2 < len(times) else None,
        "worstInFlightS": worst(in_flight),
        "worstIdleS": worst(set(times) - in_flight),
        "slowest": [
            {"round": r, "vm": vm, "servedS": None if t is None else round(t, 3), "inFlight": (r, vm) in in_flight}
            for (r, vm), t in slowest
        ],
        "targetS": TARGETS_S[name],
    }


@dataclass
class Round:
    """One fault in a cluster of its own: each measured VM's time (None: not served)."""

    times: dict[str, float | None]
    owned: set[str]
    in_flight: set[str]
    agree: float | None
    load: Load
    seconds: float


async def one_round(url: str, prefix: str, sig: int, seed: int) -> Round:
    began = time.monotonic()
    async with cluster(url, prefix, NODES, heartbeat=HEARTBEAT_S, node_timeout=NODE_TIMEOUT_S, env=NODE_ENV) as h:
        established = time.monotonic() + LIVENESS_TRUST_ROUNDS * HEARTBEAT_S
        agent = await h.start_agent()
        async with h.client(h.urls(), timeout=60) as setup:
            vms = [vm["uuid"] for vm in await make_vms(setup, agent, VMS, hosts=HOSTS)]
        ring = HashRing({n.uuid for n in h.nodes})
        victim = h.nodes[1]
        survivors = [n for n in h.nodes if n is not victim]
        owned = {vm for vm in vms if ring.owner_of(vm) == victim.uuid}
        load = Load(
            vms,
            h.client(h.urls(), timeout=CALL_DEADLINE_S),
            h.client(h.urls(survivors), timeout=CALL_DEADLINE_S),
            h.client(h.urls(survivors), timeout=CALL_DEADLINE_S),
        )
        db = await asyncpg.connect(h.database_url.replace("postgresql+asyncpg://", "postgresql://"))
        workers = [asyncio.create_task(load.worker(seed * 1000 + i)) for i in range(WORKERS)]
        try:
            await asyncio.sleep(WARMUP_S)
            await asyncio.sleep(max(0.0, established - time.monotonic()))
            in_flight = await operations_on(db, victim.uuid)
            wait_until = time.monotonic() + FAULT_WAIT_S
            while len(in_flight) < MIN_IN_FLIGHT and time.monotonic() < wait_until:
                in_flight = await operations_on(db, victim.uuid)
            t0 = load.t0 = time.monotonic()
            victim.signal(sig)
            in_flight |= await operations_on(db, victim.uuid) | await at_agent(agent, victim.uuid, t0)
            probed: set[str] = set()

            def probe(vms: set[str]) -> list[asyncio.Task[None]]:
                fresh = sorted(vms - probed)
                probed.update(fresh)
                return [
                    asyncio.create_task(load.probe(vm, seed * 1000 + WORKERS + len(probed) + i, t0 + SERVE_CAP_S))
                    for i, vm in enumerate(fresh)
                ]

            probes = probe(owned | in_flight)
            await asyncio.sleep(IN_FLIGHT_RECHECK_S)
            in_flight |= await operations_on(db, victim.uuid)
            probes += probe(in_flight)
            expected = {n.uuid for n in survivors}
            try:
                agree: float | None = await h.wait_until(
                    lambda: h.rings_agree(expected), SERVE_CAP_S, "survivors agree", interval=0.1
                )
            except TimeoutError:
                agree = None
            await asyncio.gather(*probes)
            if sig == signal.SIGSTOP:
                await asyncio.sleep(max(0.0, t0 + NODE_TIMEOUT_S + 1.0 - time.monotonic()))
                victim.signal(signal.SIGCONT)
        finally:
            load.stop.set()
            await asyncio.gather(*workers, return_exceptions=True)
            await load.close()
            await db.close()
    times = {vm: load.served.get(vm) for vm in owned | in_flight}
    return Round(times, owned, in_flight, agree, load, time.monotonic() - began)


def _worst(r: Round) -> float | None:
    """The round's slowest VM; None if one was not served."""
    served = [t for t in r.times.values() if t is not None]
    return round(max(served), 3) if served and len(served) == len(r.times) else None


def fault_summary(name: str, rounds: list[Round]) -> dict[str, Any]:
    times = {(i, vm): t for i, r in enumerate(rounds) for vm, t in r.times.items()}
    in_flight = {(i, vm) for i, r in enumerate(rounds) for vm in r.in_flight}
    out = summary(name, times, in_flight)
    calls: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    error_samples: dict[str, str] = {}
    for r in rounds:
        calls.update(r.load.calls)
        errors.update(r.load.codes)
        for code, text in r.load.samples.items():
            error_samples.setdefault(code, text)
    agree = [r.agree for r in rounds]
    out.update(
        rounds=len(rounds),
        ownedVms=sum(len(r.owned) for r in rounds),
        inFlightVms=sum(len(r.in_flight) for r in rounds),
        inFlightNotOwned=sum(len(r.in_flight - r.owned) for r in rounds),
        worstByRoundS=[_worst(r) for r in rounds],
        ringsAgreeS=None if any(a is None for a in agree) else round(max(a for a in agree if a is not None), 3),
        ringsAgreeByRoundS=[None if a is None else round(a, 3) for a in agree],
        calls={k: calls.get(k, 0) for k in (OK, DEFINITE, FAILED, TIMED_OUT, HUNG)},
        postFaultCalls=sum(r.load.post_fault_calls for r in rounds),
        errorCodes=dict(errors),
        errorSamples=error_samples,
        seconds=round(sum(r.seconds for r in rounds), 1),
    )
    out["met"] = out["worstS"] is not None and out["worstS"] <= out["targetS"] and calls[HUNG] == 0
    return out


async def run(url: str, prefix: str, seconds: float, progress: Any, quick: bool = False) -> dict[str, Any]:
    began = time.monotonic()
    rounds = 1 if quick else ROUNDS
    faults: dict[str, Any] = {}
    for i, (name, sig) in enumerate(FAULTS.items()):
        if ONLY and name not in ONLY:
            continue
        done = [await one_round(url, f"{prefix}{name.lower()}{j}", sig, seed=(i + 1) * 100 + j) for j in range(rounds)]
        faults[name] = fault_summary(name, done)
        progress.update(1)
    return {
        "settings": {
            "heartbeatS": HEARTBEAT_S,
            "nodeTimeoutS": NODE_TIMEOUT_S,
            "agentTimeoutS": AGENT_TIMEOUT_S,
            "callTimeoutS": CALL_DEADLINE_S,
        },
        "nodes": NODES,
        "hosts": HOSTS,
        "vmsTotal": VMS,
        "workers": WORKERS,
        "rounds": rounds,
        "serveCapS": SERVE_CAP_S,
        "hungMarginS": HUNG_MARGIN_S,
        "faults": faults,
        "seconds": round(time.monotonic() - began, 1),
    }
