"""The transport interface both the AMQP and the in-process bus implement, with one behaviour.

A transport moves bytes between named queues. It knows nothing of message types or the ring.
Acknowledgement rule, the same on both: a delivery is acked when its handler returns; a handler
that raises is rejected without requeue (dead-lettered), so a poison message never loops; a
handler cancelled by shutdown leaves its message unacked, and the broker gives it back.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field


class QueueKind(enum.Enum):
    """How a queue lives: see ``topology``."""

    NODE = "node"
    SHARED = "shared"
    PRIVATE = "private"


@dataclass(slots=True)
class Delivery:
    """One received message: the body and the AMQP properties the bus uses."""

    body: bytes
    message_id: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    redelivered: bool = False
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Delivery], Awaitable[None]]


class RejectMessage(Exception):
    """A handler raises this to have its delivery dead-lettered (poison), without a traceback."""


class NoRouteError(Exception):
    """The destination queue does not exist: nobody would ever receive the message."""

    def __init__(self, queue: str) -> None:
        super().__init__(f"no route to {queue}")
        self.queue = queue


class TransportDown(Exception):
    """The broker connection is down or the operation did not complete in time."""


class QueueMismatch(Exception):
    """A queue exists on the broker with other arguments than this node declares (another
    ``queue_type``): a configuration error, not a fault to retry."""


class Transport(ABC):
    """Byte-level messaging used by ``CloudBus``."""

    on_disconnect: Callable[[], None] | None = None
    on_reconnect: Callable[[], None] | None = None

    @property
    @abstractmethod
    def connected(self) -> bool: ...

    async def probe(self, timeout: float) -> bool:
        """True when the broker answered a round trip within ``timeout``. A node that cannot
        reach the broker withholds its heartbeat, so that its peers take its work over."""
        return self.connected

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def declare(self, queue: str, kind: QueueKind) -> None:
        """Create ``queue`` if missing (idempotent)."""

    @abstractmethod
    async def consume(self, queue: str, handler: Handler, *, prefetch: int) -> None:
        """Deliver ``queue``'s messages to ``handler``, at most ``prefetch`` unacked at once."""

    @abstractmethod
    async def stop_consuming(self, queue: str) -> None:
        """No new deliveries from ``queue``; handlers already running finish."""

    @abstractmethod
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
        """Put ``body`` on ``queue``; NoRouteError if mandatory and the queue does not exist."""

    @abstractmethod
    async def publish_event(self, exchange: str, topic: str, body: bytes, *, message_id: str) -> None: ...

    @abstractmethod
    async def bind(self, queue: str, exchange: str, pattern: str) -> None:
        """Bind ``queue`` to the topic ``exchange`` (declared if missing) with ``pattern``."""

    @abstractmethod
    async def take(self, queue: str) -> tuple[Delivery, Callable[[], Awaitable[None]]] | None:
        """Fetch one message without a consumer: (delivery, ack), or None when empty or missing."""

    @abstractmethod
    async def delete_if_empty(self, queue: str) -> bool:
        """Delete ``queue`` if it holds nothing; True when it is gone."""

    @abstractmethod
    async def queue_status(self, queue: str) -> tuple[int, int] | None:
        """(ready messages, consumers) of ``queue``, or None when it does not exist."""
