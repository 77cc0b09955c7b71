"""Queries on ``management_node``: every time comparison uses the database clock."""

from __future__ import annotations

from dataclasses import dataclass

import orjson
from sqlalchemy import BigInteger, column, delete, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from zstack_mn.db.engine import Database
from zstack_mn.db.models import NODE_TABLE

JOINING, RUNNING, LEAVING = "JOINING", "RUNNING", "LEAVING"

_HELD_ADVISORY_KEYS_SQL = (
    "SELECT ((classid::bigint << 32) | objid::bigint) AS k FROM pg_locks "
    "WHERE locktype = 'advisory' AND granted AND objsubid = 1 "
    "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)
_HELD_ADVISORY_KEYS = text(_HELD_ADVISORY_KEYS_SQL).columns(column("k", BigInteger))


_HEARTBEAT = text(
    "WITH me AS (UPDATE management_node SET heartbeat = now(), ring_digest = :digest WHERE uuid = :uuid RETURNING uuid), "
    "held AS (" + _HELD_ADVISORY_KEYS_SQL + ") "
    "SELECT (SELECT count(*) FROM me) AS alive, (SELECT coalesce(json_agg(r ORDER BY r.join_date, r.uuid), '[]') FROM ("
    "SELECT n.uuid, n.host_name, n.http_address, n.state, n.liveness_key, n.ring_digest, n.join_date, "
    "extract(epoch FROM now() - n.heartbeat)::float8 AS heartbeat_age, "
    "EXISTS (SELECT 1 FROM held WHERE held.k = n.liveness_key) AS session_held "
    "FROM management_node n) r)::text AS nodes"
)


_A_PEER_IS_DEAD = text(
    "WITH held AS (" + _HELD_ADVISORY_KEYS_SQL + ") "
    "SELECT EXISTS (SELECT 1 FROM management_node n WHERE n.uuid <> :uuid AND n.state = :running AND ("
    "(:sessions AND NOT EXISTS (SELECT 1 FROM held WHERE held.k = n.liveness_key)) "
    "OR (:stale AND n.heartbeat < now() - make_interval(secs => :timeout))"
    ")) AS dead"
)


@dataclass(frozen=True, slots=True)
class NodeRow:
    uuid: str
    host_name: str
    http_address: str
    state: str
    liveness_key: int
    ring_digest: str
    heartbeat_age: float
    session_held: bool | None = None
    """Whether the node's liveness lock is held (PostgreSQL, read by ``beat``); None when unknown."""


@dataclass(frozen=True, slots=True)
class Beat:
    """One heartbeat: whether our row was still there (False: we were evicted), and every row."""

    alive: bool
    rows: list[NodeRow]


class NodeRepository:
    """Membership rows."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.t = NODE_TABLE

    async def insert(self, uuid: str, host_name: str, http_address: str, liveness_key: int) -> None:
        async with self.db.begin() as conn:
            await conn.execute(
                insert(self.t).values(
                    uuid=uuid,
                    host_name=host_name,
                    http_address=http_address,
                    state=JOINING,
                    liveness_key=liveness_key,
                    join_date=self.db.now(),
                    heartbeat=self.db.now(),
                )
            )

    async def set_state(self, uuid: str, state: str) -> bool:
        async with self.db.begin() as conn:
            result = await conn.execute(
                update(self.t).where(self.t.c.uuid == uuid).values(state=state, heartbeat=self.db.now())
            )
            return result.rowcount == 1

    async def heartbeat(self, uuid: str, ring_digest: str) -> bool:
        """Write the heartbeat; False when the row is gone (this node was evicted)."""
        async with self.db.begin() as conn:
            result = await conn.execute(
                update(self.t).where(self.t.c.uuid == uuid).values(heartbeat=self.db.now(), ring_digest=ring_digest)
            )
            return result.rowcount == 1

    async def beat(self, uuid: str, ring_digest: str, *, on: AsyncConnection | None = None) -> Beat:
        """Write our heartbeat and read every row, with whether each node's liveness lock is held:
        one statement on PostgreSQL, run ``on`` the given autocommit connection (the liveness
        session, so heartbeats take nothing from the pool) or in a pooled transaction."""
        if self.db.is_postgres:
            if on is not None:
                row = (await on.execute(_HEARTBEAT, {"uuid": uuid, "digest": ring_digest})).one()
            else:
                row = await self.db.fetch_one(_HEARTBEAT, uuid=uuid, digest=ring_digest)
            rows = [
                NodeRow(
                    r["uuid"],
                    r["host_name"],
                    r["http_address"],
                    r["state"],
                    int(r["liveness_key"]),
                    r["ring_digest"],
                    float(r["heartbeat_age"]),
                    bool(r["session_held"]),
                )
                for r in orjson.loads(row.nodes)
            ]
            return Beat(bool(row.alive), rows)
        alive = await self.heartbeat(uuid, ring_digest)
        return Beat(alive, await self.list())

    async def list(self) -> list[NodeRow]:
        t = self.t
        async with self.db.begin() as conn:
            rows = await conn.execute(
                select(
                    t.c.uuid,
                    t.c.host_name,
                    t.c.http_address,
                    t.c.state,
                    t.c.liveness_key,
                    t.c.ring_digest,
                    self.db.age_seconds(t.c.heartbeat).label("age"),
                ).order_by(t.c.join_date, t.c.uuid)
            )
            return [
                NodeRow(r.uuid, r.host_name, r.http_address, r.state, r.liveness_key, r.ring_digest, float(r.age))
                for r in rows
            ]

    async def a_peer_is_dead(self, uuid: str, *, sessions: bool, stale_after: float | None) -> bool:
        """Whether a RUNNING peer of ``uuid`` no longer holds its liveness lock (with
        ``sessions``) or has a heartbeat older than ``stale_after`` seconds (PostgreSQL, database
        time): one autocommit read, for probing between heartbeats."""
        row = await self.db.fetch_one(
            _A_PEER_IS_DEAD,
            uuid=uuid,
            running=RUNNING,
            sessions=sessions,
            stale=stale_after is not None,
            timeout=stale_after or 0.0,
        )
        return bool(row.dead)

    async def evict_if_stale(self, uuid: str, timeout: float) -> bool:
        """Delete ``uuid`` if its heartbeat is older than ``timeout`` (database time); True if this
        call deleted it, which makes the caller its rescuer."""
        async with self.db.begin() as conn:
            result = await conn.execute(
                delete(self.t)
                .where(self.t.c.uuid == uuid, self.db.older_than(self.t.c.heartbeat, timeout))
                .returning(self.t.c.uuid)
            )
            return result.first() is not None

    async def evict_if_session_gone(self, uuid: str, liveness_key: int) -> bool:
        """Delete ``uuid`` if its liveness lock is not held (PostgreSQL); True if this call deleted it."""
        held = _HELD_ADVISORY_KEYS.subquery()
        async with self.db.begin() as conn:
            result = await conn.execute(
                delete(self.t)
                .where(
                    self.t.c.uuid == uuid,
                    ~select(held.c.k).where(held.c.k == liveness_key).exists(),
                )
                .returning(self.t.c.uuid)
            )
            return result.first() is not None

    async def delete(self, uuid: str) -> bool:
        async with self.db.begin() as conn:
            result = await conn.execute(delete(self.t).where(self.t.c.uuid == uuid))
            return result.rowcount == 1
