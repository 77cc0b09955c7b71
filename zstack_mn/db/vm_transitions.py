"""A VM's state changes, each one round trip to the database: begin an operation, finish it, create.

On PostgreSQL each is one call of a server-side function (migration 0002) in autocommit mode: the
VM row locked or compared-and-set on its version, the capacity reserved or released on one host,
the op record checked or written, all in the statement's own transaction, so a host row is locked
only from its update to that commit. On SQLite (the embedded node: one process, whose per-VM
chains already serialise each VM) the same steps run in Python inside one transaction.

Both give the same outcomes (``Outcome``); ``tests/test_vm_transitions.py`` runs one set of cases
against both.

    store = vm_transitions(db)
    t = await store.begin(uuid, op_id=..., op_node=..., allowed=..., transient=..., final=..., place=None, only=None)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from zstack_mn.db.engine import Database
from zstack_mn.db.hosts import CONNECTED, ENABLED, HOST, HostRepository
from zstack_mn.db.results import OPERATION_PREFIX, RESULT
from zstack_mn.db.vms import VM, VmRepository, VmRow
from zstack_mn.messages import ErrorCode, ZStackError
from zstack_mn.messages.states import VmState

PLACE_HOST = "host"
PLACE_TARGET = "target"


class Outcome(enum.Enum):
    OK = "ok"
    MISSING = "missing"
    RESUME = "resume"
    FINAL = "final"
    DONE = "done"
    INVALID_STATE = "invalid_state"
    SAME_HOST = "same_host"
    NO_CAPACITY = "no_capacity"
    EXISTS = "exists"
    CONFLICT = "conflict"


@dataclass(frozen=True, slots=True)
class Transition:
    """What a state change did: its outcome, the VM row after it (or as found), the agent URL of
    the VM's host, and the recorded result of the operation when it was already finished."""

    outcome: Outcome
    vm: VmRow | None = None
    agent_url: str | None = None
    recorded: VmRow | None = None
    previous: VmState | None = None


@dataclass(frozen=True, slots=True)
class Finish:
    """The final values of an operation and the host whose capacity it gives back."""

    state: VmState
    host_uuid: str | None
    last_host_uuid: str | None
    target_host_uuid: str | None
    release: str | None


class VmTransitions(Protocol):
    async def begin(
        self,
        uuid: str,
        *,
        op_id: str,
        op_node: str,
        allowed: frozenset[VmState],
        transient: VmState,
        final: VmState,
        place: str | None,
        only: str | None,
    ) -> Transition:
        """Move the VM to ``transient`` for operation ``op_id`` unless it is already in it (RESUME)
        or done (FINAL, DONE); ``place`` reserves capacity on a host for the VM (``host``, when it
        has none) or for a migration (``target``), on ``only`` if given."""

    async def finish(self, vm: VmRow, to: Finish) -> Transition:
        """Transient → final by compare-and-set on ``vm.version``, the release and the op record
        in the same transaction; CONFLICT (with any recorded result) writes nothing."""

    async def create(
        self,
        uuid: str,
        *,
        name: str,
        cpu_num: int,
        memory_size: int,
        only: str | None,
        state: VmState,
        op_id: str,
        op_node: str,
    ) -> Transition:
        """Insert the VM in ``state`` with capacity reserved; EXISTS when the uuid is taken (with
        the recorded result of ``op_id``, when this very create has finished before), also when
        a copy of the same create inserted it a moment before."""


def vm_transitions(db: Database) -> VmTransitions:
    return PostgresVmTransitions(db) if db.is_postgres else SqlVmTransitions(db)


def _row(raw: str | None) -> VmRow | None:
    return None if raw is None else VmRow.from_json(raw)


def _state(raw: str | None) -> VmState | None:
    return None if raw is None else VmState(raw)


def _record(raw: str | None) -> VmRow | None:
    return None if raw is None else VmRow.from_record(raw)


class PostgresVmTransitions:
    """The server-side functions of migration 0002, each one call on the driver (``fetch_row``)."""

    _BEGIN = (
        "SELECT outcome, vm, agent_url, recorded, previous FROM zstack_vm_begin($1, $2, $3, $4, $5, $6, $7, $8, $9)"
    )
    _FINISH = "SELECT outcome, vm, recorded FROM zstack_vm_finish($1, $2, $3, $4, $5, $6, $7, $8)"
    _CREATE = "SELECT outcome, vm, agent_url, recorded FROM zstack_vm_create($1, $2, $3, $4, $5, $6, $7, $8, $9)"

    def __init__(self, db: Database) -> None:
        self.db = db

    async def begin(
        self,
        uuid: str,
        *,
        op_id: str,
        op_node: str,
        allowed: frozenset[VmState],
        transient: VmState,
        final: VmState,
        place: str | None,
        only: str | None,
    ) -> Transition:
        row = await self.db.fetch_row(
            self._BEGIN,
            uuid,
            op_id,
            op_node,
            OPERATION_PREFIX + op_id,
            sorted(str(state) for state in allowed),
            str(transient),
            str(final),
            place,
            only,
        )
        return Transition(
            Outcome(row["outcome"]),
            _row(row["vm"]),
            row["agent_url"],
            _record(row["recorded"]),
            _state(row["previous"]),
        )

    async def finish(self, vm: VmRow, to: Finish) -> Transition:
        assert vm.op_id is not None
        row = await self.db.fetch_row(
            self._FINISH,
            vm.uuid,
            vm.version,
            str(to.state),
            to.host_uuid,
            to.last_host_uuid,
            to.target_host_uuid,
            to.release,
            OPERATION_PREFIX + vm.op_id,
        )
        return Transition(Outcome(row["outcome"]), _row(row["vm"]), None, _record(row["recorded"]))

    async def create(
        self,
        uuid: str,
        *,
        name: str,
        cpu_num: int,
        memory_size: int,
        only: str | None,
        state: VmState,
        op_id: str,
        op_node: str,
    ) -> Transition:
        args = (uuid, name, cpu_num, memory_size, only, str(state), op_id, op_node, OPERATION_PREFIX + op_id)
        try:
            row = await self.db.fetch_row(self._CREATE, *args)
        except IntegrityError:
            try:
                row = await self.db.fetch_row(self._CREATE, *args)
            except IntegrityError:
                raise ZStackError(ErrorCode.DUPLICATE_RESOURCE, f"vm {uuid} already exists", uuid=uuid) from None
        return Transition(Outcome(row["outcome"]), _row(row["vm"]), row["agent_url"], _record(row["recorded"]))


class SqlVmTransitions:
    """The same steps as the server-side functions, in Python, in one transaction (SQLite)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def begin(
        self,
        uuid: str,
        *,
        op_id: str,
        op_node: str,
        allowed: frozenset[VmState],
        transient: VmState,
        final: VmState,
        place: str | None,
        only: str | None,
    ) -> Transition:
        async with self.db.begin() as conn:
            vm = await VmRepository.get_in(conn, uuid)
            if vm is None:
                return Transition(Outcome.MISSING)
            if vm.op_id == op_id and vm.state in (transient, final):
                outcome = Outcome.RESUME if vm.state == transient else Outcome.FINAL
                return Transition(outcome, vm, await _agent_url(conn, vm.host_uuid))
            recorded = await _recorded(conn, OPERATION_PREFIX + op_id)
            if recorded is not None:
                return Transition(Outcome.DONE, vm, None, recorded)
            if vm.state not in allowed:
                return Transition(Outcome.INVALID_STATE, vm)
            values: dict[str, Any] = {"state": transient, "op_id": op_id, "op_node": op_node}
            if place == PLACE_TARGET:
                if only is not None and only == vm.host_uuid:
                    return Transition(Outcome.SAME_HOST, vm)
                placed = await _reserve_host(conn, vm.cpu_num, vm.memory_size, None, only, vm.host_uuid, vm.uuid)
                if placed is None:
                    return Transition(Outcome.NO_CAPACITY, vm)
                values["target_host_uuid"] = placed
            elif place == PLACE_HOST and vm.host_uuid is None:
                placed = await _reserve_host(conn, vm.cpu_num, vm.memory_size, vm.last_host_uuid, only, None, vm.uuid)
                if placed is None:
                    return Transition(Outcome.NO_CAPACITY, vm)
                values["host_uuid"] = placed
            fresh = await _cas(conn, vm, values)
            if fresh is None:
                raise ZStackError(ErrorCode.CONCURRENT_MODIFICATION, f"vm {uuid} changed concurrently; retry")
            return Transition(Outcome.OK, fresh, await _agent_url(conn, fresh.host_uuid), None, vm.state)

    async def finish(self, vm: VmRow, to: Finish) -> Transition:
        assert vm.op_id is not None
        key = OPERATION_PREFIX + vm.op_id
        async with self.db.begin() as conn:
            values = {
                "state": to.state,
                "host_uuid": to.host_uuid,
                "last_host_uuid": to.last_host_uuid,
                "target_host_uuid": to.target_host_uuid,
            }
            fresh = await _cas(conn, vm, values)
            if fresh is None:
                return Transition(Outcome.CONFLICT, None, None, await _recorded(conn, key))
            await HostRepository.release(conn, to.release, fresh.cpu_num, fresh.memory_size)
            if await _recorded(conn, key) is None:
                await conn.execute(insert(RESULT).values(id=key, reply=fresh.snapshot()))
            return Transition(Outcome.OK, fresh)

    async def create(
        self,
        uuid: str,
        *,
        name: str,
        cpu_num: int,
        memory_size: int,
        only: str | None,
        state: VmState,
        op_id: str,
        op_node: str,
    ) -> Transition:
        try:
            async with self.db.begin() as conn:
                found = await VmRepository.get_in(conn, uuid)
                if found is not None:
                    recorded = await _recorded(conn, OPERATION_PREFIX + op_id)
                    return Transition(Outcome.EXISTS, found, None, recorded)
                placed = await _reserve_host(conn, cpu_num, memory_size, None, only, None, uuid)
                if placed is None:
                    return Transition(Outcome.NO_CAPACITY)
                inserted = await conn.execute(
                    insert(VM)
                    .values(
                        uuid=uuid,
                        name=name,
                        state=state,
                        host_uuid=placed,
                        cpu_num=cpu_num,
                        memory_size=memory_size,
                        version=1,
                        op_id=op_id,
                        op_node=op_node,
                    )
                    .returning(*VM.c)
                )
                vm = VmRow.of(inserted.one()._mapping)
                return Transition(Outcome.OK, vm, await _agent_url(conn, placed))
        except IntegrityError:
            raise ZStackError(ErrorCode.DUPLICATE_RESOURCE, f"vm {uuid} already exists", uuid=uuid) from None


async def _cas(conn: AsyncConnection, vm: VmRow, values: dict[str, Any]) -> VmRow | None:
    return await VmRepository.cas(conn, vm.uuid, vm.version, **values)


async def _agent_url(conn: AsyncConnection, host_uuid: str | None) -> str | None:
    if host_uuid is None:
        return None
    return (await conn.execute(select(HOST.c.agent_url).where(HOST.c.uuid == host_uuid))).scalar_one_or_none()


async def _recorded(conn: AsyncConnection, key: str) -> VmRow | None:
    raw = (await conn.execute(select(RESULT.c.reply).where(RESULT.c.id == key))).scalar_one_or_none()
    return _record(raw)


async def _reserve_host(
    conn: AsyncConnection,
    cpu: int,
    memory: int,
    preferred: str | None,
    only: str | None,
    exclude: str | None,
    pivot: str,
) -> str | None:
    """Take capacity on ``only``, else on ``preferred``, else on the first fitting host at or after
    ``pivot`` in uuid order (wrapping around); the host's uuid, or None when none fits."""
    fits = (
        HOST.c.state == ENABLED,
        HOST.c.status == CONNECTED,
        HOST.c.cpu_available >= cpu,
        HOST.c.memory_available >= memory,
    )

    async def take(host_uuid: str) -> bool:
        return await HostRepository.reserve(conn, host_uuid, cpu, memory)

    if only is not None:
        return only if await take(only) else None
    if preferred is not None and preferred != exclude and await take(preferred):
        return preferred
    others = [] if exclude is None else [HOST.c.uuid != exclude]
    for after in (HOST.c.uuid >= pivot, HOST.c.uuid < pivot):
        rows = await conn.execute(select(HOST.c.uuid).where(*fits, *others, after).order_by(HOST.c.uuid).limit(8))
        for (candidate,) in rows.all():
            if await take(candidate):
                return str(candidate)
    return None
