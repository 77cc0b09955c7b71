"""A service built on fakes, for unit tests of its handlers: no node, no broker, no agent (nameko's
``worker_factory``). The service gets a ``ServiceContext`` of

* an in-memory SQLite database, migrated (its own per factory);
* a one-node ring holding only this node, and default ``Settings``;
* ``FakeAgents``: an agent client that records every call and answers what the test programmed
  (VM states per agent URL, failures, unreachable agents), with the real agent's once-per-op-id
  and fencing rules;
* ``FakeBus``: records every event published and every message sent or called; a call is
  answered by a responder the test registers, or by another service built on the same fakes;
* ``is_fenced`` and ``is_evicted`` switches, off.

The service is not started: no background loop (tracker, reconciler) runs; a test calls a
handler, or the step a loop would run, itself.

    async with service_factory(VmInstanceService) as f:
        await f.add_host("h1")
        vm = await f.handle(CreateVmInstanceMsg(name="web", cpu_num=1, memory_size=1 << 30))
        [call] = f.agents.vm_ops(vm["uuid"])
        assert call.op == "start"
        assert [e.new_state for e in f.bus.events_of(VmStateChangedEvent)] == ["Starting", "Running"]
        stop = StopVmInstanceMsg(uuid=vm["uuid"])
        await f.service.stop_vm(stop, f.request(stop))      # or the handler itself

``service_factory(HostService, settings=Settings(host_ping_failures=3))`` changes a setting.
"""

from __future__ import annotations

import contextlib
import time
import uuid as uuidlib
from collections import Counter, defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pydantic import BaseModel
from sqlalchemy import Row, select

from zstack_mn.agent.client import AgentClient
from zstack_mn.agent.protocol import (
    OP_APPLIED,
    OP_UNKNOWN,
    VM_DESTROYED,
    VM_RUNNING,
    VM_STOPPED,
    FenceReply,
    HostFacts,
    VmList,
    VmOp,
    VmStatus,
)
from zstack_mn.bus.cloudbus import CloudBus, Request
from zstack_mn.bus.memory import MemoryBroker, MemoryTransport
from zstack_mn.bus.topology import Topology, topic_matches
from zstack_mn.cluster.ring import LiveRing
from zstack_mn.config import Settings
from zstack_mn.db.engine import Database
from zstack_mn.db.hosts import HostRepository
from zstack_mn.db.models import Host, VmInstance
from zstack_mn.messages import Envelope, ErrorCode, Event, Message, ZStackError
from zstack_mn.services.base import Service, ServiceContext

S = TypeVar("S", bound=Service)
E = TypeVar("E", bound=Event)
T = TypeVar("T", bound=BaseModel)

IN_MEMORY_DATABASE = "sqlite+aiosqlite:///:memory:"
FAKE_AGENT_BASE = "http://agent.test/hosts"
DEFAULT_TIMEOUT_S = 10.0
GIB = 1 << 30

Responder = Callable[[Message], Awaitable[dict[str, Any]]]


class Switch:
    """A flag the test flips; the context's ``is_fenced`` / ``is_evicted`` read it."""

    def __init__(self, on: bool = False) -> None:
        self.on = on

    def __call__(self) -> bool:
        return self.on


# ---------------------------------------------------------------- the agent


@dataclass(frozen=True)
class AgentCall:
    """One call the service made to an agent. ``method`` is the ``AgentClient`` method
    (``connect``, ``ping``, ``vm_op``, ``op_state``, ``raise_fence``, ``list_vms``); ``op`` is the
    VM operation of a ``vm_op`` (``start``, ``stop``, ...)."""

    method: str
    agent_url: str
    vm_uuid: str | None = None
    op: str | None = None
    request: VmOp | None = None
    op_id: str | None = None
    fence: int | None = None

    @property
    def name(self) -> str:
        """What ``FakeAgents.fail`` matches: the VM operation, else the method."""
        return self.op or self.method


@dataclass
class _Failure:
    error: ZStackError
    applied: bool


class FakeAgents(AgentClient):
    """An agent client whose agents live in this object.

    ``vms[agent_url][vm_uuid]`` is the VM's state as that agent reports it (``list_vms``); VM
    operations change it as a real agent would (start and reboot: Running, stop: Stopped,
    destroy: gone; migrate keeps the VM under the source URL, since a fence carries a host uuid
    and not a URL). As on a real agent, an op id is applied once (a repeat answers the first
    result and counts no effect: ``effects``), and an operation or fence raise whose fence is
    below the VM's highest is refused (AGENT_ERROR, status 409).

    Program answers with ``fail`` (the next calls of an operation or method raise), ``down``
    (agent URLs that are unreachable) and ``before`` (awaited at the start of every call, after
    it is recorded: it may inspect the database, block on an event, or raise).
    """

    def __init__(self, *, cpu_num: int = 64, memory_size: int = 256 * GIB) -> None:
        # AgentClient.__init__ is not called on purpose: it opens an HTTP session, and every
        # request method is answered here (``_request`` refuses any this class does not fake).
        self.timeout = DEFAULT_TIMEOUT_S
        self.pool_timeout = DEFAULT_TIMEOUT_S
        self.fenced = None
        self.cpu_num = cpu_num
        self.memory_size = memory_size
        self.calls: list[AgentCall] = []
        self.vms: defaultdict[str, dict[str, str]] = defaultdict(dict)
        self.applied: dict[str, VmStatus] = {}
        self.effects: Counter[str] = Counter()
        self.fences: dict[str, int] = {}
        self.down: set[str] = set()
        self.before: Callable[[AgentCall], Awaitable[None]] | None = None
        self._failures: defaultdict[str, deque[_Failure]] = defaultdict(deque)

    def fail(
        self,
        name: str,
        code: ErrorCode = ErrorCode.AGENT_ERROR,
        *,
        times: int = 1,
        applied: bool = False,
        description: str = "injected failure",
    ) -> None:
        """The next ``times`` calls of ``name`` (a VM operation such as ``stop``, or a method such
        as ``ping``) raise ``code``; with ``applied``, a VM operation takes effect first (the
        agent applied it and the answer was lost)."""
        for _ in range(times):
            self._failures[name].append(_Failure(ZStackError(code, f"{name}: {description}"), applied))

    def calls_of(self, name: str) -> list[AgentCall]:
        """The calls of a VM operation or a method, in order."""
        return [c for c in self.calls if c.name == name]

    def vm_ops(self, vm_uuid: str | None = None) -> list[AgentCall]:
        """The VM operations sent (about ``vm_uuid``), in order."""
        return [c for c in self.calls if c.method == "vm_op" and vm_uuid in (None, c.vm_uuid)]

    def state_of(self, vm_uuid: str) -> str | None:
        """The VM's state on whichever agent has it; None when none does."""
        return next((vms[vm_uuid] for vms in self.vms.values() if vm_uuid in vms), None)

    async def close(self) -> None:
        return None

    async def _request(
        self, method: str, url: str, model: type[T] | None, body: BaseModel | None = None, *, vm_op: bool = False
    ) -> T | None:
        raise AssertionError(f"FakeAgents does not fake {method} {url}: add the AgentClient method to it")

    async def _enter(self, call: AgentCall) -> _Failure | None:
        """Record the call, run ``before``, and raise for an unreachable agent; returns the failure
        programmed for this call, if any (a VM operation applies it after its effect)."""
        self.calls.append(call)
        if self.before is not None:
            await self.before(call)
        if call.agent_url in self.down:
            raise ZStackError(ErrorCode.AGENT_UNREACHABLE, f"agent {call.agent_url} unreachable (FakeAgents.down)")
        queued = self._failures.get(call.name)
        return queued.popleft() if queued else None

    async def _simple(self, call: AgentCall) -> None:
        failure = await self._enter(call)
        if failure is not None:
            raise failure.error

    async def connect(self, agent_url: str) -> HostFacts:
        await self._simple(AgentCall("connect", agent_url))
        host_id = agent_url.rstrip("/").rsplit("/", 1)[-1]
        return HostFacts(
            host_id=host_id, hostname=f"fake-{host_id}", cpu_num=self.cpu_num, memory_size=self.memory_size
        )

    async def ping(self, agent_url: str) -> None:
        await self._simple(AgentCall("ping", agent_url))

    async def list_vms(self, agent_url: str) -> VmList:
        await self._simple(AgentCall("list_vms", agent_url))
        return VmList(vms=[VmStatus(uuid=u, state=s) for u, s in self.vms[agent_url].items()])

    async def op_state(self, agent_url: str, op_id: str) -> str:
        await self._simple(AgentCall("op_state", agent_url, op_id=op_id))
        return OP_APPLIED if op_id in self.applied else OP_UNKNOWN

    async def raise_fence(self, agent_url: str, vm_uuid: str, fence: int, op_id: str | None = None) -> FenceReply:
        await self._simple(AgentCall("raise_fence", agent_url, vm_uuid, op_id=op_id, fence=fence))
        self._admit(vm_uuid, fence)
        where = next((url for url, vms in self.vms.items() if vm_uuid in vms), None)
        return FenceReply(
            vm_uuid=vm_uuid,
            fence=fence,
            op_id=op_id,
            op_state=None if op_id is None else OP_APPLIED if op_id in self.applied else OP_UNKNOWN,
            vm_state=None if where is None else self.vms[where][vm_uuid],
            host_id=None if where is None else where.rstrip("/").rsplit("/", 1)[-1],
        )

    async def vm_op(self, agent_url: str, vm_uuid: str, op: str, req: VmOp) -> VmStatus:
        call = AgentCall("vm_op", agent_url, vm_uuid, op, req, req.op_id, req.fence)
        failure = await self._enter(call)
        if failure is not None and not failure.applied:
            raise failure.error
        self._admit(vm_uuid, req.fence)
        status = self._apply(agent_url, vm_uuid, op, req.op_id)
        if failure is not None:
            raise failure.error
        return status

    def _admit(self, vm_uuid: str, fence: int) -> None:
        held = self.fences.get(vm_uuid, 0)
        if fence < held:
            raise ZStackError(
                ErrorCode.AGENT_ERROR,
                f"agent error 409: stale fence {fence} for vm {vm_uuid} (holds {held})",
                status=409,
            )
        self.fences[vm_uuid] = fence

    def _apply(self, agent_url: str, vm_uuid: str, op: str, op_id: str) -> VmStatus:
        if op_id in self.applied:
            return self.applied[op_id]
        here = self.vms[agent_url]
        if op in ("start", "reboot", "migrate"):
            here[vm_uuid] = VM_RUNNING
            state = VM_RUNNING
        elif op == "stop":
            if vm_uuid in here:
                here[vm_uuid] = VM_STOPPED
            state = VM_STOPPED
        elif op == "destroy":
            for vms in self.vms.values():
                vms.pop(vm_uuid, None)
            state = VM_DESTROYED
        else:
            raise ZStackError(ErrorCode.AGENT_ERROR, f"agent error 404: unknown operation {op}", status=404)
        status = VmStatus(uuid=vm_uuid, state=state)
        self.applied[op_id] = status
        self.effects[op_id] += 1
        return status


# ---------------------------------------------------------------- the bus


class FakeBus(CloudBus):
    """A bus that sends nothing anywhere: ``events`` holds what was published, ``sent`` every
    message sent or called, in order. A call or send is answered by the responder registered for
    its type (``answer``), else by the service registered for its service name (``route_to``,
    through that service's ``dispatch``: chains and fencing included); a call with neither fails
    with NO_ROUTE. A send's ZStackError (its handler refused it) is kept in ``send_errors``, as
    the sender of a real send never sees it. Published events also reach ``subscribe``rs."""

    def __init__(self, node_uuid: str, ring: LiveRing) -> None:
        self._memory_url = f"memory://fake-bus-{uuidlib.uuid4().hex}"
        super().__init__(node_uuid, MemoryTransport(self._memory_url), Topology(), ring=ring)
        self.events: list[Event] = []
        self.sent: list[Message] = []
        self.send_errors: list[tuple[Message, ZStackError]] = []
        self._responders: dict[type[Message], Responder] = {}
        self._routes: dict[str, Service] = {}

    def answer(self, msg_type: type[Message], responder: Responder) -> None:
        """Answer every call and send of ``msg_type`` with ``responder(msg)`` (its reply body, or
        a ZStackError it raises)."""
        self._responders[msg_type] = responder

    def route_to(self, service: Service) -> None:
        """Hand every message for ``service.name`` to ``service`` (built on the same fakes, or not)."""
        self._routes[service.name] = service

    def events_of(self, event_type: type[E]) -> list[E]:
        return [e for e in self.events if isinstance(e, event_type)]

    def sent_of(self, msg_type: type[Message]) -> list[Message]:
        return [m for m in self.sent if isinstance(m, msg_type)]

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        MemoryBroker.reset(self._memory_url)

    async def publish(self, event: Event) -> None:
        self.events.append(event)
        for pattern, handler in list(self._subscribers):
            if topic_matches(pattern, event.topic()):
                await handler(event)

    async def send(self, msg: Message, *, ttl: float | None = None) -> None:
        self.sent.append(msg)
        try:
            await self._answer(msg, Envelope.request(msg, ttl_ms=None), ttl)
        except ZStackError as exc:
            self.send_errors.append((msg, exc))

    async def call_envelope(
        self,
        msg: Message,
        *,
        timeout: float | None = None,
        msg_id: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Envelope:
        self.sent.append(msg)
        timeout = self.limits.call_timeout if timeout is None else timeout
        env = Envelope.request(
            msg, ttl_ms=int(timeout * 1000), reply_to=self.reply_queue, msg_id=msg_id, headers=headers
        )
        assert env.correlation_id is not None
        try:
            body = await self._answer(msg, env, timeout)
        except ZStackError as exc:
            if exc.code is ErrorCode.NO_ROUTE and not self._has_route(msg):
                raise
            return Envelope.reply_error(env.correlation_id, exc, self.node_uuid)
        return Envelope.reply_ok(env.correlation_id, body, self.node_uuid)

    def _has_route(self, msg: Message) -> bool:
        return type(msg) in self._responders or msg.SERVICE in self._routes

    async def _answer(self, msg: Message, env: Envelope, timeout: float | None) -> dict[str, Any]:
        responder = self._responders.get(type(msg))
        if responder is not None:
            return await responder(msg)
        service = self._routes.get(msg.SERVICE)
        if service is None:
            raise ZStackError(ErrorCode.NO_ROUTE, f"FakeBus: no responder or service for {msg.type_name}")
        deadline = None if timeout is None else time.monotonic() + timeout
        return await service.dispatch(Request(env, msg, deadline))


# ---------------------------------------------------------------- the factory


@dataclass
class Fakes(Generic[S]):
    """A service on fakes, and the fakes, typed for the test to program and inspect."""

    service: S
    ctx: ServiceContext
    db: Database
    agents: FakeAgents
    bus: FakeBus
    ring: LiveRing
    fenced: Switch
    evicted: Switch
    hosts: dict[str, str] = field(default_factory=dict)
    """Host uuid by name, for the hosts ``add_host`` made."""

    def request(
        self,
        msg: Message,
        *,
        msg_id: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        headers: dict[str, str] | None = None,
    ) -> Request:
        """The ``Request`` a handler is called with, as the bus would make it for ``msg``."""
        env = Envelope.request(msg, ttl_ms=int(timeout * 1000), msg_id=msg_id, headers=headers)
        return Request(env, msg, time.monotonic() + timeout)

    async def handle(
        self,
        msg: Message,
        *,
        msg_id: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        headers: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Run ``msg`` through the service's ``dispatch`` (per-resource chain, fencing gate), as
        the bus delivers it; a handler method can also be called directly with ``request``."""
        return await self.service.dispatch(self.request(msg, msg_id=msg_id, timeout=timeout, headers=headers))

    async def add_host(
        self, name: str = "h1", *, cpu: int = 8, memory: int = 8 * GIB, agent_url: str | None = None
    ) -> str:
        """Insert a Connected, Enabled host whose agent is ``agent_url`` (default: a URL of
        ``FakeAgents``, ``http://agent.test/hosts/<name>``); returns its uuid."""
        host = str(uuidlib.uuid4())
        await HostRepository(self.db).insert(host, name, agent_url or agent_url_of(name), cpu, memory)
        self.hosts[name] = host
        return host

    async def vm_row(self, vm_uuid: str) -> Row[Any] | None:
        """The VM's ``vm_instance`` row as stored now."""
        table = VmInstance.__table__
        async with self.db.begin() as conn:
            return (await conn.execute(select(table).where(table.c.uuid == vm_uuid))).first()

    async def host_row(self, host_uuid: str) -> Row[Any] | None:
        """The host's ``host`` row as stored now."""
        table = Host.__table__
        async with self.db.begin() as conn:
            return (await conn.execute(select(table).where(table.c.uuid == host_uuid))).first()


def agent_url_of(host_name: str) -> str:
    """The fake agent URL of a host added by ``Fakes.add_host``."""
    return f"{FAKE_AGENT_BASE}/{host_name}"


@contextlib.asynccontextmanager
async def service_factory(
    service_class: type[S],
    *,
    node_uuid: str | None = None,
    settings: Settings | None = None,
    db: Database | None = None,
    agents: FakeAgents | None = None,
) -> AsyncIterator[Fakes[S]]:
    """``service_class`` built on fakes (see the module docstring). ``settings``, ``db`` and
    ``agents`` replace the defaults; a database given here is neither migrated nor closed (for a
    file or PostgreSQL database: the in-memory one is a single connection, so transactions of
    handlers run concurrently interleave on it)."""
    me = node_uuid or str(uuidlib.uuid4())
    ring = LiveRing(me, [me])
    database = db or Database(IN_MEMORY_DATABASE)
    bus = FakeBus(me, ring)
    fake_agents = agents or FakeAgents()
    fenced, evicted = Switch(), Switch()
    try:
        if db is None:
            await database.migrate()
        ctx = ServiceContext(
            node_uuid=me,
            bus=bus,
            db=database,
            ring=ring,
            settings=settings or Settings(),
            agents=fake_agents,
            is_fenced=fenced,
            is_evicted=evicted,
        )
        service = service_class(ctx)
        try:
            yield Fakes(service, ctx, database, fake_agents, bus, ring, fenced, evicted)
        finally:
            await service.stop()
    finally:
        await bus.close()
        if db is None:
            await database.close()
