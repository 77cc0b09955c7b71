"""The session-scoped liveness signal: a PostgreSQL session advisory lock keyed by the node uuid,
held on a connection of its own (outside the pool: it lives as long as the node). PostgreSQL releases it the moment the process dies (its socket
closes), so peers see a crash at their next heartbeat round instead of after ``node_timeout``.
On SQLite (one embedded node) there is nothing to signal and this is idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid as uuidlib

import structlog
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from zstack_mn.db.engine import Database

log = structlog.get_logger(__name__)


RETAKE_ATTEMPTS = 3
RETAKE_PAUSE_S = 0.1


def liveness_key(node_uuid: str) -> int:
    """A signed 64-bit advisory-lock key derived from the node uuid."""
    return int.from_bytes(uuidlib.UUID(node_uuid).bytes[:8], "big", signed=True)


class LivenessSession:
    """Holds this node's advisory lock: ``ensure`` takes it (at join), ``retake`` takes it again
    in the background once it was ``lost`` (a database restart or fail-over)."""

    def __init__(self, db: Database, node_uuid: str, timeout: float) -> None:
        self.db = db
        self.key = liveness_key(node_uuid)
        self.timeout = timeout
        self._conn: AsyncConnection | None = None
        self.held_since: float | None = None
        self._retaking: asyncio.Task[bool] | None = None
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def enabled(self) -> bool:
        return self.db.is_postgres

    def age(self) -> float:
        """Seconds this session has held the lock without interruption (0 when not held)."""
        return 0.0 if self.held_since is None else time.monotonic() - self.held_since

    @property
    def connection(self) -> AsyncConnection | None:
        """The session holding the lock (autocommit), for the heartbeat to run on; None when not held."""
        return self._conn

    async def ensure(self) -> bool:
        """Hold the lock; True when held now. A session already held is trusted: the heartbeat
        that runs on it is its check, and ``lost`` drops it when that fails."""
        if not self.enabled:
            return True
        if self._conn is not None:
            return True
        conn: AsyncConnection | None = None
        try:
            conn = await asyncio.wait_for(self.db.direct.connect(), self.timeout)
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            got = await asyncio.wait_for(
                conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": self.key}), self.timeout
            )
            if not got.scalar():
                self._close_later(conn)
                log.error("liveness lock is held by another session", key=self.key)
                return False
        except BaseException as exc:
            if conn is not None:
                self._close_later(conn)  # cancelled (release) after the connect: it may hold the lock
            if not isinstance(exc, Exception):
                raise
            log.warning("cannot take the liveness lock", error=f"{type(exc).__name__}: {exc}")
            return False
        self._conn = conn
        self.held_since = time.monotonic()
        return True

    def retake(self) -> None:
        """Take the lock again in the background when it is not held, so that a heartbeat never
        waits on a connect to a database host that may be gone (a killed primary whose name no
        longer resolves, or whose address drops packets). One retake runs at a time; it makes up
        to RETAKE_ATTEMPTS attempts with a growing pause (each attempt that fails on a host moves
        the next one to the following host), and the next heartbeat starts another."""
        if not self.enabled or self._conn is not None:
            return
        if self._retaking is None or self._retaking.done():
            self._retaking = asyncio.get_running_loop().create_task(self._retake(), name="liveness-retake")

    async def settled(self) -> bool:
        """Wait for the retake in progress, if any, to end; whether the lock is held now."""
        if self._retaking is not None:
            await asyncio.wait({self._retaking})
        return self._conn is not None

    async def _retake(self) -> bool:
        for attempt in range(RETAKE_ATTEMPTS):
            if await self.ensure():
                return True
            await asyncio.sleep(RETAKE_PAUSE_S * 2**attempt)
        return False

    def lost(self) -> None:
        """The session failed, or the database no longer sees its lock: forget it now (the next
        ``retake`` takes the lock on a new one) and close it in the background."""
        conn, self._conn, self.held_since = self._conn, None, None
        if conn is None:
            return
        log.warning("liveness session lost; taking the lock again")
        self._close_later(conn)

    def _close_later(self, conn: AsyncConnection) -> None:
        task = asyncio.get_running_loop().create_task(self._invalidate(conn), name="liveness-close")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _invalidate(self, conn: AsyncConnection) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(conn.invalidate(), self.timeout)

    async def release(self) -> None:
        retaking, self._retaking = self._retaking, None
        if retaking is not None and not retaking.done():
            retaking.cancel()
            await asyncio.wait({retaking}, timeout=self.timeout)
        conn, self._conn, self.held_since = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.key}), self.timeout
                )
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), self.timeout)
        if self._closing:
            await asyncio.wait(self._closing, timeout=self.timeout)
