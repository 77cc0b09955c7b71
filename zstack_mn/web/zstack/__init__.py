"""ZStack's own API, both wire protocols, as thin adapters over the node's portal.

``mount(app, portal, guard)`` adds ZStack's REST API (``/zstack/v1``, ``rest``) and its RPC endpoint
(``/zstack/api``, ``rpc``) to a node's FastAPI app. Both read their wire format, check the
session (``sessions``), and hand the project's API message to the portal as a job (``jobs``) or
answer a query (``queries``); ``catalog`` says which ZStack APIs exist and how their fields map.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from zstack_mn.services.api_portal import ApiPortal
from zstack_mn.web.zstack import openapi
from zstack_mn.web.zstack.jobs import JobRunner
from zstack_mn.web.zstack.rest import mount_rest
from zstack_mn.web.zstack.rpc import mount_rpc
from zstack_mn.web.zstack.service import ZStackApi
from zstack_mn.web.zstack.sessions import SessionGuard


def mount(app: FastAPI, portal: ApiPortal, guard: SessionGuard, jobs: JobRunner | None = None) -> ZStackApi:
    """Serve the ZStack API from ``app``, with the node's session guard and its job runner (one
    for both APIs); returns the adapters' shared state (for tests)."""
    zapi = ZStackApi(portal, guard, jobs)
    mount_rest(app, zapi)
    mount_rpc(app, zapi)
    _document(app)
    app.state.zstack = zapi
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
