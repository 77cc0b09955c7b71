"""The action fast path (``zstack_mn.web.api.ActionFastPath``) answers a well-formed action as the
FastAPI route would, and leaves every malformed one to the route: each refusal here is compared
with the answer of the same node's app built without the fast path, and changes nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from fastapi import FastAPI

from tests.embedded import embedded_node, session_headers
from zstack_mn.client import Client
from zstack_mn.node import Node
from zstack_mn.web.api import HANDLED_BY, ActionFastPath, create_app

pytestmark = pytest.mark.timeout(60)

MISSING_VM = "0f0e0d0c-0b0a-4909-8807-060504030201"
JSON = {"Content-Type": "application/json"}


def app_of(node: Node, *, fast: bool) -> FastAPI:
    assert node.portal is not None
    assert node.guard is not None
    return create_app(
        node.portal,
        node_uuid=node.uuid,
        readiness=node.readiness,
        metrics_registry=node.metrics.registry,
        guard=node.guard,
        call_timeout=node.settings.call_timeout,
        fast_actions=fast,
    )


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    async with embedded_node(tmp_path) as n:
        yield n


@pytest.fixture
async def vm(node: Node) -> dict[str, Any]:
    async with Client.http([node.http_url]) as client:
        return await client.create_vm("fast-path", cpu_num=1, memory_size="64M")


def http(app: FastAPI, headers: dict[str, str]) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://node", headers=headers)


Headers = dict[str, str] | list[tuple[str, str]]


def answer_of(resp: httpx.Response) -> tuple[int, list[tuple[str, str]], bytes]:
    """Everything a client receives: status, headers in order, body bytes."""
    return resp.status_code, resp.headers.multi_items(), resp.content


def refusals(vm_uuid: str) -> list[tuple[str, str, bytes, Headers]]:
    """(case, path, body, headers) of requests the fast path must leave to the route."""
    path = f"/v1/vm-instances/{vm_uuid}/actions"
    stop = orjson.dumps({"stopVmInstance": {}})
    return [
        ("malformed uuid", "/v1/vm-instances/0/actions", stop, JSON),
        ("malformed json", path, b'{"stopVmInstance": {', JSON),
        ("two actions", path, orjson.dumps({"stopVmInstance": {}, "rebootVmInstance": {}}), JSON),
        ("unknown action", path, orjson.dumps({"pauseVmInstance": {}}), JSON),
        ("unknown parameter", path, orjson.dumps({"stopVmInstance": {"force": 1}}), JSON),
        ("null action", path, orjson.dumps({"stopVmInstance": None}), JSON),
        ("not an object", path, b"[]", JSON),
        ("empty body", path, b"", JSON),
        ("not json content", path, stop, {"Content-Type": "text/plain"}),
        ("no content type", path, stop, {}),
        ("two slashes in the content type", path, stop, {"Content-Type": "application/x/+json"}),
        ("empty key", path, stop, {**JSON, "Idempotency-Key": ""}),
        ("key too long", path, stop, {**JSON, "Idempotency-Key": "k" * 201}),
        ("host action on a vm path", path, orjson.dumps({"reconnectHost": {}}), JSON),
        ("malformed host uuid", "/v1/hosts/zz/actions", orjson.dumps({"reconnectHost": {}}), JSON),
    ]


async def test_malformed_actions_get_the_routes_own_answer_and_change_nothing(node: Node, vm: dict[str, Any]):
    headers = await session_headers(node.http_url)
    fast_app, slow_app = app_of(node, fast=True), app_of(node, fast=False)
    fast_path = fast_app.state.fast_path
    assert isinstance(fast_path, ActionFastPath)
    async with http(fast_app, headers) as fast, http(slow_app, headers) as slow:
        for case, path, body, extra in refusals(vm["uuid"]):
            got = await fast.put(path, content=body, headers=extra)
            want = await slow.put(path, content=body, headers=extra)
            assert answer_of(got) == answer_of(want), case
            assert 400 <= got.status_code < 500, (case, got.text)
        assert fast_path.answered == 0
        inventory = (await fast.get(f"/v1/vm-instances/{vm['uuid']}")).json()["inventory"]
        assert inventory == vm
        assert inventory["state"] == "Running"


async def test_a_refused_operation_is_the_same_answer_through_the_fast_path(node: Node, vm: dict[str, Any]):
    headers = await session_headers(node.http_url)
    fast_app, slow_app = app_of(node, fast=True), app_of(node, fast=False)
    body = orjson.dumps({"startVmInstance": {}})
    async with http(fast_app, headers) as fast, http(slow_app, headers) as slow:
        for uuid in (vm["uuid"], MISSING_VM):
            got = await fast.put(f"/v1/vm-instances/{uuid}/actions", content=body, headers=JSON)
            want = await slow.put(f"/v1/vm-instances/{uuid}/actions", content=body, headers=JSON)
            assert answer_of(got) == answer_of(want), (got.text, want.text)
            assert got.status_code in (404, 409), got.text
    assert fast_app.state.fast_path.answered == 2


async def test_a_well_formed_action_is_answered_by_the_fast_path_once_per_key(node: Node, vm: dict[str, Any]):
    headers = await session_headers(node.http_url)
    app = app_of(node, fast=True)
    path = f"/v1/vm-instances/{vm['uuid']}/actions"
    async with http(app, headers) as client:
        stopped = await client.put(path, content=orjson.dumps({"stopVmInstance": {}}), headers=JSON)
        assert stopped.status_code == 200, stopped.text
        assert stopped.json()["inventory"]["state"] == "Stopped"
        assert stopped.headers[HANDLED_BY] == node.uuid
        keyed = {"Idempotency-Key": "start-once", "Content-Type": "application/json; charset=utf-8"}
        first = await client.put(path, content=orjson.dumps({"startVmInstance": {}}), headers=keyed)
        again = await client.put(path, content=orjson.dumps({"startVmInstance": {}}), headers=keyed)
        assert first.status_code == again.status_code == 200, (first.text, again.text)
        assert first.json() == again.json()
        assert first.json()["inventory"]["state"] == "Running"
        now = (await client.get(f"/v1/vm-instances/{vm['uuid']}")).json()["inventory"]
        assert now == first.json()["inventory"]
    assert app.state.fast_path.answered == 3


async def test_a_well_formed_action_gets_what_the_route_would_answer(node: Node, vm: dict[str, Any]):
    """A stop through each app, of two VMs in the same state: the same status, the same
    headers and an inventory of the same shape in the same state."""
    async with Client.http([node.http_url]) as client:
        twin = await client.create_vm("fast-path-twin", cpu_num=1, memory_size="64M")
    headers = await session_headers(node.http_url)
    fast_app, slow_app = app_of(node, fast=True), app_of(node, fast=False)
    body = orjson.dumps({"stopVmInstance": {}})
    async with http(fast_app, headers) as fast, http(slow_app, headers) as slow:
        got = await fast.put(f"/v1/vm-instances/{vm['uuid']}/actions", content=body, headers=JSON)
        want = await slow.put(f"/v1/vm-instances/{twin['uuid']}/actions", content=body, headers=JSON)
    assert got.status_code == want.status_code == 200, (got.text, want.text)
    assert [k for k, _ in got.headers.multi_items()] == [k for k, _ in want.headers.multi_items()]
    assert got.headers[HANDLED_BY] == want.headers[HANDLED_BY]
    mine, theirs = got.json()["inventory"], want.json()["inventory"]
    assert mine.keys() == theirs.keys()
    assert mine["state"] == theirs["state"] == "Stopped"
    assert fast_app.state.fast_path.answered == 1


async def test_chunked_and_suffixed_json_bodies_take_the_fast_path(node: Node, vm: dict[str, Any]):
    async def chunked(body: bytes) -> AsyncIterator[bytes]:
        yield body[:5]
        yield body[5:]

    headers = await session_headers(node.http_url)
    app = app_of(node, fast=True)
    path = f"/v1/vm-instances/{vm['uuid']}/actions"
    async with http(app, headers) as client:
        stopped = await client.put(path, content=chunked(orjson.dumps({"stopVmInstance": {}})), headers=JSON)
        assert "content-length" not in stopped.request.headers
        assert stopped.status_code == 200, stopped.text
        started = await client.put(
            path, content=orjson.dumps({"startVmInstance": {}}), headers={"Content-Type": "application/x-vm+json"}
        )
        assert started.status_code == 200, started.text
        assert started.json()["inventory"]["state"] == "Running"
    assert app.state.fast_path.answered == 2


async def test_an_action_whose_client_leaves_mid_body_is_not_run(node: Node, vm: dict[str, Any]):
    """The body is cut short by a disconnect; what arrived is a whole action in itself."""
    headers = await session_headers(node.http_url)
    body = orjson.dumps({"stopVmInstance": {}})
    events: list[dict[str, Any]] = [
        {"type": "http.request", "body": body, "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return events.pop(0)

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "PUT",
        "scheme": "http",
        "path": f"/v1/vm-instances/{vm['uuid']}/actions",
        "raw_path": f"/v1/vm-instances/{vm['uuid']}/actions".encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body) + 10).encode()),
            (b"authorization", headers["Authorization"].encode()),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    app = app_of(node, fast=True)
    await app(scope, receive, send)
    assert sent == []
    assert app.state.fast_path.answered == 0
    async with http(app, headers) as client:
        inventory = (await client.get(f"/v1/vm-instances/{vm['uuid']}")).json()["inventory"]
    assert inventory == vm


async def test_repeated_headers_are_left_to_the_route(node: Node, vm: dict[str, Any]):
    """Two keys, or a second content type: the route reads the first of each (and runs the
    action); the fast path does not guess and passes them on."""
    headers = await session_headers(node.http_url)
    app = app_of(node, fast=True)
    path = f"/v1/vm-instances/{vm['uuid']}/actions"
    async with http(app, headers) as client:
        two_keys = [*JSON.items(), ("Idempotency-Key", "a"), ("Idempotency-Key", "b")]
        stopped = await client.put(path, content=orjson.dumps({"stopVmInstance": {}}), headers=two_keys)
        assert stopped.status_code == 200, stopped.text
        two_types = [*JSON.items(), ("Content-Type", "text/plain")]
        started = await client.put(path, content=orjson.dumps({"startVmInstance": {}}), headers=two_types)
        assert started.status_code == 200, started.text
        assert started.json()["inventory"]["state"] == "Running"
    assert app.state.fast_path.answered == 0
