"""A loopback TCP proxy that can cut one node off from a server the way a network partition does.

``cut()`` black-holes the traffic: connections stay open, bytes in both directions are dropped,
new connections are accepted and never connected through, and nothing is refused or reset, so
the node learns of the cut only from its own timeouts and heartbeats. ``heal()`` closes every
connection that lived through the cut (their byte streams have holes) and forwards again.
No traffic leaves the machine and nothing needs root.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any

CHUNK = 65536
CONNECT_TIMEOUT_S = 5.0

Link = tuple[asyncio.StreamWriter, ...]
"""The writers of one proxied connection: the client's, and the server's once connected."""


class CutProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._cut = False
        self._server: asyncio.Server | None = None
        self._links: set[Link] = set()
        self._stale: set[Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    @property
    def is_cut(self) -> bool:
        return self._cut

    def cut(self) -> None:
        self._cut = True
        self._stale |= self._links

    def heal(self) -> None:
        self._cut = False
        for writers in self._stale:
            for w in writers:
                w.close()
        self._stale.clear()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writers in list(self._links):
            for w in writers:
                w.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _track(self, link: Link) -> None:
        """A new connection; one made while cut is stale from the start (closed on heal)."""
        self._links.add(link)
        if self._cut:
            self._stale.add(link)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            link: Link = (writer,)
            self._track(link)
            self._spawn(self._drain(reader, link))
            return
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(*self.target), CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError):
            writer.close()
            return
        link = (writer, up_writer)
        self._track(link)  # the cut may have come while this connection was being made
        self._spawn(self._pump(reader, up_writer, link))
        self._spawn(self._pump(up_reader, writer, link))

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: Link) -> None:
        try:
            while data := await reader.read(CHUNK):
                if self._cut:
                    continue
                writer.write(data)
                await writer.drain()
        except (OSError, ConnectionError):
            pass
        finally:
            if not self._cut:
                for w in link:
                    w.close()
                self._links.discard(link)

    async def _drain(self, reader: asyncio.StreamReader, link: Link) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while await reader.read(CHUNK):
                pass
        self._links.discard(link)
