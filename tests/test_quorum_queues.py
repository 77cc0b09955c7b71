"""``queue_type = quorum`` on the real RabbitMQ: the durable queues are quorum queues with a
delivery limit while reply queues stay exclusive; a node declaring another type than the queue
has gets a clear error; rescue empties and deletes a quorum queue without the ``if-empty`` flag
RabbitMQ refuses there (540 would cut the rescuer's connection)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from zstack_mn.bus.amqp import AmqpTransport
from zstack_mn.bus.topology import DELIVERY_LIMIT, Topology
from zstack_mn.bus.transport import Delivery, QueueKind, QueueMismatch
from zstack_mn.testing import servers

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture
async def quorum(amqp_url: str, topology: Topology) -> AsyncIterator[AmqpTransport]:
    t = AmqpTransport(amqp_url, topology, publish_timeout=5, connection_name="quorum", queue_type="quorum")
    await t.start()
    yield t
    await t.close()


def queue_types(vhost: str, prefix: str) -> dict[str, tuple[str, str]]:
    """name → (type, arguments) of the vhost's queues under ``prefix``."""
    listed = servers.rabbitmqctl("list_queues", "-p", vhost, "--no-table-headers", "-q", "name", "type", "arguments")
    assert listed.returncode == 0, listed.stderr
    rows = [line.split("\t") for line in listed.stdout.splitlines() if line.startswith(prefix)]
    return {name: (kind, args) for name, kind, args in rows}


async def test_durable_queues_are_quorum_and_replies_stay_exclusive(
    quorum: AmqpTransport, topology: Topology, rabbit_vhost: str
) -> None:
    node = str(uuid.uuid4())
    await quorum.declare(topology.service_queue("vmInstance", node), QueueKind.NODE)
    await quorum.declare(topology.api_queue, QueueKind.SHARED)
    await quorum.declare(topology.reply_queue(node), QueueKind.PRIVATE)
    types = queue_types(rabbit_vhost, topology.prefix)
    assert types[topology.service_queue("vmInstance", node)][0] == "quorum"
    assert types[topology.api_queue][0] == "quorum"
    assert types[topology.dead_letter_queue][0] == "quorum"
    assert types[topology.reply_queue(node)][0] == "classic"
    assert f"x-delivery-limit,{DELIVERY_LIMIT}" in types[topology.api_queue][1].replace(" ", "").replace('"', "")


async def test_another_queue_type_is_a_clear_error(amqp_url: str, topology: Topology, quorum: AmqpTransport) -> None:
    await quorum.declare(topology.api_queue, QueueKind.SHARED)
    classic = AmqpTransport(amqp_url, topology, publish_timeout=5, connection_name="classic")
    with pytest.raises(QueueMismatch, match="ZSTACK_MN_QUEUE_TYPE"):
        await classic.start()  # the dead-letter queue exists as a quorum queue already
    await classic.close()


async def test_rescue_empties_and_deletes_a_quorum_queue(quorum: AmqpTransport, topology: Topology) -> None:
    dead = topology.service_queue("vmInstance", str(uuid.uuid4()))
    await quorum.declare(dead, QueueKind.NODE)
    for i in range(3):
        await quorum.publish(dead, f"m{i}".encode(), message_id=f"m{i}")
    assert await quorum.delete_if_empty(dead) is False, "a queue with messages is kept"
    taken = []
    while (got := await quorum.take(dead)) is not None:
        delivery, ack = got
        taken.append(delivery.body)
        await ack()
    assert sorted(taken) == [b"m0", b"m1", b"m2"]
    assert await quorum.delete_if_empty(dead) is True
    assert await quorum.queue_status(dead) is None
    await quorum.declare(topology.api_queue, QueueKind.SHARED)
    await quorum.publish(topology.api_queue, b"after", message_id="after")  # the connection lives on
    assert await quorum.queue_status(topology.api_queue) == (1, 0)


async def test_nodes_declaring_the_same_new_quorum_queues_at_once_all_start(amqp_url: str) -> None:
    """Three nodes starting together declare one new quorum API queue and dead-letter queue at
    the same moment; RabbitMQ 3.10 may cut one of them with INTERNAL_ERROR, and whatever else
    that connection had in flight (a consume, a bind) fails with it: that must cost a retry, not
    the node."""

    async def ignore(_: Delivery) -> None:
        return None

    for _ in range(3):
        topology = Topology(f"q{uuid.uuid4().hex[:8]}")
        made = [
            AmqpTransport(amqp_url, topology, publish_timeout=5, connection_name=f"race{i}", queue_type="quorum")
            for i in range(3)
        ]

        async def start(t: AmqpTransport, names: Topology = topology) -> None:
            await t.start()
            await t.declare(names.api_queue, QueueKind.SHARED)
            await t.consume(names.api_queue, ignore, prefetch=10)
            events = f"{names.api_queue}.events.{uuid.uuid4().hex[:6]}"
            await t.declare(events, QueueKind.PRIVATE)
            await t.bind(events, names.event_exchange, "vm.#")
            await t.consume(events, ignore, prefetch=1)

        try:
            await asyncio.gather(*(start(t) for t in made))
            for t in made:
                assert await t.queue_status(topology.api_queue) is not None
        finally:
            for t in made:
                await t.close()
