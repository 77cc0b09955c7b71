"""The cloud bus: typed request/reply, fire-and-forget, events, and routing by the ring.

Routing (ZStack's rules):

* a message naming a resource goes to ``<service>.<owner>`` with ``owner = ring.owner_of(uuid)``;
* a creational message carries the uuid of the resource it creates (the portal derives it from
  the request id), so it is routed the same way; a non-resource message goes to the sending node;
* an API message (service ``api``) goes to the shared ``api.portal`` queue.

A node that receives a resource message it does not own forwards it (receiver check, bounded by
``max_hops``). Every ``call`` has a deadline and fails with TIMEOUT rather than hang; a late reply
is dropped with a log line; every pending call fails at once when the broker connection drops.
A message that cannot be parsed gets an error reply (when it has a reply-to) and is dead-lettered.

    bus = CloudBus(node_uuid, transport, Topology(), ring=ring, limits=BusLimits())
    await bus.start(); await bus.serve("vmInstance", dispatcher)
    inventory = await bus.call(StartVmInstanceMsg(uuid=vm_uuid), timeout=30)
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable, Set
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from zstack_mn.bus.topology import Topology, topic_matches
from zstack_mn.bus.transport import (
    Delivery,
    NoRouteError,
    QueueKind,
    RejectMessage,
    Transport,
    TransportDown,
)
from zstack_mn.messages import (
    Envelope,
    ErrorCode,
    Event,
    Message,
    ZStackError,
    decode,
    encode,
    new_id,
)
from zstack_mn.messages.names import API_SERVICE, TOPIC_NODE_ALL
from zstack_mn.metrics import NodeMetrics

log = structlog.get_logger(__name__)

TOPIC_HEADER = "topic"
NO_ROUTE_RETRIES = 4
MAX_PREFETCH = 65_535


class RingView(Protocol):
    """What the bus needs of the ring."""

    def owner_of(self, resource_uuid: str) -> str: ...


@dataclass(frozen=True, slots=True)
class BusLimits:
    """The bus's bounds (from Settings)."""

    call_timeout: float = 30.0
    max_message_bytes: int = 1 << 20
    prefetch: int = 1_000
    max_hops: int = 3


@dataclass(slots=True)
class Request:
    """A request being handled: its envelope, typed message and local monotonic deadline."""

    envelope: Envelope
    message: Message
    deadline: float | None
    redelivered: bool = False
    handled_by: str | None = None

    def time_left(self) -> float | None:
        if self.deadline is None:
            return None
        return self.deadline - time.monotonic()


Dispatcher = Callable[[Request], Awaitable[dict[str, Any]]]
EventHandler = Callable[[Event], Awaitable[None]]


@dataclass
class _Pending:
    future: asyncio.Future[Envelope]
    waiters: int = 1
    envelope: Envelope | None = None
    owner: str | None = None
    deadline: float = 0.0


class Rescued(enum.Enum):
    """What became of a message taken from a departed node's queue."""

    MOVED = "moved"
    REFUSED = "refused"
    """No node could take it; its caller was told to retry."""
    DROPPED = "dropped"
    """Unreadable, expired, or with no caller to tell."""


class CloudBus:
    """One node's view of the bus."""

    def __init__(
        self,
        node_uuid: str,
        transport: Transport,
        topology: Topology,
        *,
        ring: RingView,
        limits: BusLimits | None = None,
        metrics: NodeMetrics | None = None,
        on_no_route: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.node_uuid = node_uuid
        self.transport = transport
        self.topology = topology
        self.ring = ring
        self.limits = limits or BusLimits()
        self.metrics = metrics or NodeMetrics()
        self.on_no_route = on_no_route
        self.reply_queue = topology.reply_queue(node_uuid)
        self.event_queue = topology.event_queue(node_uuid)
        self._pending: dict[str, _Pending] = {}
        self._subscribers: list[tuple[str, EventHandler]] = []
        self._serving: list[str] = []
        self._local: dict[str, Dispatcher] = {}
        self._local_tasks: set[asyncio.Future[Any]] = set()
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._started = False
        transport.on_disconnect = self._fail_pending

    async def start(self) -> None:
        """Declare and consume this node's reply and event queues."""
        await self.transport.declare(self.reply_queue, QueueKind.PRIVATE)
        await self.transport.consume(
            self.reply_queue, self._on_reply, prefetch=min(max(self.limits.prefetch * 4, 256), MAX_PREFETCH)
        )
        await self.transport.declare(self.event_queue, QueueKind.PRIVATE)
        await self.transport.bind(self.event_queue, self.topology.event_exchange, TOPIC_NODE_ALL)
        for pattern, _ in self._subscribers:
            await self.transport.bind(self.event_queue, self.topology.event_exchange, pattern)
        await self.transport.consume(self.event_queue, self._on_event, prefetch=1)
        self._started = True

    async def serve(self, service: str, dispatcher: Dispatcher) -> None:
        """Consume ``<service>.<this node>``; each request goes to ``dispatcher``."""
        queue = self.topology.service_queue(service, self.node_uuid)
        self._local[service] = dispatcher
        await self.transport.declare(queue, QueueKind.NODE)
        await self.transport.consume(queue, self._request_handler(service, dispatcher), prefetch=self.limits.prefetch)
        self._serving.append(queue)

    async def serve_api(self, dispatcher: Dispatcher) -> None:
        """Consume the shared API queue (load-balanced across nodes)."""
        queue = self.topology.api_queue
        await self.transport.declare(queue, QueueKind.SHARED)
        await self.transport.consume(
            queue, self._request_handler(API_SERVICE, dispatcher), prefetch=self.limits.prefetch
        )
        self._serving.append(queue)

    async def stop_serving(self) -> None:
        """Stop taking new requests; handlers already running go on (replies still arrive)."""
        for queue in self._serving:
            await self.transport.stop_consuming(queue)
        self._serving.clear()

    def node_queues(self, services: list[str], node_uuid: str) -> list[str]:
        return [self.topology.service_queue(s, node_uuid) for s in services]

    async def close(self) -> None:
        self._fail_pending(ZStackError(ErrorCode.NODE_STOPPING, "the node is shutting down"))
        await self.transport.close()

    def _fail_pending(self, error: ZStackError | None = None) -> None:
        err = error or ZStackError(ErrorCode.BUS_UNAVAILABLE, "the broker connection was lost; retry the call")
        pending, self._pending = self._pending, {}
        for p in pending.values():
            if not p.future.done():
                p.future.set_exception(err)
        if pending:
            log.warning("pending calls failed", count=len(pending), code=err.code.value)

    def destination(self, service: str, resource_uuid: str | None) -> str:
        """The queue a message for ``service`` about ``resource_uuid`` goes to."""
        if service == API_SERVICE:
            return self.topology.api_queue
        if resource_uuid is None:
            return self.topology.service_queue(service, self.node_uuid)
        owner = self._owner_or_none(resource_uuid)
        if owner is None:
            raise ZStackError(ErrorCode.NO_ROUTE, "no management node is running: the ring is empty")
        return self.topology.service_queue(service, owner)

    async def call(
        self,
        msg: Message,
        *,
        timeout: float | None = None,
        msg_id: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Send ``msg`` and wait for its reply body; ZStackError for an error reply or a timeout."""
        reply = await self.call_envelope(msg, timeout=timeout, msg_id=msg_id, headers=headers)
        if reply.ok:
            return reply.body
        assert reply.error is not None
        raise ZStackError.from_info(reply.error)

    async def call_envelope(
        self,
        msg: Message,
        *,
        timeout: float | None = None,
        msg_id: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Envelope:
        """Like ``call`` but returns the reply envelope (with ``handledBy``).

        A retry of a request this node is still waiting for (same id: an idempotency key retried
        on this node) is sent again to the owner the ring names now, and both callers get the
        first reply, so a retry never waits behind a delivery stuck on a frozen node.

        A message whose destination is this node (non-resource, or a resource this node owns)
        runs in-process through the same dispatcher (chains, fencing, error replies): the sender
        is the receiver, so it is surely alive, and a crash takes the caller with it."""
        timeout = self.limits.call_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        env = Envelope.request(
            msg, ttl_ms=int(timeout * 1000), reply_to=self.reply_queue, msg_id=msg_id, headers=headers
        )
        corr = env.correlation_id
        assert corr is not None
        local = self._local.get(env.service)
        if (
            local is not None
            and env.resource_uuid is not None
            and self._owner_or_none(env.resource_uuid) != self.node_uuid
        ):
            local = None
        if local is not None:
            task = asyncio.ensure_future(self._handle(env.service, local, Request(env, msg, deadline)))
            self._local_tasks.add(task)
            task.add_done_callback(self._local_tasks.discard)
            try:
                async with asyncio.timeout(timeout):
                    return await asyncio.shield(task)
            except TimeoutError:
                raise ZStackError(
                    ErrorCode.TIMEOUT, f"no reply to {msg.type_name} within {timeout:g}s", messageId=env.id
                ) from None
        pending = self._pending.get(corr)
        if pending is None:
            future: asyncio.Future[Envelope] = asyncio.get_running_loop().create_future()
            pending = self._pending[corr] = _Pending(future, envelope=env, deadline=deadline)
        else:
            pending.waiters += 1
        if env.resource_uuid is not None and env.service != API_SERVICE:
            pending.owner = self._owner_or_none(env.resource_uuid)
        try:
            async with asyncio.timeout(max(deadline - time.monotonic(), 0)):
                await self._route(env, deadline)
                return await asyncio.shield(pending.future)
        except TimeoutError:
            raise ZStackError(
                ErrorCode.TIMEOUT, f"no reply to {msg.type_name} within {timeout:g}s", messageId=env.id
            ) from None
        finally:
            pending.waiters -= 1
            if pending.waiters == 0 and self._pending.get(corr) is pending:
                del self._pending[corr]

    def reroute_pending(self, live: Set[str]) -> int:
        """Re-send every call still waiting on a node that has left the ring to the new owner
        (same id: the first reply wins, the stale copy's reply is dropped as late), so callers do
        not wait for deliveries stuck on a dead or frozen node. Returns how many were re-sent."""
        moved = 0
        for pending in list(self._pending.values()):
            env = pending.envelope
            if env is None or pending.owner is None or pending.owner in live or pending.future.done():
                continue
            pending.owner = self._owner_or_none(env.resource_uuid or "")
            task = asyncio.get_running_loop().create_task(self._reroute(env, pending.deadline))
            self._local_tasks.add(task)
            task.add_done_callback(self._local_tasks.discard)
            moved += 1
        if moved:
            log.info("re-sent calls that waited on a departed node", count=moved)
        return moved

    async def _reroute(self, env: Envelope, deadline: float) -> None:
        try:
            await self._route(env, deadline)
        except ZStackError as exc:
            log.warning("re-send failed; the original call keeps waiting", error=exc.description)

    async def send(self, msg: Message, *, ttl: float | None = None) -> None:
        """Fire-and-forget: route ``msg`` and return once the broker confirmed it."""
        ttl = self.limits.call_timeout if ttl is None else ttl
        env = Envelope.request(msg, ttl_ms=int(ttl * 1000))
        await self._route(env, time.monotonic() + ttl)

    async def _route(self, env: Envelope, deadline: float) -> None:
        """Publish ``env`` to its destination, re-resolving the owner when it has gone."""
        delay = 0.05
        for attempt in range(NO_ROUTE_RETRIES + 1):
            queue = self.destination(env.service, env.resource_uuid)
            try:
                await self._publish(queue, env, deadline)
                return
            except NoRouteError:
                if (
                    attempt == NO_ROUTE_RETRIES
                    or time.monotonic() + delay >= deadline
                    or queue == self.topology.api_queue
                ):
                    raise ZStackError(
                        ErrorCode.NO_ROUTE, f"no route to {queue}: its node is gone or not serving {env.service}"
                    ) from None
                log.info("no route; refreshing the ring", queue=queue, attempt=attempt + 1)
                if self.on_no_route is not None:
                    await self.on_no_route(queue)
                await asyncio.sleep(delay)
                delay *= 2

    async def _publish(self, queue: str, env: Envelope, deadline: float) -> None:
        left_ms = int((deadline - time.monotonic()) * 1000)
        if left_ms <= 0:
            raise ZStackError(ErrorCode.TIMEOUT, f"deadline passed before {env.type} was sent")
        env.ttl_ms = left_ms
        body = encode(env, self.limits.max_message_bytes)
        try:
            await self.transport.publish(
                queue, body, message_id=env.id, correlation_id=env.correlation_id, reply_to=env.reply_to, ttl_ms=left_ms
            )
        except TransportDown as exc:
            raise ZStackError(ErrorCode.BUS_UNAVAILABLE, f"cannot publish {env.type}: {exc}") from None

    async def publish(self, event: Event) -> None:
        """Broadcast ``event`` on the event exchange; a broker outage is logged, not raised."""
        env = Envelope.event(event)
        env.headers[TOPIC_HEADER] = event.topic()
        try:
            await self.transport.publish_event(
                self.topology.event_exchange,
                event.topic(),
                encode(env, self.limits.max_message_bytes),
                message_id=env.id,
            )
        except TransportDown as exc:
            log.warning("event not published", event_type=event.type_name, error=str(exc))

    async def subscribe(self, pattern: str, handler: EventHandler) -> None:
        """Call ``handler`` for every event whose topic matches ``pattern`` (AMQP topic syntax)."""
        self._subscribers.append((pattern, handler))
        if self._started:
            await self.transport.bind(self.event_queue, self.topology.event_exchange, pattern)

    async def _on_reply(self, delivery: Delivery) -> None:
        try:
            env = decode(delivery.body, self.limits.max_message_bytes)
        except ZStackError as exc:
            log.warning("unreadable reply dropped", error=exc.description)
            return
        pending = self._pending.pop(env.correlation_id or "", None)
        if pending is None or pending.future.done():
            log.info("late or unknown reply dropped", correlation_id=env.correlation_id)
            return
        pending.future.set_result(env)

    async def _on_event(self, delivery: Delivery) -> None:
        try:
            env = decode(delivery.body, self.limits.max_message_bytes)
            event = env.parse_event()
        except ZStackError as exc:
            log.warning("unreadable event dropped", error=exc.description)
            return
        topic = env.headers.get(TOPIC_HEADER, event.topic())
        for pattern, handler in list(self._subscribers):
            if topic_matches(pattern, topic):
                try:
                    await handler(event)
                except Exception:
                    log.exception("event handler failed", event_type=event.type_name)

    def _request_handler(self, service: str, dispatcher: Dispatcher) -> Callable[[Delivery], Awaitable[None]]:
        async def handle(delivery: Delivery) -> None:
            await self._on_request(service, dispatcher, delivery)

        return handle

    async def _on_request(self, service: str, dispatcher: Dispatcher, delivery: Delivery) -> None:
        received = time.monotonic()
        try:
            env = decode(delivery.body, self.limits.max_message_bytes)
            msg = env.parse_message()
            if env.service != msg.SERVICE or (service != API_SERVICE and service != msg.SERVICE):
                raise ZStackError(ErrorCode.NO_HANDLER, f"{env.type} does not belong to service {service}")
        except ZStackError as exc:
            self.metrics.dead_lettered.labels(reason=exc.code.name).inc()
            log.warning("poison message", queue_service=service, code=exc.code.value, error=exc.description)
            await self._send_reply_raw(delivery.reply_to, delivery.correlation_id, exc)
            raise RejectMessage(exc.description) from None

        deadline = None if env.ttl_ms is None else received + env.ttl_ms / 1000
        if env.resource_uuid is not None and service != API_SERVICE:
            owner = self._owner_or_none(env.resource_uuid)
            if owner is not None and owner != self.node_uuid and env.hops < self.limits.max_hops:
                await self._forward(env, service, owner, deadline)
                return
        reply = await self._handle(service, dispatcher, Request(env, msg, deadline, delivery.redelivered))
        if env.reply_to:
            await self._send_reply(env.reply_to, reply)

    async def _handle(self, service: str, dispatcher: Dispatcher, request: Request) -> Envelope:
        """Run ``dispatcher`` on ``request``; every outcome becomes a reply envelope."""
        env = request.envelope
        started = time.monotonic()
        corr = env.correlation_id or env.id
        with structlog.contextvars.bound_contextvars(
            message_id=env.id, message_type=env.type, resource_uuid=env.resource_uuid
        ):
            self.metrics.in_flight.inc()
            self._in_flight += 1
            self._idle.clear()
            outcome = "ok"
            try:
                body = await dispatcher(request)
                reply = Envelope.reply_ok(corr, body, request.handled_by or self.node_uuid)
            except ZStackError as exc:
                outcome = exc.code.name
                reply = Envelope.reply_error(corr, exc, request.handled_by or self.node_uuid)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                outcome = "INTERNAL_ERROR"
                log.exception("handler raised")
                err = ZStackError(ErrorCode.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
                reply = Envelope.reply_error(corr, err, self.node_uuid)
            finally:
                self.metrics.in_flight.dec()
                self._in_flight -= 1
                if self._in_flight == 0:
                    self._idle.set()
            self.metrics.observe_message(service, env.type, outcome, time.monotonic() - started)
            return reply

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no handler runs; False if some still run after ``timeout``."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    def _owner_or_none(self, resource_uuid: str) -> str | None:
        try:
            return self.ring.owner_of(resource_uuid)
        except LookupError:
            return None

    async def _forward(self, env: Envelope, service: str, owner: str, deadline: float | None) -> None:
        env.hops += 1
        self.metrics.forwarded.inc()
        log.info("forwarding to owner", owner=owner, hops=env.hops, message_id=env.id)
        try:
            await self._route(env, deadline if deadline is not None else time.monotonic() + self.limits.call_timeout)
        except ZStackError as exc:
            if env.reply_to:
                await self._send_reply(
                    env.reply_to, Envelope.reply_error(env.correlation_id or env.id, exc, self.node_uuid)
                )

    async def _send_reply(self, reply_to: str, reply: Envelope) -> None:
        try:
            body = encode(reply, self.limits.max_message_bytes)
        except ZStackError as exc:
            body = encode(
                Envelope.reply_error(reply.correlation_id or "", exc, self.node_uuid), self.limits.max_message_bytes
            )
        try:
            await self.transport.publish(
                reply_to, body, message_id=reply.id, correlation_id=reply.correlation_id, mandatory=False
            )
        except TransportDown as exc:
            log.warning("reply not sent", reply_to=reply_to, error=str(exc))

    async def _send_reply_raw(self, reply_to: str | None, correlation_id: str | None, error: ZStackError) -> None:
        if reply_to:
            await self._send_reply(reply_to, Envelope.reply_error(correlation_id or new_id(), error, self.node_uuid))

    async def republish_raw(self, delivery: Delivery) -> Rescued:
        """Route a rescued delivery to the owner it has now. When no node can take it (the last
        node is leaving) its caller gets a retryable error instead; what cannot be read, or has
        no caller left to tell, is dropped (the caller logs it)."""
        try:
            env = decode(delivery.body, self.limits.max_message_bytes)
        except ZStackError:
            return Rescued.DROPPED
        if env.is_reply or env.ttl_ms is None:
            deadline = time.monotonic() + self.limits.call_timeout
        else:
            deadline = time.monotonic() + env.ttl_ms / 1000
        try:
            await self._route(env, deadline)
            return Rescued.MOVED
        except ZStackError as exc:
            if env.is_reply or not env.reply_to or exc.code is ErrorCode.TIMEOUT:
                return Rescued.DROPPED
        refusal = ZStackError(
            ErrorCode.NO_ROUTE, f"no management node can take {env.type} now; retry", messageId=env.id
        )
        try:
            await self._send_reply_raw(env.reply_to, env.correlation_id, refusal)
        except ZStackError:
            return Rescued.DROPPED
        return Rescued.REFUSED
