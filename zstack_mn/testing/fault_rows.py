"""The rows of docs/FAULTS.md: how each fault is injected into a running cluster, and what it may
cost the clients. A row's ``inject`` runs while the load runs; it records problems (expectations
of its own, such as "nobody was evicted") and measures (detection times, pause lengths) on
``Run``. ``zstack_mn.testing.faults`` runs the rows and checks the history."""

from __future__ import annotations

import asyncio
import random
import signal
import time
import uuid as uuidlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import httpx

from zstack_mn.agent.protocol import AgentFault
from zstack_mn.bus.topology import Topology
from zstack_mn.client import Client
from zstack_mn.cluster.ring import HashRing
from zstack_mn.messages import ErrorCode
from zstack_mn.messages.host import HOST
from zstack_mn.messages.vm import VM
from zstack_mn.testing import servers
from zstack_mn.testing.cluster import ClusterHarness, Proc, agent_in_flight, set_agent_faults
from zstack_mn.testing.ha import PgPair, RabbitCluster
from zstack_mn.testing.history import OK, History, make_client, with_key
from zstack_mn.testing.observer import Observer
from zstack_mn.testing.proxy import CutProxy
from zstack_mn.testing.uuids import seeded_uuids

HEARTBEAT_S = 0.5
NODE_TIMEOUT_S = 3.0
DEADLINE_S = 30.0
ATTEMPT_TIMEOUT_S = 4.0
AGENT_LATENCY_S = 0.02
AGENT_TIMEOUT_S = 3.0
DETECTION_BOUND_S = 20.0
DEATH_NOTICED_BOUND_S = 2 * (NODE_TIMEOUT_S + HEARTBEAT_S)
LEAVE_NOTICED_BOUND_S = 4 * HEARTBEAT_S
CONSUMERS_BACK_BOUND_S = 10.0
MEMBER_LOSS_SERVED_BOUND_S = 5.0
"""Broker member lost (issue 16's target): every VM is served again within this."""
RING_SAMPLE = 10_000
RETRYABLE_CODES = frozenset(c.name for c in ErrorCode if c.retryable)
LATENCY_OPS = ("start", "stop", "reboot")


@dataclass
class Run:
    """Everything a row's fault needs, and what it reports back."""

    harness: ClusterHarness
    nodes: list[Proc]
    rng: random.Random
    observer: Observer
    agent_url: str
    history: History
    vms: list[str]
    proxies: dict[str, CutProxy] = field(default_factory=dict)
    ha: HaServers | None = None
    """The row's own RabbitMQ cluster and PostgreSQL pair (rows with ``backend="ha"``)."""
    ring_at_injection: HashRing | None = None
    victim: Proc | None = None
    victim_uuid: str = ""
    injected_at: float = 0.0
    measures: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def expect(self, ok: bool, problem: str) -> None:
        if not ok:
            self.problems.append(problem)

    async def wait_for(self, predicate: Callable[[], Any], bound: float, what: str) -> float | None:
        """Seconds until ``predicate()`` held, or None (and a problem) past ``bound``."""
        try:
            return await self.harness.wait_until(predicate, bound, what)
        except TimeoutError:
            self.problems.append(f"{what}: not within {bound:g}s")
            return None

    def gone(self, uuid: str) -> bool:
        return uuid in self.observer.timeline.gone_at

    async def set_agent_faults(self, faults: list[AgentFault]) -> None:
        await set_agent_faults(self.agent_url, faults)

    async def agent_in_flight(self, node: str) -> int:
        return await agent_in_flight(self.agent_url, node)


Inject = Callable[[Run], Awaitable[None]]
Prepare = Callable[["RunSetup"], Awaitable[dict[str, str]]]


@dataclass(frozen=True)
class Timings:
    """The cluster's timings in a run (seconds)."""

    heartbeat: float
    node_timeout: float
    agent_timeout: float


SCALED = Timings(HEARTBEAT_S, NODE_TIMEOUT_S, AGENT_TIMEOUT_S)
"""Most rows: scaled down so that a run is short."""
DEFAULTS = Timings(2.0, 10.0, 10.0)
"""The settings' defaults, as a user runs them (``zstack_mn.config.Settings``)."""


@dataclass(frozen=True)
class Row:
    """One row of the matrix: how to inject the fault and what it may cost the clients."""

    name: str
    summary: str
    inject: Inject
    allowed_errors: frozenset[str] = frozenset()
    special_node: Prepare | None = None
    detect_bound: float | None = None
    timings: Timings = SCALED
    backend: str = "shared"
    """``shared``: the machine's RabbitMQ and PostgreSQL (a vhost and a database of the run's own);
    ``ha``: a 3-member RabbitMQ cluster with quorum queues and a PostgreSQL primary with a
    synchronous standby, started for the run (``zstack_mn.testing.ha``)."""
    served_bound: float | None = None
    """When set: every VM must be served again within this many seconds of the injection."""


@dataclass
class RunSetup:
    """What a row's special node is prepared with (before any node starts)."""

    harness: ClusterHarness
    rng: random.Random
    proxies: dict[str, CutProxy]
    measures: dict[str, Any]


@dataclass
class HaServers:
    rabbit: RabbitCluster
    pg: PgPair


# ---------------------------------------------------------------- the faults


async def _sigkill(run: Run) -> None:
    victim = run.victim = run.rng.choice(run.nodes)
    run.victim_uuid = victim.uuid
    victim.signal(signal.SIGKILL)
    await run.wait_for(
        lambda: run.observer.timeline.first_without(victim.uuid, run.injected_at),
        DETECTION_BOUND_S,
        "survivors' rings drop the killed node",
    )


async def _sigstop_short(run: Run) -> None:
    victim = run.victim = run.rng.choice(run.nodes)
    run.victim_uuid = victim.uuid
    pause = run.rng.uniform(0.2, 0.6) * NODE_TIMEOUT_S
    run.measures["pause_s"] = round(pause, 2)
    victim.signal(signal.SIGSTOP)
    try:
        await asyncio.sleep(pause)
    finally:
        victim.signal(signal.SIGCONT)
    await asyncio.sleep(2 * HEARTBEAT_S)
    run.expect(not run.gone(victim.uuid), "a node paused for less than node_timeout was evicted")


async def _sigstop_long(run: Run) -> None:
    victim = run.victim = run.rng.choice(run.nodes)
    run.victim_uuid = victim.uuid
    victim.signal(signal.SIGSTOP)
    try:
        await run.wait_for(lambda: run.gone(victim.uuid), DETECTION_BOUND_S, "the paused node is evicted")
        await asyncio.sleep(run.rng.uniform(0.0, 2.0))
    finally:
        victim.signal(signal.SIGCONT)
    await run.wait_for(lambda: _rejoined(run, victim), 30, "the woken node rejoins under a new uuid")


async def _rejoined(run: Run, proc: Proc) -> bool:
    try:
        now = await run.harness.current_uuid(proc)
    except (TimeoutError, RuntimeError):
        return False
    if now != run.victim_uuid and now in run.observer.timeline.running_at_end():
        proc.uuid = now
        return True
    return False


async def _sigterm(run: Run) -> None:
    victim = run.victim = run.rng.choice(run.nodes)
    run.victim_uuid = victim.uuid
    victim.signal(signal.SIGTERM)
    code = await asyncio.to_thread(victim.popen.wait, 60)
    run.expect(code == 0, f"SIGTERM exit status {code}")
    await run.wait_for(
        lambda: run.observer.timeline.first_without(victim.uuid, run.injected_at),
        DETECTION_BOUND_S,
        "peers see the stopped node leave",
    )


async def _rolling_restart(run: Run) -> None:
    for old in list(run.nodes):
        old.signal(signal.SIGTERM)
        code = await asyncio.to_thread(old.popen.wait, 60)
        run.expect(code == 0, f"{old.name}: SIGTERM exit status {code}")
        new = await run.harness.start_node(port=old.port)
        run.nodes[run.nodes.index(old)] = new
        await run.wait_for(_lately_in_every_ring(run, new.uuid), 15, f"{new.name} in every ring")


def _lately_in_every_ring(run: Run, uuid: str) -> Callable[[], float | None]:
    """A predicate: within the last second, every ring agreed on a membership that has ``uuid``."""
    return lambda: run.observer.timeline.first_with(uuid, time.monotonic() - 1)


async def _join(run: Run) -> None:
    newcomer = await run.harness.start_node()
    run.victim_uuid = newcomer.uuid
    took = await run.wait_for(
        lambda: run.observer.timeline.first_with(newcomer.uuid, run.injected_at), 15, "every ring has the newcomer"
    )
    before = HashRing({n.uuid for n in run.nodes})
    after = HashRing({n.uuid for n in run.nodes} | {newcomer.uuid})
    moved = [v for v in run.vms if before.owner_of(v) != after.owner_of(v)]
    run.expect(all(after.owner_of(v) == newcomer.uuid for v in moved), "a VM moved between two old nodes")
    sample = seeded_uuids(run.rng, RING_SAMPLE)
    share = sum(before.owner_of(u) != after.owner_of(u) for u in sample) / RING_SAMPLE
    fair = 1 / len(after.nodes)
    run.expect(share <= 1.2 * fair, f"{share:.1%} of {RING_SAMPLE} uuids moved to the newcomer (fair {fair:.1%})")
    run.measures["moved_share"] = round(share, 3)
    run.expect(
        took is None or took <= LEAVE_NOTICED_BOUND_S,
        f"the newcomer reached every ring after {took}s (bound {LEAVE_NOTICED_BOUND_S:g}s)",
    )
    run.measures.update(moved=len(moved), of=len(run.vms), ring_s=took and round(took, 2))
    run.nodes.append(newcomer)


async def _outage(run: Run, what: str, stop: Callable[[], Any], start: Callable[[], Any], longest: float) -> None:
    """Stop a server for a random 1 s to ``longest`` and start it again, even if the run fails."""
    down = run.rng.uniform(1.0, longest)
    run.measures["down_s"] = round(down, 2)
    stopped = await asyncio.to_thread(stop)
    try:
        run.expect(stopped.returncode == 0, f"{what} stop: {stopped.stderr.strip()}")
        await asyncio.sleep(down)
    finally:
        started = await asyncio.to_thread(start)
    run.expect(started.returncode == 0, f"{what} start: {started.stderr.strip()}")


def _nobody_hurt(run: Run, what: str) -> None:
    run.expect(all(n.alive for n in run.nodes), f"a node exited during a {what} restart")
    run.expect(not any(run.gone(n.uuid) for n in run.nodes), f"a {what} restart evicted a node")


async def _rabbitmq_restart(run: Run) -> None:
    await _outage(
        run, "rabbitmq", lambda: servers.rabbitmqctl("stop_app"), lambda: servers.rabbitmqctl("start_app"), 5.0
    )
    took = await run.wait_for(lambda: _consumers_back(run), 30, "every node's consumers are back")
    run.measures["consumers_back_s"] = took and round(took, 2)
    run.expect(
        took is None or took <= CONSUMERS_BACK_BOUND_S,
        f"consumers back {took}s after start_app (bound {CONSUMERS_BACK_BOUND_S:g}s)",
    )
    _nobody_hurt(run, "broker")


async def _broker_member_kill(run: Run) -> None:
    """kill -9 the RabbitMQ member that leads the API queue (the worst member to lose)."""
    assert run.ha is not None
    leader = await run.ha.rabbit.queue_leader(Topology(run.harness.queue_prefix).api_queue)
    run.measures["member"] = leader + 1
    run.injected_at = time.monotonic()
    await run.ha.rabbit.kill(leader)
    await _until_every_vm_served(run)
    _nobody_hurt(run, "broker member")


async def _broker_member_stop(run: Run) -> None:
    """``rabbitmqctl stop_app`` on a member that does not lead the API queue, for 1–5 s."""
    assert run.ha is not None
    rabbit = run.ha.rabbit
    leader = await rabbit.queue_leader(Topology(run.harness.queue_prefix).api_queue)
    member = run.rng.choice([i for i in range(len(rabbit.members)) if i != leader])
    run.measures["member"] = member + 1
    down = run.rng.uniform(1.0, 5.0)
    run.measures["down_s"] = round(down, 2)
    run.injected_at = time.monotonic()
    await rabbit.stop_app(member)
    try:
        await asyncio.sleep(down)
    finally:
        await rabbit.start_app(member)
    await _until_every_vm_served(run)
    _nobody_hurt(run, "broker member")


async def _db_failover(run: Run) -> None:
    """Stop the PostgreSQL primary with ``-m immediate`` and promote the synchronous standby."""
    assert run.ha is not None
    took = await run.ha.pg.fail_over()
    run.measures["promoted_s"] = round(took, 2)
    await _until_every_vm_served(run)
    _nobody_hurt(run, "database fail-over")


async def _until_every_vm_served(run: Run, bound: float = 60.0) -> None:
    """Wait (bounded) until every VM of the run has been served again since the injection."""
    await run.wait_for(lambda: set(run.vms) <= _served_again(run)[1].keys(), bound, "every VM served again")


def _served_again(run: Run) -> tuple[dict[str, float], dict[str, float]]:
    """(asked, served) after the fault, by VM: when it was first asked about (the injection, for
    a request in flight then, or the first request sent later) and when a request about it first
    succeeded with an answer given after the injection."""
    asked: dict[str, float] = {}
    served: dict[str, float] = {}
    for op in sorted(run.history.ops, key=lambda o: o.sent):
        if not op.vm or (op.answered is not None and op.answered < run.injected_at):
            continue  # a create that failed names no VM
        asked.setdefault(op.vm, max(op.sent, run.injected_at))
        if op.outcome == OK and op.answered is not None and op.vm not in served:
            served[op.vm] = op.answered
    return asked, served


def every_vm_served_again_s(run: Run) -> float | None:
    """The longest any VM waited to be served after the fault (see ``_served_again``); the
    workload's own pacing (how long until it picks a VM again) is left out, and so are VMs it no
    longer asks about. None if a VM asked about never was."""
    asked, served = _served_again(run)
    if not asked or asked.keys() - served.keys():
        return None
    return max(served[vm] - asked[vm] for vm in asked)


async def _consumers_back(run: Run) -> bool:
    """Every live node consumes its service queues, and every node the API queue (rabbitmqctl)."""
    vhost = urlsplit(run.harness.amqp_url).path.lstrip("/") or "/"
    listed = await asyncio.to_thread(
        servers.rabbitmqctl, "list_queues", "-p", vhost, "name", "consumers", "--no-table-headers", "-q"
    )
    if listed.returncode != 0:
        return False
    consumers = {}
    for line in listed.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            consumers[parts[0]] = int(parts[1])
    topology = Topology(run.harness.queue_prefix)
    live = [n.uuid for n in run.nodes if n.alive]
    wanted = [topology.service_queue(service, u) for service in (VM, HOST) for u in live]
    return consumers.get(topology.api_queue, 0) >= len(live) and all(consumers.get(q, 0) >= 1 for q in wanted)


async def _postgres_restart(run: Run) -> None:
    await _outage(
        run, "postgresql", lambda: servers.pg_ctl("stop", "-m", "immediate"), lambda: servers.pg_ctl("start"), 8.0
    )
    await run.wait_for(lambda: _all_ready(run), 30, "every node ready again")
    _nobody_hurt(run, "database")


async def _all_ready(run: Run) -> bool:
    async with httpx.AsyncClient(timeout=2) as http:
        for n in run.nodes:
            if not n.alive:
                return False
            try:
                if (await http.get(n.url + "/readyz")).status_code != 200:
                    return False
            except httpx.HTTPError:
                return False
    return True


def _proxied(service: str) -> Prepare:
    async def prepare(setup: RunSetup) -> dict[str, str]:
        h = setup.harness
        url = h.amqp_url if service == "broker" else h.database_url
        parts = urlsplit(url)
        proxy = CutProxy(parts.hostname or "127.0.0.1", parts.port or (5672 if service == "broker" else 5432))
        port = await proxy.start()
        setup.proxies[service] = proxy
        netloc = parts.netloc.rsplit(":", 1)[0] if parts.port else parts.netloc
        proxied = urlunsplit(parts._replace(netloc=f"{netloc}:{port}"))
        key = "ZSTACK_MN_BROKER_URL" if service == "broker" else "ZSTACK_MN_DATABASE_URL"
        return {key: proxied}

    return prepare


def _cut(service: str) -> Inject:
    async def inject(run: Run) -> None:
        victim = run.victim = run.nodes[-1]
        run.victim_uuid = victim.uuid
        proxy = run.proxies[service]
        length = run.rng.uniform(2.0, 4.0) * NODE_TIMEOUT_S
        run.measures["cut_s"] = round(length, 2)
        proxy.cut()
        try:
            await asyncio.sleep(length)
        finally:
            proxy.heal()
        evicted = run.gone(victim.uuid)
        run.measures["evicted"] = evicted
        run.expect(evicted, f"a node cut from the {service} for {length:.1f}s was not evicted")
        await run.wait_for(lambda: _rejoined(run, victim), 40, "the cut node rejoins after the cut heals")

    return inject


async def _skewed_clock(setup: RunSetup) -> dict[str, str]:
    minutes = setup.rng.choice([-1, 1]) * setup.rng.randint(2, 10)
    setup.measures["skew_min"] = minutes
    return faketime_env(f"{minutes * 60:+d}")


def faketime_env(offset: str) -> dict[str, str]:
    """Environment that runs a process with its wall clock ``offset`` seconds off (libfaketime
    from PyPI, built at install; the monotonic clock stays true)."""
    import libfaketime

    _, env = libfaketime.get_reload_information()
    return {**env, "FAKETIME": offset, "DONT_FAKE_MONOTONIC": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


async def _clock_skew(run: Run) -> None:
    skewed = run.nodes[-1]
    await asyncio.sleep(4 * NODE_TIMEOUT_S)
    run.expect(not run.gone(skewed.uuid), "the node with a skewed clock was evicted")
    victim = run.victim = run.rng.choice(run.nodes[:-1])
    run.victim_uuid = victim.uuid
    run.injected_at = time.monotonic()
    victim.signal(signal.SIGKILL)
    await run.wait_for(
        lambda: run.observer.timeline.first_without(victim.uuid, run.injected_at),
        DETECTION_BOUND_S,
        "a killed node is evicted while another node's clock is skewed",
    )


async def _duplicate_delivery(run: Run) -> None:
    """The same request (one idempotency key, so one message id) sent to every node at once."""
    live = [n for n in run.nodes if n.alive]
    clients = [make_client([n.url], DEADLINE_S, ATTEMPT_TIMEOUT_S) for n in live]
    try:
        for _ in range(4):
            key = str(uuidlib.uuid4())
            ops = await asyncio.gather(
                *(run.history.record(-2, "create", "", _create_dup(c), key=key) for c in clients)
            )
            vms = {op.vm for op in ops if op.outcome == OK}
            run.expect(
                len(vms) == 1 and all(op.outcome == OK for op in ops),
                f"one create sent to {len(ops)} nodes gave {[(op.outcome, op.vm) for op in ops]}",
            )
            if len(vms) != 1:
                continue
            vm = vms.pop()
            key = str(uuidlib.uuid4())
            ops = await asyncio.gather(
                *(run.history.record(-2, "stop", vm, with_key(c.stop_vm, vm), key=key) for c in clients)
            )
            run.expect(
                all(op.outcome == OK and op.state == "Stopped" for op in ops),
                f"one stop sent to {len(ops)} nodes gave {[(op.outcome, op.code) for op in ops]}",
            )
    finally:
        for c in clients:
            await c.close()


def _create_dup(client: Client) -> Callable[[str], Awaitable[dict[str, Any]]]:
    return lambda key: client.create_vm("dup", cpu_num=1, memory_size="64M", key=key)


async def _kill_between_effect_and_ack(run: Run) -> None:
    """SIGKILL a node while the agent is applying its operations, past their commit point: the
    effect lands, the ack never, and the new owner waits for them at the agent, not for a deadline."""
    victim = run.victim = run.rng.choice(run.nodes)
    run.victim_uuid = victim.uuid
    await run.set_agent_faults([AgentFault(op=op, apply_latency=1.0) for op in LATENCY_OPS])
    try:
        await run.wait_for(lambda: _has_in_flight(run, victim.uuid), 15, "the victim has agent calls in flight")
        run.measures["in_flight_at_kill"] = await run.agent_in_flight(victim.uuid)
        victim.signal(signal.SIGKILL)
        await asyncio.sleep(1.2)
    finally:
        await run.set_agent_faults([AgentFault(op=op, latency=AGENT_LATENCY_S) for op in LATENCY_OPS])
    await run.wait_for(
        lambda: run.observer.timeline.first_without(victim.uuid, run.injected_at),
        DETECTION_BOUND_S,
        "survivors' rings drop the killed node",
    )


async def _has_in_flight(run: Run, node: str) -> bool:
    return await run.agent_in_flight(node) > 0


async def _poison(run: Run) -> None:
    """Raw garbage on the API queue and on a node's vmInstance queue, some with a reply-to."""
    topo = Topology(run.harness.queue_prefix)
    target = run.victim = run.rng.choice(run.nodes)
    run.victim_uuid = target.uuid
    bodies = [b"{not json", b"\xff\xfe\x00", b'{"type": "NoSuchMsg", "body": {}}', b"[]", b'{"id": 1}', b"x" * 300_000]
    conn = await aio_pika.connect(run.harness.amqp_url, timeout=10)
    try:
        ch = await conn.channel()
        reply = await ch.declare_queue("", exclusive=True, auto_delete=True)
        sent_with_reply = 0
        for i, body in enumerate(bodies * 3):
            queue = topo.api_queue if i % 2 else topo.service_queue("vmInstance", target.uuid)
            reply_to = reply.name if i % 3 == 0 else None
            sent_with_reply += reply_to is not None
            await ch.default_exchange.publish(
                aio_pika.Message(body, message_id=f"poison-{i}", correlation_id=f"poison-{i}", reply_to=reply_to),
                routing_key=queue,
            )
        got = 0
        deadline = time.monotonic() + 15
        while got < sent_with_reply and time.monotonic() < deadline:
            msg = await reply.get(no_ack=True, fail=False)
            if msg is None:
                await asyncio.sleep(0.1)
                continue
            got += 1
            run.expect(b"error" in msg.body.lower(), f"a poison message got a non-error reply: {msg.body[:100]!r}")
        run.measures["error_replies"] = f"{got}/{sent_with_reply}"
        run.expect(
            got == sent_with_reply, f"{sent_with_reply - got} poison messages with a reply-to got no error reply"
        )
        dead = await ch.declare_queue(topo.dead_letter_queue, passive=True)
        run.measures["dead_lettered"] = dead.declaration_result.message_count
    finally:
        await conn.close()
    run.expect(all(n.alive for n in run.nodes), "a node died of a poison message")


ROWS: dict[str, Row] = {
    r.name: r
    for r in (
        Row("sigkill", "SIGKILL one of three nodes", _sigkill, detect_bound=DEATH_NOTICED_BOUND_S),
        Row("sigstop-short", "SIGSTOP shorter than node_timeout, then SIGCONT", _sigstop_short),
        Row(
            "sigstop-long",
            "SIGSTOP longer than node_timeout, then SIGCONT",
            _sigstop_long,
            detect_bound=DEATH_NOTICED_BOUND_S,
        ),
        Row("sigterm", "SIGTERM one node", _sigterm, detect_bound=LEAVE_NOTICED_BOUND_S),
        Row("rolling-restart", "every node SIGTERM'd and started again in turn", _rolling_restart),
        Row("join", "a fourth node joins under load", _join),
        Row("rabbitmq-restart", "rabbitmqctl stop_app / start_app", _rabbitmq_restart, RETRYABLE_CODES),
        Row("postgres-restart", "pg_ctlcluster stop -m immediate / start", _postgres_restart, RETRYABLE_CODES),
        Row(
            "broker-cut",
            "one node cut from RabbitMQ (black-holing proxy)",
            _cut("broker"),
            special_node=_proxied("broker"),
            detect_bound=DEATH_NOTICED_BOUND_S,
        ),
        Row(
            "db-cut",
            "one node cut from PostgreSQL (black-holing proxy)",
            _cut("database"),
            special_node=_proxied("database"),
            detect_bound=DEATH_NOTICED_BOUND_S,
        ),
        Row(
            "clock-skew",
            "one node's wall clock minutes off (libfaketime), then another node killed",
            _clock_skew,
            special_node=_skewed_clock,
            detect_bound=DEATH_NOTICED_BOUND_S,
        ),
        Row("duplicate-delivery", "one request (one message id) sent to every node at once", _duplicate_delivery),
        Row(
            "kill-after-effect",
            "SIGKILL a node between the agent's effect and the ack",
            _kill_between_effect_and_ack,
            detect_bound=DEATH_NOTICED_BOUND_S,
        ),
        Row("poison", "raw garbage on the API queue and a service queue", _poison),
        Row(
            "sigkill-default-timings",
            "SIGKILL one of three nodes, with the default heartbeat, node and agent timeouts",
            _sigkill,
            detect_bound=3 * DEFAULTS.heartbeat,
            timings=DEFAULTS,
        ),
        Row(
            "sigterm-default-timings",
            "SIGTERM one of three nodes, with the default heartbeat, node and agent timeouts",
            _sigterm,
            detect_bound=2 * DEFAULTS.heartbeat,
            timings=DEFAULTS,
        ),
        Row(
            "broker-member-kill",
            "3-member RabbitMQ cluster, quorum queues: kill -9 the member leading the API queue",
            _broker_member_kill,
            RETRYABLE_CODES,
            backend="ha",
            served_bound=MEMBER_LOSS_SERVED_BOUND_S,
        ),
        Row(
            "broker-member-stop",
            "3-member RabbitMQ cluster, quorum queues: stop_app / start_app of another member",
            _broker_member_stop,
            RETRYABLE_CODES,
            backend="ha",
            served_bound=MEMBER_LOSS_SERVED_BOUND_S,
        ),
        Row(
            "db-failover",
            "PostgreSQL primary stopped -m immediate, its synchronous standby promoted",
            _db_failover,
            RETRYABLE_CODES,
            backend="ha",
            served_bound=NODE_TIMEOUT_S,
        ),
    )
}
HA_ROWS = frozenset(name for name, row in ROWS.items() if row.backend == "ha")
"""Rows that start their own RabbitMQ cluster and PostgreSQL pair (``make fault-full`` runs them;
the default list of ``python -m zstack_mn.testing.faults`` too)."""
