"""Asynchronous ZStack API jobs (``zstack_api_job``; migration 0004).

A job is one asynchronous API call: its API message (as sent to the portal), the node running it
and a lease (``lease_s`` from ``lease_at``, database time). The running node writes the outcome;
any node answers a poll from this table. A job whose node is gone, or whose lease ran out, is
claimed by one poller (compare-and-set on ``node`` and ``attempts``) and run again under the same
request id, which the portal and the VM service answer from their records when the work was done.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from zstack_mn.db.engine import Database

_META = MetaData()

JOB = Table(
    "zstack_api_job",
    _META,
    Column("uuid", String(32), primary_key=True),
    Column("api", String(128), nullable=False),
    Column("message", Text, nullable=False),
    Column("state", String(16), nullable=False),
    Column("success", Boolean, nullable=True),
    Column("result", Text, nullable=True),
    Column("node", String(36), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("lease_s", Float, nullable=False),
    Column("lease_at", DateTime(timezone=True), server_default=func.now()),
    Column("created_at", DateTime(timezone=True), server_default=func.now()),
    Column("finished_at", DateTime(timezone=True), nullable=True),
)

PROCESSING = "Processing"
DONE = "Done"


@dataclass(frozen=True, slots=True)
class JobRow:
    uuid: str
    api: str
    message: dict[str, Any]
    state: str
    success: bool | None
    result: dict[str, Any] | None
    node: str
    attempts: int
    lease_expired: bool

    @property
    def done(self) -> bool:
        return self.state == DONE


class JobRepository:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def create(self, uuid: str, api: str, message: dict[str, Any], node: str, lease_s: float) -> bool:
        """Record a new job run by ``node``; False when a job with this uuid exists already (a
        client that resends its ``X-Job-UUID``), which is then left as it is."""
        try:
            async with self.db.begin() as conn:
                await conn.execute(
                    insert(JOB).values(
                        uuid=uuid,
                        api=api,
                        message=orjson.dumps(message).decode(),
                        state=PROCESSING,
                        node=node,
                        attempts=1,
                        lease_s=lease_s,
                    )
                )
        except IntegrityError:
            return False
        return True

    async def get(self, uuid: str) -> JobRow | None:
        expired = (self.db.age_seconds(JOB.c.lease_at) >= JOB.c.lease_s).label("lease_expired")
        async with self.db.begin() as conn:
            row = (await conn.execute(select(JOB, expired).where(JOB.c.uuid == uuid))).first()
        if row is None:
            return None
        return JobRow(
            uuid=row.uuid,
            api=row.api,
            message=orjson.loads(row.message),
            state=row.state,
            success=row.success,
            result=None if row.result is None else orjson.loads(row.result),
            node=row.node,
            attempts=row.attempts,
            lease_expired=bool(row.lease_expired),
        )

    async def finish(self, uuid: str, success: bool, result: dict[str, Any]) -> bool:
        """Record the outcome once; False when the job was finished already (by a taker-over)."""
        async with self.db.begin() as conn:
            done = await conn.execute(
                update(JOB)
                .where(JOB.c.uuid == uuid, JOB.c.state == PROCESSING)
                .values(state=DONE, success=success, result=orjson.dumps(result).decode(), finished_at=func.now())
            )
            return done.rowcount == 1

    async def claim(self, job: JobRow, node: str, lease_s: float) -> bool:
        """Take the job over from ``job.node`` (gone, or its lease ran out): one claimer wins."""
        async with self.db.begin() as conn:
            won = await conn.execute(
                update(JOB)
                .where(
                    JOB.c.uuid == job.uuid,
                    JOB.c.state == PROCESSING,
                    JOB.c.node == job.node,
                    JOB.c.attempts == job.attempts,
                )
                .values(node=node, attempts=job.attempts + 1, lease_s=lease_s, lease_at=func.now())
            )
            return won.rowcount == 1

    async def renew(self, uuid: str, node: str, lease_s: float) -> bool:
        """Start a new lease of ``lease_s`` on a job ``node`` still runs; False when it is no
        longer ``node``'s (taken over, or finished)."""
        async with self.db.begin() as conn:
            done = await conn.execute(
                update(JOB)
                .where(JOB.c.uuid == uuid, JOB.c.state == PROCESSING, JOB.c.node == node)
                .values(lease_s=lease_s, lease_at=func.now())
            )
            return done.rowcount == 1

    async def release(self, uuid: str, node: str) -> bool:
        """End ``node``'s lease on a job it leaves unfinished (it is leaving the ring), so that
        the next poll on another node claims it at once instead of waiting the lease out."""
        async with self.db.begin() as conn:
            done = await conn.execute(
                update(JOB).where(JOB.c.uuid == uuid, JOB.c.state == PROCESSING, JOB.c.node == node).values(lease_s=0.0)
            )
            return done.rowcount == 1

    async def expire(self, older_than_s: float) -> int:
        async with self.db.begin() as conn:
            result = await conn.execute(delete(JOB).where(self.db.older_than(JOB.c.created_at, older_than_s)))
            return result.rowcount
