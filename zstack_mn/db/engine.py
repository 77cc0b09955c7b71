"""The database: an async engine for PostgreSQL (asyncpg) or SQLite (aiosqlite), migrations under a
lock, and the few dialect differences (database-time arithmetic) in one place.

    db = Database(settings.database_url); await db.migrate(); async with db.begin() as conn: ...
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import asyncpg
import structlog
from alembic import command
from alembic.config import Config
from sqlalchemy import ColumnElement, Executable, Row, event, func, literal_column, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, NoResultFound, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from zstack_mn.db.pg_hosts import writable_connector
from zstack_mn.messages import ErrorCode, ZStackError

log = structlog.get_logger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
MIGRATION_LOCK_KEY = 0x7A5354_4D4E  # "zSTMN": one key for every node's migration run


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def normalise_url(url: str) -> str:
    """Accept ``postgresql://`` and ``sqlite://`` and pick the async drivers."""
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+asyncpg://" + url.split("://", 1)[1]
    if url.startswith("sqlite:///"):
        return "sqlite+aiosqlite:///" + url.split(":///", 1)[1]
    return url


class Database:
    """Engine, sessions, migrations and dialect helpers."""

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 4,
        max_overflow: int = 4,
        timeout: float = 10.0,
        pool_timeout: float | None = None,
        idle_transaction_timeout: float | None = None,
    ) -> None:
        """``pool_size`` connections are kept open; up to ``max_overflow`` more are opened under
        load and closed when returned idle (PostgreSQL). ``idle_transaction_timeout`` (PostgreSQL):
        the server ends a session of this process that sits inside a transaction longer than this,
        releasing its row locks. A frozen node (SIGSTOP, a stalled VM) must not hold locks that its
        successors wait on; set it below the fencing time. ``timeout`` also bounds every lock wait;
        a statement waits for a pooled connection up to ``pool_timeout`` (default ``timeout``).
        ``direct`` is an engine without a pool, for the one long-lived session (liveness)."""
        self.url = normalise_url(url)
        parsed = make_url(self.url)
        self.dialect = parsed.get_backend_name()
        self.timeout = timeout
        kwargs: dict[str, Any] = {}
        if self.is_sqlite:
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": timeout}
        else:
            server_settings = {"lock_timeout": str(int(timeout * 1000))}
            if idle_transaction_timeout is not None:
                server_settings["idle_in_transaction_session_timeout"] = str(int(idle_transaction_timeout * 1000))
            kwargs["connect_args"] = {
                "timeout": timeout,
                "command_timeout": timeout,
                "server_settings": server_settings,
            }
            creator = writable_connector(parsed, timeout, kwargs["connect_args"])
            if creator is not None:
                kwargs["async_creator"] = creator
        self.engine: AsyncEngine = create_async_engine(
            self.url,
            **kwargs,
            **(
                {}
                if self.is_sqlite
                else {
                    "pool_size": pool_size,
                    "max_overflow": max_overflow,
                    "pool_timeout": timeout if pool_timeout is None else pool_timeout,
                }
            ),
        )
        self.direct: AsyncEngine = create_async_engine(self.url, poolclass=NullPool, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        else:
            for engine in (self.engine, self.direct):
                event.listen(engine.sync_engine, "close", _close_at_once)
        self._autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    @property
    def is_postgres(self) -> bool:
        return self.dialect == "postgresql"

    @contextlib.asynccontextmanager
    async def begin(self) -> AsyncIterator[AsyncConnection]:
        """One transaction; database outages become a retryable DATABASE_UNAVAILABLE error."""
        with translated_errors():
            async with self.engine.begin() as conn:
                yield conn

    async def fetch_one(self, statement: Executable, **params: Any) -> Row[Any]:
        """Run one statement in autocommit mode (its own transaction: one round trip and one
        commit) and return its single row; errors translated as in ``begin``."""
        with translated_errors():
            async with self._autocommit.connect() as conn:
                return (await conn.execute(statement, params)).one()

    async def fetch_row(self, sql: str, *args: Any) -> Mapping[str, Any]:
        """PostgreSQL only: run ``sql`` (``$1``-style parameters) in autocommit mode, as
        ``fetch_one`` does, but on the pooled connection's asyncpg driver directly. For the
        statements every VM operation runs (``zstack_mn.db.vm_transitions``): SQLAlchemy's
        statement layer costs about twice the driver's CPU per call there, and the pool (so the
        connection budget) stays the one the rest of the node uses. A unique violation raises
        SQLAlchemy's ``IntegrityError``; retryable SQLSTATEs are translated as in ``begin``. A
        statement cut short (time-out, cancellation) or a connection found lost or killed drops
        the connection from the pool; the outage is a retryable DATABASE_UNAVAILABLE. Any other
        error of the driver (a bad argument: a bug, not an outage) is raised as it is."""
        if not self.is_postgres:
            raise RuntimeError("fetch_row runs on PostgreSQL only")
        with translated_errors():
            async with self._autocommit.connect() as conn:
                driver = (await conn.get_raw_connection()).driver_connection
                assert driver is not None
                try:
                    row: Mapping[str, Any] | None = await driver.fetchrow(sql, *args)
                except asyncpg.UniqueViolationError as exc:
                    raise IntegrityError(sql, args, exc) from exc
                except asyncio.CancelledError:
                    await conn.invalidate()  # cut short mid-statement: the connection is unusable
                    raise
                except Exception as exc:
                    lost = driver.is_closed() or isinstance(exc, _LOST_CONNECTION_ERRORS)
                    if lost:
                        await conn.invalidate()
                    sqlstate = getattr(exc, "sqlstate", None)
                    if lost or _retryable(sqlstate):
                        raise ZStackError(
                            ErrorCode.DATABASE_UNAVAILABLE,
                            f"the database is unavailable or busy ({type(exc).__name__}, SQLSTATE {sqlstate}); retry",
                            sqlstate=sqlstate,
                        ) from exc
                    raise
        if row is None:
            raise NoResultFound(f"no row from {sql}")
        return row

    def now(self) -> ColumnElement[Any]:
        """The database clock."""
        return func.now()

    def age_seconds(self, column: Any) -> ColumnElement[float]:
        """Seconds between ``column`` and the database clock, computed by the database."""
        if self.is_sqlite:
            return (func.julianday(literal_column("CURRENT_TIMESTAMP")) - func.julianday(column)) * 86400.0
        return cast(ColumnElement[float], func.extract("epoch", func.now() - column))

    def older_than(self, column: Any, seconds: float) -> ColumnElement[bool]:
        return self.age_seconds(column) > seconds

    async def migrate(self) -> None:
        """Apply pending migrations; on PostgreSQL under an advisory lock, so nodes started
        together do not race."""
        cfg = alembic_config()

        def upgrade(sync_conn: Any) -> None:
            cfg.attributes["connection"] = sync_conn
            command.upgrade(cfg, "head")

        async with self.engine.begin() as conn:
            if self.is_postgres:
                await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
            await conn.run_sync(upgrade)
        log.info("database schema is up to date")

    async def close(self) -> None:
        await self.engine.dispose()
        await self.direct.dispose()


@contextlib.contextmanager
def translated_errors() -> Iterator[None]:
    """Database outages and retryable SQLSTATEs become a retryable DATABASE_UNAVAILABLE error."""
    try:
        yield
    except (TimeoutError, OperationalError, OSError, ConnectionError) as exc:
        raise ZStackError(ErrorCode.DATABASE_UNAVAILABLE, f"database unavailable: {type(exc).__name__}") from exc
    except PoolTimeoutError as exc:
        raise ZStackError(ErrorCode.DATABASE_UNAVAILABLE, "no database connection free in time; retry") from exc
    except DBAPIError as exc:
        if exc.connection_invalidated:
            raise ZStackError(ErrorCode.DATABASE_UNAVAILABLE, "database connection lost") from exc
        if _retryable(_sqlstate(exc)):
            raise ZStackError(
                ErrorCode.DATABASE_UNAVAILABLE,
                f"the database is unavailable or busy (SQLSTATE {_sqlstate(exc)}); retry",
                sqlstate=_sqlstate(exc),
            ) from exc
        raise


_LOST_CONNECTION_ERRORS = (
    TimeoutError,  # the client-side command timeout: the statement may still run, the state is unknown
    OSError,
    ConnectionError,
    asyncpg.PostgresConnectionError,  # includes ConnectionDoesNotExistError (08003)
    asyncpg.exceptions.InternalClientError,  # the protocol is out of step ("another operation in progress")
)
"""Failures of ``fetch_row`` after which its connection must not go back to the pool."""


RETRYABLE_SQLSTATES = {
    "55P03",  # lock_not_available: lock_timeout expired
    "57014",  # query_canceled: statement timeout
    "40001",  # serialization_failure
    "40P01",  # deadlock_detected
}


RETRYABLE_SQLSTATE_CLASSES = (
    "08",  # connection_exception
    "57P",  # operator intervention: admin/crash shutdown, "the database system is shutting down"
    "53",  # insufficient resources: too many connections, out of memory
)


def _retryable(sqlstate: str | None) -> bool:
    return sqlstate is not None and (sqlstate in RETRYABLE_SQLSTATES or sqlstate.startswith(RETRYABLE_SQLSTATE_CLASSES))


def _sqlstate(exc: DBAPIError) -> str | None:
    orig = exc.orig
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    cause = getattr(orig, "__cause__", None)
    return code or getattr(cause, "sqlstate", None)


def _close_at_once(_dbapi_connection: Any, record: Any) -> None:
    """Close an asyncpg connection at once, not gracefully, whenever SQLAlchemy closes one:
    invalidated (its state unknown, its server maybe gone), recycled after a disconnect, or
    released. SQLAlchemy's graceful close waits up to 2 s for a server that does not answer (a
    killed primary whose address drops packets), and the caller waits with it: a statement cut
    short by its own deadline, or the next checkout of the pool. PostgreSQL ends the session
    quietly on the EOF. A statement cut short is not cancelled on the server: it runs to its
    end there (each is one short statement, and lock_timeout bounds its waits)."""
    driver = record.driver_connection
    if driver is not None:
        driver.terminate()


def _sqlite_pragmas(dbapi_conn: Any, _: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()
