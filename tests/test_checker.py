"""The history checker on hand-made histories: each violation it exists to find is found, and a
clean history passes. (The fault matrix trusts it; these tests are why.)"""

from __future__ import annotations

from types import SimpleNamespace

from zstack_mn.messages.ids import request_id_for_key
from zstack_mn.testing.checker import AgentView, check
from zstack_mn.testing.history import ERROR, HUNG, OK, TIMEOUT, Op

HOST = SimpleNamespace(
    uuid="host-1",
    name="h1",
    agent_url="http://agent/hosts/h1",
    cpu_total=8,
    cpu_available=7,
    memory_total=1024,
    memory_available=960,
)


def vm_row(uuid: str = "vm-1", state: str = "Running", host: str | None = "host-1") -> SimpleNamespace:
    return SimpleNamespace(
        uuid=uuid,
        state=state,
        host_uuid=host,
        target_host_uuid=None,
        cpu_num=1,
        memory_size=64,
        op_id=None,
        op_node=None,
        version=1,
    )


def op(seq: int, kind: str, outcome: str = OK, state: str | None = None, vm: str = "vm-1") -> Op:
    return Op(
        seq, 0, kind, vm, key=f"key-{seq}", sent=float(seq), answered=float(seq) + 0.5, outcome=outcome, state=state
    )


def op_record(o: Op) -> str:
    return "op:" + request_id_for_key(o.key)


def audit(vm: str, node: str, entered: float, overlapped: list[str] | None = None, outcome: str = "Running") -> dict:
    return {
        "vm": vm,
        "node": node,
        "op": "start",
        "op_id": "x",
        "entered": entered,
        "left": entered + 0.1,
        "outcome": outcome,
        "overlapped_with": overlapped or [],
    }


def clean() -> tuple[list[Op], list, list, set[str], AgentView]:
    ops = [op(0, "stop", state="Stopped"), op(1, "start", state="Running")]
    effects = {request_id_for_key(o.key): 1 for o in ops}
    agent = AgentView(effects, {"vm-1": {"host": "h1", "state": "Running"}}, [audit("vm-1", "n1", 1.0)])
    return ops, [vm_row()], [HOST], {op_record(o) for o in ops}, agent


def test_a_clean_history_holds():
    v = check(*clean(), evicted_at={})
    assert v.holds, v.examples
    assert (v.ops, v.ok) == (2, 2)


def test_an_acknowledged_request_without_a_durable_record_is_lost():
    ops, vms, hosts, ids, agent = clean()
    ids.discard(op_record(ops[1]))
    v = check(ops, vms, hosts, ids, agent, evicted_at={})
    assert v.counts["lost"] == 1
    assert not v.holds


def test_a_final_state_contradicting_the_last_acknowledged_request_is_lost():
    ops, _, _hosts, ids, agent = clean()
    agent = AgentView(agent.effects, {"vm-1": {"host": "h1", "state": "Stopped"}}, agent.audit)
    stopped = SimpleNamespace(**{**vm_row().__dict__, "state": "Stopped", "host_uuid": None})
    free = SimpleNamespace(**{**HOST.__dict__, "cpu_available": 8, "memory_available": 1024})
    v = check(ops, [stopped], [free], ids, agent, evicted_at={})
    assert v.counts["lost"] == 1, v.examples


def test_a_time_out_that_never_took_effect_is_lost_and_one_that_did_is_not():
    ops, vms, hosts, ids, agent = clean()
    never = op(2, "reboot", outcome=TIMEOUT)
    late = op(3, "reboot", outcome=TIMEOUT)
    ids.add(op_record(late))
    v = check([*ops, never, late], vms, hosts, ids, agent, evicted_at={})
    assert v.counts["lost"] == 1
    assert v.timeouts == 2
    assert v.indeterminate_applied == 1


def test_no_answer_is_hung():
    ops, vms, hosts, ids, agent = clean()
    v = check([*ops, op(2, "stop", outcome=HUNG)], vms, hosts, ids, agent, evicted_at={})
    assert v.counts["hung"] == 1


def test_an_effect_no_request_made_and_capacity_held_twice_are_duplicates():
    ops, vms, _, ids, agent = clean()
    agent = AgentView({**agent.effects, "someone-else": 1}, agent.vms, agent.audit)
    double = SimpleNamespace(**{**HOST.__dict__, "cpu_available": 6})
    v = check(ops, vms, [double], ids, agent, evicted_at={})
    assert v.counts["duplicated"] == 2, v.examples


def test_overlapping_agent_calls_and_effects_after_eviction_are_dual_ownership():
    ops, vms, hosts, ids, agent = clean()
    entries = [
        audit("vm-1", "n1", 1.0),
        audit("vm-1", "n2", 1.05, overlapped=["n1:start:x"]),
        audit("vm-1", "n3", 9.0),
        audit("vm-1", "n3", 9.5, outcome="duplicate:Running"),
    ]
    v = check(ops, vms, hosts, ids, AgentView(agent.effects, agent.vms, entries), evicted_at={"n3": 8.0})
    assert v.counts["dual_ownership"] == 2, v.examples
    assert v.stale_absorbed == 1


def test_a_vm_left_transient_or_disagreeing_with_the_agent_is_reported():
    ops, _, _hosts, ids, agent = clean()
    stuck = SimpleNamespace(**vm_row("vm-2", "Stopping").__dict__)
    ghost = vm_row("vm-3", "Stopped", host=None)
    agent = AgentView(agent.effects, {**agent.vms, "vm-3": {"host": "h1", "state": "Running"}}, agent.audit)
    full = SimpleNamespace(**{**HOST.__dict__, "cpu_available": 6, "memory_available": 896})
    v = check(ops, [vm_row(), stuck, ghost], [full], ids, agent, evicted_at={})
    assert v.counts["stranded"] == 1, v.examples
    assert v.counts["diverged"] == 1, v.examples


def test_an_error_without_effect_does_not_count_as_the_last_request():
    ops, vms, hosts, ids, agent = clean()
    failed = op(2, "stop", outcome=ERROR)
    failed.code = "INVALID_STATE"
    v = check([*ops, failed], vms, hosts, ids, agent, evicted_at={})
    assert v.holds
    assert v.errors == {"INVALID_STATE": 1}


def test_a_refused_stale_request_is_not_dual_ownership():
    ops, vms, hosts, ids, agent = clean()
    entries = [
        audit("vm-1", "n1", 1.0),
        audit("vm-1", "n2", 1.05, overlapped=["n1:start:x"], outcome="rejected:stale-fence"),
    ]
    v = check(ops, vms, hosts, ids, AgentView(agent.effects, agent.vms, entries), evicted_at={"n2": 0.5})
    assert v.holds
    assert v.stale_rejected == 1
