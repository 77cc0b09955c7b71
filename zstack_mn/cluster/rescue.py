"""Re-routing the messages left in a node's queues (an evicted node's, or our own when leaving).

Each message is republished to the owner the ring names now, confirmed by the broker, and only
then acked: at-least-once, and handlers are idempotent by message id. A queue is deleted only
once it is empty *and* has no consumer, because a frozen node's unacked messages come back to the
queue only when the broker drops its connection (AMQP heartbeat); until then we keep draining,
within a bound.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from zstack_mn.bus.cloudbus import CloudBus, Rescued
from zstack_mn.bus.transport import TransportDown

log = structlog.get_logger(__name__)


async def rescue_queues(bus: CloudBus, queues: list[str], *, bound: float, ignore_consumers: bool = False) -> int:
    """Drain ``queues`` to their new owners and delete them; returns how many messages moved."""
    moved = 0
    for queue in queues:
        moved += await _rescue_one(bus, queue, bound=bound, ignore_consumers=ignore_consumers)
    return moved


async def _rescue_one(bus: CloudBus, queue: str, *, bound: float, ignore_consumers: bool) -> int:
    transport = bus.transport
    deadline = time.monotonic() + bound
    delay = 0.05
    moved = 0
    while True:
        try:
            while (got := await transport.take(queue)) is not None:
                delivery, ack = got
                outcome = await bus.republish_raw(delivery)
                if outcome is Rescued.MOVED:
                    moved += 1
                    bus.metrics.rescued.inc()
                elif outcome is Rescued.REFUSED:
                    log.warning("no node can take a rescued message; its caller was told to retry", queue=queue)
                else:
                    log.warning("rescued message unreadable, expired or without a caller; dropped", queue=queue)
                await ack()
            status = await transport.queue_status(queue)
            if status is None:
                break
            messages, consumers = status
            if messages == 0 and (consumers == 0 or ignore_consumers) and await transport.delete_if_empty(queue):
                break
        except TransportDown as exc:
            log.warning("rescue interrupted by the broker", queue=queue, error=str(exc))
        if time.monotonic() + delay > deadline:
            log.error("queue not fully rescued within the bound; left to expire", queue=queue, bound=bound)
            break
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)
    if moved:
        log.info("queue rescued", queue=queue, moved=moved)
    return moved
