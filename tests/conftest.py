"""Shared fixtures: transports over both the in-process bus and the real RabbitMQ, databases.

Integration tests (marker ``integration``) need the real servers. Without them they are skipped
and the run ends with a loud banner, unless ``ZSTACK_MN_REQUIRE_INTEGRATION=1`` makes them fail.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from zstack_mn.bus.amqp import AmqpTransport
from zstack_mn.bus.memory import MemoryBroker, MemoryTransport
from zstack_mn.bus.topology import Topology
from zstack_mn.bus.transport import Transport
from zstack_mn.testing import servers
from zstack_mn.testing.cluster import ClusterHarness

if TYPE_CHECKING:
    from zstack_mn.testing.faults import Report

_skipped: list[str] = []
_fault_reports: list[Report] = []

MakeTransport = Callable[[], Awaitable[Transport]]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="run the full randomized fault matrix (10 runs a row)")
    parser.addoption("--fault-report", default=None, help="write the fault runs' reports here as JSON")


@pytest.fixture(scope="session")
def fault_reports() -> list[Report]:
    return _fault_reports


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    needs = [i for i in items if i.get_closest_marker("integration") or i.get_closest_marker("cluster")]
    if not needs:
        return
    missing = [n for n, up in (("RabbitMQ", servers.rabbit_up()), ("PostgreSQL", servers.postgres_up())) if not up]
    if not missing:
        return
    if servers.REQUIRED:
        raise pytest.UsageError(
            f"ZSTACK_MN_REQUIRE_INTEGRATION=1 but {' and '.join(missing)} not reachable "
            f"(RabbitMQ {servers.RABBIT_HOST}:{servers.RABBIT_PORT}, PostgreSQL {servers.PG_HOST}:{servers.PG_PORT})"
        )
    marker = pytest.mark.skip(reason=f"{' and '.join(missing)} not reachable")
    for item in needs:
        item.add_marker(marker)
        _skipped.append(item.nodeid)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    if _fault_reports:
        from zstack_mn.testing.faults import format_summary, summarize, write_summary

        terminalreporter.section("fault matrix (history checker)")
        for report in _fault_reports:
            terminalreporter.write_line(report.line())
        summary = summarize(_fault_reports)
        terminalreporter.write_line(format_summary(summary))
        path = config.getoption("--fault-report")
        if path:
            write_summary(summary, Path(path))
            terminalreporter.write_line(f"fault report written to {path}")
    if _skipped:
        bar = "!" * 78
        terminalreporter.write_line(bar, red=True, bold=True)
        terminalreporter.write_line(
            f"SKIPPED {len(_skipped)} integration tests: RabbitMQ/PostgreSQL not reachable. "
            "They prove the cluster claims; run them before you trust a change.",
            red=True,
            bold=True,
        )
        terminalreporter.write_line(bar, red=True, bold=True)


@pytest.fixture(scope="session")
def rabbit_vhost() -> Iterator[str]:
    vhost = servers.new_vhost()
    try:
        yield vhost
    finally:
        servers.delete_vhost(vhost)


@pytest.fixture(scope="session")
def amqp_url(rabbit_vhost: str) -> str:
    return servers.amqp_url(rabbit_vhost)


@pytest.fixture
def topology() -> Topology:
    return Topology(prefix=f"t{uuid.uuid4().hex[:8]}")


@pytest.fixture(params=["memory", pytest.param("amqp", marks=pytest.mark.integration)])
def transport_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
async def make_transport(
    transport_kind: str, request: pytest.FixtureRequest, topology: Topology
) -> AsyncIterator[MakeTransport]:
    """A factory of started transports on one shared broker (memory or the real RabbitMQ)."""
    made: list[Transport] = []
    memory_url = f"memory://{uuid.uuid4().hex}"
    url = request.getfixturevalue("amqp_url") if transport_kind == "amqp" else memory_url

    async def factory() -> Transport:
        if transport_kind == "amqp":
            t: Transport = AmqpTransport(url, topology, publish_timeout=5, connection_name="test")
        else:
            t = MemoryTransport(memory_url, topology.dead_letter_queue)
        await t.start()
        made.append(t)
        return t

    yield factory
    for t in made:
        await asyncio.wait_for(t.close(), 10)
    MemoryBroker.reset(memory_url)


@pytest.fixture
async def harness(tmp_path: Path, amqp_url: str, pg_database: str) -> AsyncIterator[ClusterHarness]:
    h = ClusterHarness(tmp_path, amqp_url=amqp_url, database_url=pg_database, queue_prefix=f"c{uuid.uuid4().hex[:8]}")
    try:
        yield h
    finally:
        await h.close()


@pytest.fixture
async def pg_database() -> AsyncIterator[str]:
    """A fresh PostgreSQL database for one test (URL for SQLAlchemy), dropped afterwards."""
    name = await servers.create_database()
    try:
        yield servers.pg_url(name)
    finally:
        await servers.drop_database(name)


@pytest.fixture(scope="session")
def docker_engine(request: pytest.FixtureRequest) -> Iterator[None]:
    """A Docker engine for the compose tests, held for the session (``tests/compose/stack.py``)."""
    from tests.compose.stack import engine_lease

    with engine_lease(request.config):
        yield


@pytest.fixture(scope="session")
def standin_images(docker_engine: None) -> dict[str, str]:
    """The stand-in images the compose tests run on: the compose variables that select them."""
    from tests.compose.stack import ensure_standin_images

    return ensure_standin_images()
