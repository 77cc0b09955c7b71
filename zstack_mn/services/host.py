"""The ``host`` service: add / reconnect / change state / delete hosts, allocate capacity, and
track (ping) the hosts this node owns by the ring.

The tracker pings the hosts the ring gives this node (bounded concurrency) and runs again at once
on every ring change, so a dead node's hosts are tracked by their new owners within a heartbeat.
Which hosts are its own the node keeps in memory (``OwnedHosts``): it pages through the host table
only after a ring change and every ``OWNED_HOSTS_REREAD_RUNS`` runs, and otherwise reads only its
own hosts, so what a node reads per period follows its share of the hosts, not the cluster's. An agent that misses ``host_ping_failures`` pings
marks its host Disconnected; when it answers again the host is Connected. The host side never
writes a VM: it sends ``VmStateChangedOnHostMsg`` to each VM's owner (Unknown for the running VMs
of a lost host; the agent's state for the VMs of a host that is back), and the owner decides.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from sqlalchemy.exc import IntegrityError

from zstack_mn.bus.cloudbus import Request
from zstack_mn.cluster.ring import LiveRing
from zstack_mn.db.hosts import (
    CONNECTED,
    DISCONNECTED,
    STATE_EVENTS,
    HostRepository,
    host_inventory,
)
from zstack_mn.db.vms import VmRepository
from zstack_mn.messages import ErrorCode, ZStackError
from zstack_mn.messages.events import HostStatusChangedEvent
from zstack_mn.messages.host import (
    HOST,
    AddHostMsg,
    ChangeHostStateMsg,
    DeleteHostMsg,
    PingHostMsg,
    ReconnectHostMsg,
)
from zstack_mn.messages.ids import resource_uuid_for
from zstack_mn.periodic import Periodic
from zstack_mn.services.base import Service, ServiceContext, handles
from zstack_mn.services.host_vms import HostVmSync

log = structlog.get_logger(__name__)

TRACKER_PAGE = 1000
PING_CONCURRENCY = 64
SYNC_CONCURRENCY = 16
OWNED_HOSTS_REREAD_RUNS = 12
"""A full read of the host table every this many tracker runs besides every ring change: a
safety net for a host added or deleted by another node while two rings disagreed."""


class OwnedHosts:
    """The hosts the ring gives this node (uuid → agent URL), read from the host table after a
    ring change and every ``OWNED_HOSTS_REREAD_RUNS`` uses (the tracker's and the tracer's),
    kept current in between by this node's own adds and deletes (a host's messages are routed
    to its owner, so they come here), including those made while a read runs."""

    def __init__(self, hosts: HostRepository, ring: LiveRing) -> None:
        self._hosts = hosts
        self._ring = ring
        self._owned: dict[str, str] | None = None
        self._changes: list[tuple[str, str | None]] | None = None
        """Adds (uuid, URL) and deletes (uuid, None) made while a read runs, applied after it."""
        self._generation = 0
        self._uses = 0
        self.reads = 0
        """Full reads of the host table so far (for tests and metrics)."""

    def invalidate(self) -> None:
        """The ring changed: the next use reads the table again."""
        self._owned = None
        self._generation += 1

    def added(self, uuid: str, agent_url: str) -> None:
        self._change(uuid, agent_url)

    def removed(self, uuid: str) -> None:
        self._change(uuid, None)

    def _change(self, uuid: str, agent_url: str | None) -> None:
        if self._changes is not None:
            self._changes.append((uuid, agent_url))
        if self._owned is None:
            return
        if agent_url is None:
            self._owned.pop(uuid, None)
        elif self._ring.is_mine(uuid):
            self._owned[uuid] = agent_url

    async def get(self) -> dict[str, str]:
        """uuid → agent URL of the hosts this node owns now (a copy)."""
        self._uses += 1
        if self._owned is None or self._uses > OWNED_HOSTS_REREAD_RUNS:
            generation = self._generation
            owned: dict[str, str] = {}
            changes: list[tuple[str, str | None]] = []
            self._changes = changes
            try:
                after = ""
                while page := await self._hosts.page(after, TRACKER_PAGE):
                    owned.update((h.uuid, h.agent_url) for h in page if self._ring.is_mine(h.uuid))
                    after = page[-1].uuid
            finally:
                self._changes = None
            for uuid, url in changes:  # made while the read ran: its pages may have passed them
                if url is None:
                    owned.pop(uuid, None)
                elif self._ring.is_mine(uuid):
                    owned[uuid] = url
            self.reads += 1
            self._uses = 1
            if generation != self._generation:
                return owned  # the ring changed during the read: the next use reads again
            self._owned = owned
        return dict(self._owned)


class HostService(Service):
    name = HOST

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self.hosts = HostRepository(ctx.db)
        self._failures: dict[str, int] = {}
        self.owned = OwnedHosts(self.hosts, ctx.ring)
        self.vm_sync = HostVmSync(VmRepository(ctx.db), ctx.agents, ctx.bus)
        self._tracker = Periodic("host-tracker", self._track_once, ctx.settings.host_ping_interval)
        self._tracer = Periodic("vm-tracer", self._trace_once, ctx.settings.vm_sync_interval, first_run_delayed=True)

    async def start(self) -> None:
        self._tracker.start()
        self._tracer.start()

    async def stop(self) -> None:
        await self._tracer.stop()
        await self._tracker.stop()

    def on_ring_changed(self) -> None:
        self.owned.invalidate()
        self._tracker.wake()

    async def _inventory(self, uuid: str) -> dict[str, Any]:
        row = await self.hosts.get(uuid)
        if row is None:
            raise ZStackError(ErrorCode.RESOURCE_NOT_FOUND, f"host {uuid} not found", uuid=uuid)
        return host_inventory(row).to_wire()

    @handles(AddHostMsg)
    async def add_host(self, msg: AddHostMsg, req: Request) -> dict[str, Any]:
        uuid = msg.uuid or resource_uuid_for(req.envelope.id)
        existing = await self.hosts.get(uuid)
        if existing is not None:
            if existing.agent_url == msg.agent_url.rstrip("/"):
                self.owned.added(uuid, existing.agent_url)
                return host_inventory(existing).to_wire()
            raise ZStackError(ErrorCode.DUPLICATE_RESOURCE, f"host {uuid} already exists", uuid=uuid)
        url = msg.agent_url.rstrip("/")
        facts = await self.ctx.agents.connect(url)
        try:
            await self.hosts.insert(uuid, msg.name, url, facts.cpu_num, facts.memory_size)
        except IntegrityError:
            raise ZStackError(ErrorCode.DUPLICATE_RESOURCE, f"host {uuid} already exists", uuid=uuid) from None
        self.owned.added(uuid, url)
        log.info("host added", host=uuid, cpu=facts.cpu_num, memory=facts.memory_size)
        return await self._inventory(uuid)

    @handles(ReconnectHostMsg)
    async def reconnect(self, msg: ReconnectHostMsg, req: Request) -> dict[str, Any]:
        row = await self.hosts.get(msg.uuid)
        if row is None:
            raise ZStackError(ErrorCode.RESOURCE_NOT_FOUND, f"host {msg.uuid} not found", uuid=msg.uuid)
        await self.ctx.agents.connect(row.agent_url)
        await self._mark(msg.uuid, row.agent_url, reachable=True)
        return await self._inventory(msg.uuid)

    @handles(ChangeHostStateMsg)
    async def change_state(self, msg: ChangeHostStateMsg, req: Request) -> dict[str, Any]:
        if not await self.hosts.update(msg.uuid, state=STATE_EVENTS[msg.state_event]):
            raise ZStackError(ErrorCode.RESOURCE_NOT_FOUND, f"host {msg.uuid} not found", uuid=msg.uuid)
        return await self._inventory(msg.uuid)

    @handles(DeleteHostMsg)
    async def delete(self, msg: DeleteHostMsg, req: Request) -> dict[str, Any]:
        if await self.hosts.delete_if_unused(msg.uuid):
            self._failures.pop(msg.uuid, None)
            self.owned.removed(msg.uuid)
            return {"uuid": msg.uuid, "deleted": True}
        if not await self.hosts.exists(msg.uuid):
            raise ZStackError(ErrorCode.RESOURCE_NOT_FOUND, f"host {msg.uuid} not found", uuid=msg.uuid)
        raise ZStackError(ErrorCode.HOST_IN_USE, f"host {msg.uuid} still has VMs; destroy or migrate them first")

    @handles(PingHostMsg)
    async def ping(self, msg: PingHostMsg, req: Request) -> dict[str, Any]:
        row = await self.hosts.get(msg.uuid)
        if row is None:
            raise ZStackError(ErrorCode.RESOURCE_NOT_FOUND, f"host {msg.uuid} not found", uuid=msg.uuid)
        await self._ping_one(msg.uuid, row.agent_url)
        return await self._inventory(msg.uuid)

    async def _ping_one(self, uuid: str, agent_url: str) -> None:
        try:
            await self.ctx.agents.ping(agent_url)
            reachable = True
        except ZStackError:
            reachable = False
        await self._mark(uuid, agent_url, reachable=reachable)

    async def _mark(self, uuid: str, agent_url: str, *, reachable: bool) -> None:
        if reachable:
            self._failures.pop(uuid, None)
            previous = await self.hosts.set_status(uuid, CONNECTED)
            if previous is None:
                self.owned.removed(uuid)
            elif previous != CONNECTED:
                await self.bus.publish(
                    HostStatusChangedEvent(host_uuid=uuid, old_status=previous, new_status=CONNECTED)
                )
                log.info("host reconnected", host=uuid)
                await self._sync(uuid, agent_url)
            return
        failures = self._failures[uuid] = self._failures.get(uuid, 0) + 1
        if failures < self.ctx.settings.host_ping_failures:
            return
        previous = await self.hosts.set_status(uuid, DISCONNECTED)
        if previous is None:
            self.owned.removed(uuid)
        elif previous != DISCONNECTED:
            await self.bus.publish(HostStatusChangedEvent(host_uuid=uuid, old_status=previous, new_status=DISCONNECTED))
            log.warning("host disconnected", host=uuid)
            await self.vm_sync.host_lost(uuid)

    async def _sync(self, uuid: str, agent_url: str) -> None:
        try:
            await self.vm_sync.sync(uuid, agent_url)
        except ZStackError as exc:
            log.warning("cannot read the VMs of a host from its agent", host=uuid, error=exc.description)

    async def _trace_once(self) -> None:
        """Every connected host this node owns: its VMs as its agent sees them, to their owners."""
        await self._each_owned_host(self._sync, SYNC_CONCURRENCY, connected_only=True)

    async def _track_once(self) -> None:
        await self._each_owned_host(self._ping_one, PING_CONCURRENCY, connected_only=False)

    async def _each_owned_host(
        self, work: Callable[[str, str], Awaitable[None]], concurrency: int, *, connected_only: bool
    ) -> None:
        """``work(uuid, agent_url)`` for every host the ring gives this node (``OwnedHosts``; the
        tracer's ``connected_only`` reads their statuses, and only theirs), at most
        ``concurrency`` at once, each in the host's chain, skipped while the node is fenced or
        once the host is no longer its own; a failure is logged and the others go on."""
        slots = asyncio.Semaphore(concurrency)

        async def one(uuid: str, url: str) -> None:
            async with slots, self.chains.serial(uuid):
                if not self.ctx.is_fenced() and self.ctx.ring.is_mine(uuid):
                    await work(uuid, url)

        owned = await self.owned.get()
        if connected_only:
            connected = await self.hosts.connected_among(list(owned))
            owned = {uuid: url for uuid, url in owned.items() if uuid in connected}
        mine = list(owned.items())
        results = await asyncio.gather(*(one(uuid, url) for uuid, url in mine), return_exceptions=True)
        for (uuid, _), result in zip(mine, results, strict=True):
            if isinstance(result, Exception):
                log.warning("host tracking failed for one host", host=uuid, error=repr(result))
