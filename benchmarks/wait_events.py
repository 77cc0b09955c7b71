"""What one database's sessions wait on under load: ``pg_stat_activity`` sampled every SAMPLE_S,
each session put in one class per sample, reported as sessions per sample (issue 11 asks for
these beside B3: a funnel shows as sessions queued on row locks, a commit-bound load as WAL
waits, a database with nothing to do as idle sessions)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

from zstack_mn.testing import servers

SAMPLE_S = 0.1
QUERY_TIMEOUT_S = 2.0
WAL_WAITS = {("IO", "WALSync"), ("IO", "WALWrite"), ("LWLock", "WALWrite")}
ROW_LOCKS = {"transactionid", "tuple"}


def wait_class(state: str | None, wait_type: str | None, wait_event: str | None) -> str:
    """One session's class in a sample: what it is doing or waiting on."""
    if state == "idle":
        return "idle"
    if state is not None and state.startswith("idle in transaction"):
        return "idle in transaction"
    if wait_type == "Lock":
        return "row lock" if wait_event in ROW_LOCKS else f"Lock:{wait_event}"
    if wait_type == "LWLock" and wait_event == "LockManager":
        return "lock manager"
    if (wait_type, wait_event) in WAL_WAITS:
        return "WAL"
    if wait_type is None:
        return "running"
    return f"{wait_type}:{wait_event}"


class WaitEvents:
    """Samples the sessions of ``database`` (its own excluded) until stopped."""

    def __init__(self, database: str) -> None:
        self.database = database
        self.samples = 0
        self.failed = 0
        self.counts: Counter[str] = Counter()

    @classmethod
    def of_url(cls, database_url: str) -> WaitEvents:
        database = make_url(database_url).database
        assert database, f"no database in {database_url}"
        return cls(database)

    @contextlib.asynccontextmanager
    async def sampling(self) -> AsyncIterator[WaitEvents]:
        conn = await asyncpg.connect(servers.pg_admin_dsn(), timeout=QUERY_TIMEOUT_S)
        task = asyncio.get_running_loop().create_task(self._sample(conn))
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            with contextlib.suppress(Exception):  # the sample is a side measure: never the run's failure
                await conn.close(timeout=QUERY_TIMEOUT_S)

    async def _sample(self, conn: asyncpg.Connection) -> None:
        loop = asyncio.get_running_loop()
        while True:
            tick = loop.time()
            try:
                rows = await conn.fetch(
                    "SELECT state, wait_event_type, wait_event FROM pg_stat_activity "
                    "WHERE datname = $1 AND pid <> pg_backend_pid()",
                    self.database,
                    timeout=QUERY_TIMEOUT_S,
                )
            except (asyncpg.PostgresError, OSError, TimeoutError):
                self.failed += 1
                if conn.is_closed():
                    return
            else:
                self.samples += 1
                self.counts.update(wait_class(r["state"], r["wait_event_type"], r["wait_event"]) for r in rows)
            await asyncio.sleep(max(0.0, SAMPLE_S - (loop.time() - tick)))

    def summary(self) -> dict[str, Any]:
        """Sessions per sample by class, busiest first."""
        per_sample = {k: round(v / max(self.samples, 1), 2) for k, v in self.counts.most_common()}
        return {"samples": self.samples, "failedSamples": self.failed, "sessionsPerSample": per_sample}
