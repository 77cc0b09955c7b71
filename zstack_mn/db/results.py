"""Stored replies of idempotent API requests (``message_result``)."""

from __future__ import annotations

import orjson
from sqlalchemy import delete, insert, select
from sqlalchemy.exc import IntegrityError

from zstack_mn.db.engine import Database
from zstack_mn.db.models import MessageResult

RESULT = MessageResult.__table__


class ResultRepository:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def get(self, request_id: str) -> dict | None:
        async with self.db.begin() as conn:
            row = (await conn.execute(select(RESULT.c.reply).where(RESULT.c.id == request_id))).first()
        return None if row is None else orjson.loads(row.reply)

    async def put(self, request_id: str, reply: dict) -> None:
        try:
            async with self.db.begin() as conn:
                await conn.execute(insert(RESULT).values(id=request_id, reply=orjson.dumps(reply).decode()))
        except IntegrityError:
            pass

    async def expire(self, older_than_s: float) -> int:
        async with self.db.begin() as conn:
            result = await conn.execute(delete(RESULT).where(self.db.older_than(RESULT.c.created_at, older_than_s)))
            return result.rowcount
