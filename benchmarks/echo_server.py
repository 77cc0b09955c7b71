"""Echo servers for B1, run as separate processes: ``python -m benchmarks.echo_server raw|bus URL PREFIX``.

``raw`` is plain aio-pika request/reply (default channel: publisher confirms on), the baseline;
``bus`` is a zstack-mn CloudBus serving one echo service.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any, ClassVar

import aio_pika

from zstack_mn.messages import Message, ResourceUuid

PREFETCH = 64
SERVER_NODE = "00000000-0000-4000-8000-00000000b1b1"


class BenchEchoMsg(Message):
    SERVICE: ClassVar[str] = "benchEcho"
    RESOURCE_FIELD: ClassVar[str | None] = "uuid"
    uuid: ResourceUuid
    text: str = ""


def raw_queue(prefix: str) -> str:
    return f"{prefix}.raw.rpc"


QUEUE_TYPE_OF = {"bus": "classic", "bus-quorum": "quorum"}
"""The bus servers B1 compares with raw request/reply: on classic and on quorum queues."""


async def serve_raw(url: str, prefix: str) -> None:
    conn = await aio_pika.connect_robust(url)
    channel = await conn.channel()
    await channel.set_qos(prefetch_count=PREFETCH)
    queue = await channel.declare_queue(raw_queue(prefix), auto_delete=True)

    async def on_message(msg: aio_pika.abc.AbstractIncomingMessage) -> None:
        await channel.default_exchange.publish(
            aio_pika.Message(msg.body, correlation_id=msg.correlation_id),
            routing_key=msg.reply_to or "",
            mandatory=False,
        )
        await msg.ack()

    await queue.consume(on_message)
    print("ready", flush=True)
    await asyncio.Future()


async def serve_bus(url: str, prefix: str, queue_type: str = "classic") -> None:
    from zstack_mn.bus.amqp import AmqpTransport
    from zstack_mn.bus.cloudbus import BusLimits, CloudBus, Request
    from zstack_mn.bus.topology import Topology
    from zstack_mn.cluster.ring import LiveRing

    topology = Topology(prefix)
    transport = AmqpTransport(
        url, topology, publish_timeout=10, connection_name="bench-bus-server", queue_type=queue_type
    )
    await transport.start()
    bus = CloudBus(
        SERVER_NODE, transport, topology, ring=LiveRing(SERVER_NODE, [SERVER_NODE]), limits=BusLimits(prefetch=PREFETCH)
    )
    await bus.start()

    async def echo(req: Request) -> dict[str, Any]:
        msg = req.message
        assert isinstance(msg, BenchEchoMsg)
        return {"uuid": msg.uuid, "text": msg.text}

    await bus.serve(BenchEchoMsg.SERVICE, echo)
    print("ready", flush=True)
    await asyncio.Future()


if __name__ == "__main__":
    kind, url, prefix = sys.argv[1:4]
    asyncio.run(serve_raw(url, prefix) if kind == "raw" else serve_bus(url, prefix, QUEUE_TYPE_OF[kind]))
