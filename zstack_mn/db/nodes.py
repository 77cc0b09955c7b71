"""Queries on ``management_node``: every time comparison uses the database clock."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import BigInteger, column, delete, insert, select, text, update

from zstack_mn.db.engine import Database
from zstack_mn.db.models import ManagementNode

JOINING, RUNNING, LEAVING = "JOINING", "RUNNING", "LEAVING"

_HELD_ADVISORY_KEYS = text(
    "SELECT ((classid::bigint << 32) | objid::bigint) AS k FROM pg_locks "
    "WHERE locktype = 'advisory' AND granted AND objsubid = 1 "
    "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
).columns(column("k", BigInteger))


@dataclass(frozen=True, slots=True)
class NodeRow:
    uuid: str
    host_name: str
    http_address: str
    state: str
    liveness_key: int
    ring_digest: str
    heartbeat_age: float


class NodeRepository:
    """Membership rows."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.t = ManagementNode.__table__

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
            return [NodeRow(r.uuid, r.host_name, r.http_address, r.state, r.liveness_key, r.ring_digest, float(r.age)) for r in rows]

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

    async def held_liveness_keys(self) -> set[int]:
        async with self.db.begin() as conn:
            return {int(r.k) for r in await conn.execute(_HELD_ADVISORY_KEYS)}

    async def delete(self, uuid: str) -> bool:
        async with self.db.begin() as conn:
            result = await conn.execute(delete(self.t).where(self.t.c.uuid == uuid))
            return result.rowcount == 1
