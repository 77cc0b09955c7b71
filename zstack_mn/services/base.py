"""The Service base class: a name, handlers per message type, start/stop hooks, and the node's
bus, database and ring through a ServiceContext.

Handlers are plain ``async def`` methods tagged with ``@handles(MsgType)``; they stay callable in
tests with fake collaborators. The framework gives every service routing by the ring,
per-resource serial execution, a fencing gate (no resource work while the node cannot prove it
is alive), error replies and metrics.

    class ImageService(Service):
        name = "image"

        @handles(DeleteImageMsg)
        async def delete(self, msg: DeleteImageMsg, req: Request) -> dict: ...

A plug-in package registers ``zstack_mn.services = image = mypkg:ImageService``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, ClassVar, TypeVar

import structlog

from zstack_mn.agent.client import AgentClient
from zstack_mn.bus.cloudbus import CloudBus, Request
from zstack_mn.cluster.ring import LiveRing
from zstack_mn.config import Settings
from zstack_mn.db.engine import Database
from zstack_mn.messages import ErrorCode, Message, ZStackError
from zstack_mn.services.chains import Chains

log = structlog.get_logger(__name__)

ENTRY_POINT_GROUP = "zstack_mn.services"
HANDLES_ATTRIBUTE = "__zstack_handles__"
FENCE_POLL = 0.05
PAUSE_LOG_INTERVAL = 1.0

F = TypeVar("F", bound=Callable[..., Awaitable[dict[str, Any]]])


def handles(msg_type: type[Message]) -> Callable[[F], F]:
    """Tag a method as the handler of ``msg_type``."""

    def tag(fn: F) -> F:
        setattr(fn, HANDLES_ATTRIBUTE, msg_type)
        return fn

    return tag


@dataclass
class ServiceContext:
    """What a service may use of its node."""

    node_uuid: str
    bus: CloudBus
    db: Database
    ring: LiveRing
    settings: Settings
    agents: AgentClient
    is_fenced: Callable[[], bool]
    is_evicted: Callable[[], bool] = lambda: False
    heartbeat_written: Callable[[], Awaitable[None]] = lambda: asyncio.sleep(FENCE_POLL)
    """Returns when the node next writes its heartbeat (what can end a fence)."""
    is_draining: Callable[[str], bool] = lambda node_uuid: False
    """True for a node that left the ring gracefully and is still finishing what it has in flight."""

    def is_working(self, node_uuid: str) -> bool:
        """The node may still act on what it began: in the ring, or draining after a graceful stop."""
        return node_uuid in self.ring.nodes or self.is_draining(node_uuid)


class Service:
    """Base of every service (built-in and plug-in)."""

    name: ClassVar[str] = ""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.chains = Chains()
        self._paused_logged = 0.0
        self._handlers: dict[type[Message], Callable[[Any, Request], Awaitable[dict[str, Any]]]] = {}
        for attr in dir(type(self)):
            fn = getattr(type(self), attr, None)
            msg_type = getattr(fn, HANDLES_ATTRIBUTE, None)
            if msg_type is not None:
                self._handlers[msg_type] = getattr(self, attr)

    @property
    def bus(self) -> CloudBus:
        return self.ctx.bus

    @property
    def db(self) -> Database:
        return self.ctx.db

    async def start(self) -> None:
        """Called once the node is RUNNING (trackers start here)."""

    async def stop(self) -> None:
        """Called before the node closes its bus and database."""

    def on_ring_changed(self) -> None:
        """Called on every ring change; services that track resources recompute here."""

    async def dispatch(self, req: Request) -> dict[str, Any]:
        """Run the handler of ``req``'s message type, serially per resource uuid."""
        handler = self._handlers.get(type(req.message))
        if handler is None:
            raise ZStackError(ErrorCode.NO_HANDLER, f"service {self.name} has no handler for {req.message.type_name}")
        key = req.message.resource_uuid()
        async with self.chains.slot(key):
            if key is not None:
                await self.wait_unfenced(req)
            return await handler(req.message, req)

    async def wait_unfenced(self, req: Request | None = None) -> None:
        """Wait (within the request's deadline) until the node may do resource work."""
        if not self.ctx.is_fenced():
            return
        if self.ctx.is_evicted():
            raise ZStackError(ErrorCode.NODE_FENCED, "this node was evicted from the cluster; retry on another node")
        deadline = req.deadline if req is not None and req.deadline is not None else None
        if deadline is None:
            deadline = time.monotonic() + self.ctx.settings.call_timeout
        now = time.monotonic()
        if now - self._paused_logged > PAUSE_LOG_INTERVAL:
            self._paused_logged = now
            log.warning("resource work paused: node is fenced")
        while self.ctx.is_fenced():
            if self.ctx.is_evicted():
                raise ZStackError(
                    ErrorCode.NODE_FENCED, "this node was evicted from the cluster; retry on another node"
                )
            try:
                async with asyncio.timeout(deadline - time.monotonic()):
                    await self.ctx.heartbeat_written()
            except TimeoutError:
                raise ZStackError(ErrorCode.NODE_FENCED, "this node cannot reach the database; retry later") from None


def plugin_services() -> list[type[Service]]:
    """Service classes installed through the ``zstack_mn.services`` entry-point group."""
    found: list[type[Service]] = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
        except Exception:
            log.exception("plug-in service failed to load", entry_point=ep.name)
            continue
        if isinstance(cls, type) and issubclass(cls, Service) and cls.name:
            found.append(cls)
        else:
            log.error("entry point is not a Service subclass with a name", entry_point=ep.name)
    return found
