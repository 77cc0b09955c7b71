"""Queries: rows in uuid order, ``after`` pages on from a uuid (keyset), the total only when asked
for (``count`` alone, ``replyWithCount`` with the rows), over HTTP on the embedded node; and on
PostgreSQL, every filter the API offers is served by an index in page order (no sort, no scan),
so a page costs the same at any table size (B9 measures it)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import insert, text

from tests.embedded import embedded_node, session_headers
from zstack_mn.db.engine import Database
from zstack_mn.db.models import HOST_TABLE, VM_TABLE
from zstack_mn.db.vms import VmRepository
from zstack_mn.node import Node

pytestmark = pytest.mark.timeout(120)

VMS = 7


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    async with embedded_node(tmp_path) as n:
        yield n


@pytest.fixture
async def http(node: Node) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=node.http_url, timeout=15, headers=await session_headers(node.http_url)
    ) as client:
        for i in range(VMS):
            body = {"params": {"name": f"q{i}", "cpuNum": 1, "memorySize": "64M"}}
            resp = await client.post("/v1/vm-instances", json=body)
            assert resp.status_code == 200, resp.text
        yield client


async def test_after_walks_every_vm_once_in_uuid_order(http: httpx.AsyncClient):
    seen: list[str] = []
    params: dict[str, str | int] = {"limit": 3}
    for _ in range(VMS):
        page = (await http.get("/v1/vm-instances", params=params)).json()
        assert "total" not in page
        uuids = [vm["uuid"] for vm in page["inventories"]]
        seen += uuids
        if len(uuids) < 3:
            break
        params["after"] = uuids[-1]
    assert len(seen) == VMS
    assert seen == sorted(set(seen))


async def test_the_total_comes_only_when_asked_for(http: httpx.AsyncClient):
    assert (await http.get("/v1/vm-instances", params={"count": "true"})).json() == {"total": VMS}
    both = (await http.get("/v1/vm-instances", params={"replyWithCount": "true", "limit": 2})).json()
    assert both["total"] == VMS
    assert len(both["inventories"]) == 2
    named = (await http.get("/v1/vm-instances", params={"name": "q3", "replyWithCount": "true"})).json()
    assert named["total"] == 1
    assert named["inventories"][0]["name"] == "q3"


async def test_filters_by_state_and_host(http: httpx.AsyncClient):
    vms = (await http.get("/v1/vm-instances")).json()["inventories"]
    host = vms[0]["hostUuid"]
    stopped = vms[1]["uuid"]
    resp = await http.put(f"/v1/vm-instances/{stopped}/actions", json={"stopVmInstance": {}})
    assert resp.status_code == 200, resp.text
    running = await http.get("/v1/vm-instances", params={"state": "Running", "hostUuid": host, "count": "true"})
    assert running.json() == {"total": VMS - 1}
    found = (await http.get("/v1/vm-instances", params={"state": "Stopped"})).json()["inventories"]
    assert [vm["uuid"] for vm in found] == [stopped]


@pytest.mark.integration
async def test_keyset_paging_on_postgresql(pg_database: str):
    db = Database(pg_database)
    try:
        await db.migrate()
        host = str(uuid.uuid4())
        await _seed(db, host, 25)
        repo = VmRepository(db)
        total, everything = await repo.query({}, 1000)
        assert total == 25
        walked = []
        after = None
        while True:
            none, page = await repo.query({"host_uuid": host}, 10, after=after, count=False)
            assert none is None
            walked += [vm.uuid for vm in page]
            if len(page) < 10:
                break
            after = page[-1].uuid
        assert walked == sorted(vm.uuid for vm in everything)
    finally:
        await db.close()


PLANNED = [  # the shapes VmRepository.query and HostRepository.query build
    "SELECT * FROM vm_instance ORDER BY uuid LIMIT 100",
    "SELECT * FROM vm_instance WHERE uuid > :after ORDER BY uuid LIMIT 100",
    "SELECT * FROM vm_instance WHERE name = 'vm-3' ORDER BY uuid LIMIT 100",
    "SELECT * FROM vm_instance WHERE state = 'Running' AND uuid > :after ORDER BY uuid LIMIT 100",
    "SELECT * FROM vm_instance WHERE host_uuid = :host ORDER BY uuid LIMIT 100",
    "SELECT * FROM vm_instance WHERE host_uuid = :host AND state = 'Running' AND uuid > :after ORDER BY uuid LIMIT 100",
    "SELECT * FROM host WHERE status = 'Connected' ORDER BY uuid LIMIT 100",
]


@pytest.mark.integration
@pytest.mark.parametrize("statement", PLANNED)
async def test_each_query_shape_is_an_index_scan_in_page_order(pg_database: str, statement: str):
    db = Database(pg_database)
    try:
        await db.migrate()
        host = str(uuid.uuid4())
        await _seed(db, host, 50)
        async with db.begin() as conn:
            await conn.execute(text("SET LOCAL enable_seqscan = off"))
            await conn.execute(text("SET LOCAL enable_sort = off"))
            params = {"after": "0", "host": host}
            plan = "\n".join(r[0] for r in await conn.execute(text(f"EXPLAIN {statement}"), params))
        assert "Index" in plan, plan
        assert "Sort" not in plan, plan
        assert "Seq Scan" not in plan, plan
        assert "Filter:" not in plan, plan  # every condition is an index condition, no row read in vain
    finally:
        await db.close()


async def _seed(db: Database, host: str, count: int) -> None:
    async with db.begin() as conn:
        await conn.execute(
            insert(HOST_TABLE).values(
                uuid=host,
                name="h",
                agent_url="http://127.0.0.1:9/hosts/h",
                state="Enabled",
                status="Connected",
                cpu_total=1000,
                cpu_available=1000,
                memory_total=1 << 40,
                memory_available=1 << 40,
                version=1,
            )
        )
        await conn.execute(
            insert(VM_TABLE),
            [
                {
                    "uuid": str(uuid.uuid4()),
                    "name": f"vm-{i}",
                    "state": "Running",
                    "host_uuid": host,
                    "cpu_num": 1,
                    "memory_size": 1 << 26,
                    "version": 1,
                }
                for i in range(count)
            ],
        )
