"""The one-round-trip VM state changes: the same cases on SQLite (Python steps) and on PostgreSQL
(the server-side functions of migration 0002), and capacity that never leaks or goes negative
when many creates and stops race on PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from sqlalchemy import insert, select

from zstack_mn.db.engine import Database
from zstack_mn.db.hosts import CONNECTED, DISABLED, ENABLED, HOST
from zstack_mn.db.results import OPERATION_PREFIX, RESULT
from zstack_mn.db.vm_transitions import (
    PLACE_HOST,
    PLACE_TARGET,
    Finish,
    Outcome,
    vm_transitions,
)
from zstack_mn.db.vms import VM, VmRow
from zstack_mn.services import vm_states as s
from zstack_mn.testing import servers

pytestmark = pytest.mark.timeout(120)
GIB = 1 << 30
START, STOP, MIGRATE = s.OPERATIONS["start"], s.OPERATIONS["stop"], s.OPERATIONS["migrate"]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    name = await servers.create_database() if request.param == "postgresql" else None
    url = f"sqlite:///{tmp_path / 't.db'}" if name is None else servers.pg_url(name)
    database = Database(url, pool_size=4, max_overflow=16)
    try:
        await database.migrate()
        yield database
    finally:
        await database.close()
        if name is not None:
            await servers.drop_database(name)


async def add_host(
    db: Database, cpu: int = 8, memory: int = 8 * GIB, *, state: str = ENABLED, host: str | None = None
) -> str:
    host = host or str(uuid.uuid4())
    async with db.begin() as conn:
        await conn.execute(
            insert(HOST).values(
                uuid=host,
                name=host[:8],
                agent_url=f"http://agent/{host}",
                state=state,
                status=CONNECTED,
                cpu_total=cpu,
                cpu_available=cpu,
                memory_total=memory,
                memory_available=memory,
                version=1,
            )
        )
    return host


async def capacity(db: Database, host: str) -> tuple[int, int]:
    async with db.begin() as conn:
        row = (
            await conn.execute(select(HOST.c.cpu_available, HOST.c.memory_available).where(HOST.c.uuid == host))
        ).one()
    return int(row.cpu_available), int(row.memory_available)


async def create(db: Database, *, cpu: int = 1, memory: int = GIB, only: str | None = None, op: str | None = None):
    vm = str(uuid.uuid4())
    return await vm_transitions(db).create(
        vm,
        name="v",
        cpu_num=cpu,
        memory_size=memory,
        only=only,
        state=s.STARTING,
        op_id=op or str(uuid.uuid4()),
        op_node="n1",
    )


async def begin(db: Database, vm: str, op, op_id: str, *, only: str | None = None):
    place = PLACE_TARGET if op is MIGRATE else PLACE_HOST if op is START else None
    return await vm_transitions(db).begin(
        vm,
        op_id=op_id,
        op_node="n1",
        allowed=op.allowed_from,
        transient=op.transient,
        final=op.final,
        place=place,
        only=only,
    )


async def run_to_running(db: Database, created) -> VmRow:
    vm = created.vm
    done = await vm_transitions(db).finish(vm, Finish(s.RUNNING, vm.host_uuid, None, None, None))
    assert done.outcome is Outcome.OK
    assert done.vm is not None
    return done.vm


async def test_create_reserves_on_a_fitting_host_and_refuses_when_full(db: Database):
    host = await add_host(db, cpu=2)
    first = await create(db, cpu=2)
    assert first.outcome is Outcome.OK
    assert first.vm is not None
    assert first.vm.host_uuid == host
    assert first.vm.state == s.STARTING
    assert first.agent_url == f"http://agent/{host}"
    assert await capacity(db, host) == (0, 7 * GIB)
    full = await create(db, cpu=1)
    assert full.outcome is Outcome.NO_CAPACITY
    assert full.vm is None
    assert await capacity(db, host) == (0, 7 * GIB)


async def test_create_skips_hosts_that_cannot_take_vms(db: Database):
    await add_host(db, state=DISABLED)
    enabled = await add_host(db)
    for _ in range(5):
        made = await create(db)
        assert made.vm is not None
        assert made.vm.host_uuid == enabled


async def test_a_repeated_create_finds_the_vm_and_its_recorded_result(db: Database):
    await add_host(db)
    made = await create(db, op="create-1")
    assert made.vm is not None
    running = await run_to_running(db, made)
    again = await vm_transitions(db).create(
        made.vm.uuid, name="v", cpu_num=1, memory_size=GIB, only=None, state=s.STARTING, op_id="create-1", op_node="n2"
    )
    assert again.outcome is Outcome.EXISTS
    assert again.recorded is not None
    assert again.recorded.state == s.RUNNING
    assert again.recorded.version == running.version


async def test_stop_then_start_moves_capacity_and_records_each_operation(db: Database):
    host = await add_host(db)
    running = await run_to_running(db, await create(db))
    stopping = await begin(db, running.uuid, STOP, "stop-1")
    assert stopping.outcome is Outcome.OK
    assert stopping.vm is not None
    assert stopping.vm.state == s.STOPPING
    assert stopping.previous == s.RUNNING
    assert stopping.vm.version == running.version + 1
    stopped = await vm_transitions(db).finish(stopping.vm, Finish(s.STOPPED, None, host, None, host))
    assert stopped.outcome is Outcome.OK
    assert stopped.vm is not None
    assert stopped.vm.host_uuid is None
    assert await capacity(db, host) == (8, 8 * GIB)
    started = await begin(db, running.uuid, START, "start-1")
    assert started.outcome is Outcome.OK
    assert started.vm is not None
    assert started.vm.host_uuid == host
    assert await capacity(db, host) == (7, 7 * GIB)
    async with db.begin() as conn:
        ids = set((await conn.execute(select(RESULT.c.id))).scalars())
    assert OPERATION_PREFIX + "stop-1" in ids


async def test_begin_answers_copies_of_an_operation_without_repeating_it(db: Database):
    host = await add_host(db)
    running = await run_to_running(db, await create(db))
    stopping = await begin(db, running.uuid, STOP, "stop-1")
    assert stopping.vm is not None
    resumed = await begin(db, running.uuid, STOP, "stop-1")
    assert resumed.outcome is Outcome.RESUME
    assert resumed.vm == stopping.vm
    stopped = await vm_transitions(db).finish(stopping.vm, Finish(s.STOPPED, None, host, None, host))
    assert stopped.vm is not None
    assert (await begin(db, running.uuid, STOP, "stop-1")).outcome is Outcome.FINAL
    await begin(db, running.uuid, START, "start-1")
    stale = await begin(db, running.uuid, STOP, "stop-1")
    assert stale.outcome is Outcome.DONE
    assert stale.recorded is not None
    assert stale.recorded.state == s.STOPPED
    assert stale.vm is not None
    assert stale.vm.state == s.STARTING, "a stale copy must not change the VM"


async def test_refusals_change_nothing(db: Database):
    host = await add_host(db, cpu=1)
    running = await run_to_running(db, await create(db))
    invalid = await begin(db, running.uuid, START, "start-again")
    assert invalid.outcome is Outcome.INVALID_STATE
    assert invalid.vm == running
    same = await begin(db, running.uuid, MIGRATE, "migrate-1", only=host)
    assert same.outcome is Outcome.SAME_HOST
    assert same.vm == running
    nowhere = await begin(db, running.uuid, MIGRATE, "migrate-2")
    assert nowhere.outcome is Outcome.NO_CAPACITY
    assert nowhere.vm == running
    missing = await begin(db, str(uuid.uuid4()), STOP, "stop-x")
    assert missing.outcome is Outcome.MISSING
    assert await capacity(db, host) == (0, 7 * GIB)


async def test_migrate_reserves_the_target_and_finish_releases_the_source(db: Database):
    source = await add_host(db)
    target = await add_host(db)
    running = await run_to_running(db, await create(db, only=source))
    migrating = await begin(db, running.uuid, MIGRATE, "migrate-1")
    assert migrating.outcome is Outcome.OK
    assert migrating.vm is not None
    assert migrating.vm.target_host_uuid == target
    assert migrating.agent_url == f"http://agent/{source}"
    assert await capacity(db, target) == (7, 7 * GIB)
    moved = await vm_transitions(db).finish(migrating.vm, Finish(s.RUNNING, target, source, None, source))
    assert moved.vm is not None
    assert moved.vm.host_uuid == target
    assert await capacity(db, source) == (8, 8 * GIB)


async def test_a_finish_that_loses_its_compare_and_set_writes_nothing(db: Database):
    host = await add_host(db)
    running = await run_to_running(db, await create(db))
    stopping = await begin(db, running.uuid, STOP, "stop-1")
    assert stopping.vm is not None
    stale = VmRow.of({**{f: getattr(stopping.vm, f) for f in stopping.vm.__slots__}, "version": running.version})
    lost = await vm_transitions(db).finish(stale, Finish(s.STOPPED, None, host, None, host))
    assert lost.outcome is Outcome.CONFLICT
    assert lost.vm is None
    assert lost.recorded is None
    assert await capacity(db, host) == (7, 7 * GIB), "capacity released by a losing finish"
    async with db.begin() as conn:
        state = (await conn.execute(select(VM.c.state).where(VM.c.uuid == running.uuid))).scalar_one()
    assert state == s.STOPPING


@pytest.mark.integration
async def test_racing_creates_and_stops_never_leak_capacity(pg_database: str):
    """Many creates at once against one small host, some stopped while others are created: the VMs
    placed never exceed the host, and what is free plus what the VMs hold is the host's total."""
    db = Database(pg_database, pool_size=8, max_overflow=8)
    await db.migrate()
    try:
        host = await add_host(db, cpu=40, memory=40 * GIB)
        made = await asyncio.gather(*(create(db) for _ in range(60)))
        placed = [m for m in made if m.outcome is Outcome.OK]
        assert len(placed) == 40
        assert all(m.outcome is Outcome.NO_CAPACITY for m in made if m not in placed)
        running = await asyncio.gather(*(run_to_running(db, m) for m in placed))
        stops = [begin(db, vm.uuid, STOP, f"stop-{i}") for i, vm in enumerate(running[:20])]
        more = [create(db) for _ in range(30)]
        outcomes = await asyncio.gather(*stops, *more)
        stopping = [t.vm for t in outcomes[:20]]
        assert all(vm is not None for vm in stopping)
        await asyncio.gather(
            *(vm_transitions(db).finish(vm, Finish(s.STOPPED, None, host, None, host)) for vm in stopping)
        )
        async with db.begin() as conn:
            held = (await conn.execute(select(VM.c.cpu_num).where(VM.c.host_uuid == host))).scalars().all()
        cpu_free, _ = await capacity(db, host)
        assert cpu_free >= 0
        assert cpu_free + sum(held) == 40
    finally:
        await db.close()


@pytest.mark.integration
async def test_creates_spread_over_many_hosts(pg_database: str):
    """A create starts its search for a host at its own uuid, so creates spread over the hosts in
    proportion to the share of the uuid space in front of each. Hosts spaced evenly (uuids 0…,
    2…, …, e…) each cover 1/8 of it: 200 creates leave none of them empty (a chance of about
    2e-11) and give none more than 60 (expected 25), while a funnel would put them all on one."""
    db = Database(pg_database, pool_size=4, max_overflow=4)
    await db.migrate()
    try:
        spaced = [f"{2 * i:x}0000000-0000-4000-8000-000000000000" for i in range(8)]
        hosts = [await add_host(db, cpu=1000, memory=1000 * GIB, host=h) for h in spaced]
        made = await asyncio.gather(*(create(db) for _ in range(200)))
        per_host = Counter(m.vm.host_uuid for m in made if m.vm is not None)
        assert sum(per_host.values()) == 200
        assert set(per_host) == set(hosts), "some hosts got no VM"
        assert max(per_host.values()) <= 60, f"creates funnelled: {per_host}"
    finally:
        await db.close()


async def test_an_op_record_written_before_the_snapshots_is_still_an_answer(db: Database):
    """Records kept from before migration 0002 hold the inventory the operation answered."""
    host = await add_host(db)
    running = await run_to_running(db, await create(db))
    legacy = {
        "uuid": running.uuid,
        "name": "v",
        "state": s.STOPPED,
        "lastHostUuid": host,
        "cpuNum": 1,
        "memorySize": GIB,
        "createDate": "2026-11-25T10:00:00Z",
        "lastOpDate": "2026-11-25T10:00:01Z",
    }
    async with db.begin() as conn:
        await conn.execute(insert(RESULT).values(id=OPERATION_PREFIX + "old-stop", reply=orjson.dumps(legacy).decode()))
    stale = await begin(db, running.uuid, STOP, "old-stop")
    assert stale.outcome is Outcome.DONE
    assert stale.recorded is not None
    assert stale.recorded.state == s.STOPPED
    assert stale.recorded.last_host_uuid == host
    assert stale.vm == running
