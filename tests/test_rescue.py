"""Re-routing a departed node's queue: to the new owner when there is one, and, when the last
node leaves and nobody can take the work, a retryable error to each caller instead of a silent
drop. The same cases on the in-process transport and on RabbitMQ."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from tests.test_bus import SERVICE, EchoMsg, make_node, owned_by
from zstack_mn.bus.topology import Topology
from zstack_mn.bus.transport import QueueKind
from zstack_mn.cluster.rescue import rescue_queues
from zstack_mn.cluster.ring import LiveRing
from zstack_mn.messages import ErrorCode, ZStackError

pytestmark = pytest.mark.timeout(60)


async def queued_call(make_transport, topology: Topology, ring: list[str], owner: str):
    """A caller waiting on a request queued for ``owner``, which has stopped consuming."""
    owner_bus, owner_service = await make_node(make_transport, topology, owner, ring)
    await owner_bus.stop_serving()
    caller = str(uuid.uuid4())
    caller_bus, _ = await make_node(make_transport, topology, caller, ring)
    call = asyncio.create_task(caller_bus.call(EchoMsg(uuid=owned_by(ring, owner), text="queued"), timeout=30))
    await asyncio.sleep(0.2)
    assert not call.done()
    assert owner_service.handled == []
    return owner_bus, call


async def test_the_last_node_refuses_what_it_cannot_hand_over(make_transport, topology):
    owner = str(uuid.uuid4())
    owner_bus, call = await queued_call(make_transport, topology, [owner], owner)
    owner_bus.ring.remove(owner)
    moved = await rescue_queues(owner_bus, owner_bus.node_queues([SERVICE], owner), bound=5, ignore_consumers=True)
    assert moved == 0
    with pytest.raises(ZStackError) as refused:
        await asyncio.wait_for(call, 10)
    assert refused.value.code is ErrorCode.NO_ROUTE
    assert "no management node can take" in refused.value.description
    assert refused.value.retryable


async def test_a_leaving_nodes_queue_goes_to_the_new_owner(make_transport, topology):
    owner, heir = str(uuid.uuid4()), str(uuid.uuid4())
    heir_bus, heir_service = await make_node(make_transport, topology, heir, [owner, heir])
    owner_bus, call = await queued_call(make_transport, topology, [owner, heir], owner)
    for bus in (owner_bus, heir_bus):
        assert isinstance(bus.ring, LiveRing)
        bus.ring.remove(owner)
    moved = await rescue_queues(owner_bus, owner_bus.node_queues([SERVICE], owner), bound=5, ignore_consumers=True)
    assert moved == 1
    reply = await asyncio.wait_for(call, 10)
    assert reply == {"node": heir, "text": "queued"}
    assert len(heir_service.handled) == 1


async def test_a_published_message_keeps_its_id_on_the_broker(make_transport, topology):
    transport = await make_transport()
    queue = topology.service_queue(SERVICE, str(uuid.uuid4()))
    await transport.declare(queue, QueueKind.NODE)
    await transport.publish(queue, b"{}", message_id="the-message-id")
    got = await transport.take(queue)
    assert got is not None
    delivery, ack = got
    await ack()
    assert delivery.message_id == "the-message-id"
