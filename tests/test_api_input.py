"""Malformed fields are refused with a 400 that names the field, before anything is written or
any agent is called, over HTTP and on the bus; the OpenAPI document states what the server
answers; a 405 names the allowed methods."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from tests.embedded import embedded_node, session_headers
from zstack_mn.db.models import Host, MessageResult, VmInstance
from zstack_mn.messages import ErrorCode, ZStackError
from zstack_mn.messages.api import APIAddHostMsg, APIQueryVmInstanceMsg
from zstack_mn.messages.inventory import DeletedReply
from zstack_mn.messages.types import INT32_MAX
from zstack_mn.node import Node

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    async with embedded_node(tmp_path) as n:
        yield n


@pytest.fixture
async def http(node: Node) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=node.http_url, timeout=10, headers=await session_headers(node.http_url)
    ) as client:
        yield client


async def rows(node: Node) -> tuple[int, int, int]:
    assert node.db is not None
    async with node.db.begin() as conn:
        counts = [
            (await conn.execute(select(func.count()).select_from(model))).scalar_one()
            for model in (Host, VmInstance, MessageResult)
        ]
    return counts[0], counts[1], counts[2]


def agent_calls(node: Node) -> int:
    """Hosts the simulated agent has been asked about (a connect adds one) and VM operations."""
    assert node.simulated_agent is not None
    return len(node.simulated_agent.hosts) + len(node.simulated_agent.audit)


BAD_AGENT_URLS = [
    "https://",  # no host
    "https://\u00d0\u000e",  # not ASCII, a control character
    "http://0",  # a numeric host that is no IPv4 address
    "http://10.0.0.256/hosts/a",
    "ftp://10.0.0.1/hosts/a",
    "http://10.0.0.1:0/hosts/a",
    "http://10.0.0.1:65536/hosts/a",
    "http://user@10.0.0.1/hosts/a",
    "http://10.0.0.1/hosts/a b",
    "http://[::1]:7070/hosts/a",
    "http://h/" + "a" * 1024,
    "{agent}/hosts/a b",  # would reach the embedded agent if the space went through
    "{agent}/hosts/" + "a" * 1024,
    "{agent}/hosts/a\x7f",
]


@pytest.mark.parametrize("url", BAD_AGENT_URLS)
async def test_a_malformed_agent_url_is_refused_before_the_agent_is_called(
    node: Node, http: httpx.AsyncClient, url: str
):
    assert node.agent_server is not None
    before, calls = await rows(node), agent_calls(node)
    url = url.replace("{agent}", node.agent_server.url)
    resp = await http.post(
        "/v1/hosts", json={"params": {"name": "h", "agentUrl": url}}, headers={"Idempotency-Key": "k"}
    )
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["code"] == ErrorCode.INVALID_ARGUMENT.value
    assert error["details"]["field"] == "agentUrl", error
    assert await rows(node) == before
    assert agent_calls(node) == calls


@pytest.mark.parametrize(
    ("path", "field"),
    [
        (f"/v1/vm-instances?start={INT32_MAX + 1}", "start"),
        ("/v1/hosts?start=83837548813862040773105658363904", "start"),
        ("/v1/vm-instances?limit=1001", "limit"),
        ("/v1/vm-instances?name=" + "n" * 256, "name"),
        ("/v1/vm-instances?name=a%00b", "name"),
        ("/v1/vm-instances?hostUuid=0", "hostUuid"),
        ("/v1/vm-instances?after=x", "after"),
        ("/v1/vm-instances?state=Sleeping", "state"),
        ("/v1/vm-instances?count=maybe", "count"),
        ("/v1/vm-instances?nope=1", "nope"),
        ("/v1/hosts/0", "uuid"),
        ("/v1/vm-instances/not-a-uuid", "uuid"),
    ],
)
async def test_a_malformed_query_field_is_a_400_naming_it(http: httpx.AsyncClient, path: str, field: str):
    resp = await http.get(path)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["details"]["field"] == field


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"params": {"name": "a\x00b", "cpuNum": 1, "memorySize": "1G"}}, "name"),
        ({"params": {"name": "x" * 256, "cpuNum": 1, "memorySize": "1G"}}, "name"),
        ({"params": {"name": "x", "cpuNum": 2**40, "memorySize": "1G"}}, "cpuNum"),
        ({"params": {"name": "x", "cpuNum": 1, "memorySize": "1024T"}}, "memorySize"),
        ({"params": {"name": "x", "cpuNum": 1, "memorySize": 2**70}}, "memorySize"),
        ({"params": {"name": "x", "cpuNum": 1, "memorySize": "0"}}, "memorySize"),
    ],
)
async def test_a_malformed_vm_field_is_refused_and_writes_nothing(
    node: Node, http: httpx.AsyncClient, body: dict[str, Any], field: str
):
    before, calls = await rows(node), agent_calls(node)
    resp = await http.post("/v1/vm-instances", json=body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["details"]["field"] == field
    assert await rows(node) == before
    assert agent_calls(node) == calls


async def test_an_action_body_names_exactly_one_action(http: httpx.AsyncClient):
    vm = "6f1c7d0e-5ad4-4f3e-8b3a-1e0b7e6e1c11"
    bodies: list[dict[str, Any]] = [{}, {"startVmInstance": {}, "stopVmInstance": None}, {"startVmInstance": None}]
    for body in bodies:
        resp = await http.put(f"/v1/vm-instances/{vm}/actions", json=body)
        assert resp.status_code == 400, (body, resp.text)


async def test_a_malformed_field_on_the_bus_gets_an_error_reply_naming_it(node: Node):
    assert node.bus is not None
    before, calls = await rows(node), agent_calls(node)
    unchecked = APIAddHostMsg.model_construct(name="h", agent_url="https://")
    with pytest.raises(ZStackError) as err:
        await node.bus.call(unchecked, timeout=5)
    assert err.value.code is ErrorCode.INVALID_ARGUMENT
    assert err.value.details["field"] == "agentUrl"
    too_far = APIQueryVmInstanceMsg.model_construct(start=2**80, limit=10)
    with pytest.raises(ZStackError) as err:
        await node.bus.call(too_far, timeout=5)
    assert err.value.details["field"] == "start"
    assert await rows(node) == before
    assert agent_calls(node) == calls


async def test_a_405_names_every_method_of_the_path(http: httpx.AsyncClient):
    resp = await http.request("OPTIONS", "/v1/hosts")
    assert resp.status_code == 405
    assert resp.headers["allow"] == "GET, POST"
    assert resp.json()["error"]["code"] == ErrorCode.METHOD_NOT_ALLOWED.value
    resp = await http.request("PATCH", "/v1/vm-instances/6f1c7d0e-5ad4-4f3e-8b3a-1e0b7e6e1c11")
    assert resp.headers["allow"] == "DELETE, GET"


async def test_a_host_deletion_answers_with_the_documented_body(node: Node, http: httpx.AsyncClient):
    assert node.agent_server is not None
    url = f"{node.agent_server.url}/hosts/gone"
    added = await http.post("/v1/hosts", json={"params": {"name": "a", "agentUrl": url}})
    assert added.status_code == 200, added.text
    host = added.json()["inventory"]["uuid"]
    deleted = await http.delete(f"/v1/hosts/{host}")
    assert deleted.status_code == 200, deleted.text
    assert DeletedReply.model_validate(deleted.json()).inventory.uuid == host
    assert (await http.get(f"/v1/hosts/{host}")).status_code == 404


async def test_the_openapi_document_states_what_the_server_answers(http: httpx.AsyncClient):
    doc = (await http.get("/openapi.json")).json()
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            responses = op["responses"]
            assert "422" not in responses, (method, path)
            if path.startswith("/v1/"):
                assert op["security"] == [{"session": []}], (method, path)
                assert "401" in responses, (method, path)
                assert "400" in responses, (method, path)
                error = responses["400"]["content"]["application/json"]["schema"]
                assert error == {"$ref": "#/components/schemas/ErrorReply"}
            for param in op.get("parameters", []):
                if param["in"] == "path" and path.startswith("/v1/"):  # /zstack: test_zstack_api.py
                    assert param["schema"]["pattern"].startswith("^[0-9a-fA-F]{8}"), (method, path)
    actions = doc["paths"]["/v1/vm-instances/{uuid}/actions"]["put"]["responses"]
    assert {"409", "502", "504"} <= set(actions)
    metrics = doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]


async def test_the_openapi_document_has_the_session_scheme_and_the_api_needs_a_session(node: Node):
    async with httpx.AsyncClient(base_url=node.http_url) as http:
        doc = (await http.get("/openapi.json")).json()
        scheme = doc["components"]["securitySchemes"]["session"]
        assert (scheme["type"], scheme["in"], scheme["name"]) == ("apiKey", "header", "Authorization")
        query = doc["paths"]["/v1/vm-instances"]["get"]
        assert query["security"] == [{"session": []}]
        assert "401" in query["responses"]
        assert "security" not in doc["paths"]["/healthz"]["get"]
        for headers in ({}, {"Authorization": "Bearer x"}, {"Authorization": f"OAuth {'0' * 32}"}):
            denied = await http.get("/v1/vm-instances", headers=headers)
            assert denied.status_code == 401, headers
            assert denied.json()["error"]["code"] == ErrorCode.INVALID_SESSION.value
        allowed = await http.get("/v1/vm-instances", headers=await session_headers(node.http_url))
        assert allowed.status_code == 200
