"""A management node: the one object that owns a node's parts and starts and stops them in order.

    async with Node(settings) as node:      # started, RUNNING, serving
        await node.wait()                   # until shutdown() or eviction
    # or: exit_code = await Node(settings).run()   (what `zstack-mn start` does)

Start: uuid4 → database (migrations under a lock) → bus connection → liveness lock + row JOINING →
reply/event queues → service queues and the API queue → RUNNING + *joined* → heartbeat →
service trackers → HTTP.

Stop (``shutdown``, idempotent, safe before start), in this order so that the node's VMs are
served by their new owners from the first moment, a handler never runs on a closed pool, and
nothing queued is lost: HTTP stops accepting (its requests in progress go on) → stop consuming → LEAVING, out of every ring (peers
route new work to the new owners, and leave what this node has in flight to it) → re-route what is
queued for us → wait for in-flight handlers (bounded by ``drain_timeout``) → stop trackers →
re-route again → delete our row → close the bus, agents, database. Queued work that no node can
take (the last node is stopping) is refused to its callers with a retryable error.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid as uuidlib
from collections.abc import Callable
from typing import Any

import structlog

from zstack_mn.agent.client import AgentClient
from zstack_mn.agent.simulator import SimulatedAgent
from zstack_mn.agent.simulator import create_app as create_agent_app
from zstack_mn.bus.amqp import AmqpTransport
from zstack_mn.bus.cloudbus import BusLimits, CloudBus
from zstack_mn.bus.memory import MemoryTransport
from zstack_mn.bus.topology import Topology
from zstack_mn.bus.transport import Transport
from zstack_mn.cluster.membership import Membership
from zstack_mn.cluster.rescue import rescue_queues
from zstack_mn.cluster.ring import HashRing, LiveRing
from zstack_mn.config import Settings
from zstack_mn.db.engine import Database
from zstack_mn.db.hosts import HostRepository
from zstack_mn.file_limit import files_needed, raise_file_limit
from zstack_mn.logging import bind_node
from zstack_mn.messages import ErrorCode, ZStackError
from zstack_mn.messages.host import AddHostMsg
from zstack_mn.messages.names import API_SERVICE
from zstack_mn.metrics import NodeMetrics
from zstack_mn.services.api_portal import ApiPortal
from zstack_mn.services.base import Service, ServiceContext, plugin_services
from zstack_mn.services.host import HostService
from zstack_mn.services.vm_instance import VmInstanceService
from zstack_mn.web.api import create_app
from zstack_mn.web.server import EmbeddedServer
from zstack_mn.web.zstack.sessions import SessionGuard, guarded

log = structlog.get_logger(__name__)

BUILTIN_SERVICES: tuple[type[Service], ...] = (HostService, VmInstanceService)
EXIT_OK, EXIT_EVICTED = 0, 3
REJOIN_FIRST_DELAY_S, REJOIN_MAX_DELAY_S = 1.0, 30.0
DEFAULT_HOST_NAME = "default-host"
EMBEDDED_HOST_ID = "embedded"


def make_transport(settings: Settings, topology: Topology, name: str) -> Transport:
    if settings.broker_url.startswith("memory://"):
        return MemoryTransport(settings.broker_url, topology.dead_letter_queue)
    if settings.broker_url.startswith(("amqp://", "amqps://")):
        return AmqpTransport(
            settings.broker_url,
            topology,
            publish_timeout=settings.publish_timeout,
            connection_name=name,
            heartbeat=settings.amqp_heartbeat,
            queue_type=settings.queue_type,
        )
    raise ZStackError(
        ErrorCode.INVALID_ARGUMENT, f"broker_url: unsupported scheme in {settings.broker_url.split('://')[0]}://"
    )


class Node:
    """One management node process (or several in one loop, for tests)."""

    def __init__(self, settings: Settings, *, extra_services: tuple[type[Service], ...] = ()) -> None:
        self.settings = settings
        self.extra_services = extra_services
        self.topology = Topology(settings.queue_prefix)
        self._operator_stop = asyncio.Event()
        self._clear()

    def _clear(self) -> None:
        """The state of one run, from start to shutdown; a rejoin begins from a clear one."""
        self.uuid = ""
        self.metrics = NodeMetrics()
        self.db: Database | None = None
        self.transport: Transport | None = None
        self.bus: CloudBus | None = None
        self.ring: LiveRing | None = None
        self.membership: Membership | None = None
        self.agents: AgentClient | None = None
        self.services: list[Service] = []
        self.portal: ApiPortal | None = None
        self.guard: SessionGuard | None = None
        self.http: EmbeddedServer | None = None
        self.agent_server: EmbeddedServer | None = None
        self.simulated_agent: SimulatedAgent | None = None
        self._stop = asyncio.Event()
        self._evicted = False
        self._shutdown_started = False
        self._shutdown_done = asyncio.Event()
        self._started = False

    @property
    def http_url(self) -> str:
        return self.http.url if self.http is not None else ""

    @property
    def evicted(self) -> bool:
        return self._evicted

    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.shutdown()

    async def run(self, on_started: Callable[[], None] | None = None) -> int:
        """Start, serve until asked to stop; on eviction rejoin with a new uuid (or exit 3).

        A rejoin that cannot start (the database or the broker still out of reach: the reason
        this node was evicted) is tried again with backoff for up to ``rejoin_timeout``."""
        rejoin_deadline: float | None = None
        delay = REJOIN_FIRST_DELAY_S
        while True:
            try:
                await self.start()
            except Exception as exc:
                await self.shutdown()
                if rejoin_deadline is None or asyncio.get_running_loop().time() + delay > rejoin_deadline:
                    raise
                log.warning("rejoin failed; trying again", error=f"{type(exc).__name__}: {exc}", retry_in=delay)
                if await self._stop_requested_within(delay):
                    return EXIT_OK
                delay = min(delay * 2, REJOIN_MAX_DELAY_S)
                self._reset()
                continue
            rejoin_deadline, delay = None, REJOIN_FIRST_DELAY_S
            if on_started is not None:
                on_started()
            try:
                await self.wait()
            finally:
                await self.shutdown()
            if not self._evicted:
                return EXIT_OK
            if self.settings.on_evicted == "exit":
                return EXIT_EVICTED
            log.warning("rejoining the cluster under a new uuid")
            rejoin_deadline = asyncio.get_running_loop().time() + self.settings.rejoin_timeout
            self._reset()

    async def _stop_requested_within(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self._operator_stop.wait(), seconds)
        except TimeoutError:
            return False
        return True

    def _reset(self) -> None:
        self._clear()
        if self._operator_stop.is_set():
            self._stop.set()

    def _on_ring_changed(self, old: HashRing, new: HashRing) -> None:
        """Calls waiting on a node that left go to the new owners, but for a node that is draining
        (it answers them itself); services recompute what they track."""
        if self.bus is not None:
            draining = self.membership.draining if self.membership is not None else set()
            self.bus.reroute_pending(new.nodes | draining)
        for service in self.services:
            service.on_ring_changed()

    def _on_drained(self) -> None:
        """A draining node is gone: calls it held go to the new owners; services take over what it left."""
        if self.ring is not None:
            self._on_ring_changed(self.ring.ring, self.ring.ring)

    def request_stop(self) -> None:
        """Stop serving (SIGTERM/SIGINT); also ends a rejoin that is waiting to try again."""
        self._operator_stop.set()
        self._stop.set()

    async def wait(self) -> None:
        await self._stop.wait()

    async def start(self) -> None:
        s = self.settings
        self.uuid = str(uuidlib.uuid4())
        bind_node(self.uuid)
        log.info("node starting", broker=s.broker_url, database=s.database_url)
        raise_file_limit(files_needed(s))
        self.db = Database(
            s.database_url,
            pool_size=s.db_pool_size,
            max_overflow=s.db_max_overflow,
            timeout=max(s.heartbeat_interval * 2, 5.0),
            pool_timeout=s.call_timeout,
            idle_transaction_timeout=max(s.fence_after_s * 0.8, 0.5),
        )
        await self.db.migrate()
        self.transport = make_transport(s, self.topology, f"zstack-mn {self.uuid}")
        await self.transport.start()
        self.ring = LiveRing(self.uuid)
        limits = BusLimits(s.call_timeout, s.max_message_bytes, s.max_in_flight, s.max_hops)
        self.bus = CloudBus(
            self.uuid,
            self.transport,
            self.topology,
            ring=self.ring,
            limits=limits,
            metrics=self.metrics,
            on_no_route=self._on_no_route,
        )
        self.agents = AgentClient(
            s.agent_timeout,
            self.uuid,
            fenced=self._fenced,
            max_connections=s.agent_max_connections,
            pool_timeout=s.call_timeout,
        )
        if s.run_embedded_agent:
            self.simulated_agent = SimulatedAgent()
            self.agent_server = EmbeddedServer(
                create_agent_app(self.simulated_agent), "127.0.0.1", s.embedded_agent_port
            )
            await self.agent_server.start()
        http_address = f"http://{s.http_host}:{s.http_port}" if s.http_enabled else ""
        self.membership = Membership(
            self.uuid,
            self.db,
            self.bus,
            self.ring,
            s,
            services=self.service_names,
            http_address=http_address,
            on_evicted=self._on_evicted,
            on_drained=self._on_drained,
        )
        await self.membership.join()
        await self.membership.reconcile()
        await self.bus.start()
        membership = self.membership
        ctx = ServiceContext(
            self.uuid,
            self.bus,
            self.db,
            self.ring,
            s,
            self.agents,
            is_fenced=lambda: membership.fenced,
            is_evicted=lambda: membership.evicted,
            heartbeat_written=membership.heartbeat_written,
            is_draining=lambda node_uuid: node_uuid in membership.draining,
        )
        classes = [*BUILTIN_SERVICES, *plugin_services(), *self.extra_services]
        self.services = [cls(ctx) for cls in {c.name: c for c in classes}.values()]
        for service in self.services:
            await self.bus.serve(service.name, service.dispatch)
        self.portal = ApiPortal(ctx)
        self.guard = SessionGuard(self.db, s)
        await self.guard.ensure_admin()
        await self.bus.serve_api(guarded(self.portal.dispatch, self.guard))
        self.ring.add_listener(self._on_ring_changed)
        await self.membership.announce_running()
        self.membership.start()
        for service in [*self.services, self.portal]:
            await service.start()
        if s.http_enabled:
            self.http = EmbeddedServer(
                create_app(
                    self.portal,
                    node_uuid=self.uuid,
                    readiness=self.readiness,
                    metrics_registry=self.metrics.registry,
                    guard=self.guard,
                    call_timeout=s.call_timeout,
                ),
                s.http_host,
                s.http_port,
                limit_concurrency=s.max_in_flight,
            )
            await self.http.start()
        self._started = True
        if self.agent_server is not None:
            await self._ensure_default_host()
        log.info("node started", http=self.http_url or None, services=self.service_names())

    def service_names(self) -> list[str]:
        return [svc.name for svc in self.services]

    async def _ensure_default_host(self) -> None:
        assert self.bus is not None
        assert self.agent_server is not None
        assert self.db is not None
        url = f"{self.agent_server.url}/hosts/{EMBEDDED_HOST_ID}"
        hosts = HostRepository(self.db)
        _, existing = await hosts.query({"name": DEFAULT_HOST_NAME}, 1, 0)
        if existing:
            if existing[0].agent_url != url:
                await hosts.update(existing[0].uuid, agent_url=url, status="Connected")
                for service in self.services:
                    if isinstance(service, HostService):
                        service.owned.invalidate()  # its tracker may have read the old URL already
            return
        await self.bus.call(AddHostMsg(name=DEFAULT_HOST_NAME, agent_url=url), timeout=self.settings.call_timeout)
        log.info("embedded simulated agent registered as a host", agent=url)

    def _fenced(self) -> bool:
        return self.membership is not None and self.membership.fenced

    async def _on_no_route(self, _: str) -> None:
        if self.membership is not None:
            await self.membership.reconcile()

    async def _on_evicted(self) -> None:
        self._evicted = True
        if self.bus is not None:
            await self.bus.stop_serving()
        self._stop.set()

    async def _hand_over_queued(self) -> None:
        """Re-route what is queued for this node to the new owners (or refuse it to its callers,
        retryable, when no node is left); in-flight deliveries stay with this node until done."""
        if self.bus is None or not self.services:
            return
        queues = self.bus.node_queues([svc.name for svc in self.services], self.uuid)
        try:
            moved = await rescue_queues(self.bus, queues, bound=self.settings.drain_timeout, ignore_consumers=True)
        except Exception:
            log.exception("could not re-route what is still queued for this node; its queues keep it")
        else:
            if moved:
                log.info("re-routed messages still queued for this node", moved=moved)

    async def readiness(self) -> dict[str, bool]:
        db_ok = False
        if self.db is not None:
            with contextlib.suppress(Exception):
                async with self.db.begin() as conn:
                    await asyncio.wait_for(conn.exec_driver_sql("SELECT 1"), 2)
                db_ok = True
        return {
            "bus": bool(self.transport and self.transport.connected),
            "database": db_ok,
            "running": bool(self.membership and self.membership.state == "RUNNING" and not self.membership.fenced),
        }

    async def shutdown(self) -> None:
        """Stop in the documented order; idempotent, safe before or during start."""
        if self._shutdown_started:
            await self._shutdown_done.wait()
            return
        self._shutdown_started = True
        self._stop.set()
        try:
            await self._shutdown()
        finally:
            self._shutdown_done.set()

    async def _shutdown(self) -> None:
        s = self.settings
        log.info("node stopping", evicted=self._evicted)
        http_stopped = asyncio.ensure_future(self.http.stop()) if self.http is not None else None
        if self.bus is not None:
            await self.bus.stop_serving()
        if self.membership is not None and self._started and not self._evicted:
            await self.membership.begin_leave()
        if self.ring is not None:
            self.ring.remove(self.uuid)
        await self._hand_over_queued()
        if self.bus is not None and not await self.bus.wait_idle(0 if self._evicted else s.drain_timeout):
            log.warning("in-flight work did not finish within drain_timeout", drain_timeout=s.drain_timeout)
        if http_stopped is not None:
            await http_stopped
        for service in [*reversed(self.services), *([self.portal] if self.portal else [])]:
            try:
                await service.stop()
            except Exception:
                log.exception("a service failed to stop; shutting down the rest", service=service.name)
        await self._hand_over_queued()
        if self.membership is not None:
            await self.membership.stop(delete_row=True)
        if self.bus is not None:
            await self.bus.close()
        elif self.transport is not None:
            await self.transport.close()
        if self.agents is not None:
            await self.agents.close()
        if self.agent_server is not None:
            await self.agent_server.stop()
        if self.db is not None:
            await self.db.close()
        log.info("node stopped")


__all__ = ["API_SERVICE", "EXIT_EVICTED", "EXIT_OK", "Node"]
