"""Taking over an operation another node began: fence first at the agent, then act, never a wait
for the previous node's deadline. The previous node is a row that names a node not in the ring."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.embedded import embedded_node
from zstack_mn.agent.protocol import VmOp
from zstack_mn.agent.simulator import CONTROL_FENCE
from zstack_mn.client import Client
from zstack_mn.db.vm_transitions import PLACE_HOST, Outcome, vm_transitions
from zstack_mn.db.vms import VmRepository
from zstack_mn.messages.vm import StartVmInstanceMsg
from zstack_mn.node import Node
from zstack_mn.services import vm_states as s

pytestmark = pytest.mark.timeout(60)

DEAD_NODE = str(uuid.uuid4())


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    async with embedded_node(tmp_path, node_timeout=60.0, agent_timeout=30.0) as n:
        yield n


async def half_done_start(node: Node, client: Client) -> tuple[str, str, int]:
    """A stopped VM whose start a node that is gone began: (vm uuid, op id, version)."""
    assert node.db is not None
    vm = await client.create_vm("taken", cpu_num=1, memory_size="64M")
    await client.stop_vm(vm["uuid"])
    op_id = str(uuid.uuid4())
    start = s.OPERATIONS["start"]
    t = await vm_transitions(node.db).begin(
        vm["uuid"],
        op_id=op_id,
        op_node=DEAD_NODE,
        allowed=start.allowed_from,
        transient=start.transient,
        final=start.final,
        place=PLACE_HOST,
        only=None,
    )
    assert t.outcome is Outcome.OK
    assert t.vm is not None
    return vm["uuid"], op_id, t.vm.version


async def test_a_stranded_start_is_fenced_then_sent_once_without_waiting_out_a_deadline(node: Node):
    sim, bus = node.simulated_agent, node.bus
    assert sim is not None
    assert bus is not None
    async with Client.http(node.http_url, timeout=15) as client:
        vm, op_id, version = await half_done_start(node, client)
        started = time.monotonic()
        reply = await bus.call(StartVmInstanceMsg(uuid=vm), msg_id=op_id, timeout=20)
        took = time.monotonic() - started
    assert reply["state"] == "Running"
    fences = [e for e in sim.control if e.vm == vm and e.kind == CONTROL_FENCE]
    assert fences, "no fence was raised before the take-over acted"
    raised = fences[0].detail["fence"]
    assert isinstance(raised, int)
    assert raised > version
    assert sim.effects[op_id] == 1
    assert took < node.settings.agent_timeout, f"the take-over waited {took:.1f}s: a deadline, not the agent"


async def test_a_stranded_start_the_agent_already_applied_is_finished_without_a_resend(node: Node):
    sim, bus = node.simulated_agent, node.bus
    assert sim is not None
    assert bus is not None
    assert node.db is not None
    async with Client.http(node.http_url, timeout=15) as client:
        vm, op_id, version = await half_done_start(node, client)
        row = await VmRepository(node.db).get(vm)
        assert row is not None
        assert row.host_uuid is not None
        host = (await client.query_hosts(uuid=row.host_uuid))["inventories"][0]
        host_id = host["agentUrl"].rstrip("/").rsplit("/", 1)[-1]
        sim.apply(host_id, vm, "start", VmOp(op_id=op_id, fence=version, cpu_num=1, memory_size=64 << 20))
        reply = await bus.call(StartVmInstanceMsg(uuid=vm), msg_id=op_id, timeout=20)
    assert reply["state"] == "Running"
    assert sim.effects[op_id] == 1
    assert sim.duplicates == 0, "the operation was sent again although the agent had applied it"
