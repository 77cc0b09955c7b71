"""The fault rows' "every VM served again" measure, on hand-made histories."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from zstack_mn.testing import faults
from zstack_mn.testing.fault_rows import ROWS, Run, every_vm_served_again_s
from zstack_mn.testing.faults import Report
from zstack_mn.testing.history import ERROR, OK, Op

FAULT = 100.0


def _run(*ops: Op) -> Run:
    return cast(Run, SimpleNamespace(history=SimpleNamespace(ops=list(ops)), injected_at=FAULT))


def _op(seq: int, vm: str, sent: float, answered: float | None, outcome: str = OK, **kw: Any) -> Op:
    return Op(seq, 0, "stop", vm, f"k{seq}", sent, answered, outcome, **kw)


def test_each_vm_counts_from_the_fault_or_its_first_request_after_it_to_its_first_success() -> None:
    run = _run(
        _op(1, "a", 99.0, 99.5),  # answered before the fault: not counted
        _op(2, "a", 99.8, 101.5, outcome=ERROR),  # in flight at the fault: a waits from 100
        _op(3, "a", 101.6, 102.0),  # a served 2.0 s after the fault
        _op(4, "b", 103.0, 103.4),  # b first asked 3 s later: served 0.4 s after it asked
    )
    assert every_vm_served_again_s(run) == 2.0


def test_a_failed_create_that_names_no_vm_is_not_a_vm_left_unserved() -> None:
    run = _run(_op(1, "", 100.5, 100.6, outcome=ERROR), _op(2, "a", 100.2, 100.9))
    assert every_vm_served_again_s(run) is not None


def test_a_vm_asked_about_and_never_served_leaves_no_figure() -> None:
    run = _run(_op(1, "a", 100.5, 100.6), _op(2, "b", 100.5, 101.0, outcome=ERROR))
    assert every_vm_served_again_s(run) is None


async def test_a_run_that_cannot_complete_is_recorded_as_failed_with_its_reason(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    async def cluster_did_not_start(*_: Any, **__: Any) -> Report:
        raise TimeoutError("node-2 not ready within 60s")

    monkeypatch.setattr(faults, "run_isolated", cluster_did_not_start)
    report = await faults.run_recorded(ROWS["sigkill"], tmp_path, seed=7)
    assert not report.holds
    assert report.row == "sigkill"
    assert report.seed == 7
    assert report.problems == [
        f"the run did not complete: TimeoutError: node-2 not ready within 60s (traceback in {tmp_path / 'failure.txt'})"
    ]
    assert "cluster_did_not_start" in (tmp_path / "failure.txt").read_text()
    assert "FAILS" in report.line()
    summary = faults.summarize([report])
    assert summary["rows"]["sigkill"]["runs"] == 1
    assert summary["rows"]["sigkill"]["held"] == 0
