"""The ``host`` service: add / reconnect / change state / delete hosts, allocate capacity, and
track (ping) the hosts this node owns by the ring.

The tracker pages through all hosts (10,000 are fine), pings the ones the ring gives this node
(bounded concurrency), and restarts at once on every ring change, so a dead node's hosts are
tracked by their new owners within a heartbeat. An agent that misses ``host_ping_failures`` pings
marks its host Disconnected and its running VMs Unknown; when it answers again the host is
Connected and those VMs take the state the agent reports.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError

from zstack_mn.bus.cloudbus import Request
from zstack_mn.db.hosts import (
    CONNECTED,
    DISCONNECTED,
    STATE_EVENTS,
    HostRepository,
    host_inventory,
)
from zstack_mn.db.models import VmInstance
from zstack_mn.messages import ErrorCode, ZStackError
from zstack_mn.messages.events import HostStatusChangedEvent, VmStateChangedEvent
from zstack_mn.messages.host import (
    HOST,
    AddHostMsg,
    AllocateHostMsg,
    ChangeHostStateMsg,
    DeleteHostMsg,
    PingHostMsg,
    ReconnectHostMsg,
)
from zstack_mn.services.base import Service, ServiceContext, handles
from zstack_mn.services.ids import resource_uuid_for

log = structlog.get_logger(__name__)

TRACKER_PAGE = 1000
PING_CONCURRENCY = 64
VM = VmInstance.__table__


class HostService(Service):
    name = HOST

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self.hosts = HostRepository(ctx.db)
        self._failures: dict[str, int] = {}
        self._tracker: asyncio.Task[None] | None = None
        self._ring_changed = asyncio.Event()

    async def start(self) -> None:
        self._tracker = asyncio.get_running_loop().create_task(self._track(), name="host-tracker")

    async def stop(self) -> None:
        if self._tracker is not None:
            self._tracker.cancel()
            await asyncio.gather(self._tracker, return_exceptions=True)

    def on_ring_changed(self) -> None:
        self._ring_changed.set()

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
                return host_inventory(existing).to_wire()
            raise ZStackError(ErrorCode.DUPLICATE_RESOURCE, f"host {uuid} already exists", uuid=uuid)
        url = msg.agent_url.rstrip("/")
        facts = await self.ctx.agents.connect(url)
        try:
            await self.hosts.insert(uuid, msg.name, url, facts.cpu_num, facts.memory_size)
        except IntegrityError:
            raise ZStackError(ErrorCode.DUPLICATE_RESOURCE, f"host {uuid} already exists", uuid=uuid) from None
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
            return {"uuid": msg.uuid, "deleted": True}
        if not await self.hosts.exists(msg.uuid):
            raise ZStackError(ErrorCode.RESOURCE_NOT_FOUND, f"host {msg.uuid} not found", uuid=msg.uuid)
        raise ZStackError(ErrorCode.HOST_IN_USE, f"host {msg.uuid} still has VMs; destroy or migrate them first")

    @handles(AllocateHostMsg)
    async def allocate(self, msg: AllocateHostMsg, req: Request) -> dict[str, Any]:
        """Candidate hosts with room for the VM, best first; the caller reserves atomically."""
        found = await self.hosts.candidates(msg.cpu_num, msg.memory_size)
        if msg.preferred_host_uuid in found:
            found.remove(msg.preferred_host_uuid)
            found.insert(0, msg.preferred_host_uuid)
        if not found:
            raise ZStackError(
                ErrorCode.NO_CAPACITY,
                f"no connected, enabled host has {msg.cpu_num} CPUs and {msg.memory_size} bytes free",
            )
        return {"candidates": found}

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
            if previous not in (None, CONNECTED):
                await self._sync_vms(uuid, agent_url)
                await self.bus.publish(
                    HostStatusChangedEvent(host_uuid=uuid, old_status=previous, new_status=CONNECTED)
                )
                log.info("host reconnected", host=uuid)
            return
        failures = self._failures[uuid] = self._failures.get(uuid, 0) + 1
        if failures < self.ctx.settings.host_ping_failures:
            return
        previous = await self.hosts.set_status(uuid, DISCONNECTED)
        if previous not in (None, DISCONNECTED):
            async with self.db.begin() as conn:
                unknown = await conn.execute(
                    update(VM)
                    .where(VM.c.host_uuid == uuid, VM.c.state == "Running")
                    .values(state="Unknown", version=VM.c.version + 1)
                    .returning(VM.c.uuid)
                )
                lost = [r.uuid for r in unknown]
            await self.bus.publish(HostStatusChangedEvent(host_uuid=uuid, old_status=previous, new_status=DISCONNECTED))
            for vm in lost:
                await self.bus.publish(
                    VmStateChangedEvent(vm_uuid=vm, old_state="Running", new_state="Unknown", host_uuid=uuid)
                )
            log.warning("host disconnected", host=uuid)

    async def _sync_vms(self, host_uuid: str, agent_url: str) -> None:
        """VMs left Unknown on a host that answers again take the state its agent reports."""
        try:
            real = {v.uuid: v.state for v in (await self.ctx.agents.list_vms(agent_url)).vms}
        except ZStackError as exc:
            log.warning("cannot sync VM states", host=host_uuid, error=exc.description)
            return
        settled: list[tuple[str, str]] = []
        async with self.db.begin() as conn:
            for row in await conn.execute(VM.select().where(VM.c.host_uuid == host_uuid, VM.c.state == "Unknown")):
                state = "Running" if real.get(row.uuid) == "Running" else "Stopped"
                values: dict[str, Any] = {"state": state, "version": row.version + 1}
                if state == "Stopped":
                    values.update(host_uuid=None, last_host_uuid=host_uuid)
                result = await conn.execute(
                    update(VM).where(VM.c.uuid == row.uuid, VM.c.version == row.version).values(**values)
                )
                if result.rowcount != 1:
                    continue
                if state == "Stopped":
                    await self.hosts.release(conn, host_uuid, row.cpu_num, row.memory_size)
                settled.append((row.uuid, state))
        for vm, state in settled:
            await self.bus.publish(
                VmStateChangedEvent(vm_uuid=vm, old_state="Unknown", new_state=state, host_uuid=host_uuid)
            )

    async def _track(self) -> None:
        interval = self.ctx.settings.host_ping_interval
        while True:
            self._ring_changed.clear()
            try:
                await self._track_once()
            except asyncio.CancelledError:
                raise
            except ZStackError as exc:
                log.warning("host tracker pass failed", error=exc.description)
            except Exception:
                log.exception("host tracker pass failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._ring_changed.wait()

    async def _track_once(self) -> None:
        slots = asyncio.Semaphore(PING_CONCURRENCY)

        async def ping(uuid: str, url: str) -> None:
            async with slots, self.chains.serial(uuid):
                if self.ctx.is_fenced() or not self.ctx.ring.is_mine(uuid):
                    return
                await self._ping_one(uuid, url)

        after = ""
        while True:
            page = await self.hosts.page(after, TRACKER_PAGE)
            if not page:
                return
            mine = [(r.uuid, r.agent_url) for r in page if self.ctx.ring.is_mine(r.uuid)]
            await asyncio.gather(*(ping(u, url) for u, url in mine), return_exceptions=True)
            after = page[-1].uuid
