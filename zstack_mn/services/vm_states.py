"""The VM state machine: which operation is allowed from which state, through which transient
state, to which final state."""

from __future__ import annotations

from dataclasses import dataclass

CREATED, STARTING, RUNNING = "Created", "Starting", "Running"
STOPPING, STOPPED, REBOOTING = "Stopping", "Stopped", "Rebooting"
MIGRATING, DESTROYING, DESTROYED, UNKNOWN = "Migrating", "Destroying", "Destroyed", "Unknown"

TRANSIENT = (STARTING, STOPPING, REBOOTING, MIGRATING, DESTROYING)


@dataclass(frozen=True, slots=True)
class Operation:
    agent_op: str
    allowed_from: frozenset[str]
    transient: str
    final: str


OPERATIONS = {
    "start": Operation("start", frozenset({CREATED, STOPPED}), STARTING, RUNNING),
    "stop": Operation("stop", frozenset({RUNNING, UNKNOWN}), STOPPING, STOPPED),
    "reboot": Operation("reboot", frozenset({RUNNING}), REBOOTING, RUNNING),
    "destroy": Operation("destroy", frozenset({CREATED, STOPPED, RUNNING, UNKNOWN}), DESTROYING, DESTROYED),
    "migrate": Operation("migrate", frozenset({RUNNING}), MIGRATING, RUNNING),
}

OPERATION_OF_TRANSIENT = {op.transient: name for name, op in OPERATIONS.items()}
