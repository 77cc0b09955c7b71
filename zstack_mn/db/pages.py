"""One page of a resource query, the same for every table: rows equal to flat filters, in uuid
order, after a uuid (keyset: through the primary key, whatever the depth) and/or skipping
``start``; the total counted only when asked, since it is the one part whose cost grows with the
table."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import RowMapping, Table, and_, func, select, true

from zstack_mn.db.engine import Database

T = TypeVar("T")


async def query_page(
    db: Database,
    table: Table,
    inventory: Callable[[RowMapping], T],
    filters: dict[str, Any],
    limit: int,
    start: int = 0,
    *,
    after: str | None = None,
    count: bool = True,
    rows: bool = True,
) -> tuple[int | None, list[T]]:
    """(the total of every match, or None when ``count`` is false; ``limit`` rows after
    ``after``, skipping ``start``, as ``inventory`` makes them, or none when ``rows`` is false)."""
    cond = and_(*[table.c[k] == v for k, v in filters.items()]) if filters else true()
    total: int | None = None
    found: list[T] = []
    async with db.begin() as conn:
        if count:
            total = int((await conn.execute(select(func.count()).select_from(table).where(cond))).scalar_one())
        if rows:
            page = select(table).where(cond)
            if after is not None:
                page = page.where(table.c.uuid > after)
            result = await conn.execute(page.order_by(table.c.uuid).limit(limit).offset(start))
            found = [inventory(r._mapping) for r in result]
    return total, found
