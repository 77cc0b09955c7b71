"""Stored replies of idempotent API requests (``message_result``)."""

from __future__ import annotations

from typing import Any

import orjson
from sqlalchemy import delete, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from zstack_mn.db.engine import Database
from zstack_mn.db.models import RESULT_TABLE

RESULT = RESULT_TABLE


OPERATION_PREFIX = "op:"


class ResultRepository:
    """Replies by request id: the portal's (keyed API requests) and the services' completed
    operations (``op:<message id>``), written in the same transaction as the operation's final
    state, so a stale or redelivered copy of a finished operation is answered, never re-applied."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def get(self, request_id: str) -> dict[str, Any] | None:
        async with self.db.begin() as conn:
            return await self.get_in(conn, request_id)

    @staticmethod
    async def get_in(conn: AsyncConnection, request_id: str) -> dict[str, Any] | None:
        """The stored reply, read inside the caller's transaction."""
        row = (await conn.execute(select(RESULT.c.reply).where(RESULT.c.id == request_id))).first()
        return None if row is None else orjson.loads(row.reply)

    async def put(self, request_id: str, reply: dict[str, Any]) -> None:
        try:
            async with self.db.begin() as conn:
                await conn.execute(insert(RESULT).values(id=request_id, reply=orjson.dumps(reply).decode()))
        except IntegrityError:
            pass

    async def expire(self, older_than_s: float) -> int:
        async with self.db.begin() as conn:
            result = await conn.execute(delete(RESULT).where(self.db.older_than(RESULT.c.created_at, older_than_s)))
            return result.rowcount
