"""The hypervisor-agent protocol (HTTP + JSON): request and response models shared by the client
and the simulated agent. Every VM operation carries an ``opId``; an agent applies one opId once.

Fencing and take-over (what a real agent must do for the guarantees to hold):

* **Per VM, one fence**: the highest fence the agent has seen for the VM, from an operation or a
  fence raise. It must survive an agent restart (kept with the VM's definition), or a restarted
  agent must refuse the VM's operations until a fence raise tells it the current one.
* **The commit point.** An operation is checked twice: when it arrives (a cheap early refusal)
  and again at its *commit point*, the moment just before the agent starts to change the VM.
  At the commit point, atomically with respect to every other commit point and fence raise of
  the same VM (one lock or one serial queue per VM): refuse (409) if the operation's fence is
  below the VM's fence; answer the recorded result if its opId was already applied (no second
  effect); else mark the opId *committed*, raise the VM's fence to the operation's fence, and
  go on. Past its commit point an operation runs to its end whatever happens to the fence.
  Anything an agent does before the commit point (queueing, waiting for a worker, fetching an
  image) must not change the VM.
* **Fence raise** (``POST …/vms/{vm}/fence``, ``FenceRequest``): under the same per-VM lock,
  refuse (409) a fence below the VM's fence (a later owner has raised it already), else set the
  VM's fence, make it durable, and answer ``FenceReply`` in one go: the state of ``opId``, the
  operations on the VM still in flight, those it has just cut off, and the VM's state here.
  Raising to the fence already held is accepted and changes nothing, so a new owner may repeat
  the raise to poll.
* **Op state** of an opId (``applied`` / ``in_flight`` / ``unknown``, also ``GET …/ops/{opId}``):
  ``applied`` once it took effect (results are kept at least as long as a node may re-send it);
  ``in_flight`` while a request for it is past its commit point and not finished, or has arrived
  with a fence not below the VM's fence (so it may still commit); ``unknown`` otherwise: never
  seen, failed, or arrived but cut off by a higher fence. ``unknown`` after a fence raise means
  that nothing sent before the raise can apply that opId any more: only a request carrying the
  new fence can.

The guarantee: once a fence raise to N has answered, no request with a fence below N starts to
act on the VM. The only such request that may still be acting is one past its commit point,
which the reply lists in ``inFlight`` (and reports as ``in_flight`` when it is ``opId``); the new
owner waits for those (polling ``GET …/ops/{opId}`` or repeating the raise) for as long as the
agent takes to finish them, never for the old owner's call deadline. A request admitted before
the raise but not yet at its commit point is refused there (409, audited as a stale fence) and
listed in ``fencedOut``.

A node therefore takes over a VM by: the compare-and-set that raises the VM's version to N in
the database; a fence raise to N, with the operation's opId, at the agent of the VM's host (and
of its migration target, if any: fences are per agent); waiting while the reply (or a repeat)
lists operations in flight; then finishing the operation from ``opState`` (``applied``: record
it; ``unknown``: send it again under the same opId with fence N).
"""

from __future__ import annotations

from typing import Final, Literal

from pydantic import Field

from zstack_mn.messages import WireModel

VM_RUNNING, VM_STOPPED, VM_DESTROYED = "Running", "Stopped", "Destroyed"
OP_APPLIED: Final = "applied"
OP_IN_FLIGHT: Final = "in_flight"
OP_UNKNOWN: Final = "unknown"

OpStateName = Literal["applied", "in_flight", "unknown"]


class HostFacts(WireModel):
    host_id: str
    hostname: str
    cpu_num: int = Field(ge=1)
    memory_size: int = Field(ge=1)


class VmOp(WireModel):
    """One VM operation. ``fence`` is the VM's version when the sending node began or took over
    the operation: an agent refuses a fence lower than one it has seen for the VM (409), which
    stops a node that lost the VM, but does not know it yet, from acting on it. It is checked on
    arrival and again at the commit point (see the module docstring)."""

    op_id: str = Field(min_length=1, max_length=128)
    fence: int = Field(0, ge=0)
    cpu_num: int = Field(1, ge=1)
    memory_size: int = Field(1, ge=1)
    target_host_id: str | None = None


class VmStatus(WireModel):
    uuid: str
    state: str


class VmList(WireModel):
    vms: list[VmStatus]


class OpState(WireModel):
    """What an agent knows of one operation id: a node taking over a half-done operation asks
    before it re-sends, so that its request never overlaps the previous owner's."""

    op_id: str
    state: OpStateName


class FenceRequest(WireModel):
    """``POST /hosts/{host}/vms/{vm}/fence``: from now on refuse every operation on the VM whose
    fence is below ``fence``; answer what is known of ``opId`` (the operation the new owner is
    taking over, if any)."""

    fence: int = Field(ge=0)
    op_id: str | None = Field(None, min_length=1, max_length=128)


class FenceReply(WireModel):
    """The answer to a fence raise, all read at the moment the new fence took hold.

    ``opState``: the state of the request's ``opId`` (None when it named none). ``inFlight``:
    op ids on the VM that may still act (past their commit point, or admitted with a fence not
    below ``fence``); a new owner waits until none is left. ``fencedOut``: op ids that had
    arrived with a lower fence and had not reached their commit point; they will be refused
    there. ``vmState`` / ``hostId``: the VM's state on this agent and the host that has it
    (None when no host here has it)."""

    vm_uuid: str
    fence: int
    op_id: str | None = None
    op_state: OpStateName | None = None
    in_flight: list[str] = Field(default_factory=list)
    fenced_out: list[str] = Field(default_factory=list)
    vm_state: str | None = None
    host_id: str | None = None


class VmPlacement(WireModel):
    """Simulator only, ``PUT /admin/vms/{vm}``: put the VM on ``hostId`` in ``state`` behind the
    management nodes' back (moved from any other host), as an operator or a crash would."""

    host_id: str = Field(min_length=1, max_length=128)
    state: Literal["Running", "Stopped"]


class AgentFault(WireModel):
    """Failure injection for the simulator: per host (or ``*``) and operation (or ``*``).

    ``latency`` is spent before the operation's commit point (a fence raise meanwhile cuts it
    off); ``apply_latency`` after it (the operation is committed: it finishes whatever happens
    to the fence, and a fence raise meanwhile reports it in flight)."""

    host_id: str = "*"
    op: str = "*"
    latency: float = Field(0.0, ge=0, le=600)
    apply_latency: float = Field(0.0, ge=0, le=600)
    fail: bool = False
    down: bool = False
