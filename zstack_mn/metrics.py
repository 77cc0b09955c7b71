"""Prometheus metrics of a node (one registry per node, so several nodes can share a process)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class NodeMetrics:
    """Every metric a node exports on ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.messages = Counter(
            "zstack_messages_handled_total",
            "Messages handled, by service, type and outcome",
            ["service", "type", "outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "zstack_message_seconds",
            "Time spent handling a message, by service and type",
            ["service", "type"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.in_flight = Gauge("zstack_messages_in_flight", "Messages being handled", registry=self.registry)
        self.ring_size = Gauge("zstack_ring_nodes", "Nodes in this node's ring", registry=self.registry)
        self.heartbeat_age = Gauge(
            "zstack_heartbeat_age_seconds", "Seconds since this node last wrote its heartbeat", registry=self.registry
        )
        self.dead_lettered = Counter(
            "zstack_messages_dead_lettered_total", "Poison messages dead-lettered", ["reason"], registry=self.registry
        )
        self.forwarded = Counter(
            "zstack_messages_forwarded_total", "Messages forwarded to their owner", registry=self.registry
        )
        self.rescued = Counter(
            "zstack_messages_rescued_total", "Messages re-routed from an evicted node", registry=self.registry
        )
        self._children: dict[tuple[str, ...], Any] = {}

    def observe_message(self, service: str, msg_type: str, outcome: str, seconds: float) -> None:
        """Count one handled message and its latency (label children cached: this is the hot path)."""
        key = (service, msg_type, outcome)
        counter = self._children.get(key)
        if counter is None:
            counter = self._children[key] = self.messages.labels(service=service, type=msg_type, outcome=outcome)
        hkey = (service, msg_type)
        hist = self._children.get(hkey)
        if hist is None:
            hist = self._children[hkey] = self.latency.labels(service=service, type=msg_type)
        counter.inc()
        hist.observe(seconds)
