"""An operation on the plain ``/v1`` API that outlives its caller's wait answers 202 with a job
(``Prefer: respond-async`` / ``wait=N``, else the call deadline) instead of a 504 for work that
goes on; ``GET /v1/jobs/{uuid}`` answers 202 while it runs, then what the operation answered.
Embedded node (in-process bus, SQLite); the same jobs polled on another node of a real cluster
are in ``tests/test_api_cluster.py``."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cluster_helpers import until_answered
from tests.embedded import embedded_node, session_headers
from zstack_mn.agent.protocol import AgentFault
from zstack_mn.client import Client
from zstack_mn.messages import ErrorCode, Message, ZStackError
from zstack_mn.node import Node
from zstack_mn.testing.cluster import agent_stats, set_agent_faults
from zstack_mn.web.zstack.jobs import FIRST_RUN_S

pytestmark = pytest.mark.timeout(60)

CALL_TIMEOUT_S = 1.0
AGENT_LATENCY_S = 2.0
MISSING_VM = "0f0e0d0c-0b0a-4909-8807-060504030201"
STOP: dict[str, dict[str, object]] = {"stopVmInstance": {}}


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    async with embedded_node(tmp_path, call_timeout=CALL_TIMEOUT_S, agent_timeout=5.0) as n:
        yield n


@pytest.fixture
async def http(node: Node) -> AsyncIterator[httpx.AsyncClient]:
    headers = await session_headers(node.http_url)
    async with httpx.AsyncClient(base_url=node.http_url, headers=headers, timeout=30) as client:
        yield client


@pytest.fixture
async def vm(node: Node) -> dict[str, Any]:
    async with Client.http([node.http_url]) as client:
        return await client.create_vm("jobs", cpu_num=1, memory_size="64M")


async def slow_agent(node: Node, op: str) -> str:
    assert node.agent_server is not None
    url = node.agent_server.url
    await set_agent_faults(url, [AgentFault(op=op, latency=AGENT_LATENCY_S)])
    return url


async def test_respond_async_answers_a_job_at_once_and_the_job_answers_the_operation(
    node: Node, http: httpx.AsyncClient, vm: dict[str, Any]
) -> None:
    agent = await slow_agent(node, "stop")
    resp = await http.put(
        f"/v1/vm-instances/{vm['uuid']}/actions",
        json=STOP,
        headers={"Prefer": "respond-async", "Idempotency-Key": "k1"},
    )
    assert resp.status_code == 202, resp.text
    job = resp.json()["job"]["uuid"]
    assert resp.headers["Location"] == f"/v1/jobs/{job}"
    assert resp.headers["Preference-Applied"] == "respond-async"
    waiting, done = await until_answered(http, resp.headers["Location"])
    assert waiting > 0, "the job answered before the agent's latency: the operation was not under way"
    assert done.status_code == 200
    assert done.json()["inventory"]["state"] == "Stopped"
    assert done.headers["X-Handled-By"] == node.uuid
    again = await http.put(f"/v1/vm-instances/{vm['uuid']}/actions", json=STOP, headers={"Idempotency-Key": "k1"})
    assert again.status_code == 200
    assert again.json()["inventory"]["state"] == "Stopped"
    assert (await agent_stats(agent))["duplicates"] == 0, "the stop was sent to the agent again"


async def test_an_operation_past_the_call_deadline_answers_a_job_not_a_504(
    node: Node, http: httpx.AsyncClient, vm: dict[str, Any]
) -> None:
    agent = await slow_agent(node, "stop")
    resp = await http.put(f"/v1/vm-instances/{vm['uuid']}/actions", json=STOP)
    assert resp.status_code == 202, resp.text
    assert "Preference-Applied" not in resp.headers
    _, done = await until_answered(http, resp.headers["Location"])
    assert done.status_code == 200
    assert done.json()["inventory"]["state"] == "Stopped"
    assert (await agent_stats(agent))["duplicates"] == 0, "the job's run sent the stop to the agent again"


async def test_wait_shorter_than_the_operation_answers_a_job_longer_answers_the_operation(
    node: Node, http: httpx.AsyncClient, vm: dict[str, Any]
) -> None:
    await slow_agent(node, "*")
    short = await http.put(f"/v1/vm-instances/{vm['uuid']}/actions", json=STOP, headers={"Prefer": "wait=0.2"})
    assert short.status_code == 202
    assert (await until_answered(http, short.headers["Location"]))[1].json()["inventory"]["state"] == "Stopped"
    assert node.agent_server is not None
    await set_agent_faults(node.agent_server.url, [])
    long = await http.put(
        f"/v1/vm-instances/{vm['uuid']}/actions", json={"startVmInstance": {}}, headers={"Prefer": "wait=0.9"}
    )
    assert long.status_code == 200, long.text
    assert long.json()["inventory"]["state"] == "Running"


async def test_a_job_answers_the_operations_error_with_its_status(http: httpx.AsyncClient) -> None:
    resp = await http.put(f"/v1/vm-instances/{MISSING_VM}/actions", json=STOP, headers={"Prefer": "respond-async"})
    if resp.status_code == 202:
        _, resp = await until_answered(http, resp.headers["Location"])
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == ErrorCode.RESOURCE_NOT_FOUND.value


async def test_unknown_and_malformed_job_uuids_are_refused_by_name(http: httpx.AsyncClient) -> None:
    unknown = await http.get(f"/v1/jobs/{MISSING_VM}")
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == ErrorCode.RESOURCE_NOT_FOUND.value
    malformed = await http.get("/v1/jobs/not-a-job")
    assert malformed.status_code == 400
    assert malformed.json()["error"]["details"]["field"] == "uuid"


async def test_a_zstack_api_job_is_not_a_plain_api_job(node: Node, http: httpx.AsyncClient, vm: dict[str, Any]) -> None:
    job = "ab" * 16
    started = await http.put(
        f"/zstack/v1/vm-instances/{vm['uuid']}/actions", json={"stopVmInstance": {}}, headers={"X-Job-UUID": job}
    )
    assert started.status_code == 202, started.text
    assert (await http.get(f"/v1/jobs/{uuid.UUID(job)}")).status_code == 404


async def test_the_python_client_follows_a_job_to_the_operations_answer(node: Node, vm: dict[str, Any]) -> None:
    await slow_agent(node, "stop")
    async with Client.http([node.http_url], timeout=30) as client:
        stopped = await client.stop_vm(vm["uuid"])
    assert stopped["state"] == "Stopped"


async def test_a_host_operation_answers_itself_not_with_a_job(node: Node, http: httpx.AsyncClient) -> None:
    """Host operations record no outcome a second run could answer from, so they are never run
    again as jobs: they answer when they end (or 504 at the deadline), Prefer or not."""
    hosts = (await http.get("/v1/hosts")).json()["inventories"]
    resp = await http.put(
        f"/v1/hosts/{hosts[0]['uuid']}/actions", json={"reconnectHost": {}}, headers={"Prefer": "respond-async"}
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["inventory"]["status"] == "Connected"


async def test_a_job_whose_answer_is_lost_sends_its_request_again_well_before_the_call_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first run's operation is done but its answer never comes back (a reply lost with a
    broker member): the job sends the request again after ``FIRST_RUN_S``, which the VM service
    answers from its record (not sent to the agent again), instead of waiting out the 30 s call
    deadline."""
    call_timeout = 30.0
    async with embedded_node(tmp_path, call_timeout=call_timeout, agent_timeout=5.0) as node:
        assert node.portal is not None
        async with Client.http([node.http_url]) as client:
            vm = await client.create_vm("lost-answer", cpu_num=1, memory_size="64M")
        real_handle = node.portal.handle
        runs: list[str] = []

        async def answer_lost_once(
            msg: Message, *, request_id: str, keyed: bool, timeout: float | None
        ) -> tuple[dict[str, Any], str]:
            runs.append(request_id)
            answer = await real_handle(msg, request_id=request_id, keyed=keyed, timeout=timeout)
            if len(runs) > 1:
                return answer
            await asyncio.sleep(timeout or call_timeout)
            raise ZStackError(ErrorCode.TIMEOUT, "the answer was lost")

        monkeypatch.setattr(node.portal, "handle", answer_lost_once)
        headers = await session_headers(node.http_url)
        async with httpx.AsyncClient(base_url=node.http_url, headers=headers, timeout=30) as http:
            resp = await http.put(
                f"/v1/vm-instances/{vm['uuid']}/actions", json=STOP, headers={"Prefer": "respond-async"}
            )
            assert resp.status_code == 202, resp.text
            _, done = await until_answered(http, resp.headers["Location"], bound=FIRST_RUN_S + 6)
        assert done.status_code == 200, done.text
        assert done.json()["inventory"]["state"] == "Stopped"
        assert len(runs) == 2, f"the job ran {len(runs)} times, not once more after its answer was lost"
        assert node.agent_server is not None
        assert (await agent_stats(node.agent_server.url))["duplicates"] == 0, "the second run sent the stop again"
