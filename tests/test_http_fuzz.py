"""Property-based fuzzing of the HTTP API and of the API messages on the bus (hypothesis):
whatever the input, never a 5xx, every error has a code and a description, and a refused request
writes nothing. Every check runs inside the example, so hypothesis shrinks a failure to its
smallest request. (schemathesis, in ``test_api_schemathesis.py``, checks the HTTP API against
its OpenAPI document; it cannot see the database or the bus, which these tests do.)"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from tests.embedded import embedded_node, session_headers
from zstack_mn.bus.cloudbus import CloudBus, _Pending
from zstack_mn.db.models import Host, MessageResult, VmInstance
from zstack_mn.messages import ErrorCode, Message
from zstack_mn.messages.api import ALL_APIS, APIQueryHostMsg
from zstack_mn.messages.envelope import Envelope
from zstack_mn.node import Node

pytestmark = pytest.mark.timeout(240)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
field_names = st.sampled_from(
    ["name", "cpuNum", "memorySize", "hostUuid", "uuid", "agentUrl", "stateEvent", "limit", "x"]
)
param_dicts = st.dictionaries(
    field_names, json_values | st.sampled_from(["1G", "-1", "0", "web", "enable"]), max_size=5
)
uuids = st.sampled_from(["6f1c7d0e-5ad4-4f3e-8b3a-1e0b7e6e1c11", "not-a-uuid", "", "%00", "a" * 300])
actions = st.sampled_from(
    ["startVmInstance", "stopVmInstance", "rebootVmInstance", "migrateVm", "reconnectHost", "changeHostState", "nope"]
)

requests = st.one_of(
    st.tuples(
        st.just("POST"),
        st.just("/v1/vm-instances"),
        st.one_of(st.builds(lambda p: {"params": p}, param_dicts), json_values),
    ),
    st.tuples(
        st.just("POST"), st.just("/v1/hosts"), st.one_of(st.builds(lambda p: {"params": p}, param_dicts), json_values)
    ),
    st.tuples(
        st.just("PUT"),
        uuids.map(lambda u: f"/v1/vm-instances/{u}/actions"),
        st.builds(lambda a, p: {a: p}, actions, param_dicts),
    ),
    st.tuples(
        st.just("PUT"),
        uuids.map(lambda u: f"/v1/hosts/{u}/actions"),
        st.builds(lambda a, p: {a: p}, actions, param_dicts),
    ),
    st.tuples(st.just("DELETE"), uuids.map(lambda u: f"/v1/vm-instances/{u}"), st.none()),
    st.tuples(st.just("DELETE"), uuids.map(lambda u: f"/v1/hosts/{u}"), st.none()),
    st.tuples(
        st.just("GET"),
        st.sampled_from(["/v1/vm-instances", "/v1/hosts", "/v1/management-nodes"]).flatmap(
            lambda p: st.sampled_from(["", "?limit=0", "?limit=5000", "?start=-1", "?state=Running", "?limit=abc"]).map(
                lambda q: p + q
            )
        ),
        st.none(),
    ),
    st.tuples(st.just("GET"), uuids.map(lambda u: f"/v1/vm-instances/{u}"), st.none()),
)


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    async with embedded_node(tmp_path, agent_timeout=2.0) as n:
        yield n


@pytest.fixture
async def http(node: Node) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=node.http_url, timeout=10, headers=await session_headers(node.http_url)
    ) as client:
        yield client


async def stored(node: Node) -> dict[str, list[tuple[Any, ...]]]:
    """Every row a request can write (VMs, hosts, stored replies and op records), in a stable
    order; the membership table, which the heartbeat rewrites, is left out."""
    assert node.db is not None
    tables = {"vm_instance": VmInstance, "host": Host, "message_result": MessageResult}
    async with node.db.begin() as conn:
        return {
            name: [tuple(r) for r in await conn.execute(select(model).order_by(*model.__table__.primary_key))]
            for name, model in tables.items()
        }


# One node serves every example (a node per example would take most of the run to start), so
# the function-scoped fixtures are shared on purpose: each example compares the rows before
# and after its own request.
@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(req=requests)
async def test_fuzzed_requests_never_get_a_5xx_and_refused_ones_write_nothing(
    node: Node, http: httpx.AsyncClient, req: tuple[str, str, object]
):
    method, path, body = req
    before = await stored(node)
    resp = await http.request(method, path, json=body)
    assert resp.status_code < 500, (method, path, body, resp.text)
    if resp.status_code < 400:
        return
    err = resp.json()["error"]
    assert err["code"], (method, path, body, resp.text)
    assert err["description"], (method, path, body, resp.text)
    assert await stored(node) == before, f"refused with {resp.status_code} but wrote: {method} {path} {body!r}"


async def unchecked_call(bus: CloudBus, api: type[Message], body: dict[str, Any]) -> Envelope:
    """Send ``body`` as an ``api`` message, as raw JSON that nothing on this side validated, to
    the portal's queue (the standard encoder: integers past 64 bits are part of the fuzz); the reply
    envelope."""
    corr = str(uuid.uuid4())
    envelope = Envelope.request(APIQueryHostMsg(), ttl_ms=5000, reply_to=bus.reply_queue, msg_id=corr)
    shape = envelope.model_dump(by_alias=True, exclude_none=True)
    raw = json.dumps({**shape, "type": api.type_name, "service": api.SERVICE, "body": body}).encode()
    fut: asyncio.Future[Envelope] = asyncio.get_running_loop().create_future()
    bus._pending[corr] = _Pending(fut)
    await bus.transport.publish(
        bus.topology.api_queue, raw, message_id=corr, correlation_id=corr, reply_to=bus.reply_queue
    )
    return await asyncio.wait_for(fut, 10)


bus_requests = st.tuples(
    st.sampled_from(ALL_APIS),
    st.dictionaries(
        st.sampled_from(
            ["name", "cpuNum", "memorySize", "hostUuid", "uuid", "agentUrl", "stateEvent", "limit", "start", "after"]
        ),
        json_values | st.sampled_from(["1G", "https://", "http://0", "0", "enable", 2**63, -1]),
        max_size=5,
    ),
)


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(req=bus_requests)
async def test_fuzzed_api_messages_on_the_bus_never_get_a_server_error_and_refused_ones_write_nothing(
    node: Node, req: tuple[type[Message], dict[str, Any]]
):
    api, body = req
    assert node.bus is not None
    before = await stored(node)
    reply = await unchecked_call(node.bus, api, body)
    if reply.ok:
        return
    assert reply.error is not None
    code = ErrorCode.parse(reply.error.code)
    assert code is not ErrorCode.INTERNAL_ERROR, (api.type_name, body, reply.error)
    assert reply.error.description, (api.type_name, body, reply.error)
    if code.http_status < 500:
        assert await stored(node) == before, f"refused with {code.value} but wrote: {api.type_name} {body!r}"
