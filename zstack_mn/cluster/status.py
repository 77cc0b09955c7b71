"""`zstack-mn status`: the nodes and whether their rings agree, read from the database."""

from __future__ import annotations

from typing import Any

from zstack_mn.cluster.membership import ring_digest
from zstack_mn.cluster.ring import HashRing
from zstack_mn.db.engine import Database
from zstack_mn.db.nodes import RUNNING, NodeRepository


async def cluster_status(database_url: str) -> dict[str, Any]:
    db = Database(database_url)
    try:
        rows = await NodeRepository(db).list()
    finally:
        await db.close()
    running = [r.uuid for r in rows if r.state == RUNNING]
    expected = ring_digest(HashRing(running))
    share = 1 / len(running) if running else 0.0
    nodes = [
        {
            "uuid": r.uuid,
            "hostName": r.host_name,
            "httpAddress": r.http_address,
            "state": r.state,
            "heartbeatAge": round(max(r.heartbeat_age, 0.0), 3),
            "ringShare": round(share if r.state == RUNNING else 0.0, 4),
            "ringDigest": r.ring_digest,
        }
        for r in rows
    ]
    agree = bool(running) and all(r.ring_digest == expected for r in rows if r.state == RUNNING)
    return {"nodes": nodes, "ringsAgree": agree, "expectedRingDigest": expected}
