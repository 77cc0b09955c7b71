"""In-process transport (``memory://<name>``) with the AMQP transport's routing semantics.

Transports opened on the same URL in one process share one broker, so several nodes can run in
one event loop (embedded mode, fast tests). Queues, mandatory routing (NO_ROUTE for a missing
queue), prefetch, ack-after-handler, dead-lettering of failed handlers, per-message TTL, topic
exchanges with ``*`` / ``#`` patterns and exclusive queues that vanish with their owner all
behave as on RabbitMQ.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import ClassVar

import structlog

from zstack_mn.bus.topology import topic_matches
from zstack_mn.bus.transport import (
    Delivery,
    Handler,
    NoRouteError,
    QueueKind,
    RejectMessage,
    Transport,
)

log = structlog.get_logger(__name__)


@dataclass
class _Queue:
    name: str
    kind: QueueKind
    owner: object | None
    items: deque[tuple[Delivery, float | None]] = field(default_factory=deque)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    consumers: int = 0

    def push(self, delivery: Delivery, expires_at: float | None, *, front: bool = False) -> None:
        (self.items.appendleft if front else self.items.append)((delivery, expires_at))
        self.ready.set()

    def pop(self) -> Delivery | None:
        now = asyncio.get_running_loop().time()
        while self.items:
            delivery, expires_at = self.items.popleft()
            if expires_at is None or expires_at > now:
                return delivery
        self.ready.clear()
        return None


class MemoryBroker:
    """The shared state behind every transport opened on one ``memory://`` URL."""

    _brokers: ClassVar[dict[str, MemoryBroker]] = {}

    def __init__(self) -> None:
        self.queues: dict[str, _Queue] = {}
        self.bindings: dict[str, list[tuple[str, str]]] = {}

    @classmethod
    def for_url(cls, url: str) -> MemoryBroker:
        return cls._brokers.setdefault(url, cls())

    @classmethod
    def reset(cls, url: str) -> None:
        cls._brokers.pop(url, None)


class MemoryTransport(Transport):
    """A Transport over a MemoryBroker."""

    def __init__(self, url: str = "memory://", dead_letter_queue: str = "zstack.dead-letter") -> None:
        self.url = url
        self.dead_letter_queue = dead_letter_queue
        self.broker = MemoryBroker.for_url(url)
        self._consumers: dict[str, asyncio.Task[None]] = {}
        self._handlers: set[asyncio.Task[None]] = set()
        self._open = False

    @property
    def connected(self) -> bool:
        return self._open

    async def start(self) -> None:
        self._open = True
        await self.declare(self.dead_letter_queue, QueueKind.SHARED)

    async def close(self) -> None:
        self._open = False
        for name in list(self._consumers):
            await self.stop_consuming(name)
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)
        for name, queue in list(self.broker.queues.items()):
            if queue.owner is self:
                self._drop_queue(name)

    def _drop_queue(self, name: str) -> None:
        self.broker.queues.pop(name, None)
        for exchange, binds in self.broker.bindings.items():
            self.broker.bindings[exchange] = [b for b in binds if b[0] != name]

    async def declare(self, queue: str, kind: QueueKind) -> None:
        if queue not in self.broker.queues:
            owner = self if kind is QueueKind.PRIVATE else None
            self.broker.queues[queue] = _Queue(queue, kind, owner)

    async def consume(self, queue: str, handler: Handler, *, prefetch: int) -> None:
        q = self.broker.queues.get(queue)
        if q is None:
            raise NoRouteError(queue)
        q.consumers += 1
        self._consumers[queue] = asyncio.get_running_loop().create_task(
            self._consume_loop(q, handler, asyncio.Semaphore(prefetch)), name=f"consume:{queue}"
        )

    async def _consume_loop(self, q: _Queue, handler: Handler, slots: asyncio.Semaphore) -> None:
        while True:
            await slots.acquire()
            delivery = q.pop()
            while delivery is None:
                await q.ready.wait()
                delivery = q.pop()
            task = asyncio.get_running_loop().create_task(self._run(q, handler, delivery, slots))
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    async def _run(self, q: _Queue, handler: Handler, delivery: Delivery, slots: asyncio.Semaphore) -> None:
        try:
            await handler(delivery)
        except asyncio.CancelledError:
            delivery.redelivered = True
            if q.name in self.broker.queues:
                q.push(delivery, None, front=True)
            raise
        except Exception as exc:
            if not isinstance(exc, RejectMessage):
                log.exception("handler failed; message dead-lettered", queue=q.name)
            dead = self.broker.queues.get(self.dead_letter_queue)
            if dead is not None:
                dead.push(delivery, None)
        finally:
            slots.release()

    async def stop_consuming(self, queue: str) -> None:
        task = self._consumers.pop(queue, None)
        if task is not None:
            q = self.broker.queues.get(queue)
            if q is not None:
                q.consumers -= 1
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def publish(
        self,
        queue: str,
        body: bytes,
        *,
        message_id: str,
        correlation_id: str | None = None,
        reply_to: str | None = None,
        ttl_ms: int | None = None,
        mandatory: bool = True,
    ) -> None:
        q = self.broker.queues.get(queue)
        if q is None:
            if mandatory:
                raise NoRouteError(queue)
            return
        expires_at = None if ttl_ms is None else asyncio.get_running_loop().time() + ttl_ms / 1000
        q.push(Delivery(body, message_id, correlation_id, reply_to), expires_at)

    async def publish_event(self, exchange: str, topic: str, body: bytes, *, message_id: str) -> None:
        targets = {name for name, pattern in self.broker.bindings.get(exchange, ()) if topic_matches(pattern, topic)}
        for name in targets:
            q = self.broker.queues.get(name)
            if q is not None:
                q.push(Delivery(body, message_id), None)

    async def bind(self, queue: str, exchange: str, pattern: str) -> None:
        binds = self.broker.bindings.setdefault(exchange, [])
        if (queue, pattern) not in binds:
            binds.append((queue, pattern))

    async def take(self, queue: str) -> tuple[Delivery, Callable[[], Awaitable[None]]] | None:
        q = self.broker.queues.get(queue)
        delivery = q.pop() if q is not None else None
        if delivery is None:
            return None

        async def ack() -> None:
            return None

        return delivery, ack

    async def delete_if_empty(self, queue: str) -> bool:
        q = self.broker.queues.get(queue)
        if q is None:
            return True
        if q.items:
            return False
        self._drop_queue(queue)
        return True

    async def queue_status(self, queue: str) -> tuple[int, int] | None:
        q = self.broker.queues.get(queue)
        return None if q is None else (len(q.items), q.consumers)
