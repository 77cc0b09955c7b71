"""Queries on ``vm_instance``: every state change is a compare-and-set on ``version``.

This module and ``zstack_mn.db.vm_transitions`` are the only writers of the table, and only the
VM's owner calls them (the ``vmInstance`` service, inside the VM's chain)."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, NamedTuple

import orjson
from sqlalchemy import RowMapping, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from zstack_mn.db.engine import Database
from zstack_mn.db.hosts import HostRepository
from zstack_mn.db.models import VM_TABLE
from zstack_mn.db.pages import query_page
from zstack_mn.messages.inventory import VmInventory
from zstack_mn.messages.states import VmState

VM = VM_TABLE

KEEPS_HOST = frozenset({VmState.RUNNING, VmState.UNKNOWN})
"""States in which a VM holds capacity on its host (outside an operation)."""


@dataclass(frozen=True, slots=True)
class VmRow:
    """One ``vm_instance`` row, whichever way it was read (a query, a server-side function's
    ``row_to_json``, an op record)."""

    uuid: str
    name: str
    state: VmState
    host_uuid: str | None
    last_host_uuid: str | None
    target_host_uuid: str | None
    cpu_num: int
    memory_size: int
    version: int
    op_id: str | None
    op_node: str | None
    created_at: datetime | str | None
    updated_at: datetime | str | None

    @classmethod
    def of(cls, mapping: RowMapping | Mapping[str, Any]) -> VmRow:
        values = {name: mapping[name] for name in _VM_FIELDS}
        values["state"] = VmState(values["state"])
        return cls(**values)

    @classmethod
    def from_json(cls, raw: str | bytes) -> VmRow:
        return cls.of(orjson.loads(raw))

    @classmethod
    def from_record(cls, raw: str | bytes) -> VmRow:
        """An op record: a row snapshot, or (written before migration 0002) the inventory the
        operation answered, whose row fields it does not hold are left empty."""
        data = orjson.loads(raw)
        if "cpu_num" in data:
            return cls.of(data)
        return cls(
            uuid=data["uuid"],
            name=data["name"],
            state=VmState(data["state"]),
            host_uuid=data.get("hostUuid"),
            last_host_uuid=data.get("lastHostUuid"),
            target_host_uuid=None,
            cpu_num=data["cpuNum"],
            memory_size=data["memorySize"],
            version=0,
            op_id=None,
            op_node=None,
            created_at=data.get("createDate"),
            updated_at=data.get("lastOpDate"),
        )

    def snapshot(self) -> str:
        """The row as JSON: what an op record holds (the same shape PostgreSQL's ``row_to_json`` writes)."""
        return orjson.dumps({name: getattr(self, name) for name in _VM_FIELDS}).decode()


_VM_FIELDS = tuple(f.name for f in fields(VmRow))


def vm_inventory(row: VmRow) -> VmInventory:
    return VmInventory(
        uuid=row.uuid,
        name=row.name,
        state=row.state,
        host_uuid=row.host_uuid,
        last_host_uuid=row.last_host_uuid,
        cpu_num=row.cpu_num,
        memory_size=row.memory_size,
        create_date=row.created_at,
        last_op_date=row.updated_at,
    )


class VmSeen(NamedTuple):
    """What a host tracker reads of a VM before it asks the host's agent."""

    uuid: str
    state: VmState
    version: int
    host_uuid: str | None


class _Refused(Exception):
    """Rolls back a settle whose host could not take the VM."""


class VmRepository:
    def __init__(self, db: Database) -> None:
        self.db = db

    @staticmethod
    async def insert(conn: AsyncConnection, **values: Any) -> None:
        await conn.execute(insert(VM).values(version=1, **values))

    async def get(self, uuid: str) -> VmRow | None:
        async with self.db.begin() as conn:
            return await self.get_in(conn, uuid)

    @staticmethod
    async def get_in(conn: AsyncConnection, uuid: str) -> VmRow | None:
        row = (await conn.execute(select(VM).where(VM.c.uuid == uuid))).first()
        return None if row is None else VmRow.of(row._mapping)

    @staticmethod
    async def cas(conn: AsyncConnection, uuid: str, version: int, **values: Any) -> VmRow | None:
        """Apply ``values`` only if the row is still at ``version`` (bumping it); the new row, or
        None when someone else changed it first."""
        result = await conn.execute(
            update(VM)
            .where(VM.c.uuid == uuid, VM.c.version == version)
            .values(**values, version=version + 1, updated_at=func.now())
            .returning(*VM.c)
        )
        row = result.first()
        return None if row is None else VmRow.of(row._mapping)

    async def settle(self, vm: VmRow, state: VmState, host_uuid: str | None = None) -> VmRow | None:
        """Set ``vm`` (as read, at its version) to ``state`` outside an operation, in one
        transaction: give back every host reservation the new state does not need, and take one
        on a host it now needs and did not hold (a VM found running where it was not placed).
        ``host_uuid``: where a Running or Unknown VM is (default: its current host). None, writing
        nothing, when the VM changed since it was read or that host cannot take it."""
        keep = (host_uuid or vm.host_uuid) if state in KEEPS_HOST else None
        held = {vm.host_uuid, vm.target_host_uuid} - {None}
        values: dict[str, Any] = {"state": state, "host_uuid": keep, "target_host_uuid": None}
        if keep is None:
            values["last_host_uuid"] = vm.host_uuid or vm.last_host_uuid
        try:
            async with self.db.begin() as conn:
                fresh = await self.cas(conn, vm.uuid, vm.version, **values)
                if fresh is None:
                    return None
                new_host = keep if keep not in held else None
                if new_host is not None and not await HostRepository.reserve(
                    conn, new_host, vm.cpu_num, vm.memory_size
                ):
                    raise _Refused
                for other in held - {keep}:
                    await HostRepository.release(conn, other, vm.cpu_num, vm.memory_size)
        except _Refused:
            return None
        return fresh

    async def in_states(self, states: frozenset[VmState], after: str, limit: int) -> list[str]:
        """Uuids of VMs in ``states``, in uuid order after ``after`` (for paging)."""
        async with self.db.begin() as conn:
            rows = await conn.execute(
                select(VM.c.uuid).where(VM.c.state.in_(states), VM.c.uuid > after).order_by(VM.c.uuid).limit(limit)
            )
            return [r.uuid for r in rows]

    async def on_host(self, host_uuid: str, states: frozenset[VmState], after: str, limit: int) -> list[VmSeen]:
        """The VMs on ``host_uuid`` in ``states``, in uuid order after ``after``."""
        async with self.db.begin() as conn:
            rows = await conn.execute(
                select(VM.c.uuid, VM.c.state, VM.c.version, VM.c.host_uuid)
                .where(VM.c.host_uuid == host_uuid, VM.c.state.in_(states), VM.c.uuid > after)
                .order_by(VM.c.uuid)
                .limit(limit)
            )
            return [VmSeen(r.uuid, VmState(r.state), r.version, r.host_uuid) for r in rows]

    async def seen(self, uuids: Collection[str]) -> list[VmSeen]:
        """The VMs among ``uuids`` that exist, wherever they are."""
        if not uuids:
            return []
        async with self.db.begin() as conn:
            rows = await conn.execute(
                select(VM.c.uuid, VM.c.state, VM.c.version, VM.c.host_uuid).where(VM.c.uuid.in_(list(uuids)))
            )
            return [VmSeen(r.uuid, VmState(r.state), r.version, r.host_uuid) for r in rows]

    async def query(
        self,
        filters: dict[str, Any],
        limit: int,
        start: int = 0,
        *,
        after: str | None = None,
        count: bool = True,
        rows: bool = True,
    ) -> tuple[int | None, list[VmInventory]]:
        """A page of VMs: ``zstack_mn.db.pages.query_page``."""
        return await query_page(
            self.db, VM, lambda m: vm_inventory(VmRow.of(m)), filters, limit, start, after=after, count=count, rows=rows
        )
