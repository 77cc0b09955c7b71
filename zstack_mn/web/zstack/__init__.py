"""ZStack's own API, both wire protocols, as thin adapters over the node's portal.

``mount(app, portal)`` adds ZStack's REST API (``/zstack/v1``, ``rest``) and its RPC endpoint
(``/zstack/api``, ``rpc``) to a node's FastAPI app. Both read their wire format, check the
session (``sessions``), and hand the project's API message to the portal as a job (``jobs``) or
answer a query (``queries``); ``catalog`` says which ZStack APIs exist and how their fields map.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from fastapi import FastAPI

from zstack_mn.services.api_portal import ApiPortal
from zstack_mn.web.zstack import openapi
from zstack_mn.web.zstack.rest import mount_rest
from zstack_mn.web.zstack.rpc import mount_rpc
from zstack_mn.web.zstack.service import ZStackApi

log = structlog.get_logger(__name__)


def mount(app: FastAPI, portal: ApiPortal) -> ZStackApi:
    """Serve the ZStack API from ``app``; returns the adapters' shared state (for tests). Inside
    a running loop (a node starting) the ``admin`` account is also created now; a login creates
    it otherwise, or if this attempt fails."""
    zapi = ZStackApi(portal)
    mount_rest(app, zapi)
    mount_rpc(app, zapi)
    _document(app)
    app.state.zstack = zapi
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return zapi
    task = loop.create_task(zapi.guard.ensure_admin(), name="zstack-admin")
    _STARTING.add(task)
    task.add_done_callback(_started)
    return zapi


def _document(app: FastAPI) -> None:
    """``app.openapi()`` with the ZStack API added (the adapters' routes are left out of FastAPI's
    own generation: one route serves several ZStack APIs)."""
    base = app.openapi
    cache: dict[str, Any] = {}

    def build() -> dict[str, Any]:
        if "doc" not in cache:
            cache["doc"] = openapi.add_to(base())
        doc: dict[str, Any] = cache["doc"]
        return doc

    setattr(app, "openapi", build)  # noqa: B010  # FastAPI's documented way to replace the schema generator


_STARTING: set[asyncio.Task[None]] = set()


def _started(task: asyncio.Task[None]) -> None:
    _STARTING.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.warning("could not create the ZStack API admin account yet", error=str(task.exception()))
