"""The history checker: reconciles what the clients saw with the database and the agent, in the
manner of Jepsen's queue checker, and counts the four failures docs/FAULTS.md forbids.

* **lost**: a request answered with success whose operation is not durable (no ``op:<id>``
  record, or the VM's final state contradicts the last acknowledged operation on it), or a
  request that timed out and never took effect anywhere;
* **hung**: no answer by the deadline + 1 s;
* **duplicated**: an agent effect applied twice for one operation id, an effect under an id no
  client request made, or host capacity that does not equal what its VMs hold;
* **dual ownership**: an agent saw two operations on one VM in flight at once, or an operation
  with an effect from a node after that node had been seen evicted. Operations the agent
  refused for a stale fence, or absorbed as a repeat of an applied op id, had no effect: they
  are counted apart (``stale_rejected``, ``stale_absorbed``), not as violations.

Also reported, and required to be 0: VMs left in a transient state after quiescence and VMs
whose database state disagrees with the agent's.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import select

from zstack_mn.db.engine import Database
from zstack_mn.db.models import Host, MessageResult, VmInstance
from zstack_mn.db.results import OPERATION_PREFIX
from zstack_mn.messages.ids import request_id_for_key
from zstack_mn.services.vm_states import TRANSIENT
from zstack_mn.testing.history import ERROR, HUNG, OK, TIMEOUT, Op

VIOLATION_KINDS = ("lost", "hung", "duplicated", "dual_ownership", "stranded", "diverged")
EXAMPLES = 5


@dataclass
class Verdict:
    """What the checker found; ``holds`` when every violation count is 0."""

    ops: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    timeouts: int = 0
    indeterminate_applied: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(VIOLATION_KINDS, 0))
    stale_absorbed: int = 0
    stale_rejected: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)
    error_examples: dict[str, list[str]] = field(default_factory=dict)

    def flag(self, kind: str, example: str) -> None:
        self.counts[kind] += 1
        shown = self.examples.setdefault(kind, [])
        if len(shown) < EXAMPLES:
            shown.append(example)

    @property
    def holds(self) -> bool:
        return not any(self.counts.values())

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "holds": self.holds}


@dataclass(frozen=True)
class AgentView:
    """The agent's ``/admin/stats`` and ``/admin/audit`` answers."""

    effects: dict[str, int]
    vms: dict[str, dict[str, str]]
    audit: list[dict[str, Any]]


async def read_database(database_url: str) -> tuple[list[Any], list[Any], set[str]]:
    """VM rows, host rows and the ids of stored operation results."""
    db = Database(database_url)
    try:
        async with db.begin() as conn:
            vms = list(await conn.execute(select(VmInstance.__table__)))
            hosts = list(await conn.execute(select(Host.__table__)))
            ids = {r.id for r in await conn.execute(select(MessageResult.__table__.c.id))}
    finally:
        await db.close()
    return vms, hosts, ids


def check(
    ops: list[Op],
    vms: list[Any],
    hosts: list[Any],
    result_ids: set[str],
    agent: AgentView,
    evicted_at: dict[str, float],
) -> Verdict:
    """Reconcile the history with the database and agent read after quiescence.

    ``evicted_at`` maps a node uuid to the (monotonic) moment it was first seen gone from the
    membership table without having left gracefully.
    """
    v = Verdict(ops=len(ops))
    errors: Counter[str] = Counter()
    request_ids = {request_id_for_key(op.key): op for op in ops}
    for op in ops:
        op_id = request_id_for_key(op.key)
        applied = OPERATION_PREFIX + op_id in result_ids or agent.effects.get(op_id, 0) > 0
        if op.outcome == OK:
            v.ok += 1
            if OPERATION_PREFIX + op_id not in result_ids:
                v.flag("lost", f"{op.kind} {op.vm} (key {op.key}) acknowledged but no durable op record")
        elif op.outcome == HUNG:
            v.flag("hung", f"{op.kind} {op.vm} (key {op.key}) sent at {op.sent:.2f} never answered")
        elif op.outcome == TIMEOUT:
            v.timeouts += 1
            if applied:
                v.indeterminate_applied += 1
            else:
                v.flag("lost", f"{op.kind} {op.vm} (key {op.key}) timed out and never took effect")
        elif op.outcome == ERROR:
            errors[op.code or "?"] += 1
            shown = v.error_examples.setdefault(op.code or "?", [])
            if len(shown) < EXAMPLES:
                shown.append(f"{op.kind} {op.vm} at {op.sent:.2f}: {op.detail}")
    v.errors = dict(errors)
    _check_last_acknowledged(ops, vms, result_ids, agent, v)
    _check_effects(agent, request_ids, v)
    _check_capacity(vms, hosts, v)
    _check_agent_agrees(vms, hosts, result_ids, agent, v)
    _check_ownership(agent, evicted_at, v)
    return v


def _check_last_acknowledged(ops: list[Op], vms: list[Any], result_ids: set[str], agent: AgentView, v: Verdict) -> None:
    """A VM's final state must be what its last request that took effect said, when that
    request was acknowledged (a request that failed without effect does not count)."""
    by_uuid = {r.uuid: r for r in vms}
    last: dict[str, Op] = {}
    for op in ops:
        op_id = request_id_for_key(op.key)
        took_effect = OPERATION_PREFIX + op_id in result_ids or agent.effects.get(op_id, 0) > 0
        if op.vm and (op.outcome != ERROR or took_effect):
            last[op.vm] = op
    for vm, op in last.items():
        row = by_uuid.get(vm)
        if op.outcome != OK:
            continue
        if row is None:
            v.flag("lost", f"vm {vm}: acknowledged {op.kind} but the VM is gone")
        elif op.state and row.state != op.state:
            v.flag("lost", f"vm {vm}: last acknowledged {op.kind} said {op.state}, database says {row.state}")


def _check_effects(agent: AgentView, request_ids: dict[str, Op], v: Verdict) -> None:
    for op_id, count in agent.effects.items():
        if count > 1:
            v.flag("duplicated", f"op {op_id} applied {count} times")
        if op_id not in request_ids:
            v.flag("duplicated", f"agent applied op {op_id}, which no client request made")


def _check_capacity(vms: list[Any], hosts: list[Any], v: Verdict) -> None:
    held_cpu: Counter[str] = Counter()
    held_mem: Counter[str] = Counter()
    for r in vms:
        for h in {r.host_uuid, r.target_host_uuid} - {None}:
            held_cpu[h] += r.cpu_num
            held_mem[h] += r.memory_size
    for h in hosts:
        used_cpu, used_mem = h.cpu_total - h.cpu_available, h.memory_total - h.memory_available
        if (used_cpu, used_mem) != (held_cpu[h.uuid], held_mem[h.uuid]):
            v.flag(
                "duplicated",
                f"host {h.name}: {used_cpu} CPUs/{used_mem} B reserved, its VMs hold {held_cpu[h.uuid]}/{held_mem[h.uuid]}",
            )


def _check_agent_agrees(vms: list[Any], hosts: list[Any], result_ids: set[str], agent: AgentView, v: Verdict) -> None:
    host_of_agent = {h.agent_url.rstrip("/").rsplit("/", 1)[-1]: h.uuid for h in hosts}
    for r in vms:
        if r.state in TRANSIENT:
            recorded = OPERATION_PREFIX + str(r.op_id) in result_ids
            v.flag(
                "stranded",
                f"vm {r.uuid} left {r.state} (op {r.op_id} by {r.op_node}, version {r.version}, "
                f"op recorded {recorded}, agent effects {agent.effects.get(str(r.op_id), 0)})",
            )
            continue
        real = agent.vms.get(r.uuid)
        real_state = real["state"] if real else "Absent"
        real_host = host_of_agent.get(real["host"]) if real else None
        if r.state == "Running" and (real_state != "Running" or real_host != r.host_uuid):
            v.flag("diverged", f"vm {r.uuid}: database Running on {r.host_uuid}, agent {real_state} on {real_host}")
        elif r.state == "Stopped" and real_state == "Running":
            v.flag("diverged", f"vm {r.uuid}: database Stopped, agent Running")


def _check_ownership(agent: AgentView, evicted_at: dict[str, float], v: Verdict) -> None:
    for entry in agent.audit:
        if str(entry["outcome"]).startswith("rejected"):
            v.stale_rejected += 1
            continue
        if entry["overlapped_with"]:
            v.flag(
                "dual_ownership",
                f"vm {entry['vm']}: {entry['node']} {entry['op']} while {entry['overlapped_with']} in flight",
            )
        gone = evicted_at.get(entry["node"])
        if gone is not None and entry["entered"] > gone:
            if str(entry["outcome"]).startswith("duplicate"):
                v.stale_absorbed += 1
            else:
                v.flag(
                    "dual_ownership",
                    f"vm {entry['vm']}: {entry['op']} with an effect from {entry['node']} "
                    f"{entry['entered'] - gone:.2f}s after it was evicted",
                )
