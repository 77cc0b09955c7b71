"""uvicorn inside an existing event loop, stopped by its owner rather than by signals.

server = EmbeddedServer(app, "127.0.0.1", 0); await server.start(); server.port; await server.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import uvicorn


class _QuietServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class EmbeddedServer:
    """Serves an ASGI app on host:port from the caller's loop; ``port`` 0 picks a free port."""

    def __init__(
        self, app: Any, host: str, port: int, *, startup_timeout: float = 10.0, limit_concurrency: int | None = None
    ) -> None:
        """``limit_concurrency``: requests over it at once are answered 503 at once, not queued."""
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=5,
            limit_concurrency=limit_concurrency,
            backlog=4096,
            proxy_headers=False,
            server_header=False,
        )
        self._server = _QuietServer(config)
        self._task: asyncio.Task[None] | None = None
        self.startup_timeout = startup_timeout
        self.host = host
        self.port = port

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._server.serve(), name="http")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.startup_timeout
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError(f"HTTP server on {self.host}:{self.port} stopped during start-up")
            if loop.time() > deadline:
                raise RuntimeError(f"HTTP server on {self.host}:{self.port} did not start in time")
            await asyncio.sleep(0.01)
        sockets = [s for server in self._server.servers for s in server.sockets]
        if sockets:
            self.port = sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), 10)
        except (TimeoutError, Exception):
            self._server.force_exit = True
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._task = None
