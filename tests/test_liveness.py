"""The liveness lock across a primary switch, on a real PostgreSQL: a node whose lock session is
left waiting on a server that is gone keeps its heartbeat and takes the lock again on the server
its pool now reaches, before its peers there could read the missing lock as its death."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from zstack_mn.bus.cloudbus import CloudBus
from zstack_mn.bus.memory import MemoryTransport
from zstack_mn.bus.topology import Topology
from zstack_mn.cluster.liveness import LivenessSession, liveness_key
from zstack_mn.cluster.membership import LIVENESS_TRUST_ROUNDS, Membership
from zstack_mn.cluster.ring import LiveRing
from zstack_mn.config import Settings
from zstack_mn.db.engine import Database
from zstack_mn.testing import servers
from zstack_mn.testing.proxy import CutProxy

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

HEARTBEAT_S = 1.0

_LOCK_HOLDER = text(
    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1 "
    "AND ((classid::bigint << 32) | objid::bigint) = :k"
)


async def _holders(db: Database, key: int) -> list[int]:
    async with db.begin() as conn:
        return [r.pid for r in await conn.execute(_LOCK_HOLDER, {"k": key})]


@asynccontextmanager
async def a_member(pg_database: str, lock_url: str | None = None) -> AsyncIterator[tuple[Membership, Database]]:
    """A joined Membership on ``pg_database`` (its lock session through ``lock_url`` if given),
    on an in-process bus; stopped and closed afterwards."""
    db = Database(pg_database, timeout=2.0)
    lock_db = Database(lock_url, timeout=2.0) if lock_url else db
    await db.migrate()
    me = str(uuid.uuid4())
    transport = MemoryTransport(f"memory://{me}")
    await transport.start()
    ring = LiveRing(me, [me])
    bus = CloudBus(me, transport, Topology(), ring=ring)
    settings = Settings(database_url=pg_database, heartbeat_interval=HEARTBEAT_S, node_timeout=10 * HEARTBEAT_S)
    membership = Membership(me, db, bus, ring, settings, services=list)
    membership.liveness = LivenessSession(lock_db, me, timeout=HEARTBEAT_S)
    try:
        await membership.join()
        await membership.round()
        yield membership, db
    finally:
        await membership.stop(delete_row=False)
        await transport.close()
        if lock_db is not db:
            await lock_db.close()
        await db.close()


async def test_a_heartbeat_statement_that_outlives_its_wait_keeps_the_lock_session(pg_database: str) -> None:
    """A beat on the lock session held up past half a round (here: a row lock on the node's own
    row; in life, a frozen or busy process) is left to finish, not cancelled: the next round
    writes through the same session and the lock never leaves it. Before, the cancellation made
    SQLAlchemy invalidate the session, and every later round failed on it
    (PendingRollbackError) until peers evicted the node."""
    async with a_member(pg_database) as (membership, db):
        key = liveness_key(membership.node_uuid)
        holder = await _holders(db, key)
        async with db.engine.connect() as blocker:
            transaction = await blocker.begin()
            await blocker.execute(
                text("SELECT 1 FROM management_node WHERE uuid = :u FOR UPDATE"), {"u": membership.node_uuid}
            )
            await membership.round()
            await transaction.rollback()
        before = time.monotonic()
        await membership.round()
        assert membership.last_success >= before, "the round after the slow one failed"
        assert membership.liveness.connection is not None
        assert await _holders(db, key) == holder, "the lock left its session"


async def test_a_lock_session_stranded_by_a_primary_switch_is_replaced_without_a_missed_heartbeat(
    pg_database: str,
) -> None:
    """The "old primary" is a proxy in front of the server, listed first in the lock session's
    URL; the "new primary" is the server itself, listed second. The switch: the proxy drops every
    byte (a killed host's address) and the server ends the session (the new primary never had the
    lock). Before this was fixed the node kept the stranded session for three more rounds and
    took the lock again only after that, by which time peers that trust liveness (after
    LIVENESS_TRUST_ROUNDS of their own) could evict it."""
    proxy = CutProxy(servers.PG_HOST, servers.PG_PORT)
    await proxy.start()
    name = make_url(pg_database).database
    lock_url = (
        f"postgresql+asyncpg://{servers.PG_USER}@/{name}"
        f"?host=127.0.0.1:{proxy.port}&host={servers.PG_HOST}:{servers.PG_PORT}&target_session_attrs=read-write"
    )
    try:
        async with a_member(pg_database, lock_url) as (membership, db):
            key = liveness_key(membership.node_uuid)
            stranded = await _holders(db, key)
            assert len(stranded) == 1, "the lock is not held through the proxy"

            proxy.cut()
            async with db.begin() as conn:
                await conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": stranded[0]})
            rounds_started = time.monotonic()
            for _ in range(2):
                before = time.monotonic()
                await membership.round()
                assert membership.last_success >= before, "a heartbeat round failed while the lock moved"

            async with asyncio.timeout(LIVENESS_TRUST_ROUNDS * HEARTBEAT_S):
                assert await membership.liveness.settled(), "the lock was not taken again"
            assert time.monotonic() - rounds_started < LIVENESS_TRUST_ROUNDS * HEARTBEAT_S
            held = await _holders(db, key)
            assert len(held) == 1
            assert held != stranded
            before = time.monotonic()
            await membership.round()
            assert membership.last_success >= before
            assert membership.liveness.connection is not None, "the new session did not carry the heartbeat"
    finally:
        await proxy.close()
