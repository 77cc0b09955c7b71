"""RabbitMQ restart (``rabbitmqctl stop_app`` / ``start_app``): pending calls fail at once with a
retryable error, no publish hangs past its timeout, and every consumer comes back."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest

from tests.test_bus import EchoMsg, EchoService
from zstack_mn.bus.amqp import AmqpTransport
from zstack_mn.bus.cloudbus import CloudBus
from zstack_mn.bus.topology import Topology
from zstack_mn.bus.transport import TransportDown
from zstack_mn.cluster.ring import LiveRing
from zstack_mn.messages import ErrorCode, ZStackError
from zstack_mn.testing import servers

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
CONSUMERS_BACK_S = 30.0


@pytest.fixture
async def transport(amqp_url: str, topology: Topology, request: pytest.FixtureRequest) -> AsyncIterator[AmqpTransport]:
    """A started transport on the test's vhost, closed afterwards."""
    started = AmqpTransport(amqp_url, topology, publish_timeout=5, connection_name=request.node.name[:64])
    await started.start()
    try:
        yield started
    finally:
        await started.close()


@pytest.fixture
async def admin(amqp_url: str) -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    """A plain aio-pika connection to look at queues beside the transport."""
    connection = await aio_pika.connect(amqp_url)
    try:
        yield connection
    finally:
        await connection.close()


async def test_consumers_come_back_after_a_broker_restart(amqp_url: str):
    topology = Topology(f"r{uuid.uuid4().hex[:8]}")
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    buses = []
    for node in (a, b):
        t = AmqpTransport(amqp_url, topology, publish_timeout=2, connection_name=f"restart-{node[:8]}")
        await t.start()
        bus = CloudBus(node, t, topology, ring=LiveRing(node, [b]))
        await bus.start()
        await bus.serve("echo", EchoService(node))
        buses.append(bus)
    caller = buses[0]
    try:
        assert (await caller.call(EchoMsg(uuid=str(uuid.uuid4()), text="before"), timeout=5))["node"] == b
        slow = asyncio.create_task(caller.call(EchoMsg(uuid=str(uuid.uuid4()), delay=5), timeout=30))
        await asyncio.sleep(0.3)
        assert servers.rabbitmqctl("stop_app").returncode == 0
        started = time.monotonic()
        with pytest.raises(ZStackError) as err:
            await asyncio.wait_for(slow, 10)
        assert err.value.code is ErrorCode.BUS_UNAVAILABLE
        assert err.value.retryable
        assert time.monotonic() - started < 5
        started = time.monotonic()
        with pytest.raises(ZStackError) as err:
            await caller.call(EchoMsg(uuid=str(uuid.uuid4())), timeout=20)
        assert err.value.code in (ErrorCode.BUS_UNAVAILABLE, ErrorCode.TIMEOUT)
        assert time.monotonic() - started < 20
    finally:
        assert servers.rabbitmqctl("start_app").returncode == 0
    try:
        reply = await _first_reply_within(caller, CONSUMERS_BACK_S)
        assert reply == {"node": b, "text": "after"}
    finally:
        for bus in buses:
            await bus.close()


async def _first_reply_within(caller: CloudBus, bound: float) -> dict[str, Any]:
    """Call until a call is answered (the broker's consumers are back), at most ``bound`` seconds;
    the last error when none is."""
    deadline = time.monotonic() + bound
    while True:
        try:
            return await caller.call(EchoMsg(uuid=str(uuid.uuid4()), text="after"), timeout=2)
        except ZStackError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def test_a_publish_the_broker_refuses_is_a_retryable_error(
    transport: AmqpTransport, admin: aio_pika.abc.AbstractConnection, topology: Topology
):
    """A queue at its length limit with ``reject-publish`` makes RabbitMQ nack the publish: the
    transport raises TransportDown (the bus's retryable BUS_UNAVAILABLE), and goes on working."""
    channel = await admin.channel()
    full = await channel.declare_queue(
        f"{topology.prefix}.full", arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
    )
    roomy = await channel.declare_queue(f"{topology.prefix}.roomy")
    with pytest.raises(TransportDown, match="nack"):
        await transport.publish(full.name, b"{}", message_id="refused")
    await transport.publish(roomy.name, b"{}", message_id="taken")
    taken = await roomy.get(timeout=5)
    assert taken.message_id == "taken"
    await taken.ack()


async def test_a_publish_failed_by_a_channel_closed_without_a_reason_is_a_retryable_error(
    transport: AmqpTransport, monkeypatch: pytest.MonkeyPatch
):
    """aiormq fails what is in flight on a channel that closes without a reason with a bare
    ``Exception``: the transport raises TransportDown (the bus's retryable BUS_UNAVAILABLE), not
    an error the API would answer as INTERNAL_ERROR; any other error is left as it is."""
    channel = transport._publish_channel
    assert channel is not None
    underlay = await channel.get_underlay_channel()

    async def rejected_without_reason(*_: Any, **__: Any) -> None:
        raise Exception

    monkeypatch.setattr(underlay, "basic_publish", rejected_without_reason)
    with pytest.raises(TransportDown, match="closed while"):
        await transport.publish("any-queue", b"{}", message_id="in-flight")

    async def a_bug(*_: Any, **__: Any) -> None:
        raise KeyError("a bug, not an outage")

    monkeypatch.setattr(underlay, "basic_publish", a_bug)
    with pytest.raises(KeyError):
        await transport.publish("any-queue", b"{}", message_id="buggy")


async def test_a_reply_waits_for_its_channel_to_reopen_on_a_live_connection(
    transport: AmqpTransport, admin: aio_pika.abc.AbstractConnection, topology: Topology
):
    """After a reconnect aio-pika reopens channels one at a time: a handler can answer before
    the publishing channel is back. A reply (non-mandatory) waits for it, within the publish
    deadline, instead of being dropped; a request still fails at once, for its caller to retry."""
    replies = await (await admin.channel()).declare_queue(f"{topology.prefix}.replies")
    channel = transport._publish_channel
    assert channel is not None
    await (await channel.get_underlay_channel()).close()
    assert channel.is_closed
    with pytest.raises(TransportDown):
        await transport.publish(replies.name, b"request", message_id="request")
    await (await channel.get_underlay_channel()).close()
    assert channel.is_closed
    await transport.publish(replies.name, b"{}", message_id="reply", mandatory=False)
    got = await replies.get(timeout=5)
    assert got.message_id == "reply"
    await got.ack()
