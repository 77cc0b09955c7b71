"""The body limit holds however the body is sent: with a Content-Length or chunked."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import orjson
import pytest

from tests.embedded import embedded_node, session_headers
from zstack_mn.node import Node
from zstack_mn.web.api import MAX_BODY_BYTES

pytestmark = pytest.mark.timeout(60)

JSON = {"Content-Type": "application/json"}


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    async with embedded_node(tmp_path) as n:
        yield n


async def chunked(body: bytes, size: int = 4096) -> AsyncIterator[bytes]:
    for i in range(0, len(body), size):
        yield body[i : i + size]


def host_body(name: str) -> bytes:
    return orjson.dumps({"params": {"name": name, "agentUrl": "not-a-url"}})


async def test_a_chunked_body_over_the_limit_is_refused_and_changes_nothing(node: Node):
    async with httpx.AsyncClient(base_url=node.http_url, headers=await session_headers(node.http_url)) as http:
        before = (await http.get("/v1/hosts", params={"count": "true"})).json()["total"]
        resp = await http.post("/v1/hosts", content=chunked(host_body("x" * (MAX_BODY_BYTES + 1))), headers=JSON)
        assert resp.status_code == 413, resp.text
        assert resp.json()["error"]["code"] == "SYS.1004"
        assert resp.request.headers.get("transfer-encoding") == "chunked"
        assert (await http.get("/v1/hosts", params={"count": "true"})).json()["total"] == before


async def test_a_chunked_body_under_the_limit_reaches_the_api(node: Node):
    async with httpx.AsyncClient(base_url=node.http_url, headers=await session_headers(node.http_url)) as http:
        resp = await http.post("/v1/hosts", content=chunked(host_body("small")), headers=JSON)
        assert resp.request.headers.get("transfer-encoding") == "chunked"
        assert resp.status_code == 400, resp.text
        assert "agentUrl" in resp.text


async def test_a_declared_length_over_the_limit_is_refused_unread(node: Node):
    async with httpx.AsyncClient(base_url=node.http_url, headers=await session_headers(node.http_url)) as http:
        resp = await http.post("/v1/hosts", content=host_body("y" * (MAX_BODY_BYTES + 1)), headers=JSON)
        assert resp.request.headers["content-length"].isdigit()
        assert resp.status_code == 413, resp.text
