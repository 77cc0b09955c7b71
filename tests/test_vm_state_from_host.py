"""A VM's state as its host reports it reaches the VM only through the VM's owner
(``VmStateChangedOnHostMsg``): the host service never writes a VM row."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tests.embedded import embedded_node
from zstack_mn.agent.protocol import AgentFault, VmPlacement
from zstack_mn.client import Client
from zstack_mn.db.vms import VmRepository
from zstack_mn.messages import Event
from zstack_mn.messages.events import VmStateChangedEvent
from zstack_mn.messages.names import TOPIC_VM_STATE_CHANGED
from zstack_mn.messages.states import VmState
from zstack_mn.messages.vm import VmStateChangedOnHostMsg
from zstack_mn.node import Node

pytestmark = pytest.mark.timeout(60)


class Transitions:
    """VM state events as they arrive, awaited (never polled)."""

    def __init__(self) -> None:
        self.seen: list[VmStateChangedEvent] = []
        self._changed = asyncio.Condition()

    async def record(self, evt: Event) -> None:
        if isinstance(evt, VmStateChangedEvent):
            async with self._changed:
                self.seen.append(evt)
                self._changed.notify_all()

    async def wait(self, vm: str, old: VmState, new: VmState, timeout: float = 15) -> VmStateChangedEvent:
        def found() -> VmStateChangedEvent | None:
            return next((e for e in self.seen if (e.vm_uuid, e.old_state, e.new_state) == (vm, old, new)), None)

        match: Callable[[], VmStateChangedEvent | None] = found
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: match() is not None)
        evt = match()
        assert evt is not None
        return evt


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    async with embedded_node(tmp_path) as n:
        yield n


@pytest.fixture
async def transitions(node: Node) -> Transitions:
    assert node.bus is not None
    t = Transitions()
    await node.bus.subscribe(TOPIC_VM_STATE_CHANGED, t.record)
    return t


async def test_a_vm_gone_from_its_lost_host_is_stopped_and_frees_its_capacity(node: Node, transitions: Transitions):
    sim = node.simulated_agent
    assert sim is not None
    async with Client.http(node.http_url, timeout=15) as client:
        vm = await client.create_vm("lost", cpu_num=2, memory_size="64M")
        host = (await client.query_hosts())["inventories"][0]
        assert host["availableCpuCapacity"] == host["totalCpuCapacity"] - 2

        sim.faults = [AgentFault(op="ping", down=True)]
        await transitions.wait(vm["uuid"], VmState.RUNNING, VmState.UNKNOWN)
        where = sim.locate(vm["uuid"])
        assert where is not None
        del where.vms[vm["uuid"]]
        sim.faults = []
        await transitions.wait(vm["uuid"], VmState.UNKNOWN, VmState.STOPPED)

        after = (await client.query_vms(uuid=vm["uuid"]))["inventories"][0]
        assert after["state"] == "Stopped"
        assert "hostUuid" not in after
        assert after["lastHostUuid"] == host["uuid"]
        host_after = (await client.query_hosts())["inventories"][0]
        assert host_after["availableCpuCapacity"] == host_after["totalCpuCapacity"]
        assert host_after["availableMemoryCapacity"] == host_after["totalMemoryCapacity"]


async def test_the_owner_ignores_a_report_from_another_host_or_that_does_not_apply(node: Node):
    assert node.bus is not None
    async with Client.http(node.http_url, timeout=15) as client:
        vm = await client.create_vm("kept", cpu_num=1, memory_size="64M")
        host = vm["hostUuid"]
        other = str(uuid.uuid4())

        reply = await node.bus.call(VmStateChangedOnHostMsg(uuid=vm["uuid"], host_uuid=other, state=VmState.STOPPED))
        assert reply == {"changed": False}
        assert (await client.query_vms(uuid=vm["uuid"]))["inventories"][0]["state"] == "Running"

        await client.stop_vm(vm["uuid"])
        stopped = await node.bus.call(VmStateChangedOnHostMsg(uuid=vm["uuid"], host_uuid=host, state=VmState.UNKNOWN))
        assert stopped == {"changed": False}
        assert (await client.query_vms(uuid=vm["uuid"]))["inventories"][0]["state"] == "Stopped"


async def test_the_owner_takes_a_report_that_applies(node: Node, transitions: Transitions):
    assert node.bus is not None
    async with Client.http(node.http_url, timeout=15) as client:
        vm = await client.create_vm("reported", cpu_num=1, memory_size="64M")
        reply = await node.bus.call(
            VmStateChangedOnHostMsg(uuid=vm["uuid"], host_uuid=vm["hostUuid"], state=VmState.UNKNOWN)
        )
        assert reply["changed"] is True
        assert reply["inventory"]["state"] == "Unknown"
        assert reply["inventory"]["hostUuid"] == vm["hostUuid"]
        await transitions.wait(vm["uuid"], VmState.RUNNING, VmState.UNKNOWN)


async def test_the_tracer_corrects_a_vm_changed_behind_the_nodes_back(tmp_path: Path):
    async with embedded_node(tmp_path, vm_sync_interval=0.2) as traced:
        assert traced.bus is not None
        sim = traced.simulated_agent
        assert sim is not None
        seen = Transitions()
        await traced.bus.subscribe(TOPIC_VM_STATE_CHANGED, seen.record)
        async with Client.http(traced.http_url, timeout=15) as client:
            vm = await client.create_vm("drifting", cpu_num=4, memory_size="64M")
            where = sim.locate(vm["uuid"])
            assert where is not None

            sim.place(vm["uuid"], VmPlacement(host_id=where.host_id, state="Stopped"))
            await seen.wait(vm["uuid"], VmState.RUNNING, VmState.STOPPED)
            host = (await client.query_hosts(uuid=vm["hostUuid"]))["inventories"][0]
            assert host["availableCpuCapacity"] == host["totalCpuCapacity"]

            sim.place(vm["uuid"], VmPlacement(host_id=where.host_id, state="Running"))
            await seen.wait(vm["uuid"], VmState.STOPPED, VmState.RUNNING)
            after = (await client.query_vms(uuid=vm["uuid"]))["inventories"][0]
            assert after["hostUuid"] == vm["hostUuid"]
            host = (await client.query_hosts(uuid=vm["hostUuid"]))["inventories"][0]
            assert host["availableCpuCapacity"] == host["totalCpuCapacity"] - 4


async def test_a_report_read_before_an_operation_is_stale_and_ignored(node: Node):
    assert node.bus is not None
    async with Client.http(node.http_url, timeout=15) as client:
        vm = await client.create_vm("raced", cpu_num=1, memory_size="64M")
        version_before = await vm_version(node, vm["uuid"])
        await client.reboot_vm(vm["uuid"])
        stale = VmStateChangedOnHostMsg(
            uuid=vm["uuid"], host_uuid=vm["hostUuid"], state=VmState.STOPPED, version=version_before
        )
        assert await node.bus.call(stale) == {"changed": False}
        assert (await client.query_vms(uuid=vm["uuid"]))["inventories"][0]["state"] == "Running"


async def vm_version(node: Node, uuid: str) -> int:
    assert node.db is not None
    vm = await VmRepository(node.db).get(uuid)
    assert vm is not None
    return vm.version
