"""The fault harness's view of membership: who is RUNNING and whether every ring agrees, sampled
from ``management_node`` on the machine-wide monotonic clock (so it compares with the clients'
history and the agent's audit)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from zstack_mn.cluster.membership import ring_digest
from zstack_mn.cluster.ring import HashRing
from zstack_mn.db.engine import Database
from zstack_mn.db.nodes import RUNNING, NodeRepository

OBSERVE_EVERY_S = 0.1
CLOSE_BOUND_S = 5.0


@dataclass
class Timeline:
    """What the observer saw of the membership table, on the machine-wide monotonic clock."""

    first_seen: dict[str, float] = field(default_factory=dict)
    gone_at: dict[str, float] = field(default_factory=dict)
    samples: list[tuple[float, frozenset[str], bool]] = field(default_factory=list)

    def running_at_end(self) -> frozenset[str]:
        return self.samples[-1][1] if self.samples else frozenset()

    def first_without(self, uuid: str, after: float) -> float | None:
        """When every live ring first agreed on a membership without ``uuid``."""
        for t, running, agree in self.samples:
            if t >= after and uuid not in running and agree:
                return t
        return None

    def first_with(self, uuid: str, after: float) -> float | None:
        for t, running, agree in self.samples:
            if t >= after and uuid in running and agree:
                return t
        return None


class Observer:
    """Polls ``management_node`` and records who is RUNNING and whether every ring agrees."""

    def __init__(self, database_url: str) -> None:
        self.db = Database(database_url, timeout=2.0)
        self.nodes = NodeRepository(self.db)
        self.timeline = Timeline()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="observer")

    async def _run(self) -> None:
        while not self._closing:
            try:
                rows = await asyncio.wait_for(self.nodes.list(), 2.0)
            except Exception:
                await asyncio.sleep(OBSERVE_EVERY_S)
                continue
            now = time.monotonic()
            present = {r.uuid for r in rows}
            running = frozenset(r.uuid for r in rows if r.state == RUNNING)
            digest = ring_digest(HashRing(running))
            agree = bool(running) and all(r.ring_digest == digest for r in rows if r.state == RUNNING)
            for u in present:
                self.timeline.first_seen.setdefault(u, now)
            for u in self.timeline.first_seen:
                if u not in present:
                    self.timeline.gone_at.setdefault(u, now)
            self.timeline.samples.append((now, running, agree))
            await asyncio.sleep(OBSERVE_EVERY_S)

    async def close(self) -> None:
        """Stop sampling. Python 3.11's ``wait_for`` can swallow a cancellation that races its
        inner query, so the loop also checks a flag and the wait for it is bounded."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=CLOSE_BOUND_S)
        await asyncio.wait_for(self.db.close(), CLOSE_BOUND_S)
