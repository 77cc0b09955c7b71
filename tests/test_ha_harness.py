"""The HA harness itself (zstack_mn/testing/ha.py): a 3-node RabbitMQ cluster keeps a quorum
queue's message through a kill -9 of the queue's leader and comes back from stop_app / start_app
and a restart; a PostgreSQL primary + standby replicates, fails over, and the two-host URL then
writes to the new primary."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from pathlib import Path

import aio_pika
import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from zstack_mn.testing import ha

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not ha.available(), reason="RabbitMQ or PostgreSQL 15 binaries not installed"),
]


async def get_one(url: str, queue: str, timeout: float) -> aio_pika.abc.AbstractIncomingMessage:
    """Basic.get one message of ``queue`` through ``url``, retrying (fresh connection each time)
    while the queue elects a new leader."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = await aio_pika.connect(url, timeout=5)
            async with conn:
                channel = await conn.channel()
                q = await channel.get_queue(queue, ensure=False)
                message = await q.get(no_ack=True, fail=False, timeout=5)
                if message is not None:
                    return message
        except (aio_pika.exceptions.AMQPError, OSError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"no message on {queue} via {url} within {timeout}s")
        await asyncio.sleep(0.5)


async def test_rabbit_cluster_keeps_a_quorum_message_through_a_leader_kill(tmp_path: Path):
    async with ha.RabbitCluster(tmp_path) as rc:
        print(f"\nRabbitMQ cluster up in {rc.started_in:.1f}s")
        status = await rc.cluster_status(0)
        assert sorted(status["running_nodes"]) == sorted(rc.nodes)

        queue = f"ha-{uuid.uuid4().hex[:8]}"
        conn = await aio_pika.connect(rc.urls[0], timeout=10)
        async with conn:
            channel = await conn.channel(publisher_confirms=True)
            await channel.declare_queue(queue, durable=True, arguments={"x-queue-type": "quorum"})
            message = aio_pika.Message(b"survives", delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            await channel.default_exchange.publish(message, routing_key=queue, timeout=10)

        leader = await rc.queue_leader(queue)
        beam = rc.members[leader].beam_pid()
        assert beam is not None
        started = time.monotonic()
        await rc.kill(leader)
        assert not ha.pid_alive(beam)
        other = (leader + 1) % 3
        got = await get_one(rc.urls[other], queue, timeout=60)
        assert got.body == b"survives"
        print(f"message read via member {other} {time.monotonic() - started:.1f}s after killing leader {leader}")
        assert len(await rc.running_nodes(other)) == 2

        started = time.monotonic()
        await rc.restart(leader)
        await rc.wait_running(3)
        print(f"killed member restarted and rejoined in {time.monotonic() - started:.1f}s")

        await rc.stop_app(other)
        assert rc.nodes[other] not in await rc.running_nodes(leader)
        await rc.start_app(other)
        await rc.wait_running(3, timeout=60)
    assert not rc.root.exists()
    assert not any(m.alive for m in rc.members)


async def test_pg_pair_replicates_and_fails_over(tmp_path: Path):
    async with ha.PgPair(tmp_path) as pg:
        print(f"\nPostgreSQL pair up in {pg.started_in:.1f}s")
        first = pg.primary_port
        assert await pg.primary_is(first)
        assert await pg.role(pg.standby_port) == "standby"

        engine = create_async_engine(pg.url, pool_pre_ping=True)
        try:
            async with engine.begin() as conn:
                await conn.execute(text("CREATE TABLE t (v text)"))
                await conn.execute(text("INSERT INTO t VALUES ('before')"))
            seen = await pg.fetchval(pg.standby_port, "SELECT v FROM t", database=pg.database)
            assert seen == "before"

            took = await pg.fail_over()
            print(f"fail-over (stop -m immediate → promoted standby accepts writes) in {took:.2f}s")
            assert pg.primary_port != first
            assert await pg.primary_is(pg.primary_port)
            assert await pg.role(first) == "down"

            async with engine.begin() as conn:
                await conn.execute(text("INSERT INTO t VALUES ('after')"))
            async with engine.connect() as conn:
                rows = (await conn.execute(text("SELECT v FROM t ORDER BY v"))).scalars().all()
            assert rows == ["after", "before"]
            conn = await asyncpg.connect(pg.multi_dsn, timeout=10)
            try:
                assert await conn.fetchval("SELECT count(*) FROM t") == 2
                assert not await conn.fetchval("SELECT pg_is_in_recovery()")
            finally:
                await conn.close()
        finally:
            with contextlib.suppress(Exception):
                await engine.dispose()

        took = await pg.rejoin()
        print(f"former primary rebuilt as standby in {took:.1f}s")
        assert await pg.role(first) == "standby"
    assert not pg.root.exists()
