"""The API portal: every API message, from the shared ``api.portal`` queue or from this node's
HTTP gateway, is validated here and routed on by the ring. A client never needs the ring.

Idempotency: a request that carries a client key (``Idempotency-Key`` over HTTP, the envelope's
``idempotencyKey`` header over AMQP) gets a message id derived from the key, so every node turns
the same key into the same id, and a retry racing the first attempt is applied once (resource
uuids and operation ids derive from the same id). The first successful reply is stored and
returned to any retry, except where the handler records the outcome itself (``RECORDS_OUTCOME``:
VM operations, whose op record is that reply).
"""

from __future__ import annotations

import uuid as uuidlib
from typing import Any

import structlog

from zstack_mn.bus.cloudbus import Request
from zstack_mn.db.hosts import HostRepository
from zstack_mn.db.nodes import NodeRepository
from zstack_mn.db.results import ResultRepository
from zstack_mn.db.vms import VmRepository
from zstack_mn.messages import ErrorCode, Message, ZStackError
from zstack_mn.messages.api import (
    ACTION_APIS,
    APIQueryHostMsg,
    APIQueryManagementNodeMsg,
    APIQueryVmInstanceMsg,
)
from zstack_mn.messages.ids import IDEMPOTENCY_HEADER, request_id_for_key, resource_uuid_for
from zstack_mn.messages.inventory import ManagementNodeInventory
from zstack_mn.messages.names import API_SERVICE
from zstack_mn.periodic import Periodic
from zstack_mn.services.base import Service, ServiceContext

log = structlog.get_logger(__name__)

RESULT_RETENTION_S = 24 * 3600
RESULT_SWEEP_INTERVAL_S = 600
LOCAL_ID_ATTEMPTS = 64


class ApiPortal(Service):
    name = API_SERVICE

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self.results = ResultRepository(ctx.db)
        self.hosts = HostRepository(ctx.db)
        self.vms = VmRepository(ctx.db)
        self.nodes = NodeRepository(ctx.db)
        self._sweeper = Periodic("result-sweeper", self._sweep, RESULT_SWEEP_INTERVAL_S, first_run_delayed=True)

    async def start(self) -> None:
        self._sweeper.start()

    async def stop(self) -> None:
        await self._sweeper.stop()

    async def _sweep(self) -> None:
        """Forget stored replies older than RESULT_RETENTION_S (a retry after a day is a new request)."""
        removed = await self.results.expire(RESULT_RETENTION_S)
        if removed:
            log.info("expired stored replies", removed=removed)

    async def dispatch(self, req: Request) -> dict[str, Any]:
        key = req.envelope.headers.get(IDEMPOTENCY_HEADER)
        request_id = request_id_for_key(key) if key else req.envelope.id
        body, handled_by = await self.handle(
            req.message, request_id=request_id, keyed=bool(key), timeout=req.time_left()
        )
        req.handled_by = handled_by
        return body

    async def handle(
        self, msg: Message, *, request_id: str, keyed: bool, timeout: float | None
    ) -> tuple[dict[str, Any], str]:
        """Answer one API message: (reply body, uuid of the node that handled it)."""
        if isinstance(msg, APIQueryVmInstanceMsg | APIQueryHostMsg | APIQueryManagementNodeMsg):
            return await self.query(msg), self.ctx.node_uuid
        if type(msg) not in ACTION_APIS or msg.TARGET is None:
            raise ZStackError(ErrorCode.NO_HANDLER, f"{msg.type_name} is not an API message")
        store = keyed and not msg.TARGET.RECORDS_OUTCOME
        if store:
            stored = await self.results.get(request_id)
            if stored is not None:
                return stored["body"], stored["handledBy"]
        inner = _with_resource_uuid(_as_target(msg, msg.TARGET), request_id)
        reply = await self.bus.call_envelope(inner, timeout=timeout, msg_id=request_id)
        if not reply.ok:
            assert reply.error is not None
            raise ZStackError.from_info(reply.error)
        body = {"inventory": reply.body}
        handled_by = reply.handled_by or self.ctx.node_uuid
        if store:
            await self.results.put(request_id, {"body": body, "handledBy": handled_by})
        return body, handled_by

    def new_request_id(self, msg: Message) -> str:
        """A fresh id for a request without an idempotency key. For a creational message it is one
        whose derived resource uuid this node owns, so the work stays in this process (no hop);
        a retry of such a request is a new request anyway, since nothing ties it to this one."""
        request_id = str(uuidlib.uuid4())
        target = msg.TARGET
        field = target.RESOURCE_FIELD if target is not None else None
        if field is None or getattr(msg, field, None) is not None or len(self.ctx.ring.nodes) < 2:
            return request_id
        for _ in range(LOCAL_ID_ATTEMPTS):
            if self.ctx.ring.is_mine(resource_uuid_for(request_id)):
                return request_id
            request_id = str(uuidlib.uuid4())
        return request_id

    async def query(self, msg: Message) -> dict[str, Any]:
        if isinstance(msg, APIQueryVmInstanceMsg | APIQueryHostMsg):
            repo = self.vms if isinstance(msg, APIQueryVmInstanceMsg) else self.hosts
            total, rows = await repo.query(
                msg.filters(), msg.limit, msg.start, after=msg.after, count=msg.counted, rows=not msg.count
            )
            return msg.reply(total, rows)
        assert isinstance(msg, APIQueryManagementNodeMsg)
        nodes = await self.management_nodes()
        if msg.uuid:
            nodes = [n for n in nodes if n.uuid == msg.uuid]
        page = nodes[msg.start : msg.start + msg.limit]
        return {"total": len(nodes), "inventories": [n.to_wire() for n in page]}

    async def management_nodes(self) -> list[ManagementNodeInventory]:
        rows = await self.nodes.list()
        ring = self.ctx.ring.nodes
        share = 1 / len(ring) if ring else 0.0
        return [
            ManagementNodeInventory(
                uuid=r.uuid,
                host_name=r.host_name,
                http_address=r.http_address,
                state=r.state,
                heartbeat_age=round(max(r.heartbeat_age, 0.0), 3),
                ring_share=round(share if r.uuid in ring else 0.0, 4),
                ring_digest=r.ring_digest,
            )
            for r in rows
        ]


def _as_target(msg: Message, target: type[Message]) -> Message:
    """The service message an API message stands for, without validating again: the API twin
    has the same fields, already validated."""
    return target.model_construct(msg.model_fields_set, **{name: getattr(msg, name) for name in target.model_fields})


def _with_resource_uuid(msg: Message, request_id: str) -> Message:
    """A creational message (its resource field left empty) gets the uuid derived from the
    request id, so every copy and retry of one request is routed to the same owner."""
    field = msg.RESOURCE_FIELD
    if field is None or getattr(msg, field) is not None:
        return msg
    return msg.model_copy(update={field: resource_uuid_for(request_id)})
