"""The simulated hypervisor agent: many hosts in one process, each at ``/hosts/<host-id>``.

It is the hypervisor: VM states live here, never in a management node, so a node that dies
takes nothing with it. Each VM operation carries an ``opId`` and is applied once per opId (a
repeat returns the first result and counts as a duplicate), which is what the fault suite checks
for duplicated side effects. Latency, errors and outages can be injected per host and operation.

    zstack-mn agent --port 9100        # then AddHost with agentUrl http://127.0.0.1:9100/hosts/h1
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field

from fastapi import FastAPI, HTTPException

from zstack_mn.agent.protocol import VM_DESTROYED, VM_RUNNING, VM_STOPPED, AgentFault, HostFacts, VmList, VmOp, VmStatus

VM_OPERATIONS = ("start", "stop", "reboot", "destroy", "migrate")
DEFAULT_CPU = 64
DEFAULT_MEMORY = 256 << 30


@dataclass
class SimulatedHost:
    host_id: str
    cpu_num: int
    memory_size: int
    vms: dict[str, str] = field(default_factory=dict)


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
    async def vm_op(host_id: str, vm_uuid: str, op: str, req: VmOp) -> VmStatus:
        if op not in VM_OPERATIONS:
            raise HTTPException(404, f"unknown operation {op}")
        await sim.inject(host_id, op)
        return sim.apply(host_id, vm_uuid, op, req)

    @app.get("/admin/stats")
    async def stats() -> dict[str, object]:
        return {
            "effects": dict(sim.effects),
            "duplicates": sim.duplicates,
            "vms": {vm: {"host": h.host_id, "state": s} for h in sim.hosts.values() for vm, s in h.vms.items()},
        }

    @app.put("/admin/faults")
    async def set_faults(faults: list[AgentFault]) -> dict[str, int]:
        sim.faults = faults
        return {"faults": len(faults)}

    return app
