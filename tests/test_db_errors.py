"""Database contention and cancellation become a retryable error, never a 500 (real PostgreSQL)."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from zstack_mn.db.engine import Database
from zstack_mn.messages import ErrorCode, ZStackError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


async def run_in_transaction(db: Database, *statements: str) -> None:
    async with db.begin() as conn:
        for statement in statements:
            await conn.execute(text(statement))


async def test_lock_timeout_and_cancelled_statement_are_retryable(pg_database: str):
    holder, waiter = Database(pg_database, timeout=1.0), Database(pg_database, timeout=1.0)
    try:
        await holder.migrate()
        async with holder.begin() as conn:
            await conn.execute(text("INSERT INTO message_result (id, reply) VALUES ('k', '{}')"))
        locked = await holder.engine.connect()
        await locked.begin()
        await locked.execute(text("UPDATE message_result SET reply = '{}' WHERE id = 'k'"))
        with pytest.raises(ZStackError) as err:
            await run_in_transaction(waiter, "UPDATE message_result SET reply = '{}' WHERE id = 'k'")
        assert err.value.code is ErrorCode.DATABASE_UNAVAILABLE
        assert err.value.retryable
        await locked.rollback()
        await locked.close()
        with pytest.raises(ZStackError) as err:
            await run_in_transaction(waiter, "SET LOCAL statement_timeout = 50", "SELECT pg_sleep(0.5)")
        assert err.value.code is ErrorCode.DATABASE_UNAVAILABLE
        assert err.value.retryable
    finally:
        await holder.close()
        await waiter.close()


async def test_driver_statements_translate_errors_and_recover_from_a_killed_connection(pg_database: str):
    """``fetch_row`` (the VM transitions' path, on the asyncpg driver under the shared pool): a
    lock wait past the timeout and a connection the server killed are retryable; the pool then
    serves the next statement on a sound connection; a unique violation is IntegrityError."""
    from sqlalchemy.exc import IntegrityError

    holder, db = Database(pg_database, timeout=1.0), Database(pg_database, timeout=1.0, pool_size=1, max_overflow=0)
    try:
        await holder.migrate()
        await db.fetch_row("INSERT INTO message_result (id, reply) VALUES ($1, '{}') RETURNING id", "k")
        with pytest.raises(IntegrityError):
            await db.fetch_row("INSERT INTO message_result (id, reply) VALUES ($1, '{}') RETURNING id", "k")

        locked = await holder.engine.connect()
        await locked.begin()
        await locked.execute(text("UPDATE message_result SET reply = '{}' WHERE id = 'k'"))
        with pytest.raises(ZStackError) as err:
            await db.fetch_row("UPDATE message_result SET reply = '[]' WHERE id = $1 RETURNING id", "k")
        assert err.value.code is ErrorCode.DATABASE_UNAVAILABLE
        assert err.value.retryable
        await locked.rollback()
        await locked.close()

        pid = (await db.fetch_row("SELECT pg_backend_pid() AS pid"))["pid"]
        async with holder.begin() as conn:
            await conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        with pytest.raises(ZStackError) as err:
            await db.fetch_row("SELECT 1 AS one")
        assert err.value.code is ErrorCode.DATABASE_UNAVAILABLE
        assert err.value.retryable
        after = await db.fetch_row("SELECT pg_backend_pid() AS pid, 1 AS one")
        assert after["one"] == 1
        assert after["pid"] != pid
    finally:
        await holder.close()
        await db.close()
