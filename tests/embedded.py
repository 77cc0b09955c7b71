"""An embedded node in the test's own event loop: in-process bus, SQLite, in-process agent."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from zstack_mn.client import Client
from zstack_mn.config import ZSTACK_DEFAULT_PASSWORD, load_settings
from zstack_mn.node import Node


@asynccontextmanager
async def embedded_node(tmp_path: Path, **overrides: object) -> AsyncIterator[Node]:
    settings = load_settings(
        None,
        {
            "broker_url": f"memory://{uuid.uuid4().hex}",
            "database_url": f"sqlite+aiosqlite:///{tmp_path / 'mn.db'}",
            "http_port": 0,
            "heartbeat_interval": 0.2,
            "node_timeout": 2.0,
            "agent_timeout": 1.0,
            "host_ping_interval": 0.2,
            "call_timeout": 10.0,
            **overrides,
        },
    )
    node = Node(settings)
    async with node:
        yield node


async def session_headers(url: str, password: str = ZSTACK_DEFAULT_PASSWORD) -> dict[str, str]:
    """``Authorization: OAuth <session>`` for a new login of ``admin`` at ``url`` (every ``/v1``
    call needs one)."""
    async with Client.http(url, password=password) as client:
        return {"Authorization": f"OAuth {await client.login()}"}
