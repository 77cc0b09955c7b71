"""The stop/start load the compose tests run on a stack's VMs under a fault, and what they check
of it afterwards: every VM served again, nothing acknowledged lost."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import httpx

from tests.compose.stack import Stack
from tests.embedded import session_headers
from zstack_mn.client import Client
from zstack_mn.messages import ZStackError


@dataclass
class Op:
    """One operation of the load: when it was sent and, once acknowledged, when and with what state."""

    sent: float
    acked: float | None = None
    state: str | None = None


@dataclass
class Churned:
    """One VM stopped and started in a loop; a failed call ends its loop."""

    uuid: str
    name: str
    ops: list[Op] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def acked_after(self, t: float) -> list[Op]:
        return [op for op in self.ops if op.acked is not None and op.acked > t]

    def served_again(self, fault: float) -> float | None:
        """Seconds from the fault to the acknowledgement of this VM's first request sent after it."""
        after = [op for op in self.ops if op.sent >= fault and op.acked is not None]
        return after[0].acked - fault if after and after[0].acked is not None else None

    @property
    def last_state(self) -> str:
        """The state the last acknowledged operation left the VM in."""
        return [op.state for op in self.ops if op.state is not None][-1]


async def churn(client: Client, vm: Churned, stop: asyncio.Event) -> None:
    state = "Running"
    while not stop.is_set():
        op = Op(time.monotonic())
        vm.ops.append(op)
        try:
            inv = await (client.stop_vm if state == "Running" else client.start_vm)(vm.uuid)
        except ZStackError as exc:
            vm.failed.append(f"{exc.code.value}: {exc}")
            return
        op.acked, op.state = time.monotonic(), inv["state"]
        state = inv["state"]


async def until_served_again(vms: list[Churned], fault: float, what: str, within: float) -> float:
    """Wait (at most ``within`` seconds) until every VM has two operations acknowledged after
    ``fault``, failing at once on a failed call. The slowest VM's time from the fault to its first
    request sent after it being acknowledged."""
    deadline = time.monotonic() + within
    while not all(len(vm.acked_after(fault)) >= 2 for vm in vms):
        assert [(vm.name, vm.failed) for vm in vms if vm.failed] == [], what
        slow = [vm.name for vm in vms if len(vm.acked_after(fault)) < 2]
        assert time.monotonic() < deadline, f"{what}: not served again within {within} s: {slow}"
        await asyncio.sleep(0.1)
    served = [vm.served_again(fault) for vm in vms]
    return max(s for s in served if s is not None)


async def check_nothing_lost(stack: Stack, host: str, vms: list[Churned], password: str) -> None:
    """Each VM is, in the database and on the agent's ``host``, in the state its last acknowledged
    operation left it in."""
    auth = await session_headers(stack.url("node1"), password)
    async with httpx.AsyncClient(timeout=10, headers=auth) as http:
        on_agent = (await http.get(f"{stack.url('agent')}/hosts/{host}/vms")).json()["vms"]
        agent_states = {v["uuid"]: v["state"] for v in on_agent}
        for vm in vms:
            got = await http.get(f"{stack.url('node1')}/v1/vm-instances/{vm.uuid}")
            assert got.status_code == 200, (vm.name, got.text)
            assert got.json()["inventory"]["state"] == vm.last_state, vm.name
            assert agent_states.get(vm.uuid) == vm.last_state, (vm.name, agent_states.get(vm.uuid))
