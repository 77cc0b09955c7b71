"""The VMs of a host as its agent sees them, told to the VMs' owners (ZStack's VM tracer).

A host's tracker never writes a VM. It reads what the database has on the host, then asks the
host's agent, then sends each VM's owner a ``VmStateChangedOnHostMsg`` for what differs, carrying
the VM's version as read *before* the agent was asked: an operation that ran in between changed
the version, and the owner drops the report as stale. Three uses:

* a host is lost: its running VMs are Unknown (no agent to ask);
* a host answers again, and every ``vm_sync_interval`` for each connected host a node owns: the
  agent's states (a VM the agent does not list is Stopped), and a VM the agent runs that the
  database has nowhere (or Stopped) is Running there, capacity taken, if the host has room.

    sync = HostVmSync(vms, agents, bus)
    await sync.sync(host_uuid, agent_url)
"""

from __future__ import annotations

import asyncio

import structlog

from zstack_mn.agent.client import AgentClient
from zstack_mn.bus.cloudbus import CloudBus
from zstack_mn.db.vms import VmRepository, VmSeen
from zstack_mn.messages import ZStackError
from zstack_mn.messages.states import VmState
from zstack_mn.messages.vm import VmStateChangedOnHostMsg

log = structlog.get_logger(__name__)

PAGE = 1000
OWNER_CALLS = 64
ON_A_HOST = frozenset({VmState.RUNNING, VmState.UNKNOWN})
"""The states of a VM that holds its host outside an operation."""
PLACEABLE = frozenset({VmState.CREATED, VmState.STOPPED})
"""The states of a VM that holds no host, and may be found running on one."""


class HostVmSync:
    def __init__(self, vms: VmRepository, agents: AgentClient, bus: CloudBus) -> None:
        self.vms = vms
        self.agents = agents
        self.bus = bus

    async def host_lost(self, host_uuid: str) -> int:
        """Every running VM of the host is Unknown; returns how many reports were sent."""
        sent = 0
        after = ""
        while page := await self.vms.on_host(host_uuid, frozenset({VmState.RUNNING}), after, PAGE):
            after = page[-1].uuid
            sent += await self._tell(host_uuid, [(vm, VmState.UNKNOWN) for vm in page])
        return sent

    async def sync(self, host_uuid: str, agent_url: str) -> int:
        """Bring the VMs of the host in line with its agent; returns how many reports were sent.
        ZStackError when the agent cannot be read (nothing is sent for that page)."""
        sent = 0
        known: set[str] = set()
        after = ""
        while True:
            page = await self.vms.on_host(host_uuid, ON_A_HOST, after, PAGE)
            real = await self._states(agent_url)
            known.update(vm.uuid for vm in page)
            changes = [(vm, _reported(real.get(vm.uuid))) for vm in page]
            sent += await self._tell(host_uuid, [(vm, state) for vm, state in changes if state != vm.state])
            if len(page) < PAGE:
                break
            after = page[-1].uuid
        strays = {uuid for uuid, state in real.items() if state == VmState.RUNNING and uuid not in known}
        if strays:
            sent += await self._place_strays(host_uuid, agent_url, strays)
        return sent

    async def _place_strays(self, host_uuid: str, agent_url: str, strays: set[str]) -> int:
        """VMs the agent runs that the database does not have on this host: read them, then ask
        the agent again, and report Running only what it still runs (the read came first)."""
        seen = [vm for vm in await self.vms.seen(strays) if vm.state in PLACEABLE and vm.host_uuid is None]
        if not seen:
            return 0
        real = await self._states(agent_url)
        return await self._tell(
            host_uuid, [(vm, VmState.RUNNING) for vm in seen if real.get(vm.uuid) == VmState.RUNNING]
        )

    async def _states(self, agent_url: str) -> dict[str, str]:
        return {v.uuid: v.state for v in (await self.agents.list_vms(agent_url)).vms}

    async def _tell(self, host_uuid: str, reports: list[tuple[VmSeen, VmState]]) -> int:
        """Send the reports to the VMs' owners, at most OWNER_CALLS at once, each within the call
        deadline; a report that fails is logged (the next pass finds the difference again)."""
        slots = asyncio.Semaphore(OWNER_CALLS)
        failed = 0

        async def tell(vm: VmSeen, state: VmState) -> None:
            nonlocal failed
            msg = VmStateChangedOnHostMsg(uuid=vm.uuid, host_uuid=host_uuid, state=state, version=vm.version)
            async with slots:
                try:
                    await self.bus.call(msg)
                except ZStackError as exc:
                    failed += 1
                    log.warning("a VM's owner did not take the host's report", vm=vm.uuid, error=exc.description)

        await asyncio.gather(*(tell(vm, state) for vm, state in reports))
        if failed:
            log.warning("some VMs keep a state their host contradicts", host=host_uuid, vms=failed)
        return len(reports) - failed


def _reported(state: str | None) -> VmState:
    return VmState.RUNNING if state == VmState.RUNNING else VmState.STOPPED
