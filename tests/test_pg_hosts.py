"""A database URL with several hosts: each host gets a connect deadline of its own, so a first
host that swallows packets does not use up the time the next one needs (asyncpg alone shares one
deadline among all hosts). The primary fail-over itself is checked against a real standby in
the ``db-failover`` row of the fault matrix (``zstack_mn/testing/fault_rows.py``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
from pydantic import ValidationError
from sqlalchemy import text
from sqlalchemy.engine import make_url

from zstack_mn.config import Settings
from zstack_mn.db.engine import Database
from zstack_mn.db.pg_hosts import hosts_of, writable_connector
from zstack_mn.testing import servers


def test_hosts_of_reads_every_host_parameter_in_order() -> None:
    url = make_url("postgresql+asyncpg://u@/db?host=10.0.0.1:5433&host=db2&target_session_attrs=read-write")
    assert hosts_of(url) == [("10.0.0.1", 5433), ("db2", 5432)]
    assert writable_connector(make_url("postgresql+asyncpg://u@h:5432/db"), 1.0, {}) is None


def test_hosts_of_reads_v6_addresses_in_brackets() -> None:
    url = make_url("postgresql+asyncpg://u@/db?host=[fd00::1]:5433&host=[fd00::2]&host=fd00::3")
    assert hosts_of(url) == [("fd00::1", 5433), ("fd00::2", 5432), ("fd00::3", 5432)]


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("host=a:x&host=b", "'a:x'"),
        ("host=[fd00::1]x&host=b", "'[fd00::1]x'"),
        ("host=a&host=b&connect_timeout=3", "connect_timeout"),
        ("host=a:70000&host=b", "'a:70000'"),
        ("host=:5432&host=b", "empty"),
    ],
)
def test_a_database_url_the_node_cannot_use_is_refused_at_start_naming_it(query: str, named: str) -> None:
    with pytest.raises(ValidationError) as err:
        Settings(database_url=f"postgresql://u@/db?{query}")
    assert "database_url" in str(err.value)
    assert named in str(err.value)


def test_libpq_comma_hosts_are_refused_with_the_form_the_node_takes() -> None:
    with pytest.raises(ValidationError) as err:
        Settings(database_url="postgresql://u@h1:5432,h2:5432/db")
    assert "database_url" in str(err.value)
    assert "?host=a:5432&host=b:5432" in str(err.value)


@asynccontextmanager
async def hole_before_the_server(pg_database: str, target: str = "read-write") -> AsyncIterator[HoleUrl]:
    """A loopback port that accepts connections and never answers (a dead host's address),
    listed before the real server in a multi-host URL with ``target_session_attrs=target``;
    closed with every connection it took afterwards."""
    accepted: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        await reader.read()

    hole = await asyncio.start_server(swallow, "127.0.0.1", 0)
    hole_port = hole.sockets[0].getsockname()[1]
    name = make_url(pg_database).database
    url = (
        f"postgresql+asyncpg://{servers.PG_USER}@/{name}"
        f"?host=127.0.0.1:{hole_port}&host={servers.PG_HOST}:{servers.PG_PORT}&target_session_attrs={target}"
    )
    try:
        yield HoleUrl(url, accepted)
    finally:
        for writer in accepted:
            writer.close()
        hole.close()


@dataclass
class HoleUrl:
    url: str
    accepted: list[asyncio.StreamWriter]


@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_a_black_holed_first_host_costs_one_deadline_not_all(pg_database: str) -> None:
    async with hole_before_the_server(pg_database) as hole:
        db = Database(hole.url, timeout=2.0, pool_size=1, max_overflow=0)
        try:
            async with db.begin() as conn:
                assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
        finally:
            await db.close()


@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_a_caller_out_of_time_on_a_dead_host_begins_its_next_attempt_with_the_next_host(pg_database: str) -> None:
    """A heartbeat's deadline can be shorter than the per-host connect deadline: cut short on a
    black-holed primary, its next connection attempt must start with the standby, not the dead
    host again (a container killed in Docker black-holes its address: a node kept timing out on
    it and was evicted)."""
    async with hole_before_the_server(pg_database) as hole:
        connect = writable_connector(make_url(hole.url), 10.0, {})
        assert connect is not None
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await connect()
        assert len(hole.accepted) == 1
        conn = await connect()
        try:
            assert await conn.fetchval("SELECT 1") == 1
        finally:
            await conn.close()
        assert len(hole.accepted) == 1, "the second attempt went to the dead host again"


@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_an_unreachable_host_is_left_out_while_a_host_that_answers_is_not(pg_database: str) -> None:
    """After a fail-over the old primary is unreachable and the standby answers "not writable"
    until it is promoted: attempts in that window must not go back to the dead host (in Docker
    each went through a resolver lookup of a killed container's name that took seconds, holding
    one of the few resolver threads, until the lookups of the live host starved). Here the server
    plays the standby: it answers, but not as the session kind asked for."""
    async with hole_before_the_server(pg_database, target="read-only") as hole:
        connect = writable_connector(make_url(hole.url), 10.0, {})
        assert connect is not None
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await connect()
        for _ in range(3):
            async with asyncio.timeout(5):
                with pytest.raises(OSError, match="TargetServerAttributeNotMatched"):
                    await connect()
        assert len(hole.accepted) == 1, "an attempt went back to the unreachable host"


def test_a_parameter_the_connector_would_drop_is_refused() -> None:
    url = make_url("postgresql+asyncpg://u@/db?host=a:1&host=b:2&application_name=x")
    with pytest.raises(ValueError, match="application_name"):
        writable_connector(url, 1.0, {})
