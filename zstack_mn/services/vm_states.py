"""The VM state machine: which operation is allowed from which state, through which transient
state, to which final state. The states themselves are ``zstack_mn.messages.states.VmState``;
the names below are short aliases of its members for the code that reads the machine."""

from __future__ import annotations

from dataclasses import dataclass

from zstack_mn.messages.states import TRANSIENT_VM_STATES, VmState

CREATED, STARTING, RUNNING = VmState.CREATED, VmState.STARTING, VmState.RUNNING
STOPPING, STOPPED, REBOOTING = VmState.STOPPING, VmState.STOPPED, VmState.REBOOTING
MIGRATING, DESTROYING, DESTROYED, UNKNOWN = VmState.MIGRATING, VmState.DESTROYING, VmState.DESTROYED, VmState.UNKNOWN

TRANSIENT = TRANSIENT_VM_STATES


@dataclass(frozen=True, slots=True)
class Operation:
    agent_op: str
    allowed_from: frozenset[VmState]
    transient: VmState
    final: VmState


OPERATIONS = {
    "start": Operation("start", frozenset({CREATED, STOPPED}), STARTING, RUNNING),
    "stop": Operation("stop", frozenset({RUNNING, UNKNOWN}), STOPPING, STOPPED),
    "reboot": Operation("reboot", frozenset({RUNNING}), REBOOTING, RUNNING),
    "destroy": Operation("destroy", frozenset({CREATED, STOPPED, RUNNING, UNKNOWN}), DESTROYING, DESTROYED),
    "migrate": Operation("migrate", frozenset({RUNNING}), MIGRATING, RUNNING),
}

OPERATION_OF_TRANSIENT = {op.transient: name for name, op in OPERATIONS.items()}
