"""The ``vmInstance`` service.

Every operation is: begin, one round trip to the database that checks the state machine, reserves
capacity (where it must) and moves the VM to its transient state, recording the message id
(``op_id``) and this node (``op_node``) → the agent call, carrying the message id, which the agent
applies once → finish, one round trip to the final state with the op record. A redelivered
message (same id) finds its ``op_id`` on the row and resumes instead of repeating. A VM left in a
transient state by a node that is gone is reconciled by its new owner against the agent's real
state. See ``zstack_mn.db.vm_transitions`` for the round trips themselves.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog

from zstack_mn.agent.protocol import OP_APPLIED, VmOp
from zstack_mn.bus.cloudbus import Request
from zstack_mn.db.hosts import HostRepository
from zstack_mn.db.vm_transitions import PLACE_HOST, PLACE_TARGET, Finish, Outcome, vm_transitions
from zstack_mn.db.vms import VmRepository, VmRow, vm_inventory
from zstack_mn.messages import Envelope, ErrorCode, ZStackError
from zstack_mn.messages.events import VmStateChangedEvent
from zstack_mn.messages.ids import resource_uuid_for
from zstack_mn.messages.vm import (
    OPERATION_MESSAGES,
    VM,
    CreateVmInstanceMsg,
    DestroyVmInstanceMsg,
    MigrateVmMsg,
    RebootVmInstanceMsg,
    StartVmInstanceMsg,
    StopVmInstanceMsg,
    VmStateChangedOnHostMsg,
)
from zstack_mn.periodic import Periodic
from zstack_mn.services import vm_states as s
from zstack_mn.services.base import Service, ServiceContext, handles

log = structlog.get_logger(__name__)

RECONCILE_PAGE = 500
CREATE_ATTEMPTS = 3
TAKEOVER_POLL_S = 0.05
TAKEOVER_POLL_MAX_S = 0.5
OTHER_NODE_MARGIN_S = 0.5
OTHER_NODE_WAITS = 8
"""At most this many operations of another node waited for before one begins (then INVALID_STATE)."""
ABSENT = "Absent"
"""What a VM is when no agent it may be on lists it."""


class VmInstanceService(Service):
    name = VM

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self.vms = VmRepository(ctx.db)
        self.hosts = HostRepository(ctx.db)
        self.transitions = vm_transitions(ctx.db)
        self._reconciler = Periodic(
            "vm-reconcile",
            self.reconcile_transient,
            lambda: max(ctx.settings.node_timeout, 1.0),
            cooldown=min(ctx.settings.heartbeat_interval, 1.0),
        )
        """A pass on every ring change, and every ``node_timeout`` for what a pass could not finish
        (an operation whose request timed out while it waited for its previous owner)."""

    async def start(self) -> None:
        self._reconciler.start()

    async def stop(self) -> None:
        await self._reconciler.stop()

    def on_ring_changed(self) -> None:
        self._reconciler.wake()

    async def _event(self, uuid: str, old: str | None, new: str, host: str | None) -> None:
        if old != new:
            await self.bus.publish(VmStateChangedEvent(vm_uuid=uuid, old_state=old, new_state=new, host_uuid=host))

    @handles(CreateVmInstanceMsg)
    async def create(self, msg: CreateVmInstanceMsg, req: Request) -> dict[str, Any]:
        if msg.uuid is not None:
            return await self._create(msg.uuid, msg, req)
        uuid = resource_uuid_for(req.envelope.id)
        async with self.chains.serial(uuid):
            return await self._create(uuid, msg, req)

    async def _create(self, uuid: str, msg: CreateVmInstanceMsg, req: Request) -> dict[str, Any]:
        """Insert the VM (Starting, capacity reserved, in one round trip) and start it; a copy of
        the same request finds the row it made and resumes. Runs serially per ``uuid``."""
        await self.wait_unfenced(req)
        for _ in range(CREATE_ATTEMPTS):
            t = await self.transitions.create(
                uuid,
                name=msg.name,
                cpu_num=msg.cpu_num,
                memory_size=msg.memory_size,
                only=msg.host_uuid,
                state=s.STARTING,
                op_id=req.envelope.id,
                op_node=self.ctx.node_uuid,
            )
            if t.outcome is not Outcome.NO_CAPACITY or msg.host_uuid:
                break
        if t.outcome is Outcome.EXISTS:
            assert t.vm is not None
            if t.recorded is not None:
                return vm_inventory(t.recorded).to_wire()
            if t.vm.op_id == req.envelope.id:
                return await self._operate(uuid, "start", req)
            raise ZStackError(ErrorCode.DUPLICATE_RESOURCE, f"vm {uuid} already exists", uuid=uuid)
        if t.outcome is Outcome.NO_CAPACITY:
            where = f"host {msg.host_uuid}" if msg.host_uuid else "no connected, enabled host"
            raise ZStackError(ErrorCode.NO_CAPACITY, f"{where} has {msg.cpu_num} CPUs and {msg.memory_size} bytes free")
        assert t.vm is not None
        await self._event(uuid, None, s.STARTING, t.vm.host_uuid)
        await self.wait_unfenced(req)
        return await self._run(t.vm, t.agent_url, s.OPERATIONS["start"], req)

    @handles(VmStateChangedOnHostMsg)
    async def state_changed_on_host(self, msg: VmStateChangedOnHostMsg, req: Request) -> dict[str, Any]:
        """A host reports the VM in ``msg.state`` (Unknown: the host is lost). Taken outside an
        operation only (an operation settles its VM itself), and only when the VM has not changed
        since the report's ``version`` was read: for a VM on that host, any of the reported
        states (Unknown only for a Running VM); for a VM on no host, Running there, with the
        capacity taken if the host has room. Capacity follows in the same transaction."""
        vm = await self.vms.get(msg.uuid)
        if vm is None or vm.state.transient or (msg.version is not None and msg.version != vm.version):
            return {"changed": False}
        if vm.host_uuid == msg.host_uuid:
            applies = vm.state != msg.state and (msg.state != s.UNKNOWN or vm.state == s.RUNNING)
        else:
            applies = vm.host_uuid is None and msg.state == s.RUNNING and vm.state in (s.CREATED, s.STOPPED)
        if not applies:
            return {"changed": False}
        fresh = await self.vms.settle(vm, msg.state, host_uuid=msg.host_uuid)
        if fresh is None:
            if vm.host_uuid != msg.host_uuid:
                log.warning("vm runs on a host that has no room for it; left as it is", vm=vm.uuid, host=msg.host_uuid)
            return {"changed": False}
        log.info("vm state taken from its host", vm=vm.uuid, was=vm.state, now=fresh.state, host=msg.host_uuid)
        await self._event(vm.uuid, vm.state, fresh.state, fresh.host_uuid)
        return {"changed": True, "inventory": vm_inventory(fresh).to_wire()}

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
        """Begin (one round trip: state check, capacity, CAS, op record check), the agent call,
        finish (one round trip). A copy of a message whose operation is under way resumes it; one
        whose operation is finished is answered with the recorded result."""
        op = s.OPERATIONS[name]
        await self.wait_unfenced(req)
        place = PLACE_TARGET if name == "migrate" else PLACE_HOST if name == "start" else None
        for attempt in range(OTHER_NODE_WAITS + 1):
            t = await self.transitions.begin(
                uuid,
                op_id=req.envelope.id,
                op_node=self.ctx.node_uuid,
                allowed=op.allowed_from,
                transient=op.transient,
                final=op.final,
                place=place,
                only=target,
            )
            if (
                attempt == OTHER_NODE_WAITS
                or t.outcome is not Outcome.INVALID_STATE
                or t.vm is None
                or not await self._await_other_node(t.vm, req)
            ):
                break
        vm = t.vm
        if t.outcome is Outcome.MISSING or vm is None:
            raise ZStackError(ErrorCode.RESOURCE_NOT_FOUND, f"vm {uuid} not found", uuid=uuid)
        if t.outcome is Outcome.FINAL:
            return vm_inventory(vm).to_wire()
        if t.outcome is Outcome.DONE:
            assert t.recorded is not None
            return vm_inventory(t.recorded).to_wire()
        if t.outcome is Outcome.INVALID_STATE:
            raise ZStackError(
                ErrorCode.INVALID_STATE,
                f"vm {uuid} is {vm.state}; cannot {name} it (allowed from {', '.join(sorted(op.allowed_from))})",
                uuid=uuid,
                state=vm.state,
            )
        if t.outcome is Outcome.SAME_HOST:
            raise ZStackError(ErrorCode.INVALID_STATE, "hostUuid: the VM already runs on that host", field="hostUuid")
        if t.outcome is Outcome.NO_CAPACITY:
            if name == "migrate":
                raise ZStackError(ErrorCode.NO_CAPACITY, "no other host can take this VM")
            raise ZStackError(
                ErrorCode.NO_CAPACITY,
                f"no connected, enabled host has {vm.cpu_num} CPUs and {vm.memory_size} bytes free",
            )
        if t.outcome is Outcome.RESUME:
            if vm.op_node != self.ctx.node_uuid:
                await self.wait_unfenced(req)
                vm, applied = await self._take_over(vm, t.agent_url, req)
                if applied:
                    return await self._finish(vm, op)
        else:
            await self._event(uuid, t.previous, op.transient, vm.host_uuid)
        await self.wait_unfenced(req)
        return await self._run(vm, t.agent_url, op, req)

    async def _run(self, vm: VmRow, agent_url: str | None, op: s.Operation, req: Request) -> dict[str, Any]:
        """The agent call of an operation that has begun, fenced by the VM's version, then its finish."""
        if vm.host_uuid is None or agent_url is None:
            return await self._finish(vm, op)
        assert vm.op_id is not None
        try:
            await self.ctx.agents.vm_op(
                agent_url,
                vm.uuid,
                op.agent_op,
                VmOp(
                    op_id=vm.op_id,
                    fence=vm.version,
                    cpu_num=vm.cpu_num,
                    memory_size=vm.memory_size,
                    target_host_id=vm.target_host_uuid,
                ),
            )
        except ZStackError:
            await self._settle_from_agent(vm, fallback_failed_start=op.agent_op == "start")
            raise
        await self.wait_unfenced(req)
        return await self._finish(vm, op)

    async def _await_other_node(self, vm: VmRow, req: Request) -> bool:
        """When ``vm`` is in the middle of an operation of another node that is still working (a
        node that is draining after a graceful stop, or a moment of ring disagreement), wait for
        that operation to end, as this node's own chain would for its own: True once the VM has
        changed (begin again), False when there is nothing to wait for or the wait ran out."""
        if not vm.state.transient or vm.op_node in (None, self.ctx.node_uuid):
            return False
        assert vm.op_node is not None
        deadline = time.monotonic() + self.ctx.settings.agent_timeout + OTHER_NODE_MARGIN_S
        if req.deadline is not None:
            deadline = min(deadline, req.deadline - OTHER_NODE_MARGIN_S)
        delay = TAKEOVER_POLL_S
        while self.ctx.is_working(vm.op_node) and time.monotonic() + delay < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, TAKEOVER_POLL_MAX_S)
            now = await self.vms.get(vm.uuid)
            if now is None or now.version != vm.version:
                return True
        return False

    async def _take_over(self, vm: VmRow, agent_url: str | None, req: Request) -> tuple[VmRow, bool]:
        """Make this node the node of an operation another node began, fence first: a
        compare-and-set that raises the VM's version (the fence its agent calls carry) and names
        this node, then the same fence raised at the VM's agent. From the raise on, the agent
        refuses every request of the previous node that has not reached its commit point; this
        node waits only for one the agent reports past it (in flight), never for the previous
        node's call deadline. Returns the VM and whether the agent has applied the operation
        already (nothing left to send)."""
        async with self.db.begin() as conn:
            fresh = await self.vms.cas(conn, vm.uuid, vm.version, op_node=self.ctx.node_uuid)
        if fresh is None:
            raise ZStackError(ErrorCode.CONCURRENT_MODIFICATION, f"vm {vm.uuid} changed concurrently; retry")
        applied = agent_url is not None and await self._raise_fence(fresh, agent_url, req)
        log.info("took over an operation", vm=vm.uuid, previous=vm.op_node, op=vm.op_id, fence=fresh.version)
        return fresh, applied

    async def _raise_fence(self, vm: VmRow, agent_url: str, req: Request) -> bool:
        """Raise the VM's fence at its agent to ``vm.version``; repeat the raise (it is
        idempotent) while the agent reports an operation on the VM that may still act, within
        the request's deadline. True when the agent has applied the operation being taken over."""
        deadline = req.deadline if req.deadline is not None else time.monotonic() + self.ctx.settings.call_timeout
        delay = TAKEOVER_POLL_S
        while True:
            try:
                reply = await self.ctx.agents.raise_fence(agent_url, vm.uuid, vm.version, vm.op_id)
            except ZStackError as exc:
                if exc.details.get("status") == 409:
                    raise ZStackError(
                        ErrorCode.CONCURRENT_MODIFICATION, f"vm {vm.uuid} was taken over by another node; retry"
                    ) from None
                raise
            if not reply.in_flight:
                return reply.op_state == OP_APPLIED
            left = deadline - time.monotonic()
            if left <= delay:
                raise ZStackError(
                    ErrorCode.TIMEOUT,
                    f"vm {vm.uuid}: the previous node's operation is still running at the agent; retry",
                    uuid=vm.uuid,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, TAKEOVER_POLL_MAX_S)

    async def _finish(self, vm: VmRow, op: s.Operation) -> dict[str, Any]:
        """Transient → final, with the capacity bookkeeping of ``op`` and the op record, in one
        round trip that writes nothing unless the compare-and-set wins. When it loses (the VM was
        taken over, or its host disconnected), the answer is the outcome recorded by whoever
        finished the operation, or a retryable error: never a state this node did not decide."""
        t = await self.transitions.finish(vm, _final_values(vm, op))
        if t.outcome is Outcome.CONFLICT or t.vm is None:
            if t.recorded is not None:
                return vm_inventory(t.recorded).to_wire()
            log.warning("vm changed while the operation ran; its outcome is not this node's to report", vm=vm.uuid)
            raise ZStackError(
                ErrorCode.CONCURRENT_MODIFICATION,
                f"vm {vm.uuid} changed while the operation ran (taken over or its host disconnected); retry",
                uuid=vm.uuid,
            )
        await self._event(vm.uuid, vm.state, op.final, t.vm.host_uuid)
        return vm_inventory(t.vm).to_wire()

    async def _settle_from_agent(self, vm: VmRow, *, fallback_failed_start: bool = False) -> None:
        """Set a VM in a transient state to what its agent reports (capacity follows). Not on
        a fenced node, nor when another node has taken the operation over (its fence refused
        ours): the VM has a new owner, which settles it."""
        if self.ctx.is_fenced():
            return
        found_vm = await self.vms.get(vm.uuid)
        if found_vm is None or not found_vm.state.transient or found_vm.op_node != self.ctx.node_uuid:
            return
        vm = found_vm
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
            real = real or ABSENT
        if real is None:
            state = s.STOPPED if fallback_failed_start and vm.state == s.STARTING else s.UNKNOWN
        elif real == s.RUNNING:
            state = s.RUNNING
        elif vm.state == s.DESTROYING and real == ABSENT:
            state = s.DESTROYED
        else:
            state = s.STOPPED
        fresh = await self.vms.settle(vm, state, host_uuid=where)
        if fresh is None:
            return
        log.info("vm state reconciled with its agent", vm=vm.uuid, was=vm.state, now=state)
        await self._event(vm.uuid, vm.state, state, fresh.host_uuid)

    async def reconcile_transient(self) -> int:
        """Finish every operation a node no longer in the ring left half-done on a VM this node
        owns now: re-issue it to the agent under its original op id (applied once there), then
        complete it; if the agent cannot, settle the VM to what the agent reports."""
        settled, after = 0, ""
        while True:
            page = await self.vms.in_states(s.TRANSIENT, after, RECONCILE_PAGE)
            if not page:
                return settled
            after = page[-1]
            for uuid in page:
                if not self.ctx.ring.is_mine(uuid) or self.ctx.is_fenced():
                    continue
                async with self.chains.slot(uuid):
                    vm = await self.vms.get(uuid)
                    if vm is None or not vm.state.transient or vm.op_id is None:
                        continue
                    if vm.op_node not in (None, self.ctx.node_uuid) and self.ctx.is_working(vm.op_node):
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


def _final_values(vm: VmRow, op: s.Operation) -> Finish:
    """Where the VM is after ``op`` and which host gets its capacity back."""
    if op.agent_op in ("stop", "destroy"):
        return Finish(op.final, None, vm.host_uuid or vm.last_host_uuid, vm.target_host_uuid, vm.host_uuid)
    if op.agent_op == "migrate" and vm.target_host_uuid:
        return Finish(op.final, vm.target_host_uuid, vm.host_uuid, None, vm.host_uuid)
    return Finish(op.final, vm.host_uuid, vm.last_host_uuid, vm.target_host_uuid, None)
