"""Several broker URLs per node: the transport connects to the first that answers and, when the
member it is on goes away, reconnects to the next one, with its consumers. Each "member" here is a
TCP proxy in front of the real RabbitMQ (a member that dies is a proxy that closes), so the AMQP
path is real; the 3-member cluster rows of the fault matrix cover real member loss."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import pytest
from yarl import URL

from zstack_mn.bus.amqp import AmqpTransport
from zstack_mn.bus.failover import FailoverConnection
from zstack_mn.bus.topology import Topology
from zstack_mn.bus.transport import Delivery, QueueKind, TransportDown
from zstack_mn.config import split_urls
from zstack_mn.testing.cluster import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


class Proxy:
    """A TCP proxy to the broker that can die: ``close`` stops listening and cuts every
    connection through it."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()


def via(url: str, port: int) -> str:
    return str(URL(url).with_port(port))


def test_split_urls_reads_a_comma_separated_setting() -> None:
    assert split_urls(" amqp://a:5672/v , amqp://b:5672/v,, ") == ["amqp://a:5672/v", "amqp://b:5672/v"]


async def test_each_connection_attempt_takes_the_next_url() -> None:
    """The property aio-pika reads once per attempt moves on; logging it does not."""
    conn = FailoverConnection(["amqp://a/", "amqp://b/", "amqp://c/"], first=1)
    assert str(conn) == "amqp://b/"
    assert [conn.url.host for _ in range(4)] == ["b", "c", "a", "b"]
    assert str(conn) == "amqp://b/"
    assert str(conn) == "amqp://b/"


async def test_a_dead_first_url_is_skipped_at_start(amqp_url: str) -> None:
    dead = via(amqp_url, free_port())
    t = AmqpTransport(
        f"{dead},{amqp_url}", Topology(f"f{uuid.uuid4().hex[:8]}"), publish_timeout=3, connection_name="fo"
    )
    await t.start()
    try:
        assert t.connected
    finally:
        await t.close()


async def test_no_url_answering_is_transport_down(amqp_url: str) -> None:
    dead = [via(amqp_url, free_port()) for _ in range(2)]
    t = AmqpTransport(",".join(dead), Topology("f"), publish_timeout=2, connection_name="fo")
    with pytest.raises(TransportDown) as err:
        await t.start()
    assert all(str(URL(d).port) in str(err.value) for d in dead)


async def test_a_lost_member_is_left_for_the_next_url_with_the_consumers(amqp_url: str) -> None:
    broker = URL(amqp_url)
    first, second = Proxy(broker.host or "127.0.0.1", broker.port or 5672), Proxy(broker.host or "", broker.port or 0)
    await first.start()
    await second.start()
    topology = Topology(f"f{uuid.uuid4().hex[:8]}")
    t = AmqpTransport(
        f"{via(amqp_url, first.port)},{via(amqp_url, second.port)}", topology, publish_timeout=3, connection_name="fo"
    )
    got: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_message(delivery: Delivery) -> None:
        await got.put(delivery.body)

    await t.start()
    try:
        queue = topology.service_queue("failover", "n1")
        await t.declare(queue, QueueKind.SHARED)
        await t.consume(queue, on_message, prefetch=10)
        await t.publish(queue, b"before", message_id="m1")
        assert await asyncio.wait_for(got.get(), 10) == b"before"
        await first.close()
        async with asyncio.timeout(30):
            while True:
                with contextlib.suppress(TransportDown):
                    await t.publish(queue, b"after", message_id="m2")
                    break
                await asyncio.sleep(0.2)
        async with asyncio.timeout(15):  # "before" may come again: its ack can be lost with the member
            while await got.get() != b"after":
                pass
        assert f":{second.port}/" in str(t._connection)
    finally:
        await t.close()
        await second.close()
        await first.close()
