"""The fault matrix of docs/FAULTS.md on real processes, RabbitMQ and PostgreSQL, judged by the
history checker (``zstack_mn.testing.faults`` and ``checker``).

Each row runs once at a random moment (the seed is in the report, to replay it); with
``--run-slow`` (``make fault-full``) each row runs ``FULL_RUNS`` times. Every run's one-line report
is printed at the end of the session and written as JSON to ``--fault-report``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from zstack_mn.testing.fault_rows import HA_ROWS, ROWS
from zstack_mn.testing.faults import RUN_BOUND_S, Report, run_on

FULL_RUNS = 10

DEFAULT_HA_ROWS = frozenset({"broker-member-kill"})
"""The HA rows the default suite runs (each starts a RabbitMQ cluster and a PostgreSQL pair: about
80 s); ``make fault-full`` runs them all. The database fail-over under load is also in
``tests/test_compose_ha.py``, and the multi-host connector in ``tests/test_pg_hosts.py``."""

HA_START_S = 180
"""What a row on its own RabbitMQ cluster and PostgreSQL pair adds: starting and stopping them."""

pytestmark = [pytest.mark.integration, pytest.mark.cluster, pytest.mark.timeout(RUN_BOUND_S + 60 + HA_START_S)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "row_name" in metafunc.fixturenames:
        full = metafunc.config.getoption("--run-slow")
        runs = FULL_RUNS if full else 1
        rows = [name for name in ROWS if full or name not in HA_ROWS or name in DEFAULT_HA_ROWS]
        params = [
            pytest.param(name, i, id=f"{name}-{i}", marks=[pytest.mark.slow] if runs > 1 else [])
            for name in rows
            for i in range(runs)
        ]
        metafunc.parametrize(("row_name", "run_index"), params)


async def test_fault_row_holds(
    row_name: str, run_index: int, tmp_path: Path, amqp_url: str, pg_database: str, fault_reports: list[Report]
):
    # Bounded inside the event loop (below pytest-timeout), so that a run that hangs is cancelled
    # and its processes are stopped, instead of being left running by pytest-timeout.
    report = await run_on(ROWS[row_name], tmp_path, amqp_url=amqp_url, database_url=pg_database)
    fault_reports.append(report)
    assert report.verdict["ok"] > 0, "the load made no successful request: the run proved nothing"
    assert report.holds, (
        f"{report.line()}\nproblems: {report.problems}\nexamples: {report.verdict['examples']}\n"
        f"errors: {report.verdict['error_examples']}"
    )
