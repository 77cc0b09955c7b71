"""Queries on ``vm_instance``: every state change is a compare-and-set on ``version``."""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from zstack_mn.db.engine import Database
from zstack_mn.db.models import Host, VmInstance
from zstack_mn.messages.inventory import VmInventory

VM = VmInstance.__table__
HOST = Host.__table__


def vm_inventory(row: Any) -> VmInventory:
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


class VmRepository:
    def __init__(self, db: Database) -> None:
        self.db = db

    @staticmethod
    async def insert(conn: AsyncConnection, **values: Any) -> None:
        await conn.execute(insert(VM).values(version=1, **values))

    async def get(self, uuid: str) -> Any | None:
        async with self.db.begin() as conn:
            return await self.get_in(conn, uuid)

    @staticmethod
    async def get_in(conn: AsyncConnection, uuid: str) -> Any | None:
        return (await conn.execute(select(VM).where(VM.c.uuid == uuid))).first()

    @staticmethod
    async def cas(conn: AsyncConnection, uuid: str, version: int, **values: Any) -> Any | None:
        """Apply ``values`` only if the row is still at ``version`` (bumping it); the new row, or
        None when someone else changed it first."""
        result = await conn.execute(
            update(VM)
            .where(VM.c.uuid == uuid, VM.c.version == version)
            .values(**values, version=version + 1, updated_at=func.now())
            .returning(*VM.c)
        )
        return result.first()

    async def seconds_since_change(self, uuid: str) -> float | None:
        """Seconds (database clock) since the row last changed; None when there is no row."""
        async with self.db.begin() as conn:
            row = (await conn.execute(select(self.db.age_seconds(VM.c.updated_at)).where(VM.c.uuid == uuid))).first()
        return None if row is None else float(row[0])

    async def in_states(self, states: tuple[str, ...], after: str, limit: int) -> list[Any]:
        async with self.db.begin() as conn:
            rows = await conn.execute(
                select(VM.c.uuid).where(VM.c.state.in_(states), VM.c.uuid > after).order_by(VM.c.uuid).limit(limit)
            )
            return list(rows)

    async def query(self, filters: dict[str, Any], limit: int, start: int) -> tuple[int, list[VmInventory]]:
        cond = and_(*[getattr(VM.c, k) == v for k, v in filters.items()]) if filters else True
        async with self.db.begin() as conn:
            total = (await conn.execute(select(func.count()).select_from(VM).where(cond))).scalar_one()
            rows = await conn.execute(
                select(VM).where(cond).order_by(VM.c.created_at, VM.c.uuid).limit(limit).offset(start)
            )
            return int(total), [vm_inventory(r) for r in rows]
