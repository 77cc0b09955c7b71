"""Per-resource serialisation (ZStack's ``chainSubmit`` with a sync signature).

Work for one key runs one at a time, in submission order (asyncio.Lock wakes waiters FIFO);
different keys run concurrently, with no bound here: how much runs at once on a node is bounded
where the work enters it (the broker prefetch of each queue it consumes and the HTTP server's
concurrency limit, both ``max_in_flight``), so a task waiting on an agent costs its memory and
nothing else. A key's chain is freed as soon as it has no work queued.

    async with chains.slot(vm_uuid): ...
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class _Chain:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


class Chains:
    """Serial per key."""

    def __init__(self) -> None:
        self._chains: dict[str, _Chain] = {}

    def __len__(self) -> int:
        return len(self._chains)

    @contextlib.asynccontextmanager
    async def slot(self, key: str | None) -> AsyncIterator[None]:
        """Serial for ``key``; work without a key runs at once."""
        if key is None:
            yield
            return
        async with self.serial(key):
            yield

    @contextlib.asynccontextmanager
    async def serial(self, key: str) -> AsyncIterator[None]:
        """Serial for ``key``."""
        chain = self._chains.get(key)
        if chain is None:
            chain = self._chains[key] = _Chain()
        chain.users += 1
        try:
            async with chain.lock:
                yield
        finally:
            chain.users -= 1
            if chain.users == 0:
                del self._chains[key]
