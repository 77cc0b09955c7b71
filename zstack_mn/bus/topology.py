"""Every queue and exchange name of the cluster, in one place (the topics and the API service
name, which other layers share, are in ``zstack_mn.messages.names``).

| thing | name | kind |
| --- | --- | --- |
| point-to-point | the default exchange, routing key = queue name | mandatory publish: unroutable comes back as NO_ROUTE |
| per-node service queue | ``<p>.message.<service>.<node>`` | durable, outlives a crashed node (x-expires far above node_timeout), dead-letters poison |
| API queue | ``<p>.message.api.portal`` | durable, shared by every node |
| reply queue | ``<p>.reply.<node>`` | exclusive, auto-delete; replies correlate by correlation id |
| event exchange | ``<p>.event`` | topic; each node binds its own ``<p>.event.<node>`` queue |
| dead letters | ``<p>.dlx`` (fanout) → ``<p>.dead-letter`` | bounded length |

The durable queues (service, API, dead letters) are classic queues, or quorum queues
(``queue_type = quorum``: replicated over a RabbitMQ cluster's members, with a delivery limit);
reply and event queues stay classic and exclusive, since they die with their node.

``<p>`` is the queue prefix (default ``zstack``), which lets several clusters or test runs share a
broker.
"""

from __future__ import annotations

from dataclasses import dataclass

from zstack_mn.messages.names import API_SERVICE

API_QUEUE_SUFFIX = "portal"

NODE_QUEUE_EXPIRES_MS = 30 * 60 * 1000
DEAD_LETTER_MAX_LENGTH = 100_000
QUEUE_TYPES = ("classic", "quorum")
DELIVERY_LIMIT = 20
"""On quorum queues: a message delivered this many times without an ack (its consumer died with
it each time) is dead-lettered instead of being redelivered forever."""


@dataclass(frozen=True, slots=True)
class Topology:
    """Names derived from one prefix."""

    prefix: str = "zstack"

    def service_queue(self, service: str, node_uuid: str) -> str:
        return f"{self.prefix}.message.{service}.{node_uuid}"

    @property
    def api_queue(self) -> str:
        return f"{self.prefix}.message.{API_SERVICE}.{API_QUEUE_SUFFIX}"

    def reply_queue(self, owner: str) -> str:
        return f"{self.prefix}.reply.{owner}"

    @property
    def event_exchange(self) -> str:
        return f"{self.prefix}.event"

    def event_queue(self, owner: str) -> str:
        return f"{self.prefix}.event.{owner}"

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.prefix}.dlx"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.prefix}.dead-letter"


def topic_matches(pattern: str, key: str) -> bool:
    """AMQP topic matching: ``*`` is exactly one word, ``#`` zero or more words."""
    return _match(pattern.split("."), key.split("."))


def _match(pattern: list[str], key: list[str]) -> bool:
    if not pattern:
        return not key
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_match(rest, key[i:]) for i in range(len(key) + 1))
    return bool(key) and head in ("*", key[0]) and _match(rest, key[1:])
