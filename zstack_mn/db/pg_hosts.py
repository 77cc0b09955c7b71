"""Several PostgreSQL hosts in one database URL (a primary and its standbys), each tried with a
connect deadline of its own.

asyncpg tries the hosts of a multi-host URL in turn, but under one deadline for them all: a first
host that drops packets uses it up before the second is tried. ``writable_connector`` gives each
host ``per_host_timeout`` and keeps the first connection whose session accepts writes (the
``target_session_attrs`` of the URL, ``read-write`` by default), so a primary that moved to what
was a standby is found within one deadline per dead host.

    postgresql://zstack@/zstack?host=10.0.0.1:5432&host=10.0.0.2:5432&target_session_attrs=read-write
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from sqlalchemy.engine import URL

DEFAULT_PORT = 5432
UNREACHABLE_FOR_S = 5.0
DEFAULT_TARGET = "read-write"


def hosts_of(url: URL) -> list[tuple[str, int]]:
    """The (host, port) pairs of a URL's ``host`` query parameters, in order: ``name``,
    ``name:port``, ``[v6 address]`` or ``[v6 address]:port`` (a bare v6 address takes the default
    port)."""
    given = url.query.get("host", ())
    listed = [given] if isinstance(given, str) else list(given)
    default = url.port or DEFAULT_PORT
    return [_host_port(entry, default) for entry in listed]


def checked_hosts(url: URL) -> list[tuple[str, int]]:
    """``hosts_of(url)``, refusing (``ValueError`` naming ``database_url``) a host that does not
    parse and, with several hosts, a query parameter the connector would not pass on."""
    hosts = hosts_of(url)
    unknown = set(url.query) - {"host", "target_session_attrs", "ssl", "sslmode"}
    if len(hosts) > 1 and unknown:
        raise ValueError(f"database_url: {', '.join(sorted(unknown))} not supported with several hosts")
    return hosts


def _host_port(entry: str, default: int) -> tuple[str, int]:
    if entry.startswith("["):
        address, _, rest = entry[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ValueError(f"database_url: host {entry!r} is not [address]:port")
        host, port = address, rest[1:] if rest else None
    elif entry.count(":") == 1:
        host, port = entry.split(":")
    else:
        host, port = entry, None
    if not host:
        raise ValueError(f"database_url: a host parameter is empty ({entry!r})")
    if port is None:
        return host, default
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"database_url: host {entry!r} has no port number from 1 to 65535")
    return host, int(port)


def writable_connector(
    url: URL, per_host_timeout: float, connect_args: dict[str, Any]
) -> Callable[[], Awaitable[asyncpg.Connection]] | None:
    """An ``async_creator`` for SQLAlchemy when ``url`` names several hosts; None otherwise (the
    driver's own connect is then as good)."""
    hosts = checked_hosts(url)
    if len(hosts) < 2:
        return None
    target = str(url.query.get("target_session_attrs", DEFAULT_TARGET))
    ssl = url.query.get("ssl") or url.query.get("sslmode")
    base = {
        "user": url.username,
        "password": url.password,
        "database": url.database,
        "target_session_attrs": target,
        **({"ssl": str(ssl)} if ssl else {}),
        **{k: v for k, v in connect_args.items() if k != "timeout"},
    }
    start = [0]
    """Where the next connection attempt begins: the host that answered last, or the one after a
    host that failed or ran the caller out of time. After a fail-over a dead first host costs one
    deadline once, not on every new connection, and a caller whose deadline is shorter than
    ``per_host_timeout`` (a heartbeat) still reaches the second host on its next attempt."""
    unreachable_until = [0.0] * len(hosts)
    """A host that could not be reached (refused, timed out, its name not resolved, or the
    caller's deadline ran out on it) is left out of attempts for UNREACHABLE_FOR_S while another
    host is not: a killed container's name can take seconds to fail to resolve, each such lookup
    holds one of the few resolver threads, and connects that kept trying it starved the lookups
    of the live host (a node in Docker could not take its liveness lock again for 10 s after a
    fail-over and was evicted). A host that answered but is a standby is reachable: it keeps its
    turn, so the next attempt after its promotion begins there."""

    def passed(i: int) -> None:
        if start[0] == i:
            start[0] = (i + 1) % len(hosts)

    def unreachable(i: int) -> None:
        unreachable_until[i] = time.monotonic() + UNREACHABLE_FOR_S
        passed(i)

    def order() -> list[int]:
        ring = [*range(start[0], len(hosts)), *range(start[0])]
        now = time.monotonic()
        return [i for i in ring if unreachable_until[i] <= now] or ring

    async def connect() -> asyncpg.Connection:
        failures: list[str] = []
        for i in order():
            host, port = hosts[i]
            try:
                conn: asyncpg.Connection = await asyncpg.connect(host=host, port=port, timeout=per_host_timeout, **base)
                start[0] = i
                unreachable_until[i] = 0.0
                return conn
            except (asyncpg.InvalidAuthorizationSpecificationError, asyncpg.InvalidCatalogNameError):
                raise  # a wrong user, password or database is a configuration error, not an outage
            except asyncpg.InternalClientError as exc:  # TargetServerAttributeNotMatched: a standby, not yet promoted
                failures.append(f"{host}:{port}: {type(exc).__name__}: {exc}")
            except (OSError, TimeoutError) as exc:
                failures.append(f"{host}:{port}: {type(exc).__name__}: {exc}")
                unreachable(i)
            except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                failures.append(f"{host}:{port}: {type(exc).__name__}: {exc}")
                passed(i)
            except asyncio.CancelledError:
                unreachable(i)  # the caller's own deadline ran out on this host
                raise
        raise OSError(f"no {target} PostgreSQL host answered: {'; '.join(failures)}")

    return connect
