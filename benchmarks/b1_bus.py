"""B1: cloud-bus ``call`` against raw aio-pika request/reply, same broker, payload and
concurrency, measured in the same run; the bus on classic queues and on quorum queues
(``queue_type = quorum``, what a RabbitMQ cluster needs), so the cost of quorum is a ratio."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from typing import Any

import aio_pika
import orjson
import psutil

from benchmarks.common import PAYLOAD_TEXT, LoadResult, broker_process, run_load
from benchmarks.echo_server import QUEUE_TYPE_OF, SERVER_NODE, BenchEchoMsg, raw_queue

CONCURRENCY = (1, 16, 256)


def start_server(kind: str, url: str, prefix: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.echo_server", kind, url, prefix],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise RuntimeError(f"{kind} echo server did not start")
    return proc


async def raw_client(url: str, prefix: str) -> tuple[Any, Any]:
    conn = await aio_pika.connect_robust(url)
    channel = await conn.channel()
    reply_q = await channel.declare_queue(exclusive=True, auto_delete=True)
    pending: dict[str, asyncio.Future[bytes]] = {}

    async def on_reply(msg: aio_pika.abc.AbstractIncomingMessage) -> None:
        fut = pending.pop(msg.correlation_id or "", None)
        if fut is not None and not fut.done():
            fut.set_result(msg.body)
        await msg.ack()

    await reply_q.consume(on_reply)
    queue = raw_queue(prefix)

    async def call(_: int) -> bytes:
        corr = uuid.uuid4().hex
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        pending[corr] = fut
        body = orjson.dumps({"uuid": str(uuid.uuid4()), "text": PAYLOAD_TEXT})
        await channel.default_exchange.publish(
            aio_pika.Message(body, correlation_id=corr, reply_to=reply_q.name, message_id=corr), routing_key=queue
        )
        return await asyncio.wait_for(fut, 30)

    return call, conn


async def bus_client(url: str, prefix: str, queue_type: str) -> tuple[Any, Any]:
    from zstack_mn.bus.amqp import AmqpTransport
    from zstack_mn.bus.cloudbus import CloudBus
    from zstack_mn.bus.topology import Topology
    from zstack_mn.cluster.ring import LiveRing

    topology = Topology(prefix)
    transport = AmqpTransport(
        url, topology, publish_timeout=10, connection_name="bench-bus-client", queue_type=queue_type
    )
    await transport.start()
    me = str(uuid.uuid4())
    bus = CloudBus(me, transport, topology, ring=LiveRing(me, [SERVER_NODE]))
    await bus.start()

    async def call(_: int) -> dict[str, Any]:
        return await bus.call(BenchEchoMsg(uuid=str(uuid.uuid4()), text=PAYLOAD_TEXT), timeout=30)

    return call, bus


async def run(url: str, prefix: str, seconds: float, progress: Any) -> dict[str, Any]:
    """Both servers and clients stay up; rounds alternate raw and bus at each concurrency, and each
    point reports the round with the median rate, so machine drift hits both sides alike."""
    broker = broker_process()
    servers = {kind: start_server(kind, url, f"{prefix}{kind}") for kind in KINDS}
    clients: dict[str, Any] = {}
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {}
    try:
        clients["raw"] = await raw_client(url, f"{prefix}raw")
        for kind, queue_type in QUEUE_TYPE_OF.items():
            clients[kind] = await bus_client(url, f"{prefix}{kind}", queue_type)
        for _ in range(ROUNDS):
            for c in CONCURRENCY:
                for kind in KINDS:
                    res: LoadResult = await run_load(
                        clients[kind][0],
                        c,
                        seconds,
                        processes={"server": psutil.Process(servers[kind].pid), "broker": broker},
                    )
                    samples.setdefault(str(c), {}).setdefault(kind, []).append(res.summary())
                    progress.update(1)
    finally:
        for _, closer in clients.values():
            await closer.close()
        for proc in servers.values():
            proc.kill()
            proc.wait()
    results: dict[str, Any] = {}
    for point, kinds in samples.items():
        row: dict[str, Any] = {
            kind: sorted(runs, key=lambda r: r["callsPerSecond"])[len(runs) // 2] for kind, runs in kinds.items()
        }
        row["ratio"] = round(row["bus"]["callsPerSecond"] / max(row["raw"]["callsPerSecond"], 1e-9), 3)
        row["quorumRatio"] = round(row["bus-quorum"]["callsPerSecond"] / max(row["raw"]["callsPerSecond"], 1e-9), 3)
        row["quorumToClassic"] = round(row["bus-quorum"]["callsPerSecond"] / max(row["bus"]["callsPerSecond"], 1e-9), 3)
        row["rounds"] = {kind: [r["callsPerSecond"] for r in runs] for kind, runs in kinds.items()}
        results[point] = row
    return {"concurrency": results}


ROUNDS = 3
KINDS = ("raw", *QUEUE_TYPE_OF)
STEPS = ROUNDS * len(KINDS) * len(CONCURRENCY)
