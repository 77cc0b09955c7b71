"""Per-resource serialisation (ZStack's ``chainSubmit`` with a sync signature).

Work for one key runs one at a time, in submission order (asyncio.Lock wakes waiters FIFO);
different keys run concurrently, at most ``concurrency`` at once. A key's chain is freed as soon
as it has no work queued.

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
    """Serial per key, bounded across keys."""

    def __init__(self, concurrency: int) -> None:
        self._chains: dict[str, _Chain] = {}
        self._slots = asyncio.Semaphore(concurrency)

    def __len__(self) -> int:
        return len(self._chains)

    @contextlib.asynccontextmanager
    async def slot(self, key: str | None) -> AsyncIterator[None]:
        """Serial for ``key`` and one of the bounded concurrency slots."""
        if key is None:
            async with self._slots:
                yield
            return
        async with self.serial(key), self._slots:
            yield

    @contextlib.asynccontextmanager
    async def serial(self, key: str) -> AsyncIterator[None]:
        """Serial for ``key`` only: for work that already holds a concurrency slot."""
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
