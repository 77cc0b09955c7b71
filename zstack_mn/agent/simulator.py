"""The simulated hypervisor agent: many hosts in one process, each at ``/hosts/<host-id>``.

It is the hypervisor: VM states live here, never in a management node, so a node that dies
takes nothing with it. Each VM operation carries an ``opId`` and is applied once per opId (a
repeat returns the first result and counts as a duplicate), which is what the fault suite checks
for duplicated side effects. Latency, errors and outages can be injected per host and operation.

Every VM operation carries a *fence*, the VM's version when the sending node took the operation;
the agent refuses one lower than the highest it has seen for that VM, so a replaced owner's late
request has no effect. Every VM operation is also audited: who sent it (the ``X-ZStack-Node`` header), when it entered
and left (``time.monotonic``, the machine-wide clock the fault harness shares), and whether
another operation on the same VM was in flight at the time. Two operations on one VM at once
means two nodes (or one node twice) worked on one resource concurrently: dual ownership.

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
    HostFacts,
    OpState,
    VmList,
    VmOp,
    VmStatus,
)

VM_OPERATIONS = ("start", "stop", "reboot", "destroy", "migrate")
DEFAULT_CPU = 64
DEFAULT_MEMORY = 256 << 30
AUDIT_LIMIT = 200_000
REJECTED_STALE = "rejected:stale-fence"


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
        self._in_flight: dict[str, list[AuditEntry]] = {}
        self.fences: dict[str, int] = {}

    def admit(self, vm_uuid: str, fence: int) -> bool:
        """Fencing: refuse an operation whose fence is lower than the highest seen for the VM
        (it comes from a node that has since been replaced as the VM's owner)."""
        if fence < self.fences.get(vm_uuid, 0):
            return False
        self.fences[vm_uuid] = fence
        return True

    def reject(self, vm_uuid: str, node: str, op: str, op_id: str) -> None:
        now = time.monotonic()
        self.audit.append(AuditEntry(vm_uuid, node, op, op_id, now, now, REJECTED_STALE))

    def enter(self, vm_uuid: str, node: str, op: str, op_id: str) -> AuditEntry:
        """Record an operation entering; notes any operation on the same VM still in flight."""
        entry = AuditEntry(vm_uuid, node, op, op_id, time.monotonic())
        running = self._in_flight.setdefault(vm_uuid, [])
        entry.overlapped_with = [f"{e.node}:{e.op}:{e.op_id}" for e in running]
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

    def op_state(self, op_id: str) -> str:
        """``applied``, ``in_flight`` (arrived, not applied yet) or ``unknown`` (never seen)."""
        if op_id in self.applied:
            return OP_APPLIED
        if any(e.op_id == op_id for entries in self._in_flight.values() for e in entries):
            return OP_IN_FLIGHT
        return OP_UNKNOWN

    def in_flight_by(self, node: str) -> int:
        return sum(1 for entries in self._in_flight.values() for e in entries if e.node == node)

    def host(self, host_id: str) -> SimulatedHost:
        if host_id not in self.hosts:
            self.hosts[host_id] = SimulatedHost(host_id, self.cpu_num, self.memory_size)
        return self.hosts[host_id]

    async def inject(self, host_id: str, op: str) -> None:
        for fault in self.faults:
            if fault.host_id in ("*", host_id) and fault.op in ("*", op):
                if fault.latency:
                    await asyncio.sleep(fault.latency)
                if fault.down:
                    raise HTTPException(503, f"host {host_id} is down")
                if fault.fail:
                    raise HTTPException(500, f"injected failure of {op} on {host_id}")

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

    @app.post("/hosts/{host_id}/vms/{vm_uuid}/{op}", response_model=VmStatus)
    async def vm_op(
        host_id: str, vm_uuid: str, op: str, req: VmOp, x_zstack_node: str = Header("", max_length=64)
    ) -> VmStatus:
        if op not in VM_OPERATIONS:
            raise HTTPException(404, f"unknown operation {op}")
        if not sim.admit(vm_uuid, req.fence):
            sim.reject(vm_uuid, x_zstack_node, op, req.op_id)
            raise HTTPException(409, f"stale fence {req.fence} for vm {vm_uuid}: another node has taken it over")
        entry = sim.enter(vm_uuid, x_zstack_node, op, req.op_id)
        outcome = "error"
        try:
            await sim.inject(host_id, op)
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
        """The VM-operation audit; with ``node``, only how many of its operations are in flight."""
        if node is not None:
            return {"inFlight": sim.in_flight_by(node)}
        return {"entries": [asdict(e) for e in sim.audit], "now": time.monotonic()}

    @app.put("/admin/faults")
    async def set_faults(faults: list[AgentFault]) -> dict[str, int]:
        sim.faults = faults
        return {"faults": len(faults)}

    return app
