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

CHUNK = 65536
CONNECT_TIMEOUT_S = 5.0


class CutProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._cut = False
        self._server: asyncio.Server | None = None
        self._links: set[tuple[asyncio.StreamWriter, ...]] = set()
        self._stale: set[tuple[asyncio.StreamWriter, ...]] = set()
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

    def _spawn(self, coro: object) -> None:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            link: tuple[asyncio.StreamWriter, ...] = (writer,)
            self._links.add(link)
            self._stale.add(link)
            self._spawn(self._drain(reader, link))
            return
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(*self.target), CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError):
            writer.close()
            return
        link = (writer, up_writer)
        self._links.add(link)
        if self._cut:
            self._stale.add(link)
        self._spawn(self._pump(reader, up_writer, link))
        self._spawn(self._pump(up_reader, writer, link))

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: tuple) -> None:
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

    async def _drain(self, reader: asyncio.StreamReader, link: tuple) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while await reader.read(CHUNK):
                pass
        self._links.discard(link)
