"""The action fast path (``zstack_mn.web.api.ActionFastPath``) answers a well-formed action as the
FastAPI route would, and leaves every malformed one to the route: each refusal here is compared
with the answer of the same node's app built without the fast path, and changes nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
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


def refusals(vm_uuid: str) -> list[tuple[str, str, bytes, dict[str, str]]]:
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
            assert got.status_code == want.status_code, case
            assert 400 <= got.status_code < 500, (case, got.text)
            assert got.json() == want.json(), case
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
            assert (got.status_code, got.json()) == (want.status_code, want.json()), (got.text, want.text)
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
