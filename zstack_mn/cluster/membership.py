"""Membership: join, heartbeat, the ring, eviction, fencing and rescue.

Protocol (docs/ARCHITECTURE.md has the whole picture):

* join: liveness lock → row JOINING → (node declares queues, consumes) → RUNNING → *joined* event;
* every ``heartbeat_interval`` (a timer without drift or overlap): probe the broker, and only if
  it answered, write the heartbeat in database time (a node cut from the broker cannot serve, so
  it lets its peers evict it and take its queues over); a missing row means we were evicted;
  rebuild the ring from the RUNNING rows; evict peers whose heartbeat is older than
  ``node_timeout`` or whose liveness lock is gone;
* a node evicts only after its own heartbeat write succeeded in the same round, and only by
  timeout after ``node_timeout`` of uninterrupted own success (a database outage must not cause
  mass eviction); by liveness only once its own liveness session is a few rounds old (after a
  database restart every peer needs a round to take its lock again);
* the node whose delete won rescues the evicted node's queues and broadcasts *left*;
* fencing: ``fenced`` is true while our last successful heartbeat is older than ``fence_after``,
  counted from the start of the round that wrote it (never later than the database's own
  timestamp, so the node fences itself no later than its peers could consider it dead).
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import time
from collections.abc import Awaitable, Callable

import structlog
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection

from zstack_mn.bus.cloudbus import CloudBus
from zstack_mn.cluster.events import GRACEFUL_STOP, NodeJoinedEvent, NodeLeftEvent
from zstack_mn.cluster.liveness import LivenessSession
from zstack_mn.cluster.rescue import rescue_queues
from zstack_mn.cluster.ring import HashRing, LiveRing
from zstack_mn.config import Settings
from zstack_mn.db.engine import Database, translated_errors
from zstack_mn.db.nodes import JOINING, LEAVING, RUNNING, Beat, NodeRepository, NodeRow
from zstack_mn.messages import ErrorCode, Event, ZStackError
from zstack_mn.periodic import Periodic

log = structlog.get_logger(__name__)

LIVENESS_TRUST_ROUNDS = 3
PROBES_PER_HEARTBEAT = 4
"""How often, per heartbeat, a node asks whether a peer's liveness lock is gone."""
RESCUE_BOUND_FACTOR = 6
SESSION_TIMEOUTS = 3


def _session_broken(exc: BaseException) -> bool:
    """Whether a failed statement says its session is gone (or unusable), rather than refused."""
    if not isinstance(exc, ZStackError):
        return True
    sqlstate = exc.details.get("sqlstate")
    return sqlstate is None or str(sqlstate).startswith(("08", "57P"))


def _retrieve(task: asyncio.Task[Beat]) -> None:
    """A beat no round waited for to the end: its outcome is read here, so that its failure is
    not reported as an exception never retrieved (the round that needed it already logged)."""
    if not task.cancelled():
        task.exception()


def ring_digest(ring: HashRing) -> str:
    """A short fingerprint of a ring's members, for comparing rings across nodes."""
    return hashlib.blake2b(",".join(sorted(ring.nodes)).encode(), digest_size=6).hexdigest()


class Membership:
    """This node's membership in the cluster."""

    def __init__(
        self,
        node_uuid: str,
        db: Database,
        bus: CloudBus,
        ring: LiveRing,
        settings: Settings,
        *,
        services: Callable[[], list[str]],
        http_address: str = "",
        on_evicted: Callable[[], Awaitable[None]] | None = None,
        on_drained: Callable[[], None] | None = None,
    ) -> None:
        """``on_drained``: called when a node that left gracefully is gone (its row deleted or
        evicted): the operations it was finishing are now for their new owners to take over."""
        self.node_uuid = node_uuid
        self.db = db
        self.bus = bus
        self.ring = ring
        self.settings = settings
        self.services = services
        self.http_address = http_address
        self.on_evicted = on_evicted
        self.on_drained = on_drained
        self.draining: set[str] = set()
        """Nodes out of the ring that are still alive, finishing what they have in flight."""
        self.nodes = NodeRepository(db)
        self.liveness = LivenessSession(db, node_uuid, timeout=max(settings.heartbeat_interval, 1.0))
        self.last_success = time.monotonic()
        self.healthy_since: float | None = None
        self.state = JOINING
        self.evicted = False
        self._stopping = False
        self._rescues: set[asyncio.Task[None]] = set()
        self._round_timeout = max(settings.heartbeat_interval, 1.0)
        self._heartbeat = Periodic(
            "heartbeat", self._tick, settings.heartbeat_interval, stop_timeout=2 * self._round_timeout + 1
        )
        self._probe = Periodic(
            "liveness-probe",
            self._probe_peers,
            settings.heartbeat_interval / PROBES_PER_HEARTBEAT,
            first_run_delayed=True,
            stop_timeout=self._round_timeout + 1,
        )
        self._written = asyncio.Event()
        self._session_timeouts = 0
        self._session_beat: asyncio.Task[Beat] | None = None
        bus.metrics.heartbeat_age.set_function(self.heartbeat_age)

    @property
    def fenced(self) -> bool:
        """True while this node must not do resource work."""
        return self.evicted or time.monotonic() - self.last_success > self.settings.fence_after_s

    async def heartbeat_written(self) -> None:
        """Return when the next heartbeat has been written (work paused by fencing waits on this,
        not on a timer: ten thousand paused operations cost nothing while they wait)."""
        await self._written.wait()

    def heartbeat_age(self) -> float:
        return time.monotonic() - self.last_success

    async def join(self) -> None:
        """Take the liveness lock and insert our row (JOINING)."""
        if not await self.liveness.ensure():
            raise RuntimeError("cannot take the liveness lock")
        await self.nodes.insert(self.node_uuid, socket.gethostname(), self.http_address, self.liveness.key)
        self.last_success = time.monotonic()
        self.healthy_since = self.last_success
        await self.bus.subscribe("node.#", self._on_event)

    async def announce_running(self) -> None:
        """RUNNING in the table, in our ring, and broadcast to everyone's."""
        await self.nodes.set_state(self.node_uuid, RUNNING)
        self.state = RUNNING
        await self.reconcile()
        await self.bus.publish(NodeJoinedEvent(node_uuid=self.node_uuid, http_address=self.http_address))
        log.info("node is running", ring=len(self.ring.nodes))

    def start(self) -> None:
        self._heartbeat.start()
        if self.liveness.enabled:
            self._probe.start()

    async def _probe_peers(self) -> None:
        """Between heartbeats: when a peer's liveness lock is gone (its process died and
        PostgreSQL closed its session) or its heartbeat has just passed ``node_timeout`` (it is
        frozen or cut off), run the heartbeat round now, which evicts it, instead of at the next
        tick: eviction comes within a fraction of a heartbeat of its cause. Each check only under
        the trust the round itself needs to evict that way. A failed probe says nothing (the
        heartbeat round reports database trouble)."""
        if self.evicted or self._stopping:
            return
        sessions = self._trusts_liveness()
        stale_after = self.settings.node_timeout if self._trusts_timeouts(time.monotonic()) else None
        if not sessions and stale_after is None:
            return
        try:
            async with asyncio.timeout(self._round_timeout):
                dead = await self.nodes.a_peer_is_dead(self.node_uuid, sessions=sessions, stale_after=stale_after)
        except (ZStackError, TimeoutError, OSError):
            return
        if dead:
            self._heartbeat.wake()

    def _trusts_timeouts(self, now: float) -> bool:
        """A peer's stale heartbeat means death only after ``node_timeout`` of our own
        uninterrupted success (a database outage must not evict everyone)."""
        return now - (self.healthy_since or now) >= self.settings.node_timeout

    def _trusts_liveness(self) -> bool:
        """A peer's missing lock means death only once our own lock is a few rounds old: after a
        database restart every node needs a round to take its lock again."""
        return self.liveness.enabled and self.liveness.age() >= LIVENESS_TRUST_ROUNDS * self.settings.heartbeat_interval

    async def _tick(self) -> None:
        if not self.evicted and not self._stopping:
            await self.round()

    async def round(self) -> None:
        """One heartbeat round: probe the broker, write, reconcile the ring, evict the dead."""
        round_started = time.monotonic()
        if not await self.bus.transport.probe(self._round_timeout):
            self.healthy_since = None
            log.warning("heartbeat withheld: the broker does not answer", fenced=self.fenced)
            return
        try:
            beat = await asyncio.wait_for(self._beat(), self._round_timeout)
        except (ZStackError, TimeoutError, OSError) as exc:
            self.healthy_since = None
            log.warning("heartbeat not written", error=str(exc), fenced=self.fenced)
            return
        if not beat.alive:
            await self._handle_evicted()
            return
        now = time.monotonic()
        self.last_success = round_started
        written, self._written = self._written, asyncio.Event()
        written.set()
        if self.healthy_since is None:
            self.healthy_since = now
            log.info("heartbeat written again")
        self._apply(beat.rows)
        await self._evict_dead(beat.rows, now)

    async def _beat(self) -> Beat:
        """The heartbeat write and the membership read, one statement, on the liveness session
        when this node holds it, waited for up to half the round. Otherwise the round goes on
        through the pool, so a lost or slow lock session never stops heartbeats, and a lost lock
        is taken again in the background (a connect to a primary that is gone must not hold the
        heartbeat up).

        The session's statement is never cancelled (a cancelled statement leaves its connection
        unusable, and closing it releases the lock its peers read as this node's life): one that
        outlives its wait keeps running, and the session is dropped only when it has been
        waited on for SESSION_TIMEOUTS rounds (a busy event loop is slow, not dead), when its
        connection failed (the lock is gone with it), or when the pool's write in the same round
        reached a server that does not see the lock (after a fail-over the session still waits
        on the old primary, and peers on the new one would soon evict a node whose lock they
        cannot see). A statement refused (a lock or statement timeout) keeps the session."""
        digest = ring_digest(self.ring.ring)
        session = self.liveness.connection
        if session is not None:
            try:
                return await self._beat_on_session(session, digest)
            except (ZStackError, TimeoutError, OSError, SQLAlchemyError) as exc:
                if isinstance(exc, TimeoutError):
                    self._session_timeouts += 1
                    if self._session_timeouts >= SESSION_TIMEOUTS:
                        self._drop_session()
                else:
                    self._session_timeouts = 0
                    if _session_broken(exc):
                        self._drop_session()
                log.warning(
                    "heartbeat on the liveness session failed; writing it through the pool",
                    error=f"{type(exc).__name__}: {exc}",
                )
        held_before = self.liveness.held_since
        try:
            beat = await self.nodes.beat(self.node_uuid, digest)
            if held_before is not None and self.liveness.held_since == held_before and self._lock_unseen(beat):
                log.warning("the database does not see this node's liveness lock; its session is elsewhere")
                self._drop_session()
        finally:
            self.liveness.retake()
        return beat

    async def _beat_on_session(self, session: AsyncConnection, digest: str) -> Beat:
        """The beat on the liveness session within half the round; TimeoutError (the statement
        goes on) when it takes longer or an earlier one is still running. An earlier beat that
        failed after its round stopped waiting is this round's failure: its connection is
        unusable (SQLAlchemy invalidated it), as is one invalidated otherwise."""
        pending, self._session_beat = self._session_beat, None
        if pending is not None:
            if not pending.done():
                self._session_beat = pending
                raise TimeoutError("the previous heartbeat on the liveness session has not answered yet")
            failed = None if pending.cancelled() else pending.exception()
            if failed is not None:
                raise failed
        if session.invalidated:
            raise ZStackError(ErrorCode.DATABASE_UNAVAILABLE, "the liveness session's connection was invalidated")
        task = asyncio.get_running_loop().create_task(self._session_statement(session, digest))
        task.add_done_callback(_retrieve)
        self._session_beat = task
        done, _ = await asyncio.wait({task}, timeout=self._round_timeout / 2)
        if not done:
            raise TimeoutError("the heartbeat on the liveness session is slow")
        beat = task.result()
        self._session_timeouts = 0
        return beat

    async def _session_statement(self, session: AsyncConnection, digest: str) -> Beat:
        with translated_errors():
            return await self.nodes.beat(self.node_uuid, digest, on=session)

    def _drop_session(self) -> None:
        """Forget the lock session and start taking the lock again. A beat still running on it
        is not cancelled: closing the connection (at once, ``db.engine``) ends it."""
        self._session_beat = None
        self._session_timeouts = 0
        self.liveness.lost()
        self.liveness.retake()

    def _lock_unseen(self, beat: Beat) -> bool:
        mine = next((r for r in beat.rows if r.uuid == self.node_uuid), None)
        return mine is not None and mine.session_held is False

    def _apply(self, rows: list[NodeRow]) -> None:
        present = {r.uuid for r in rows}
        leaving = {r.uuid for r in rows if r.state == LEAVING and r.uuid != self.node_uuid}
        self._set_draining(leaving | (self.draining & present))
        running = {r.uuid for r in rows if r.state == RUNNING}
        if self.state == RUNNING:
            running.add(self.node_uuid)
        else:
            running.discard(self.node_uuid)
        if self.ring.replace(running):
            log.info("ring reconciled from the table", nodes=len(running))
        self.bus.metrics.ring_size.set(len(self.ring.nodes))

    def _set_draining(self, draining: set[str]) -> None:
        gone = self.draining - draining
        self.draining = draining
        if gone:
            log.info("draining nodes are gone; their operations are for their VMs' owners", nodes=sorted(gone))
            if self.on_drained is not None:
                self.on_drained()

    async def reconcile(self) -> None:
        """Rebuild the ring from the table now (also used when a destination turned out gone)."""
        try:
            rows = await asyncio.wait_for(self.nodes.list(), self._round_timeout)
        except (ZStackError, TimeoutError, OSError) as exc:
            log.warning("ring reconcile failed", error=str(exc))
            return
        self._apply(rows)

    async def _evict_dead(self, rows: list[NodeRow], now: float) -> None:
        use_timeout = self._trusts_timeouts(now)
        use_liveness = self._trusts_liveness()
        for row in rows:
            if row.uuid == self.node_uuid:
                continue
            won, reason = False, ""
            if use_timeout and row.heartbeat_age > self.settings.node_timeout:
                won, reason = await self.nodes.evict_if_stale(row.uuid, self.settings.node_timeout), "heartbeat timeout"
            elif use_liveness and row.session_held is False:
                won, reason = await self.nodes.evict_if_session_gone(row.uuid, row.liveness_key), "session gone"
            if won:
                log.warning(
                    "evicted a dead node", dead=row.uuid, reason=reason, heartbeat_age=round(row.heartbeat_age, 2)
                )
                self.ring.remove(row.uuid)
                self._set_draining(self.draining - {row.uuid})
                task = asyncio.get_running_loop().create_task(self._rescue(row.uuid, reason))
                self._rescues.add(task)
                task.add_done_callback(self._rescues.discard)

    async def _rescue(self, dead: str, reason: str) -> None:
        await self.bus.publish(NodeLeftEvent(node_uuid=dead, reason=reason))
        queues = self.bus.node_queues(self.services(), dead)
        bound = RESCUE_BOUND_FACTOR * self.settings.node_timeout
        moved = await rescue_queues(self.bus, queues, bound=bound)
        log.info("rescue finished", dead=dead, moved=moved)

    async def _on_event(self, event: Event) -> None:
        if isinstance(event, NodeJoinedEvent) and event.node_uuid != self.node_uuid:
            if self.ring.add(event.node_uuid):
                log.info("node joined", joined=event.node_uuid, ring=len(self.ring.nodes))
        elif isinstance(event, NodeLeftEvent):
            if event.node_uuid == self.node_uuid:
                if self.state != LEAVING:
                    await self._handle_evicted()
                return
            if event.draining:
                self.draining.add(event.node_uuid)
            else:
                self._set_draining(self.draining - {event.node_uuid})
            if self.ring.remove(event.node_uuid):
                log.info("node left", left=event.node_uuid, reason=event.reason, ring=len(self.ring.nodes))
        self.bus.metrics.ring_size.set(len(self.ring.nodes))

    async def _handle_evicted(self) -> None:
        if self.evicted:
            return
        self.evicted = True
        self._written.set()
        log.error("this node was evicted by its peers; it stops serving now")
        if self.on_evicted is not None:
            await self.on_evicted()

    async def begin_leave(self) -> None:
        """Graceful stop, step one: LEAVING in the table, out of our ring and everyone's."""
        self.state = LEAVING
        try:
            await self.nodes.set_state(self.node_uuid, LEAVING)
        except ZStackError as exc:
            log.warning("could not mark the node LEAVING", error=str(exc))
        self.ring.remove(self.node_uuid)
        await self.bus.publish(NodeLeftEvent(node_uuid=self.node_uuid, reason=GRACEFUL_STOP))
        await self.reconcile()

    async def stop(self, *, delete_row: bool) -> None:
        """Stop the heartbeat; delete our row if asked; release the liveness lock."""
        self._stopping = True
        await self._probe.stop()
        await self._heartbeat.stop()
        if self._rescues:
            await asyncio.wait(self._rescues, timeout=self.settings.drain_timeout)
        if delete_row and not self.evicted:
            try:
                await self.nodes.delete(self.node_uuid)
            except ZStackError as exc:
                log.warning("could not delete the node row; peers will evict it", error=str(exc))
        self._session_beat = None
        await self.liveness.release()
