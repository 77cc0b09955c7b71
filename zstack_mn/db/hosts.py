"""Queries on ``host``. Capacity is reserved with one conditional UPDATE, never read-then-write."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import RowMapping, delete, exists, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from zstack_mn.db.engine import Database
from zstack_mn.db.models import HOST_TABLE, VM_TABLE
from zstack_mn.db.pages import query_page
from zstack_mn.messages.inventory import HostInventory
from zstack_mn.messages.states import HostState, HostStatus, VmState

ENABLED, DISABLED, MAINTENANCE = HostState.ENABLED, HostState.DISABLED, HostState.MAINTENANCE
CONNECTED, DISCONNECTED = HostStatus.CONNECTED, HostStatus.DISCONNECTED
STATUS_CHUNK = 1000
STATE_EVENTS = {"enable": ENABLED, "disable": DISABLED, "maintain": MAINTENANCE}

HOST = HOST_TABLE
VM = VM_TABLE


@dataclass(frozen=True, slots=True)
class HostRow:
    """One ``host`` row."""

    uuid: str
    name: str
    agent_url: str
    state: HostState
    status: HostStatus
    cpu_total: int
    cpu_available: int
    memory_total: int
    memory_available: int
    version: int
    created_at: datetime | None
    updated_at: datetime | None

    @classmethod
    def of(cls, mapping: RowMapping | Mapping[str, Any]) -> HostRow:
        values = {name: mapping[name] for name in _HOST_FIELDS}
        values["state"] = HostState(values["state"])
        values["status"] = HostStatus(values["status"])
        return cls(**values)


_HOST_FIELDS = tuple(f.name for f in fields(HostRow))


def host_inventory(row: HostRow) -> HostInventory:
    return HostInventory(
        uuid=row.uuid,
        name=row.name,
        agent_url=row.agent_url,
        state=row.state,
        status=row.status,
        total_cpu_capacity=row.cpu_total,
        available_cpu_capacity=row.cpu_available,
        total_memory_capacity=row.memory_total,
        available_memory_capacity=row.memory_available,
        create_date=row.created_at,
        last_op_date=row.updated_at,
    )


class HostSeen(NamedTuple):
    """What a tracker reads of a host."""

    uuid: str
    agent_url: str
    status: HostStatus


class HostRepository:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def insert(self, uuid: str, name: str, agent_url: str, cpu: int, memory: int) -> None:
        async with self.db.begin() as conn:
            await conn.execute(
                insert(HOST).values(
                    uuid=uuid,
                    name=name,
                    agent_url=agent_url,
                    state=ENABLED,
                    status=CONNECTED,
                    cpu_total=cpu,
                    cpu_available=cpu,
                    memory_total=memory,
                    memory_available=memory,
                    version=1,
                )
            )

    async def get(self, uuid: str) -> HostRow | None:
        async with self.db.begin() as conn:
            row = (await conn.execute(select(HOST).where(HOST.c.uuid == uuid))).first()
        return None if row is None else HostRow.of(row._mapping)

    async def exists(self, uuid: str) -> bool:
        return await self.get(uuid) is not None

    async def update(self, uuid: str, **values: Any) -> bool:
        async with self.db.begin() as conn:
            result = await conn.execute(
                update(HOST)
                .where(HOST.c.uuid == uuid)
                .values(**values, version=HOST.c.version + 1, updated_at=func.now())
            )
            return result.rowcount == 1

    async def set_status(self, uuid: str, status: HostStatus) -> HostStatus | None:
        """Set the status; returns the previous one (None when the host is gone)."""
        async with self.db.begin() as conn:
            row = (await conn.execute(select(HOST.c.status).where(HOST.c.uuid == uuid))).first()
            if row is None:
                return None
            if row.status != status:
                await conn.execute(
                    update(HOST)
                    .where(HOST.c.uuid == uuid, HOST.c.status == row.status)
                    .values(status=status, version=HOST.c.version + 1, updated_at=func.now())
                )
            return HostStatus(row.status)

    async def delete_if_unused(self, uuid: str) -> bool:
        """Delete the host unless a VM still lives on it; False when refused."""
        in_use = exists().where(VM.c.host_uuid == uuid, VM.c.state != VmState.DESTROYED)
        async with self.db.begin() as conn:
            result = await conn.execute(delete(HOST).where(HOST.c.uuid == uuid, ~in_use))
            return result.rowcount == 1

    @staticmethod
    async def reserve(conn: AsyncConnection, host_uuid: str, cpu: int, memory: int) -> bool:
        """Take capacity atomically; False when the host lacks it or cannot take VMs."""
        result = await conn.execute(
            update(HOST)
            .where(
                HOST.c.uuid == host_uuid,
                HOST.c.state == ENABLED,
                HOST.c.status == CONNECTED,
                HOST.c.cpu_available >= cpu,
                HOST.c.memory_available >= memory,
            )
            .values(cpu_available=HOST.c.cpu_available - cpu, memory_available=HOST.c.memory_available - memory)
        )
        return result.rowcount == 1

    @staticmethod
    async def release(conn: AsyncConnection, host_uuid: str | None, cpu: int, memory: int) -> None:
        if host_uuid is None:
            return
        await conn.execute(
            update(HOST)
            .where(HOST.c.uuid == host_uuid)
            .values(cpu_available=HOST.c.cpu_available + cpu, memory_available=HOST.c.memory_available + memory)
        )

    async def connected_among(self, uuids: list[str]) -> set[str]:
        """Which of ``uuids`` are Connected (read ``STATUS_CHUNK`` at a time)."""
        connected: set[str] = set()
        async with self.db.begin() as conn:
            for i in range(0, len(uuids), STATUS_CHUNK):
                rows = await conn.execute(
                    select(HOST.c.uuid).where(HOST.c.uuid.in_(uuids[i : i + STATUS_CHUNK]), HOST.c.status == CONNECTED)
                )
                connected.update(r.uuid for r in rows)
        return connected

    async def page(self, after: str, limit: int) -> list[HostSeen]:
        """The hosts in uuid order after ``after`` (for trackers paging through many hosts)."""
        async with self.db.begin() as conn:
            rows = await conn.execute(
                select(HOST.c.uuid, HOST.c.agent_url, HOST.c.status)
                .where(HOST.c.uuid > after)
                .order_by(HOST.c.uuid)
                .limit(limit)
            )
            return [HostSeen(r.uuid, r.agent_url, HostStatus(r.status)) for r in rows]

    async def query(
        self,
        filters: dict[str, Any],
        limit: int,
        start: int = 0,
        *,
        after: str | None = None,
        count: bool = True,
        rows: bool = True,
    ) -> tuple[int | None, list[HostInventory]]:
        """A page of hosts: ``zstack_mn.db.pages.query_page``."""
        return await query_page(
            self.db,
            HOST,
            lambda m: host_inventory(HostRow.of(m)),
            filters,
            limit,
            start,
            after=after,
            count=count,
            rows=rows,
        )
