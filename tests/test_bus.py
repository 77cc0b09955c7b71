"""Behaviour of the cloud bus, the same cases on the in-process transport and on RabbitMQ."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, ClassVar

import orjson
import pytest
from pydantic import Field

from zstack_mn.bus.cloudbus import CloudBus, Request
from zstack_mn.bus.topology import Topology
from zstack_mn.cluster.ring import LiveRing
from zstack_mn.messages import (
    Envelope,
    ErrorCode,
    Event,
    Message,
    ResourceUuid,
    ZStackError,
    decode,
)

SERVICE = "echo"


class EchoMsg(Message):
    SERVICE: ClassVar[str] = SERVICE
    RESOURCE_FIELD: ClassVar[str | None] = "uuid"
    uuid: ResourceUuid
    text: str = ""
    delay: float = Field(0.0, ge=0)
    fail: bool = False


class LocalEchoMsg(Message):
    SERVICE: ClassVar[str] = SERVICE
    text: str = ""


class PingedEvent(Event):
    TOPIC: ClassVar[str] = "test.pinged"
    text: str


class EchoService:
    """Replies with its node uuid; records what it handled (``handled_one`` is set at each)."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.handled: list[str] = []
        self.handled_one = asyncio.Event()

    async def __call__(self, req: Request) -> dict[str, Any]:
        msg = req.message
        if isinstance(msg, EchoMsg):
            if msg.delay:
                await asyncio.sleep(msg.delay)
            if msg.fail:
                raise RuntimeError("handler blew up")
        self.handled.append(req.envelope.id)
        self.handled_one.set()
        text = msg.text if isinstance(msg, EchoMsg | LocalEchoMsg) else ""
        return {"node": self.node, "text": text}


async def make_node(
    make_transport, topology: Topology, node: str, ring_nodes: list[str]
) -> tuple[CloudBus, EchoService]:
    transport = await make_transport()
    ring = LiveRing(node, ring_nodes)
    bus = CloudBus(node, transport, topology, ring=ring)
    await bus.start()
    service = EchoService(node)
    await bus.serve(SERVICE, service)
    return bus, service


def owned_by(ring_nodes: list[str], node: str) -> str:
    ring = LiveRing(node, ring_nodes)
    while True:
        candidate = str(uuid.uuid4())
        if ring.owner_of(candidate) == node:
            return candidate


async def test_request_reply_routes_to_owner(make_transport, topology):
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    bus_a, _ = await make_node(make_transport, topology, a, [a, b])
    await make_node(make_transport, topology, b, [a, b])
    for node in (a, b):
        reply = await bus_a.call_envelope(EchoMsg(uuid=owned_by([a, b], node), text="hi"), timeout=5)
        assert reply.ok
        assert reply.body == {"node": node, "text": "hi"}
        assert reply.handled_by == node


async def test_non_resource_message_is_handled_locally(make_transport, topology):
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    bus_a, _ = await make_node(make_transport, topology, a, [a, b])
    bus_b, _ = await make_node(make_transport, topology, b, [a, b])
    assert (await bus_a.call(LocalEchoMsg(text="x"), timeout=5))["node"] == a
    assert (await bus_b.call(LocalEchoMsg(text="x"), timeout=5))["node"] == b


async def test_call_times_out_and_late_reply_is_dropped(make_transport, topology):
    a = str(uuid.uuid4())
    bus, service = await make_node(make_transport, topology, a, [a])
    with pytest.raises(ZStackError) as err:
        await bus.call(EchoMsg(uuid=str(uuid.uuid4()), delay=0.5), timeout=0.1)
    assert err.value.code is ErrorCode.TIMEOUT
    await asyncio.wait_for(service.handled_one.wait(), 5)
    assert len(service.handled) == 1
    assert bus._pending == {}
    assert (await bus.call(EchoMsg(uuid=str(uuid.uuid4()), text="after"), timeout=5))["text"] == "after"


async def test_unroutable_message_fails_at_once_with_no_route(make_transport, topology):
    a, ghost = str(uuid.uuid4()), str(uuid.uuid4())
    bus, _ = await make_node(make_transport, topology, a, [a, ghost])
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(ZStackError) as err:
        await bus.call(EchoMsg(uuid=owned_by([a, ghost], ghost)), timeout=20)
    assert err.value.code is ErrorCode.NO_ROUTE
    assert loop.time() - started < 10


async def test_event_fans_out_to_every_subscriber(make_transport, topology):
    nodes = [str(uuid.uuid4()) for _ in range(3)]
    buses = []
    received: dict[str, asyncio.Queue[Event]] = {}
    for n in nodes:
        bus, _ = await make_node(make_transport, topology, n, nodes)
        received[n] = asyncio.Queue()
        await bus.subscribe("test.*", received[n].put)
        buses.append(bus)
    await buses[0].publish(PingedEvent(text="hello"))
    for n in nodes:
        evt = await asyncio.wait_for(received[n].get(), 5)
        assert isinstance(evt, PingedEvent)
        assert evt.text == "hello"


async def raw_call(bus: CloudBus, queue: str, body: bytes) -> Envelope:
    """Publish raw bytes with this bus's reply queue and wait for the error reply."""
    corr = str(uuid.uuid4())
    fut = asyncio.get_running_loop().create_future()
    from zstack_mn.bus.cloudbus import _Pending

    bus._pending[corr] = _Pending(fut)
    await bus.transport.publish(queue, body, message_id=corr, correlation_id=corr, reply_to=bus.reply_queue)
    return await asyncio.wait_for(fut, 5)


async def dead_letters(bus: CloudBus, topology: Topology) -> int:
    count = 0
    while (got := await bus.transport.take(topology.dead_letter_queue)) is not None:
        await got[1]()
        count += 1
    return count


async def test_poison_messages_get_error_replies_and_are_dead_lettered(make_transport, topology):
    a = str(uuid.uuid4())
    bus, service = await make_node(make_transport, topology, a, [a])
    queue = topology.service_queue(SERVICE, a)
    good = Envelope.request(EchoMsg(uuid=str(uuid.uuid4())), ttl_ms=5000)
    cases = {
        b"{not json": ErrorCode.MALFORMED_MESSAGE,
        orjson.dumps({"id": "x", "type": "NoSuchMsg", "service": SERVICE}): ErrorCode.UNKNOWN_MESSAGE_TYPE,
        orjson.dumps({**good.model_dump(by_alias=True), "body": {"uuid": "not-a-uuid"}}): ErrorCode.INVALID_ARGUMENT,
        orjson.dumps(
            {**good.model_dump(by_alias=True), "body": {"uuid": str(uuid.uuid4()), "delay": "slow"}}
        ): ErrorCode.INVALID_ARGUMENT,
        orjson.dumps({"id": "x", "type": "EchoMsg", "hops": -1}): ErrorCode.MALFORMED_MESSAGE,
        b"[" * 10 + b" " * (2 << 20): ErrorCode.MESSAGE_TOO_LARGE,
    }
    for body, code in cases.items():
        reply = await raw_call(bus, queue, body)
        assert reply.ok is False
        assert reply.error is not None
        assert reply.error.code == code.value, (body[:60], reply.error)
    bad_field = await raw_call(bus, queue, orjson.dumps({**good.model_dump(by_alias=True), "body": {"uuid": "nope"}}))
    assert bad_field.error is not None
    assert bad_field.error.details["field"] == "uuid"
    assert await dead_letters(bus, topology) == len(cases) + 1
    assert service.handled == []
    assert (await bus.call(EchoMsg(uuid=str(uuid.uuid4()), text="alive"), timeout=5))["text"] == "alive"


async def test_handler_error_becomes_error_reply_and_consumer_goes_on(make_transport, topology):
    a = str(uuid.uuid4())
    bus, _ = await make_node(make_transport, topology, a, [a])
    with pytest.raises(ZStackError) as err:
        await bus.call(EchoMsg(uuid=str(uuid.uuid4()), fail=True), timeout=5)
    assert err.value.code is ErrorCode.INTERNAL_ERROR
    assert "handler blew up" in err.value.description
    assert (await bus.call(EchoMsg(uuid=str(uuid.uuid4()), text="ok"), timeout=5))["text"] == "ok"


async def test_thousand_concurrent_calls(make_transport, topology):
    nodes = [str(uuid.uuid4()) for _ in range(2)]
    bus, s0 = await make_node(make_transport, topology, nodes[0], nodes)
    _, s1 = await make_node(make_transport, topology, nodes[1], nodes)
    calls = [bus.call(EchoMsg(uuid=str(uuid.uuid4()), text=str(i)), timeout=60) for i in range(1000)]
    replies = await asyncio.gather(*calls)
    assert sorted(int(r["text"]) for r in replies) == list(range(1000))
    assert len(s0.handled) + len(s1.handled) == 1000
    assert s0.handled
    assert s1.handled


async def test_receiver_forwards_a_message_it_does_not_own(make_transport, topology):
    a, b, stale = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    _, service_a = await make_node(make_transport, topology, a, [a, b])
    _, service_b = await make_node(make_transport, topology, b, [a, b])
    bus_stale, _ = await make_node(make_transport, topology, stale, [a])
    resource = owned_by([a, b], b)
    reply = await bus_stale.call_envelope(EchoMsg(uuid=resource), timeout=5)
    assert reply.handled_by == b
    assert service_a.handled == []
    assert len(service_b.handled) == 1


async def test_hop_limit_stops_forwarding_loops(make_transport, topology):
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    bus_a, service_a = await make_node(make_transport, topology, a, [b])
    _, service_b = await make_node(make_transport, topology, b, [a])
    reply = await bus_a.call_envelope(EchoMsg(uuid=str(uuid.uuid4())), timeout=5)
    assert reply.ok
    assert len(service_a.handled) + len(service_b.handled) == 1


def test_envelope_round_trip_keeps_every_field():
    env = Envelope.request(EchoMsg(uuid=str(uuid.uuid4()), text="t"), ttl_ms=10, reply_to="r", headers={"k": "v"})
    from zstack_mn.messages import encode

    back = decode(encode(env, 1 << 20), 1 << 20)
    assert back == env
    assert back.parse_message() == EchoMsg(uuid=env.resource_uuid, text="t")
