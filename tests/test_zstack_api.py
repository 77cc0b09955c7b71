"""ZStack's own API on the embedded node: both protocols driven by the ZStack-style clients of
``tests/zstack_sdk.py``, the job take-over paths, sessions, and the pure pieces (conditions,
uuids, dates, settings)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from tests.embedded import embedded_node
from tests.zstack_scenarios import HEX32, MB, NOTHING, rest_lifecycle, rpc_lifecycle
from tests.zstack_sdk import RestClient, RpcClient
from zstack_mn.bus.cloudbus import Request
from zstack_mn.cli_api import parse_call, run_call
from zstack_mn.client import Client
from zstack_mn.config import ConfigError, load_settings
from zstack_mn.db.accounts import SESSION, AccountRepository, sha512_hex
from zstack_mn.db.jobs import JOB, JobRepository
from zstack_mn.messages import Envelope, ErrorCode, ZStackError
from zstack_mn.messages.api import APIAddHostMsg, APIQueryVmInstanceMsg, APIStopVmInstanceMsg
from zstack_mn.messages.ids import SESSION_HEADER
from zstack_mn.node import Node
from zstack_mn.testing.cluster import free_port
from zstack_mn.web.zstack import builtins, sessions
from zstack_mn.web.zstack.catalog import APIS, BY_NAME, Context
from zstack_mn.web.zstack.conditions import Op, QuerySpec, parse_rest_condition
from zstack_mn.web.zstack.jobs import MAX_ATTEMPTS, request_id_of
from zstack_mn.web.zstack.service import ZStackApi
from zstack_mn.web.zstack.sessions import guarded
from zstack_mn.web.zstack.wire import UUID_PATTERN, internal_uuid, zstack_date
from zstack_mn.zstack_client import ZStackTransport

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    port = free_port()
    async with embedded_node(
        tmp_path, embedded_agent_port=port, kvm_agent_url=f"http://127.0.0.1:{port}/hosts/{{managementIp}}"
    ) as n:
        yield n


def zapi_of(node: Node) -> ZStackApi:
    """The adapters' state over the node's own portal (what ``mount`` builds for its app)."""
    assert node.portal is not None
    assert node.guard is not None
    return ZStackApi(node.portal, node.guard)


async def test_rest_lifecycle_on_the_embedded_node(node: Node) -> None:
    c = RestClient(node.http_url)
    try:
        await rest_lifecycle(c, "emb")
    finally:
        await c.close()


async def test_rpc_lifecycle_on_the_embedded_node(node: Node) -> None:
    r = RpcClient(node.http_url)
    try:
        await rpc_lifecycle(r, "emb")
    finally:
        await r.close()


async def test_a_resent_job_uuid_runs_once(node: Node) -> None:
    c = RestClient(node.http_url)
    try:
        await c.login()
        job = uuid.uuid4().hex
        first = (
            await c.call("CreateVmInstance", job_uuid=job, name="once", cpuNum=1, memorySize=MB, **NOTHING)
        ).unwrap()
        second = (
            await c.call("CreateVmInstance", job_uuid=job, name="once", cpuNum=1, memorySize=MB, **NOTHING)
        ).unwrap()
        assert first["inventory"]["uuid"] == second["inventory"]["uuid"]
        assert (await c.query("QueryVmInstance", ["name=once"], count=True)).unwrap() == {"total": 1}
        bad = await c.call("StopVmInstance", job_uuid="not-a-uuid", uuid=first["inventory"]["uuid"])
        assert bad.error is not None
        assert bad.error["status"] == 400
        assert "X-Job-UUID" in bad.error["details"]
    finally:
        await c.close()


async def _a_running_vm(c: RestClient) -> str:
    await c.login()
    inv = (
        await c.call("CreateVmInstance", name=f"vm-{uuid.uuid4().hex[:6]}", cpuNum=1, memorySize=MB, **NOTHING)
    ).unwrap()
    vm: str = inv["inventory"]["uuid"]
    return vm


async def _stop_job_of_a_dead_node(zapi: ZStackApi, vm: str, attempts: int = 1) -> str:
    """A StopVmInstance job recorded by a node that is gone (never in the ring)."""
    job = uuid.uuid4().hex
    msg = APIStopVmInstanceMsg(uuid=internal_uuid(vm, "uuid"))
    repo = JobRepository(zapi.portal.ctx.db)
    assert await repo.create(
        job, "StopVmInstance", {"type": msg.type_name, "body": msg.to_wire()}, str(uuid.uuid4()), 30
    )
    for _ in range(attempts - 1):
        row = await repo.get(job)
        assert row is not None
        assert await repo.claim(row, row.node, 30)
    return job


async def test_a_job_whose_node_died_before_it_ran_is_run_by_a_poller(node: Node) -> None:
    c = RestClient(node.http_url)
    try:
        vm = await _a_running_vm(c)
        job = await _stop_job_of_a_dead_node(zapi_of(node), vm)
        result = await c.poll(f"{node.http_url}/zstack/v1/api-jobs/{job}")
        assert result.unwrap()["inventory"]["state"] == "Stopped"
    finally:
        await c.close()


async def test_a_job_whose_node_died_after_the_work_is_answered_from_the_op_record(node: Node) -> None:
    c = RestClient(node.http_url)
    try:
        vm = await _a_running_vm(c)
        zapi = zapi_of(node)
        job = await _stop_job_of_a_dead_node(zapi, vm)
        # the dead node had done the work (under the job's request id) but not recorded the job
        body, _ = await zapi.portal.handle(
            APIStopVmInstanceMsg(uuid=internal_uuid(vm, "uuid")), request_id=request_id_of(job), keyed=True, timeout=10
        )
        assert body["inventory"]["state"] == "Stopped"
        assert (await c.call("StartVmInstance", uuid=vm)).unwrap()["inventory"]["state"] == "Running"
        # the taken-over job answers the recorded stop; it does not stop the VM again
        result = await c.poll(f"{node.http_url}/zstack/v1/api-jobs/{job}")
        assert result.unwrap()["inventory"]["state"] == "Stopped"
        now = (await c.query("QueryVmInstance", [f"uuid={vm}"])).unwrap()["inventories"][0]
        assert now["state"] == "Running"
    finally:
        await c.close()


async def test_a_job_that_keeps_failing_to_finish_ends_with_a_timeout(node: Node) -> None:
    c = RestClient(node.http_url)
    try:
        vm = await _a_running_vm(c)
        job = await _stop_job_of_a_dead_node(zapi_of(node), vm, attempts=MAX_ATTEMPTS)
        result = await c.poll(f"{node.http_url}/zstack/v1/api-jobs/{job}")
        assert result.error is not None
        assert result.error["code"] == ErrorCode.TIMEOUT.value
        async with httpx.AsyncClient() as h:
            gone = await h.get(f"{node.http_url}/zstack/v1/api-jobs/{uuid.uuid4().hex}")
            assert gone.status_code == 404
            rpc_gone = await h.get(f"{node.http_url}/zstack/api/result/{uuid.uuid4().hex}")
            assert rpc_gone.status_code == 404
    finally:
        await c.close()


async def test_an_expired_session_is_refused(node: Node) -> None:
    c = RestClient(node.http_url)
    try:
        await c.login()
        accounts = AccountRepository(zapi_of(node).portal.ctx.db)
        live = await accounts.valid_session(c.session_id or "")
        assert live is not None
        assert live.expires_at > datetime.now(UTC)
        short = await accounts.open_session(live.account_uuid, 60)
        async with accounts.db.begin() as conn:  # an hour later, by the database's clock
            await conn.execute(
                update(SESSION)
                .where(SESSION.c.uuid == short.uuid)
                .values(created_at=datetime.now(UTC) - timedelta(hours=1))
            )
        refused = await c.query("QueryVmInstance", sessionId=short.uuid)
        assert refused.error is not None
        assert '"ID.1001"' in refused.error["details"]
        assert (await c.call("ValidateSession", sessionUuid=short.uuid)).unwrap() == {"valid": False}
        assert await accounts.expire_sessions() >= 1
    finally:
        await c.close()


async def test_malformed_requests_get_a_4xx_and_write_nothing(node: Node) -> None:
    c = RestClient(node.http_url)
    try:
        await c.login()
        auth = {"Authorization": f"OAuth {c.session_id}"}
        async with httpx.AsyncClient(base_url=f"{node.http_url}/zstack") as h:
            no_auth = await h.get("/v1/vm-instances")
            assert no_auth.status_code == 401
            assert no_auth.json()["error"]["code"] == "ID.1001"
            two = await h.put(
                f"/v1/vm-instances/{uuid.uuid4().hex}/actions",
                json={"startVmInstance": {}, "stopVmInstance": {}},
                headers=auth,
            )
            assert two.status_code == 400
            assert two.json()["error"]["opaque"]["field"] == "body"
            extra = await h.post("/v1/vm-instances", json={"params": {"name": "x"}, "bogus": 1}, headers=auth)
            assert extra.status_code == 400
            assert extra.json()["error"]["opaque"]["field"] == "bogus"
            not_json = await h.post("/v1/vm-instances", content=b"{", headers=auth)
            assert not_json.status_code == 400
            unknown_field = await h.post(
                "/v1/vm-instances", json={"params": {"name": "y", "cpuNum": 1, "memorySize": 1, "x": 1}}, headers=auth
            )
            assert unknown_field.status_code == 400
            assert unknown_field.json()["error"]["opaque"]["field"] == "x"
            rpc = await h.post("/api", content=b"[]")
            assert rpc.status_code == 400
        assert (await c.query("QueryVmInstance", count=True)).unwrap() == {"total": 0}
    finally:
        await c.close()


def test_rest_conditions_are_split_by_the_longest_operator_first() -> None:
    assert parse_rest_condition("name!=a").op is Op.NOT_EQ
    assert parse_rest_condition("cpuNum>=2").op is Op.GE
    c = parse_rest_condition("uuid!?=a,b")
    assert (c.name, c.op, c.value) == ("uuid", Op.NOT_IN, "a,b")
    assert parse_rest_condition("name~=web%").op is Op.LIKE
    assert parse_rest_condition("name= spaced ").value == " spaced "
    n = parse_rest_condition("hostUuid is null")
    assert (n.name, n.op, n.value) == ("hostUuid", Op.IS_NULL, None)
    with pytest.raises(ZStackError) as err:
        parse_rest_condition("name")
    assert err.value.details["field"] == "q"


def test_query_parameters_are_checked() -> None:
    spec = QuerySpec.from_rest(
        [("limit", "5"), ("start", "2"), ("sort", "-name"), ("replyWithCount", "true"), ("limit", "2")]
    )
    assert (spec.limit, spec.start, spec.sort_by, spec.sort_desc, spec.reply_with_count) == (5, 2, "name", True, True)
    for bad in ([("limit", "x")], [("count", "maybe")], [("groupBy", "name")], [("bogus", "1")]):
        with pytest.raises(ZStackError) as err:
            QuerySpec.from_rest(bad)
        assert err.value.code is ErrorCode.INVALID_ARGUMENT
        assert err.value.details["field"] == bad[0][0]


def test_uuids_and_dates_in_zstack_form() -> None:
    u = uuid.uuid4()
    assert internal_uuid(u.hex, "uuid") == str(u) == internal_uuid(str(u), "uuid")
    with pytest.raises(ZStackError):
        internal_uuid("nope", "hostUuid")
    assert zstack_date(datetime(2026, 1, 2, 13, 4, 5, tzinfo=UTC)) == "Jan 2, 2026 1:04:05 PM"
    assert zstack_date(datetime(2026, 1, 2, 0, 4, 5, tzinfo=UTC)) == "Jan 2, 2026 12:04:05 AM"
    assert HEX32.match(u.hex)


def test_a_cluster_refuses_zstacks_default_admin_password_unless_told() -> None:
    with pytest.raises(ConfigError, match="admin_password"):
        load_settings(None, {"broker_url": "amqp://guest:guest@127.0.0.1/", "admin_password": "password"})
    allowed = load_settings(
        None,
        {
            "broker_url": "amqp://guest:guest@127.0.0.1/",
            "admin_password": "password",
            "allow_default_admin_password": True,
        },
    )
    assert allowed.initial_admin_password == "password"
    assert load_settings(None, {"broker_url": "amqp://guest:guest@127.0.0.1/"}).initial_admin_password is None
    assert load_settings(None, {"broker_url": "memory://"}).initial_admin_password == "password"
    with pytest.raises(ConfigError, match="kvm_agent_url"):
        load_settings(None, {"broker_url": "memory://", "kvm_agent_url": "http://{managementIp}:7070/{hostId}"})


async def test_the_python_client_and_the_cli_speak_zstack(node: Node) -> None:
    assert node.agent_server is not None
    async with Client.zstack(node.http_url) as c:
        h = await c.add_host("cl-h", f"{node.agent_server.url}/hosts/cl")
        assert HEX32.match(h["uuid"])
        vm = await c.create_vm("cl-vm", cpu_num=1, memory_size="64M", host_uuid=h["uuid"])
        assert HEX32.match(vm["uuid"])
        assert vm["hostUuid"] == h["uuid"]
        assert (await c.stop_vm(vm["uuid"]))["state"] == "Stopped"
        assert (await c.start_vm(vm["uuid"]))["state"] == "Running"
        with pytest.raises(ZStackError) as err:
            await c.start_vm(vm["uuid"])
        assert err.value.code is ErrorCode.INVALID_STATE
        page = await c.query_vms(name="cl-vm", host_uuid=h["uuid"])
        assert page["total"] == 1
        assert page["inventories"][0]["uuid"] == vm["uuid"]
        once = await c.create_vm("cl-key", cpu_num=1, memory_size="1M", key="one-key")
        twice = await c.create_vm("cl-key", cpu_num=1, memory_size="1M", key="one-key")
        assert once["uuid"] == twice["uuid"]
        assert (await c.query_vms(name="cl-key"))["total"] == 1
        # an ended session is renewed by one new login
        transport = c.transport
        assert isinstance(transport, ZStackTransport)
        old = transport.auth.session
        await zapi_of(node).guard.logout(old)
        assert (await c.destroy_vm(vm["uuid"]))["state"] == "Destroyed"
        assert transport.auth.session != old
    query = parse_call("QueryVmInstance", ["name=cl-key"])
    ok, payload = await run_call(query, [node.http_url], 10)
    assert ok
    assert payload["inventories"][0]["uuid"] == once["uuid"]
    ok, payload = await run_call(query, [node.http_url], 10, password="wrong")
    assert not ok
    assert payload["error"]["code"] == ErrorCode.AUTHENTICATION_ERROR.value


async def test_the_bus_entry_refuses_a_message_without_a_live_session(node: Node) -> None:
    c = RestClient(node.http_url)
    try:
        await c.login()
        guard = zapi_of(node).guard
        seen: list[Request] = []

        async def portal_dispatch(req: Request) -> dict[str, Any]:
            seen.append(req)
            return {"ok": True}

        entry = guarded(portal_dispatch, guard)
        msg = APIQueryVmInstanceMsg()
        for headers in ({}, {SESSION_HEADER: uuid.uuid4().hex}, {SESSION_HEADER: "not-a-session"}):
            with pytest.raises(ZStackError) as err:
                await entry(Request(Envelope.request(msg, ttl_ms=None, headers=headers), msg, None))
            assert err.value.code is ErrorCode.INVALID_SESSION
        assert seen == []
        assert await entry(
            Request(Envelope.request(msg, ttl_ms=None, headers={SESSION_HEADER: c.session_id or ""}), msg, None)
        ) == {"ok": True}
        assert len(seen) == 1
    finally:
        await c.close()


def test_the_builtin_image_and_network_answer_conditions() -> None:
    found = builtins.query(
        [builtins.NO_IMAGE], QuerySpec.from_rest([("q", "name~=zstack-mn-%"), ("q", "system=false")])
    )
    assert [i["uuid"] for i in found["inventories"]] == [builtins.NO_IMAGE_UUID]
    assert builtins.query([builtins.NO_NETWORK], QuerySpec.from_rest([("q", "name!=zstack-mn-no-network")])) == {
        "inventories": []
    }
    assert builtins.query([builtins.NO_NETWORK], QuerySpec.from_rest([("count", "true")])) == {"total": 1}
    for bad in ("size>1", "nosuch=1"):
        with pytest.raises(ZStackError) as err:
            builtins.query([builtins.NO_IMAGE], QuerySpec.from_rest([("q", bad)]))
        assert err.value.code is ErrorCode.INVALID_ARGUMENT


async def test_the_admin_account_is_created_at_start(node: Node) -> None:
    assert node.db is not None
    accounts = AccountRepository(node.db)
    deadline = asyncio.get_running_loop().time() + 5
    while await accounts.check_password("admin", sha512_hex("password")) is None:
        assert asyncio.get_running_loop().time() < deadline, "no admin account 5 s after the start"
        await asyncio.sleep(0.05)
    assert await accounts.check_password("admin", sha512_hex("wrong")) is None


async def test_a_single_resource_by_path_and_old_jobs_expire(node: Node) -> None:
    c = RestClient(node.http_url)
    try:
        vm = await _a_running_vm(c)
        auth = {"Authorization": f"OAuth {c.session_id}"}
        async with httpx.AsyncClient(base_url=f"{node.http_url}/zstack/v1", headers=auth) as h:
            one = (await h.get(f"/vm-instances/{vm}")).json()["inventories"]
            assert [i["uuid"] for i in one] == [vm]
            host = one[0]["hostUuid"]
            assert [i["uuid"] for i in (await h.get(f"/hosts/{host}")).json()["inventories"]] == [host]
            mn = node.uuid.replace("-", "")
            assert [i["uuid"] for i in (await h.get(f"/management-nodes/{mn}")).json()["inventories"]] == [mn]
            assert (await h.get(f"/vm-instances/{uuid.uuid4().hex}")).json() == {"inventories": []}
            bad = await h.get("/vm-instances/not-a-uuid")
            assert bad.status_code == 400
            assert bad.json()["error"]["opaque"]["field"] == "uuid"
        jobs = JobRepository(zapi_of(node).portal.ctx.db)
        job = await _stop_job_of_a_dead_node(zapi_of(node), vm)
        assert await jobs.expire(3600) == 0
        async with jobs.db.begin() as conn:
            await conn.execute(
                update(JOB).where(JOB.c.uuid == job).values(created_at=datetime.now(UTC) - timedelta(days=2))
            )
        assert await jobs.expire(3600) == 1
        assert await jobs.get(job) is None
    finally:
        await c.close()


async def _conditions_on(node: Node) -> None:
    """Conditions whose SQL differs by database: ``like`` on a uuid (stored dashed, matched in the
    32-hex form a client knows) and on a number or a date (refused, not a 5xx); dates compared."""
    c = RestClient(node.http_url)
    try:
        await c.login()
        vm = (await c.call("CreateVmInstance", name="cond-vm", cpuNum=2, memorySize=MB, **NOTHING)).unwrap()
        v = vm["inventory"]["uuid"]

        async def found(*conditions: str) -> list[str]:
            return [i["uuid"] for i in (await c.query("QueryVmInstance", list(conditions))).unwrap()["inventories"]]

        assert await found(f"uuid~={v[:12]}%") == [v]
        assert await found(f"uuid!~={v[:12]}%", "name=cond-vm") == []
        assert await found("name~=cond-%", "createDate>2020-01-02T03:04:05", "cpuNum>=2") == [v]
        assert await found("name=cond-vm", "createDate<2020-01-02") == []
        for bad, field in (
            ("cpuNum~=2%", "cpuNum"),
            ("createDate~=2026%", "createDate"),
            ("createDate>soon", "createDate"),
        ):
            refused = await c.query("QueryVmInstance", [bad])
            assert refused.error is not None
            assert refused.error["status"] == 400, (bad, refused.error)
            assert f'"field":"{field}"' in refused.error["details"], (bad, refused.error)
    finally:
        await c.close()


async def test_conditions_on_sqlite(node: Node) -> None:
    await _conditions_on(node)


@pytest.mark.integration
async def test_conditions_on_postgresql(tmp_path: Path, pg_database: str) -> None:
    async with embedded_node(tmp_path, database_url=pg_database) as n:
        await _conditions_on(n)


async def test_a_job_uuid_given_to_another_request_is_refused(node: Node) -> None:
    c = RestClient(node.http_url)
    try:
        vm = await _a_running_vm(c)
        job = uuid.uuid4().hex
        assert (await c.call("StopVmInstance", job_uuid=job, uuid=vm)).unwrap()["inventory"]["state"] == "Stopped"
        other = await c.call("StartVmInstance", job_uuid=job, uuid=vm)
        assert other.error is not None
        assert other.error["status"] == 409
        assert ErrorCode.DUPLICATE_RESOURCE.value in other.error["details"]
        assert "duplicate job uuid" in other.error["details"]
        now = (await c.query("QueryVmInstance", [f"uuid={vm}"])).unwrap()["inventories"][0]
        assert now["state"] == "Stopped", "the refused start ran"
    finally:
        await c.close()


async def test_a_job_of_a_live_node_is_taken_over_only_once_released(node: Node) -> None:
    c = RestClient(node.http_url)
    try:
        vm = await _a_running_vm(c)
        zapi = zapi_of(node)
        job = uuid.uuid4().hex
        msg = APIStopVmInstanceMsg(uuid=internal_uuid(vm, "uuid"))
        # recorded by this node, which is in the ring, as if its run were still going
        assert await zapi.jobs.jobs.create(
            job, "StopVmInstance", {"type": msg.type_name, "body": msg.to_wire()}, node.uuid, 60
        )
        waiting = await zapi.jobs.poll(job)
        assert waiting is not None
        assert not waiting.done
        assert waiting.attempts == 1, "a live node's job within its lease was taken over"
        assert not await zapi.jobs.jobs.release(job, str(uuid.uuid4())), "another node's lease was released"
        assert await zapi.jobs.jobs.release(job, node.uuid)
        result = await c.poll(f"{node.http_url}/zstack/v1/api-jobs/{job}")
        assert result.unwrap()["inventory"]["state"] == "Stopped"
        finished = await zapi.jobs.jobs.get(job)
        assert finished is not None
        assert finished.attempts == 2
    finally:
        await c.close()


async def test_the_openapi_document_states_the_zstack_api(node: Node) -> None:
    async with httpx.AsyncClient() as h:
        doc = (await h.get(f"{node.http_url}/openapi.json")).json()
    paths = doc["paths"]
    scheme = doc["components"]["securitySchemes"]["zstackSession"]
    assert scheme == {**scheme, "type": "apiKey", "in": "header", "name": "Authorization"}
    assert "ZStackErrorReply" in doc["components"]["schemas"]
    for api in APIS:  # every API of the catalog, at its (normalised) path and method
        op = paths["/zstack/v1" + api.path.replace("{vmInstanceUuid}", "{uuid}")][api.method.lower()]
        assert op["responses"]["202" if api.kind.value == "action" else "200"]
        assert "400" in op["responses"]
        if api.kind.value == "session":
            assert "security" not in op
        else:
            assert op["security"] == [{"zstackSession": []}]
            assert "401" in op["responses"]
    start = paths["/zstack/v1/vm-instances/{uuid}/actions"]["put"]
    (uuid_param,) = (p for p in start["parameters"] if p["in"] == "path")
    assert uuid_param["schema"]["pattern"] == UUID_PATTERN
    bodies = start["requestBody"]["content"]["application/json"]["schema"]["oneOf"]
    assert {"startVmInstance", "stopVmInstance", "rebootVmInstance", "migrateVm"} == {b["required"][0] for b in bodies}
    create = paths["/zstack/v1/vm-instances"]["post"]
    assert create["responses"]["202"]["content"]["application/json"]["schema"]["required"] == ["location"]
    assert "params" in create["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert {"200", "202", "404"} <= set(paths["/zstack/v1/api-jobs/{uuid}"]["get"]["responses"])
    for rpc in ("/zstack/api", "/zstack/api/"):
        assert {"200", "400"} <= set(paths[rpc]["post"]["responses"])
    assert "200" in paths["/zstack/api/result/{uuid}"]["get"]["responses"]


def test_add_kvm_host_takes_one_address_that_makes_a_valid_agent_url() -> None:
    add = BY_NAME["AddKVMHost"]
    ctx = Context(kvm_agent_url="http://{managementIp}:7070/hosts/{managementIp}")
    built = add.build({"name": "h", "managementIp": "10.0.0.7"}, ctx)
    assert isinstance(built, APIAddHostMsg)
    assert built.agent_url == "http://10.0.0.7:7070/hosts/10.0.0.7"
    for params, field in (
        ({"name": "h", "managementIp": "0"}, "managementIp"),
        ({"name": "h", "managementIp": "a b"}, "managementIp"),
        ({"name": "h", "managementIp": "10.0.0.7", "agentUrl": "http://10.0.0.7:7070/"}, "agentUrl"),
    ):
        with pytest.raises(ZStackError) as err:
            add.build(params, ctx)
        assert err.value.code is ErrorCode.INVALID_ARGUMENT
        assert err.value.details["field"] == field, params


async def test_a_session_ended_elsewhere_is_refused_once_its_trust_runs_out(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node trusts a session it found live for RECHECK_S, then reads it again: a logout served by
    another node (here: the row deleted behind this node's back) takes effect by then."""
    monkeypatch.setattr(sessions, "RECHECK_S", 0.2)
    c = RestClient(node.http_url)
    try:
        await c.login()
        session = c.session_id or ""
        guard = zapi_of(node).guard
        assert (await guard.require(session)).uuid == session
        await AccountRepository(zapi_of(node).portal.ctx.db).close_session(session)
        assert (await guard.require(session)).uuid == session, "trusted from memory until RECHECK_S"
        await asyncio.sleep(0.3)
        with pytest.raises(ZStackError) as err:
            await guard.require(session)
        assert err.value.code is ErrorCode.INVALID_SESSION
    finally:
        await c.close()
