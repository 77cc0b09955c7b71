"""The ``vmInstance`` service.

Every operation is: check the state machine → one transaction that reserves capacity (where it
must) and moves the VM to its transient state by compare-and-set, recording the message id
(``op_id``) and this node (``op_node``) → the agent call, carrying the message id, which the agent
applies once → one transaction to the final state. A redelivered message (same id) finds its
``op_id`` on the row and resumes instead of repeating. A VM left in a transient state by a node
that is gone is reconciled by its new owner against the agent's real state.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import structlog
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from zstack_mn.agent.protocol import OP_APPLIED, VmOp
from zstack_mn.bus.cloudbus import Request
from zstack_mn.db.hosts import HostRepository
from zstack_mn.db.results import OPERATION_PREFIX, ResultRepository
from zstack_mn.db.vms import VmRepository, vm_inventory
from zstack_mn.messages import Envelope, ErrorCode, ZStackError
from zstack_mn.messages.events import VmStateChangedEvent
from zstack_mn.messages.host import AllocateHostMsg
from zstack_mn.messages.vm import (
    OPERATION_MESSAGES,
    VM,
    CreateVmInstanceMsg,
    DestroyVmInstanceMsg,
    MigrateVmMsg,
    RebootVmInstanceMsg,
    StartVmInstanceMsg,
    StopVmInstanceMsg,
)
from zstack_mn.services import vm_states as s
from zstack_mn.services.base import Service, ServiceContext, handles
from zstack_mn.services.ids import resource_uuid_for

log = structlog.get_logger(__name__)

RECONCILE_PAGE = 500
TAKEOVER_MARGIN_S = 1.0
TAKEOVER_POLL_S = 0.2


class VmInstanceService(Service):
    name = VM

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self.vms = VmRepository(ctx.db)
        self.hosts = HostRepository(ctx.db)
        self.results = ResultRepository(ctx.db)
        self._reconciler: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    async def start(self) -> None:
        self._reconciler = asyncio.get_running_loop().create_task(self._reconcile_loop(), name="vm-reconcile")
        self._wake.set()

    async def stop(self) -> None:
        if self._reconciler is not None:
            self._reconciler.cancel()
            await asyncio.gather(self._reconciler, return_exceptions=True)

    def on_ring_changed(self) -> None:
        self._wake.set()

    async def _event(self, uuid: str, old: str | None, new: str, host: str | None) -> None:
        if old != new:
            await self.bus.publish(VmStateChangedEvent(vm_uuid=uuid, old_state=old, new_state=new, host_uuid=host))

    async def _candidates(self, cpu: int, memory: int, preferred: str | None, req: Request) -> list[str]:
        reply = await self.bus.call(
            AllocateHostMsg(cpu_num=cpu, memory_size=memory, preferred_host_uuid=preferred),
            timeout=_left(req, self.ctx.settings.call_timeout),
        )
        return list(reply["candidates"])

    async def _reserve_any(self, conn: AsyncConnection, candidates: list[str], cpu: int, memory: int) -> str:
        for host in candidates:
            if await self.hosts.reserve(conn, host, cpu, memory):
                return host
        raise ZStackError(ErrorCode.NO_CAPACITY, f"no host could take {cpu} CPUs and {memory} bytes (all candidates full)")

    @handles(CreateVmInstanceMsg)
    async def create(self, msg: CreateVmInstanceMsg, req: Request) -> dict[str, Any]:
        if msg.uuid is not None:
            return await self._create(msg.uuid, msg, req)
        uuid = resource_uuid_for(req.envelope.id)
        async with self.chains.serial(uuid):
            return await self._create(uuid, msg, req)

    async def _create(self, uuid: str, msg: CreateVmInstanceMsg, req: Request) -> dict[str, Any]:
        """Insert the VM (Starting, capacity reserved) and start it; a copy of the same request
        finds the row it made and resumes. Runs serially per ``uuid``."""
        existing = await self.vms.get(uuid)
        if existing is not None:
            if existing.op_id == req.envelope.id:
                return await self._operate(uuid, "start", req)
            raise ZStackError(ErrorCode.DUPLICATE_RESOURCE, f"vm {uuid} already exists", uuid=uuid)
        for attempt in range(3):
            candidates = [msg.host_uuid] if msg.host_uuid else await self._candidates(msg.cpu_num, msg.memory_size, None, req)
            await self.wait_unfenced(req)
            try:
                async with self.db.begin() as conn:
                    host = await self._reserve_any(conn, candidates, msg.cpu_num, msg.memory_size)
                    await self.vms.insert(
                        conn,
                        uuid=uuid,
                        name=msg.name,
                        state=s.STARTING,
                        host_uuid=host,
                        cpu_num=msg.cpu_num,
                        memory_size=msg.memory_size,
                        op_id=req.envelope.id,
                        op_node=self.ctx.node_uuid,
                    )
                break
            except ZStackError as exc:
                if exc.code is not ErrorCode.NO_CAPACITY or msg.host_uuid or attempt == 2:
                    raise
            except IntegrityError:
                raise ZStackError(ErrorCode.DUPLICATE_RESOURCE, f"vm {uuid} already exists", uuid=uuid) from None
        await self._event(uuid, None, s.STARTING, host)
        return await self._operate(uuid, "start", req)

    @handles(StartVmInstanceMsg)
    async def start_vm(self, msg: StartVmInstanceMsg, req: Request) -> dict[str, Any]:
        return await self._operate(msg.uuid, "start", req)

    @handles(StopVmInstanceMsg)
    async def stop_vm(self, msg: StopVmInstanceMsg, req: Request) -> dict[str, Any]:
        return await self._operate(msg.uuid, "stop", req)

    @handles(RebootVmInstanceMsg)
    async def reboot_vm(self, msg: RebootVmInstanceMsg, req: Request) -> dict[str, Any]:
        return await self._operate(msg.uuid, "reboot", req)

    @handles(DestroyVmInstanceMsg)
    async def destroy_vm(self, msg: DestroyVmInstanceMsg, req: Request) -> dict[str, Any]:
        return await self._operate(msg.uuid, "destroy", req)

    @handles(MigrateVmMsg)
    async def migrate_vm(self, msg: MigrateVmMsg, req: Request) -> dict[str, Any]:
        return await self._operate(msg.uuid, "migrate", req, target=msg.host_uuid)

    async def _operate(self, uuid: str, name: str, req: Request, target: str | None = None) -> dict[str, Any]:
        op = s.OPERATIONS[name]
        op_id = req.envelope.id
        done = await self.results.get(OPERATION_PREFIX + op_id)
        if done is not None:
            return done
        loaded = await self.vms.get_with_agent(uuid)
        if loaded is None:
            raise ZStackError(ErrorCode.RESOURCE_NOT_FOUND, f"vm {uuid} not found", uuid=uuid)
        vm, agent_url = loaded, loaded.agent_url
        resuming = vm.op_id == op_id and vm.state == op.transient
        if vm.op_id == op_id and vm.state == op.final:
            return vm_inventory(vm).to_wire()
        await self.wait_unfenced(req)
        if resuming and vm.op_node != self.ctx.node_uuid:
            await self._outlive_previous_call(vm, agent_url, req)
            vm = await self._take_over(vm)
        if not resuming:
            before = vm.host_uuid
            try:
                vm = await self._begin(vm, name, req, target)
            except _AlreadyDone as done_elsewhere:
                return done_elsewhere.result
            if vm.host_uuid != before:
                host = await self.hosts.get(vm.host_uuid) if vm.host_uuid else None
                agent_url = host.agent_url if host is not None else None
        await self.wait_unfenced(req)
        if vm.host_uuid is None or agent_url is None:
            return await self._finish(vm, op, None)
        target_id = vm.target_host_uuid
        try:
            await self.ctx.agents.vm_op(
                agent_url,
                uuid,
                op.agent_op,
                VmOp(op_id=op_id, fence=vm.version, cpu_num=vm.cpu_num, memory_size=vm.memory_size,
                     target_host_id=target_id),
            )
        except ZStackError as exc:
            await self._settle_from_agent(vm, fallback_failed_start=name == "start")
            raise exc
        await self.wait_unfenced(req)
        return await self._finish(vm, op, target_id)

    async def _outlive_previous_call(self, vm: Any, agent_url: str | None, req: Request) -> None:
        """Before resuming an operation another node began, make sure that node's agent call
        for it is over: a dead or frozen node's request may still be on its way to the agent,
        and two requests about one VM in flight at once is dual ownership. Over when the agent
        has applied the op id; otherwise wait (asking again) until the previous owner's call
        deadline, ``agent_timeout`` after the operation began in database time, has passed."""
        if agent_url is None:
            return
        since = await self.vms.seconds_since_change(vm.uuid)
        window_end = time.monotonic() + self.ctx.settings.agent_timeout + TAKEOVER_MARGIN_S - (since or 0.0)
        req_end = req.deadline
        waited = False
        while (left := window_end - time.monotonic()) > 0:
            try:
                if await self.ctx.agents.op_state(agent_url, vm.op_id) == OP_APPLIED:
                    return
            except ZStackError:
                pass
            if req_end is not None and req_end - time.monotonic() < left:
                raise ZStackError(
                    ErrorCode.TIMEOUT,
                    f"vm {vm.uuid}: the previous owner's agent call may still be running for {left:.1f}s; retry",
                    uuid=vm.uuid,
                )
            if not waited:
                log.info("waiting out the previous owner's agent call", vm=vm.uuid, seconds=round(left, 2),
                         previous=vm.op_node)
                waited = True
            await asyncio.sleep(min(TAKEOVER_POLL_S, left))

    async def _take_over(self, vm: Any) -> Any:
        """Make this node the operation's node: a compare-and-set that raises the VM's version,
        which is the fence the agent call carries, so the previous node's late call is refused."""
        async with self.db.begin() as conn:
            fresh = await self.vms.cas(conn, vm.uuid, vm.version, op_node=self.ctx.node_uuid)
        if fresh is None:
            raise ZStackError(ErrorCode.CONCURRENT_MODIFICATION, f"vm {vm.uuid} changed concurrently; retry")
        return fresh

    async def _begin(self, vm: Any, name: str, req: Request, target: str | None) -> Any:
        """State machine check + capacity + CAS to the transient state, in one transaction, which
        also makes sure the operation was not finished already (a stale copy of its message,
        handled by a node that was frozen since: the VM may have moved on since)."""
        op = s.OPERATIONS[name]
        if vm.state not in op.allowed_from:
            raise ZStackError(
                ErrorCode.INVALID_STATE,
                f"vm {vm.uuid} is {vm.state}; cannot {name} it (allowed from {', '.join(sorted(op.allowed_from))})",
                uuid=vm.uuid,
                state=vm.state,
            )
        values: dict[str, Any] = {"state": op.transient, "op_id": req.envelope.id, "op_node": self.ctx.node_uuid}
        candidates: list[str] = []
        if name == "start" and vm.host_uuid is None:
            candidates = await self._candidates(vm.cpu_num, vm.memory_size, vm.last_host_uuid, req)
        elif name == "migrate":
            if target == vm.host_uuid:
                raise ZStackError(ErrorCode.INVALID_ARGUMENT, "hostUuid: the VM already runs on that host", field="hostUuid")
            candidates = [target] if target else [
                h for h in await self._candidates(vm.cpu_num, vm.memory_size, None, req) if h != vm.host_uuid
            ]
            if not candidates:
                raise ZStackError(ErrorCode.NO_CAPACITY, "no other host can take this VM")
        async with self.db.begin() as conn:
            recorded = await self.results.get_in(conn, OPERATION_PREFIX + req.envelope.id)
            if recorded is not None:
                raise _AlreadyDone(recorded)
            if candidates:
                chosen = await self._reserve_any(conn, candidates, vm.cpu_num, vm.memory_size)
                values["target_host_uuid" if name == "migrate" else "host_uuid"] = chosen
            fresh = await self.vms.cas(conn, vm.uuid, vm.version, **values)
            if fresh is None:
                raise ZStackError(ErrorCode.CONCURRENT_MODIFICATION, f"vm {vm.uuid} changed concurrently; retry")
        await self._event(vm.uuid, vm.state, op.transient, fresh.host_uuid)
        return fresh

    async def _finish(self, vm: Any, op: s.Operation, target: str | None) -> dict[str, Any]:
        """Transient → final, with the capacity bookkeeping of ``op``, in one transaction that
        writes nothing unless the compare-and-set wins."""
        values: dict[str, Any] = {"state": op.final}
        release: str | None = None
        if op.agent_op in ("stop", "destroy"):
            release = vm.host_uuid
            values.update(host_uuid=None, last_host_uuid=vm.host_uuid or vm.last_host_uuid)
        elif op.agent_op == "migrate" and target:
            release = vm.host_uuid
            values.update(host_uuid=target, last_host_uuid=vm.host_uuid, target_host_uuid=None)
        async with self.db.begin() as conn:
            fresh = await self.vms.cas(conn, vm.uuid, vm.version, **values)
            if fresh is not None:
                if release is not None:
                    await self.hosts.release(conn, release, vm.cpu_num, vm.memory_size)
                inventory = vm_inventory(fresh).to_wire()
                await self.results.record_in(conn, OPERATION_PREFIX + vm.op_id, inventory)
        if fresh is None:
            return await self._decided_elsewhere(vm)
        await self._event(vm.uuid, vm.state, op.final, fresh.host_uuid)
        return inventory

    async def _decided_elsewhere(self, vm: Any) -> dict[str, Any]:
        """The VM changed while this node ran the operation (another node took it over, or its
        host disconnected): answer with the outcome recorded by whoever finished it, or a
        retryable error, never with a state this node did not decide."""
        recorded = await self.results.get(OPERATION_PREFIX + vm.op_id)
        if recorded is not None:
            return recorded
        log.warning("vm changed while the operation ran; its outcome is not this node's to report", vm=vm.uuid)
        raise ZStackError(
            ErrorCode.CONCURRENT_MODIFICATION,
            f"vm {vm.uuid} changed while the operation ran (taken over or its host disconnected); retry",
            uuid=vm.uuid,
        )

    async def _settle_from_agent(self, vm: Any, *, fallback_failed_start: bool = False) -> None:
        """Set a VM in a transient state to what its agent reports (capacity follows). Not on
        a fenced node: the VM may have a new owner already, which settles it."""
        if self.ctx.is_fenced():
            return
        vm = await self.vms.get(vm.uuid)
        if vm is None or vm.state not in s.TRANSIENT:
            return
        real: str | None = None
        where: str | None = None
        for host_uuid in filter(None, (vm.host_uuid, vm.target_host_uuid)):
            host = await self.hosts.get(host_uuid)
            if host is None:
                continue
            try:
                listing = await self.ctx.agents.list_vms(host.agent_url)
            except ZStackError:
                continue
            found = next((v.state for v in listing.vms if v.uuid == vm.uuid), None)
            if found is not None:
                real, where = found, host_uuid
                break
            real = real or "Absent"
        if real is None:
            state = s.STOPPED if fallback_failed_start and vm.state == s.STARTING else s.UNKNOWN
        elif real == "Running":
            state = s.RUNNING
        elif vm.state == s.DESTROYING and real == "Absent":
            state = s.DESTROYED
        else:
            state = s.STOPPED
        values: dict[str, Any] = {"state": state, "target_host_uuid": None}
        async with self.db.begin() as conn:
            if state == s.RUNNING:
                keep = where or vm.host_uuid
                for other in {vm.host_uuid, vm.target_host_uuid} - {keep, None}:
                    await self.hosts.release(conn, other, vm.cpu_num, vm.memory_size)
                values["host_uuid"] = keep
            elif state in (s.STOPPED, s.DESTROYED):
                for held in {vm.host_uuid, vm.target_host_uuid} - {None}:
                    await self.hosts.release(conn, held, vm.cpu_num, vm.memory_size)
                values.update(host_uuid=None, last_host_uuid=vm.host_uuid or vm.last_host_uuid)
            if await self.vms.cas(conn, vm.uuid, vm.version, **values) is None:
                return
        log.info("vm state reconciled with its agent", vm=vm.uuid, was=vm.state, now=state)
        await self._event(vm.uuid, vm.state, state, values.get("host_uuid"))

    async def _reconcile_loop(self) -> None:
        """A pass on every ring change, and every ``node_timeout`` for what a pass could not
        finish (an operation whose request timed out while it waited for its previous owner).
        ``asyncio.timeout``, not ``wait_for``: on 3.11 the latter can swallow the cancellation
        that ``stop`` sends when the event is set at the same moment, and ``stop`` would hang."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(self.ctx.settings.node_timeout, 1.0)):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.reconcile_transient()
            except asyncio.CancelledError:
                raise
            except ZStackError as exc:
                log.warning("vm reconcile pass failed", error=exc.description)
            except Exception:
                log.exception("vm reconcile pass failed")
            await asyncio.sleep(min(self.ctx.settings.heartbeat_interval, 1.0))

    async def reconcile_transient(self) -> int:
        """Finish every operation a node no longer in the ring left half-done on a VM this node
        owns now: re-issue it to the agent under its original op id (applied once there), then
        complete it; if the agent cannot, settle the VM to what the agent reports."""
        settled, after = 0, ""
        while True:
            page = await self.vms.in_states(s.TRANSIENT, after, RECONCILE_PAGE)
            if not page:
                return settled
            after = page[-1].uuid
            for row in page:
                if not self.ctx.ring.is_mine(row.uuid) or self.ctx.is_fenced():
                    continue
                async with self.chains.slot(row.uuid):
                    vm = await self.vms.get(row.uuid)
                    if vm is None or vm.state not in s.TRANSIENT or vm.op_id is None:
                        continue
                    if vm.op_node != self.ctx.node_uuid and vm.op_node in self.ctx.ring.nodes:
                        continue
                    name = s.OPERATION_OF_TRANSIENT[vm.state]
                    msg = OPERATION_MESSAGES[name](uuid=vm.uuid)
                    env = Envelope.request(msg, ttl_ms=None, msg_id=vm.op_id)
                    req = Request(env, msg, time.monotonic() + self.ctx.settings.call_timeout)
                    try:
                        await self._operate(vm.uuid, name, req, target=vm.target_host_uuid)
                    except ZStackError as exc:
                        log.warning("could not finish a stranded operation", vm=vm.uuid, error=exc.description)
                        continue
                    log.info("stranded operation finished by the new owner", vm=vm.uuid, operation=name)
                    settled += 1


class _AlreadyDone(Exception):
    """The operation was finished (by this or another node) before this copy could begin it."""

    def __init__(self, result: dict[str, Any]) -> None:
        super().__init__("operation already done")
        self.result = result


def _left(req: Request, default: float) -> float:
    left = req.time_left()
    return default if left is None else max(left, 0.001)


