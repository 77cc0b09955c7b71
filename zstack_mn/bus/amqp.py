"""RabbitMQ transport over aio-pika.

* One robust connection; a publishing channel with publisher confirms and ``on_return_raises``,
  so a mandatory message to a missing queue raises at once (NoRouteError), and one channel per
  consumed queue with its own prefetch.
* Declared queues and their consumers are held by strong references, so the robust connection
  restores them after a broker restart (aio-pika issue 536).
* Every publish has a deadline: a robust connection that is down would otherwise wait for the
  broker forever.
* The AMQP heartbeat (``amqp_heartbeat``, 5 s) lets the broker drop a frozen node's connection
  and give its unacknowledged deliveries back to its queue, where the rescuer finds them
  (measured: RabbitMQ 3.10 dropped a SIGSTOPped client about 28 s after the freeze at 10 s).
* Rescue operations (``take``, ``delete_if_empty``) run on a short-lived channel of their own,
  because a missing queue or a failed precondition closes the channel it happens on.
* ``queue_type="quorum"`` declares the durable queues as quorum queues (with a delivery limit).
  RabbitMQ refuses ``if-empty`` on a quorum queue's delete with a connection error (540), so
  there ``delete_if_empty`` deletes a queue only after finding it empty and unused twice, a
  round trip apart.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import aio_pika
import aiormq
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)

from zstack_mn.bus.failover import FailoverConnection
from zstack_mn.bus.topology import (
    DEAD_LETTER_MAX_LENGTH,
    DELIVERY_LIMIT,
    NODE_QUEUE_EXPIRES_MS,
    QUEUE_TYPES,
    Topology,
)
from zstack_mn.bus.transport import (
    Delivery,
    Handler,
    NoRouteError,
    QueueKind,
    QueueMismatch,
    RejectMessage,
    Transport,
    TransportDown,
)
from zstack_mn.config import split_urls

log = structlog.get_logger(__name__)

CUT_ATTEMPTS = 5
T = TypeVar("T")
NOT_PERSISTENT = 1
"""AMQP delivery mode 1 (aio-pika's default). A quorum queue keeps every message in its
replicated log whatever the mode."""

_CUT_ERRORS = (
    aiormq.exceptions.ConnectionClosed,  # 541 INTERNAL_ERROR, 320 CONNECTION_FORCED, ...
    ConnectionError,  # a reset socket: a member killed
    RuntimeError,  # aio-pika: the connection is closed and not reopened yet (ChannelInvalidStateError too)
    TimeoutError,
)
"""What a broker step gets when the broker cuts its connection (or it is not back yet)."""

_CONFIGURATION_ERRORS = (
    aiormq.exceptions.ConnectionNotAllowed,
    aiormq.exceptions.ConnectionNotImplemented,
    aiormq.exceptions.ConnectionSyntaxError,
    aiormq.exceptions.ConnectionCommandInvalid,
    aiormq.exceptions.ConnectionFrameError,
    aiormq.exceptions.ConnectionUnexpectedFrame,
)
"""Connection closes that another attempt would meet again: not a cut to wait out."""

_DOWN_ERRORS = (
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    aiormq.exceptions.ChannelClosed,
    ConnectionError,
    asyncio.TimeoutError,
)


class AmqpTransport(Transport):
    """A Transport on RabbitMQ."""

    def __init__(
        self,
        url: str,
        topology: Topology,
        *,
        publish_timeout: float,
        connection_name: str,
        heartbeat: int = 5,
        queue_type: str = "classic",
    ) -> None:
        if queue_type not in QUEUE_TYPES:
            raise ValueError(f"queue_type: one of {', '.join(QUEUE_TYPES)}")
        self.url = url
        self.queue_type = queue_type
        self.urls = split_urls(url)
        """The broker URLs (one setting, comma-separated: a cluster's members), tried in turn on
        connect and on every reconnect."""
        self.heartbeat = heartbeat
        self.topology = topology
        self.publish_timeout = publish_timeout
        self.connection_name = connection_name
        self._connection: AbstractRobustConnection | None = None
        self._publish_channel: AbstractChannel | None = None
        self._event_channel: AbstractChannel | None = None
        self._probe_channel: AbstractChannel | None = None
        self._queues: dict[str, AbstractQueue] = {}
        self._consumer_channels: dict[str, AbstractChannel] = {}
        self._consumer_tags: dict[str, str] = {}
        self._kinds: dict[str, QueueKind] = {}
        self._exchanges: dict[str, Any] = {}

    @property
    def connected(self) -> bool:
        conn = self._connection
        return conn is not None and not conn.is_closed and conn.connected.is_set()

    async def start(self) -> None:
        """Connect to the first broker URL that answers, each within ``publish_timeout``."""
        failures: list[str] = []
        for first in range(len(self.urls)):
            connection = FailoverConnection(
                self.urls,
                first=first,
                heartbeat=self.heartbeat,
                reconnect_interval=1.0,
                client_properties={"connection_name": self.connection_name},
            )
            try:
                await connection.connect(timeout=self.publish_timeout)
            except (*_DOWN_ERRORS, OSError) as exc:
                failures.append(f"{connection}: {type(exc).__name__} {exc}")
                await _close_quietly(connection)
                continue
            self._connection = connection
            break
        else:
            raise TransportDown(f"cannot connect to the broker: {'; '.join(failures)}")
        if first:
            log.warning("connected to a later broker URL", url=str(connection), unreachable=failures)
        self._connection.close_callbacks.add(self._closed)
        self._connection.reconnect_callbacks.add(self._reconnected)
        self._publish_channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        self._event_channel = await self._connection.channel(publisher_confirms=False)
        await self._declare_dead_letters()

    async def probe(self, timeout: float) -> bool:
        """A passive declare of the dead-letter exchange on a channel kept for this: one round
        trip to the broker (on the raw channel: aio-pika answers a repeated declare from its
        cache), which a black-holed connection never completes."""
        if not self.connected:
            return False
        try:
            async with asyncio.timeout(timeout):
                if self._probe_channel is None or self._probe_channel.is_closed:
                    self._probe_channel = await self._require().channel(publisher_confirms=False)
                underlay = await self._probe_channel.get_underlay_channel()
                await underlay.exchange_declare(self.topology.dead_letter_exchange, passive=True)
            return True
        except (TimeoutError, *_DOWN_ERRORS, aiormq.exceptions.AMQPError) as exc:
            log.warning("broker probe failed", error=f"{type(exc).__name__}: {exc}")
            channel, self._probe_channel = self._probe_channel, None
            if channel is not None:
                _close_later(channel)
            return False

    async def _restored(self, channel: AbstractChannel | None) -> None:
        """Wait until ``channel`` is restored, when the connection is back but the channel not yet
        (the caller bounds the wait); at once while the connection itself is down.

        aio-pika marks a reconnected connection connected, then reopens its channels and
        re-declares their queues one at a time, in no fixed order. Meanwhile a consumer's channel
        can deliver a request whose handler answers before the publishing channel is back, and a
        call can go out before its own reply queue exists again: either way the reply is lost
        (dropped by this node, or unroutable at the broker), the request is acknowledged, and the
        caller waits out its whole deadline (seen in the HA fault rows and the compose HA test)."""
        if channel is not None and self.connected and isinstance(channel, AbstractRobustChannel):
            await channel.ready()

    def _closed(self, *_: Any) -> None:
        if self.on_disconnect is not None:
            self.on_disconnect()

    def _reconnected(self, *_: Any) -> None:
        log.info("broker connection restored", url=str(self._connection))
        if self.on_reconnect is not None:
            self.on_reconnect()

    async def close(self) -> None:
        conn, self._connection = self._connection, None
        if conn is not None:
            conn.close_callbacks.discard(self._closed)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), self.publish_timeout)
        self._queues.clear()
        self._exchanges.clear()
        self._consumer_channels.clear()
        self._consumer_tags.clear()

    def _require(self) -> AbstractRobustConnection:
        if self._connection is None:
            raise TransportDown("transport is not started")
        return self._connection

    async def _declare_dead_letters(self) -> None:
        assert self._publish_channel is not None
        channel = self._publish_channel
        dlx = await self._surviving_cut(
            "declare the dead-letter exchange",
            lambda: channel.declare_exchange(
                self.topology.dead_letter_exchange, aio_pika.ExchangeType.FANOUT, durable=True
            ),
        )
        name = self.topology.dead_letter_queue
        args: dict[str, Any] = {"x-max-length": DEAD_LETTER_MAX_LENGTH, **self._type_arguments()}
        queue = await self._declaring(name, lambda: channel.declare_queue(name, durable=True, arguments=args))
        await self._surviving_cut(f"bind {name}", lambda: queue.bind(dlx))

    def _type_arguments(self) -> dict[str, Any]:
        if self.queue_type == "quorum":
            return {"x-queue-type": "quorum", "x-delivery-limit": DELIVERY_LIMIT}
        return {}

    def _arguments(self, kind: QueueKind) -> dict[str, Any]:
        args: dict[str, Any] = {"x-dead-letter-exchange": self.topology.dead_letter_exchange}
        if kind is QueueKind.NODE:
            args["x-expires"] = NODE_QUEUE_EXPIRES_MS
        if kind is not QueueKind.PRIVATE:
            args.update(self._type_arguments())
        return args

    def _mismatch(self, queue: str, exc: Exception) -> QueueMismatch:
        return QueueMismatch(
            f"queue {queue} exists on the broker with other arguments than this node declares "
            f"(queue_type={self.queue_type}): {exc}. Every node of a cluster needs the same "
            "ZSTACK_MN_QUEUE_TYPE; to change it, stop every node and delete the cluster's queues "
            "(README: No single broker, no single database)"
        )

    async def declare(self, queue: str, kind: QueueKind) -> None:
        private = kind is QueueKind.PRIVATE

        async def declare_once() -> AbstractQueue:
            channel = self._consumer_channels.get(queue)
            if channel is None or channel.is_closed:
                channel = await self._require().channel(publisher_confirms=False)
                self._consumer_channels[queue] = channel
            return await channel.declare_queue(
                queue, durable=not private, exclusive=private, auto_delete=private, arguments=self._arguments(kind)
            )

        self._queues[queue] = await self._declaring(queue, declare_once)
        self._kinds[queue] = kind

    async def _declaring(self, queue: str, declare: Callable[[], Awaitable[AbstractQueue]]) -> AbstractQueue:
        """``declare()``, surviving a connection cut (``_surviving_cut``); other arguments than
        the queue has are the configuration error QueueMismatch."""

        async def declare_or_mismatch() -> AbstractQueue:
            try:
                return await declare()
            except aiormq.exceptions.ChannelPreconditionFailed as exc:
                self._consumer_channels.pop(queue, None)
                raise self._mismatch(queue, exc) from None
            except BaseException:  # a cut, or the attempt's deadline (cancelled): drop its channel
                stale = self._consumer_channels.pop(queue, None)
                if stale is not None:
                    _close_later(stale)
                raise

        return await self._surviving_cut(f"declare {queue}", declare_or_mismatch)

    async def _surviving_cut(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        """``op()``, again once the robust connection is back when the broker cut the connection
        under it (or it was not back yet), up to CUT_ATTEMPTS times; each attempt within
        ``publish_timeout``. For the steps that set a node's queues up (declare, bind, prefetch,
        consume): RabbitMQ 3.10 closes a connection with INTERNAL_ERROR (541) when several nodes
        declare one new quorum queue at once, and whatever else that connection had in flight
        fails with it; a member stopped or killed while a node starts does the same."""
        delay = 0.5
        for attempt in range(CUT_ATTEMPTS):
            try:
                with _reasonless_as_down():
                    return await asyncio.wait_for(op(), self.publish_timeout)
            except _CONFIGURATION_ERRORS:
                raise
            except _CUT_ERRORS as exc:
                if attempt == CUT_ATTEMPTS - 1:
                    raise TransportDown(f"cannot {what}: {type(exc).__name__} {exc}") from exc
                log.warning(
                    "the broker connection was cut under a queue set-up step; trying again",
                    step=what,
                    error=f"{type(exc).__name__}: {exc}",
                )
                await asyncio.sleep(delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._require().connected.wait(), self.publish_timeout)
                delay = min(delay * 2, 4.0)
        raise AssertionError("unreachable")

    async def consume(self, queue: str, handler: Handler, *, prefetch: int) -> None:
        q = self._queues.get(queue)
        if q is None:
            raise NoRouteError(queue)
        await self._surviving_cut(f"set the prefetch of {queue}", lambda: q.channel.set_qos(prefetch_count=prefetch))

        async def on_message(message: AbstractIncomingMessage) -> None:
            delivery = Delivery(
                message.body,
                message.message_id,
                message.correlation_id,
                message.reply_to,
                bool(message.redelivered),
            )
            try:
                await handler(delivery)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(message.nack(requeue=True), 1)
                raise
            except Exception as exc:
                if not isinstance(exc, RejectMessage):
                    log.exception("handler failed; message dead-lettered", queue=queue)
                with contextlib.suppress(*_DOWN_ERRORS), _reasonless_as_down():
                    await message.reject(requeue=False)
                return
            try:
                with _reasonless_as_down():
                    await message.ack()
            except _DOWN_ERRORS:
                log.warning("ack lost with the connection; the broker will redeliver", queue=queue)

        self._consumer_tags[queue] = await self._surviving_cut(f"consume {queue}", lambda: q.consume(on_message))

    async def stop_consuming(self, queue: str) -> None:
        tag = self._consumer_tags.pop(queue, None)
        q = self._queues.get(queue)
        if tag is not None and q is not None:
            with contextlib.suppress(*_DOWN_ERRORS), _reasonless_as_down():
                await asyncio.wait_for(q.cancel(tag), self.publish_timeout)

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
        channel = self._publish_channel
        if channel is None:
            raise TransportDown("transport is not started")
        properties = aiormq.spec.Basic.Properties(
            content_type="application/json",
            delivery_mode=NOT_PERSISTENT,
            correlation_id=correlation_id,
            reply_to=reply_to,
            expiration=None if ttl_ms is None else str(max(int(ttl_ms), 1)),
            message_id=message_id,
        )
        try:
            async with asyncio.timeout(self.publish_timeout):
                if not mandatory:  # a reply: the bus's only non-mandatory publish
                    await self._restored(channel)
                if reply_to is not None:
                    await self._restored(self._consumer_channels.get(reply_to))
                await _publish(channel, "", queue, body, properties, mandatory=mandatory)
        except aiormq.exceptions.PublishError as exc:
            raise NoRouteError(queue) from exc
        except aiormq.exceptions.DeliveryError as exc:  # a Basic.Nack: the broker did not take it
            raise TransportDown(f"the broker refused the publish to {queue} (nack)") from exc
        except _DOWN_ERRORS as exc:
            raise TransportDown(f"publish to {queue} failed: {type(exc).__name__} {exc}") from exc

    async def publish_event(self, exchange: str, topic: str, body: bytes, *, message_id: str) -> None:
        """Events go on a channel without publisher confirms: they are notifications (lifecycle
        changes are also reconciled from the table), so a lost one costs a delay, not safety."""
        channel = self._event_channel
        if channel is None:
            raise TransportDown("transport is not started")
        try:
            async with asyncio.timeout(self.publish_timeout):
                if exchange not in self._exchanges:
                    with _reasonless_as_down():
                        self._exchanges[exchange] = await channel.declare_exchange(
                            exchange, aio_pika.ExchangeType.TOPIC, durable=True
                        )
                properties = aiormq.spec.Basic.Properties(delivery_mode=NOT_PERSISTENT, message_id=message_id)
                await _publish(channel, exchange, topic, body, properties, mandatory=False)
        except _DOWN_ERRORS as exc:
            raise TransportDown(f"event publish failed: {type(exc).__name__} {exc}") from exc

    async def bind(self, queue: str, exchange: str, pattern: str) -> None:
        q = self._queues.get(queue)
        if q is None:
            raise NoRouteError(queue)
        ex = await self._surviving_cut(
            f"declare {exchange}",
            lambda: q.channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True),
        )
        await self._surviving_cut(f"bind {queue} to {pattern}", lambda: q.bind(ex, routing_key=pattern))

    async def _scratch_channel(self) -> AbstractChannel:
        return await asyncio.wait_for(self._require().channel(publisher_confirms=False), self.publish_timeout)

    async def take(self, queue: str) -> tuple[Delivery, Callable[[], Awaitable[None]]] | None:
        channel = await self._scratch_channel()
        try:
            q = await channel.get_queue(queue, ensure=True)
            message = await asyncio.wait_for(q.get(no_ack=False, fail=False), self.publish_timeout)
        except aiormq.exceptions.ChannelNotFoundEntity:
            await _close_quietly(channel)
            return None
        except _DOWN_ERRORS as exc:
            await _close_quietly(channel)
            raise TransportDown(f"cannot read {queue}: {exc}") from exc
        if message is None:
            await _close_quietly(channel)
            return None
        delivery = Delivery(message.body, message.message_id, message.correlation_id, message.reply_to, True)

        async def ack() -> None:
            try:
                with _reasonless_as_down():
                    await message.ack()
            finally:
                await _close_quietly(channel)

        return delivery, ack

    async def delete_if_empty(self, queue: str) -> bool:
        if self.queue_type == "quorum" and self._kinds.get(queue) is not QueueKind.PRIVATE:
            return await self._delete_quorum_if_empty(queue)
        channel = await self._scratch_channel()
        try:
            with _reasonless_as_down():
                await asyncio.wait_for(channel.queue_delete(queue, if_empty=True), self.publish_timeout)
            return True
        except aiormq.exceptions.ChannelNotFoundEntity:
            return True
        except aiormq.exceptions.ChannelPreconditionFailed:
            return False
        finally:
            await _close_quietly(channel)
            self._queues.pop(queue, None)

    async def _delete_quorum_if_empty(self, queue: str) -> bool:
        """A quorum queue found empty, then again a round trip later, is deleted (a plain delete:
        RabbitMQ has no if-empty for quorum queues; whether consumers may remain is the caller's
        decision, as rescue checks them first)."""
        for _ in range(2):
            status = await self.queue_status(queue)
            if status is None:
                self._queues.pop(queue, None)
                return True
            if status[0] != 0:
                return False
        channel = await self._scratch_channel()
        try:
            with _reasonless_as_down():
                await asyncio.wait_for(channel.queue_delete(queue), self.publish_timeout)
            return True
        except aiormq.exceptions.ChannelNotFoundEntity:
            return True
        except _DOWN_ERRORS as exc:
            raise TransportDown(f"cannot delete {queue}: {exc}") from exc
        finally:
            await _close_quietly(channel)
            self._queues.pop(queue, None)

    async def queue_status(self, queue: str) -> tuple[int, int] | None:
        channel = await self._scratch_channel()
        try:
            with _reasonless_as_down():
                ok = await asyncio.wait_for(channel.declare_queue(queue, passive=True), self.publish_timeout)
            result = ok.declaration_result
            return int(result.message_count or 0), int(result.consumer_count or 0)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return None
        except _DOWN_ERRORS as exc:
            raise TransportDown(f"cannot read the status of {queue}: {exc}") from exc
        finally:
            await _close_quietly(channel)


@contextlib.contextmanager
def _reasonless_as_down() -> Iterator[None]:
    """aiormq fails what is in flight on a channel or connection that closes without a reason
    with a bare ``Exception``: a broker outage like any other (ConnectionResetError, one of the
    errors the transport turns into TransportDown), not a bug."""
    try:
        yield
    except Exception as exc:
        if type(exc) is Exception:
            raise ConnectionResetError(f"the broker channel closed while this was in flight: {exc!r}") from exc
        raise


async def _publish(
    channel: AbstractChannel,
    exchange: str,
    routing_key: str,
    body: bytes,
    properties: aiormq.spec.Basic.Properties,
    *,
    mandatory: bool,
) -> None:
    """Publish on the channel's current AMQP channel. What aio-pika's ``Exchange.publish`` does,
    without building a ``Message`` (its property checks cost more than the publish itself on the
    bus's hot path): confirms, returns and nacks behave the same (``PublishError``,
    ``DeliveryError``), since they come from the channel."""
    if channel.is_closed:
        raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} is closed")
    with _reasonless_as_down():
        underlay = await channel.get_underlay_channel()
        await underlay.basic_publish(
            body, exchange=exchange, routing_key=routing_key, properties=properties, mandatory=mandatory
        )


_CLOSING: set[asyncio.Task[None]] = set()
"""Channels being closed in the background (held, so that a close is not collected mid-way)."""


def _close_later(channel: AbstractChannel) -> None:
    """Close ``channel`` without waiting for it (from a path that cannot wait: a cancellation)."""
    task = asyncio.get_running_loop().create_task(_close_quietly(channel))
    _CLOSING.add(task)
    task.add_done_callback(_CLOSING.discard)


async def _close_quietly(closable: AbstractChannel | AbstractRobustConnection) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(closable.close(), 5)
