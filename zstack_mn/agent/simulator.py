"""The simulated hypervisor agent: many hosts in one process, each at ``/hosts/<host-id>``.

It is the hypervisor: VM states live here, never in a management node, so a node that dies
takes nothing with it. Each VM operation carries an ``opId`` and is applied once per opId (a
repeat returns the first result and counts as a duplicate), which is what the fault suite checks
for duplicated side effects. Latency, errors and outages can be injected per host and operation.

Every VM operation carries a *fence*, the VM's version when the sending node took the operation;
the agent refuses one lower than the highest it has seen for that VM, on arrival and again at the
operation's commit point (after the injected ``latency``, before ``applyLatency`` and the effect),
so a replaced owner's late request has no effect. A new owner raises the fence first
(``POST /hosts/<id>/vms/<vm>/fence``) and learns in the same reply whether the operation it takes
over is applied, in flight or unknown (the protocol is in ``zstack_mn.agent.protocol``). Fences
are per VM across the whole process (one simulated agent serves every host).

Every VM operation is also audited: who sent it (the ``X-ZStack-Node`` header), when it entered
and left (``time.monotonic``, the machine-wide clock the fault harness shares), and whether
another operation on the same VM that could still act was in flight at the time. Two operations
on one VM at once means two nodes (or one node twice) worked on one resource concurrently: dual
ownership. An operation already cut off by a higher fence (it will be refused at its commit
point) does not count as in flight for that. Fence raises and changes made behind the nodes'
back (``PUT``/``DELETE /admin/vms/<vm>``) are audited apart, in ``control``: they are neither
effects nor duplicates.

    zstack-mn agent --port 9100        # then AddHost with agentUrl http://127.0.0.1:9100/hosts/h1
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field

from fastapi import FastAPI, Header, HTTPException

from zstack_mn.agent.protocol import (
    OP_APPLIED,
    OP_IN_FLIGHT,
    OP_UNKNOWN,
    VM_DESTROYED,
    VM_RUNNING,
    VM_STOPPED,
    AgentFault,
    FenceReply,
    FenceRequest,
    HostFacts,
    OpState,
    OpStateName,
    VmList,
    VmOp,
    VmPlacement,
    VmStatus,
)

VM_OPERATIONS = ("start", "stop", "reboot", "destroy", "migrate")
DEFAULT_CPU = 64
DEFAULT_MEMORY = 256 << 30
AUDIT_LIMIT = 200_000
REJECTED_STALE = "rejected:stale-fence"
CONTROL_FENCE, CONTROL_SET, CONTROL_REMOVE = "fence", "out-of-band:set", "out-of-band:remove"


@dataclass
class SimulatedHost:
    host_id: str
    cpu_num: int
    memory_size: int
    vms: dict[str, str] = field(default_factory=dict)


@dataclass
class AuditEntry:
    """One VM operation as the agent saw it (monotonic seconds, machine-wide)."""

    vm: str
    node: str
    op: str
    op_id: str
    entered: float
    left: float | None = None
    outcome: str = ""
    overlapped_with: list[str] = field(default_factory=list)
    fence: int = 0
    committed: bool = False


@dataclass
class ControlEntry:
    """A fence raise, or a VM changed behind the management nodes' back (``out-of-band:*``)."""

    vm: str
    node: str
    kind: str
    at: float
    detail: dict[str, object] = field(default_factory=dict)


class SimulatedAgent:
    """State and behaviour of the simulator, independent of HTTP (usable directly in tests)."""

    def __init__(self, cpu_num: int = DEFAULT_CPU, memory_size: int = DEFAULT_MEMORY) -> None:
        self.cpu_num = cpu_num
        self.memory_size = memory_size
        self.hosts: dict[str, SimulatedHost] = {}
        self.applied: dict[str, VmStatus] = {}
        self.effects: Counter[str] = Counter()
        self.duplicates = 0
        self.faults: list[AgentFault] = []
        self.audit: deque[AuditEntry] = deque(maxlen=AUDIT_LIMIT)
        self.control: deque[ControlEntry] = deque(maxlen=AUDIT_LIMIT)
        self._in_flight: dict[str, list[AuditEntry]] = {}
        self.fences: dict[str, int] = {}

    def admit(self, vm_uuid: str, fence: int) -> bool:
        """Fencing on arrival: refuse an operation whose fence is lower than the highest seen for
        the VM (it comes from a node that has since been replaced as the VM's owner)."""
        if fence < self.fences.get(vm_uuid, 0):
            return False
        self.fences[vm_uuid] = fence
        return True

    def commit(self, entry: AuditEntry) -> bool:
        """The commit point, just before the effect: the fence is checked again, so an operation
        admitted before a higher fence was raised (a fence raise, or a newer owner's operation)
        is refused here. Synchronous, so atomic on the loop with fence raises and other commits."""
        if entry.fence < self.fences.get(entry.vm, 0):
            return False
        entry.committed = True
        return True

    def _live(self, entry: AuditEntry) -> bool:
        """An operation in flight that may still act on its VM: past its commit point, or not
        cut off by a higher fence yet."""
        return entry.committed or entry.fence >= self.fences.get(entry.vm, 0)

    def reject(self, vm_uuid: str, node: str, op: str, op_id: str, fence: int = 0) -> None:
        now = time.monotonic()
        self.audit.append(AuditEntry(vm_uuid, node, op, op_id, now, now, REJECTED_STALE, fence=fence))

    def enter(self, vm_uuid: str, node: str, op: str, op_id: str, fence: int = 0) -> AuditEntry:
        """Record an operation entering; notes any operation on the same VM in flight that may
        still act (one already cut off by a higher fence will be refused, so it does not count)."""
        entry = AuditEntry(vm_uuid, node, op, op_id, time.monotonic(), fence=fence)
        running = self._in_flight.setdefault(vm_uuid, [])
        entry.overlapped_with = [f"{e.node}:{e.op}:{e.op_id}" for e in running if self._live(e)]
        running.append(entry)
        self.audit.append(entry)
        return entry

    def leave(self, entry: AuditEntry, outcome: str) -> None:
        entry.left, entry.outcome = time.monotonic(), outcome
        running = self._in_flight.get(entry.vm, [])
        if entry in running:
            running.remove(entry)
        if not running:
            self._in_flight.pop(entry.vm, None)

    def op_state(self, op_id: str) -> OpStateName:
        """``applied``; ``in_flight`` (a request for it arrived and may still act: past its commit
        point, or not cut off by a higher fence); or ``unknown`` (never seen, failed, or cut off)."""
        if op_id in self.applied:
            return OP_APPLIED
        if any(e.op_id == op_id and self._live(e) for entries in self._in_flight.values() for e in entries):
            return OP_IN_FLIGHT
        return OP_UNKNOWN

    def raise_fence(self, vm_uuid: str, req: FenceRequest, node: str = "") -> FenceReply | None:
        """From now on refuse every operation on the VM with a fence below ``req.fence``, and
        answer, at that same instant, the state of ``req.op_id``, what is still in flight on the
        VM, what is cut off (to be refused at its commit point), and where the VM is. None
        (refused) when a higher fence is already held. Synchronous: nothing can commit between
        the raise and the answer."""
        held = self.fences.get(vm_uuid, 0)
        if req.fence < held:
            return None
        self.fences[vm_uuid] = req.fence
        running = self._in_flight.get(vm_uuid, [])
        where = self.locate(vm_uuid)
        reply = FenceReply(
            vm_uuid=vm_uuid,
            fence=req.fence,
            op_id=req.op_id,
            op_state=None if req.op_id is None else self.op_state(req.op_id),
            in_flight=[e.op_id for e in running if self._live(e)],
            fenced_out=[e.op_id for e in running if not self._live(e)],
            vm_state=None if where is None else where.vms[vm_uuid],
            host_id=None if where is None else where.host_id,
        )
        detail: dict[str, object] = {"fence": req.fence, "previous": held, **reply.to_wire()}
        self.control.append(ControlEntry(vm_uuid, node, CONTROL_FENCE, time.monotonic(), detail))
        return reply

    def place(self, vm_uuid: str, placement: VmPlacement) -> None:
        """Out of band: put the VM on a host in a state, moved from any other host. No op id, no
        effect, no fence change: as if an operator or a crash had done it."""
        before = self.locate(vm_uuid)
        if before is not None:
            before.vms.pop(vm_uuid, None)
        self.host(placement.host_id).vms[vm_uuid] = placement.state
        detail: dict[str, object] = {"hostId": placement.host_id, "state": placement.state}
        if before is not None:
            detail["fromHostId"] = before.host_id
        self.control.append(ControlEntry(vm_uuid, "", CONTROL_SET, time.monotonic(), detail))

    def remove(self, vm_uuid: str) -> bool:
        """Out of band: the VM vanishes from whichever host has it. False when none had it."""
        where = self.locate(vm_uuid)
        if where is None:
            return False
        state = where.vms.pop(vm_uuid)
        detail: dict[str, object] = {"fromHostId": where.host_id, "state": state}
        self.control.append(ControlEntry(vm_uuid, "", CONTROL_REMOVE, time.monotonic(), detail))
        return True

    def in_flight_by(self, node: str) -> int:
        return sum(1 for entries in self._in_flight.values() for e in entries if e.node == node)

    def host(self, host_id: str) -> SimulatedHost:
        if host_id not in self.hosts:
            self.hosts[host_id] = SimulatedHost(host_id, self.cpu_num, self.memory_size)
        return self.hosts[host_id]

    async def inject(self, host_id: str, op: str) -> None:
        """The faults of a request before its commit point: latency, then down or failure."""
        for fault in self.faults:
            if fault.host_id in ("*", host_id) and fault.op in ("*", op):
                if fault.latency:
                    await asyncio.sleep(fault.latency)
                if fault.down:
                    raise HTTPException(503, f"host {host_id} is down")
                if fault.fail:
                    raise HTTPException(500, f"injected failure of {op} on {host_id}")

    async def inject_apply(self, host_id: str, op: str) -> None:
        """The time a committed operation takes before its effect (``applyLatency``)."""
        for fault in self.faults:
            if fault.host_id in ("*", host_id) and fault.op in ("*", op) and fault.apply_latency:
                await asyncio.sleep(fault.apply_latency)

    def locate(self, vm_uuid: str) -> SimulatedHost | None:
        return next((h for h in self.hosts.values() if vm_uuid in h.vms), None)

    def apply(self, host_id: str, vm_uuid: str, op: str, req: VmOp) -> VmStatus:
        if req.op_id in self.applied:
            self.duplicates += 1
            return self.applied[req.op_id]
        host = self.host(host_id)
        where = self.locate(vm_uuid)
        if where is not None and where is not host and op != "destroy":
            raise HTTPException(409, f"vm {vm_uuid} runs on host {where.host_id}, not {host_id}")
        if op in ("start", "reboot"):
            host.vms[vm_uuid] = VM_RUNNING
            state = VM_RUNNING
        elif op == "stop":
            if vm_uuid in host.vms:
                host.vms[vm_uuid] = VM_STOPPED
            state = VM_STOPPED
        elif op == "destroy":
            if where is not None:
                where.vms.pop(vm_uuid, None)
            state = VM_DESTROYED
        else:
            if not req.target_host_id:
                raise HTTPException(400, "targetHostId: required for migrate")
            if vm_uuid not in host.vms:
                raise HTTPException(409, f"vm {vm_uuid} is not on host {host_id}")
            target = self.host(req.target_host_id)
            target.vms[vm_uuid] = host.vms.pop(vm_uuid)
            state = target.vms[vm_uuid]
        result = VmStatus(uuid=vm_uuid, state=state)
        self.applied[req.op_id] = result
        self.effects[req.op_id] += 1
        return result


def create_app(agent: SimulatedAgent | None = None) -> FastAPI:
    """The agent's HTTP face."""
    sim = agent or SimulatedAgent()
    app = FastAPI(title="zstack-mn simulated agent", docs_url=None, redoc_url=None)
    app.state.agent = sim

    @app.post("/hosts/{host_id}/connect", response_model=HostFacts)
    async def connect(host_id: str) -> HostFacts:
        await sim.inject(host_id, "connect")
        h = sim.host(host_id)
        return HostFacts(host_id=host_id, hostname=f"sim-{host_id}", cpu_num=h.cpu_num, memory_size=h.memory_size)

    @app.get("/hosts/{host_id}/ping")
    async def ping(host_id: str) -> dict[str, bool]:
        await sim.inject(host_id, "ping")
        sim.host(host_id)
        return {"ok": True}

    @app.get("/hosts/{host_id}/vms", response_model=VmList)
    async def list_vms(host_id: str) -> VmList:
        await sim.inject(host_id, "list")
        return VmList(vms=[VmStatus(uuid=u, state=s) for u, s in sim.host(host_id).vms.items()])

    @app.post("/hosts/{host_id}/vms/{vm_uuid}/fence", response_model=FenceReply, response_model_exclude_none=True)
    async def raise_fence(
        host_id: str, vm_uuid: str, req: FenceRequest, x_zstack_node: str = Header("", max_length=64)
    ) -> FenceReply:
        """Refuse every operation on the VM below ``fence`` from now on; see ``raise_fence``."""
        await sim.inject(host_id, "fence")
        reply = sim.raise_fence(vm_uuid, req, x_zstack_node)
        if reply is None:
            raise HTTPException(
                409, f"stale fence {req.fence} for vm {vm_uuid} (now {sim.fences.get(vm_uuid, 0)}): not raised"
            )
        return reply

    @app.post("/hosts/{host_id}/vms/{vm_uuid}/{op}", response_model=VmStatus)
    async def vm_op(
        host_id: str, vm_uuid: str, op: str, req: VmOp, x_zstack_node: str = Header("", max_length=64)
    ) -> VmStatus:
        if op not in VM_OPERATIONS:
            raise HTTPException(404, f"unknown operation {op}")
        if not sim.admit(vm_uuid, req.fence):
            sim.reject(vm_uuid, x_zstack_node, op, req.op_id, req.fence)
            raise HTTPException(409, f"stale fence {req.fence} for vm {vm_uuid}: another node has taken it over")
        entry = sim.enter(vm_uuid, x_zstack_node, op, req.op_id, req.fence)
        outcome = "error"
        try:
            await sim.inject(host_id, op)
            if not sim.commit(entry):
                outcome = REJECTED_STALE
                raise HTTPException(
                    409,
                    f"stale fence {req.fence} for vm {vm_uuid} (now {sim.fences.get(vm_uuid, 0)}): "
                    "another node has taken it over",
                )
            await sim.inject_apply(host_id, op)
            repeat = req.op_id in sim.applied
            result = sim.apply(host_id, vm_uuid, op, req)
            outcome = f"duplicate:{result.state}" if repeat else result.state
            return result
        finally:
            sim.leave(entry, outcome)

    @app.get("/hosts/{host_id}/ops/{op_id}", response_model=OpState)
    async def op_state(host_id: str, op_id: str) -> OpState:
        return OpState(op_id=op_id, state=sim.op_state(op_id))

    @app.get("/admin/stats")
    async def stats() -> dict[str, object]:
        return {
            "effects": dict(sim.effects),
            "duplicates": sim.duplicates,
            "vms": {vm: {"host": h.host_id, "state": s} for h in sim.hosts.values() for vm, s in h.vms.items()},
        }

    @app.get("/admin/audit")
    async def audit(node: str | None = None) -> dict[str, object]:
        """The VM-operation audit (``entries``) and the fence raises and out-of-band changes
        (``control``); with ``node``, only how many of its operations are in flight."""
        if node is not None:
            return {"inFlight": sim.in_flight_by(node)}
        return {
            "entries": [asdict(e) for e in sim.audit],
            "control": [asdict(c) for c in sim.control],
            "now": time.monotonic(),
        }

    @app.put("/admin/vms/{vm_uuid}", response_model=VmStatus)
    async def place_vm(vm_uuid: str, placement: VmPlacement) -> VmStatus:
        """Change a VM behind the management nodes' back: put it on ``hostId`` in ``state``."""
        sim.place(vm_uuid, placement)
        return VmStatus(uuid=vm_uuid, state=placement.state)

    @app.delete("/admin/vms/{vm_uuid}")
    async def remove_vm(vm_uuid: str) -> dict[str, bool]:
        """Make a VM vanish behind the management nodes' back (404 when no host has it)."""
        if not sim.remove(vm_uuid):
            raise HTTPException(404, f"vm {vm_uuid} is on no host")
        return {"removed": True}

    @app.put("/admin/faults")
    async def set_faults(faults: list[AgentFault]) -> dict[str, int]:
        sim.faults = faults
        return {"faults": len(faults)}

    return app
