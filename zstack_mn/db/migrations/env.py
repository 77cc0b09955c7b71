"""Alembic environment: runs on a connection handed in by ``zstack_mn.db.migrate`` or, from the
``alembic`` command line, on ``ZSTACK_MN_DATABASE_URL`` (async drivers included)."""

import asyncio
import os

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from zstack_mn.db.models import Base

config = context.config
target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


async def _run_online() -> None:
    from zstack_mn.config import load_settings

    url = os.environ.get("ZSTACK_MN_DATABASE_URL") or load_settings().database_url
    engine = create_async_engine(url)
    async with engine.connect() as conn:
        await conn.run_sync(_run)
        await conn.commit()
    await engine.dispose()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    asyncio.run(_run_online())
