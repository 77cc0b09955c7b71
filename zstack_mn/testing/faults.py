"""The fault matrix of docs/FAULTS.md, run against real ``zstack-mn`` processes, the real RabbitMQ
and PostgreSQL, and a simulated agent, and judged by the history checker.

One *run* of a *row*: three nodes (the row may route one of them through a cut-able proxy or a
skewed clock), an agent with two hosts, VMs, steady load from several clients; the fault at a
random moment; more load; quiescence; then the checker. Each run uses its own database and
queue prefix, and every process and server it touched is restored when it ends, even on failure.

    python -m zstack_mn.testing.faults                      # every row once
    python -m zstack_mn.testing.faults sigkill db-cut --runs 10 --json faults.json
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import io
import json
import random
import signal
import sys
import time
import traceback
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select

from zstack_mn.agent.protocol import AgentFault
from zstack_mn.bus.topology import QUEUE_TYPES
from zstack_mn.cluster.membership import LIVENESS_TRUST_ROUNDS
from zstack_mn.cluster.ring import HashRing
from zstack_mn.db.engine import Database
from zstack_mn.db.models import VmInstance
from zstack_mn.services.vm_states import TRANSIENT
from zstack_mn.testing import servers
from zstack_mn.testing.checker import AgentView, Verdict, check, read_database
from zstack_mn.testing.cluster import ClusterHarness, agent_stats
from zstack_mn.testing.fault_rows import (
    AGENT_LATENCY_S,
    ATTEMPT_TIMEOUT_S,
    DEADLINE_S,
    LATENCY_OPS,
    ROWS,
    HaServers,
    Row,
    Run,
    RunSetup,
    every_vm_served_again_s,
)
from zstack_mn.testing.ha import PgPair, RabbitCluster
from zstack_mn.testing.history import OK, History, Op, Workload, make_client
from zstack_mn.testing.observer import Observer
from zstack_mn.testing.proxy import CutProxy

QUIESCE_BOUND_S = 60.0
RUN_BOUND_S = 200.0
STUCK_REPORT_AFTER_S = 150.0
FAILURE_FILE = "failure.txt"


@dataclass
class Report:
    row: str
    seed: int
    holds: bool
    verdict: dict[str, Any]
    problems: list[str]
    measures: dict[str, Any]
    seconds: float

    def line(self) -> str:
        c = self.verdict["counts"]
        m = ", ".join(f"{k} {v}" for k, v in self.measures.items())
        status = "HOLDS" if self.holds else "FAILS"
        return (
            f"{status:5} {self.row:18} seed {self.seed:<10} ops {self.verdict['ops']:4} ok {self.verdict['ok']:4} "
            f"errors {sum(self.verdict['errors'].values()):3} lost {c['lost']} hung {c['hung']} dup {c['duplicated']} "
            f"dual {c['dual_ownership']} stranded {c['stranded']} diverged {c['diverged']} "
            f"(stale refused {self.verdict['stale_rejected']}, repeats absorbed {self.verdict['stale_absorbed']})  {m}"
        )


async def run_row(
    row: Row,
    workdir: Path,
    *,
    amqp_url: str,
    database_url: str,
    seed: int | None = None,
    vms: int = 24,
    workers: int = 6,
    load_after_s: float = 3.0,
    queue_type: str = "classic",
    ha: HaServers | None = None,
) -> Report:
    """One run of ``row`` in a cluster of its own (database and queue prefix given/derived)."""
    seed = seed if seed is not None else random.SystemRandom().randrange(1 << 30)
    rng = random.Random(seed)
    started = time.monotonic()
    harness = ClusterHarness(
        workdir,
        amqp_url=amqp_url,
        database_url=database_url,
        queue_prefix=f"f{uuidlib.uuid4().hex[:8]}",
        heartbeat=row.timings.heartbeat,
        node_timeout=row.timings.node_timeout,
        env={"ZSTACK_MN_AGENT_TIMEOUT": str(row.timings.agent_timeout), "ZSTACK_MN_QUEUE_TYPE": queue_type},
    )
    proxies: dict[str, CutProxy] = {}
    observer = Observer(database_url)
    workload: Workload | None = None
    watchdog = asyncio.get_running_loop().create_task(_report_stuck_tasks(STUCK_REPORT_AFTER_S, workdir))
    stuck_threads = (workdir / "stuck-threads.txt").open("w")
    faulthandler.dump_traceback_later(STUCK_REPORT_AFTER_S, file=stuck_threads)
    try:
        agent_url = await harness.start_agent()
        measures: dict[str, Any] = {}
        special = await row.special_node(RunSetup(harness, rng, proxies, measures)) if row.special_node else None
        nodes = await harness.start_nodes(3 if special is None else 2)
        if special is not None:
            nodes.append(await harness.start_node(extra_env=special))
        established_at = time.monotonic() + LIVENESS_TRUST_ROUNDS * row.timings.heartbeat
        await harness.wait_rings_agree(nodes, 15)
        observer.start()
        history = History(DEADLINE_S)
        vm_states = await _setup_vms(harness, agent_url, history, vms)
        run = Run(harness, nodes, rng, observer, agent_url, history, list(vm_states), proxies, ha=ha, measures=measures)
        await run.set_agent_faults([AgentFault(op=op, latency=AGENT_LATENCY_S) for op in LATENCY_OPS])
        workload = Workload(
            harness.urls(nodes), vm_states, history, workers=workers, attempt_timeout=ATTEMPT_TIMEOUT_S, seed=seed
        )
        await asyncio.sleep(max(established_at - time.monotonic(), 0.0))
        await asyncio.sleep(rng.uniform(1.0, 3.0))
        run.ring_at_injection = HashRing({n.uuid for n in nodes})
        run.injected_at = time.monotonic()
        await row.inject(run)
        await asyncio.sleep(load_after_s)
        await workload.stop()
        workload = None
        await _quiesce(run)
        verdict = check(
            history.ops, *await read_database(database_url), await _agent_view(agent_url), observer.timeline.gone_at
        )
        (workdir / "history.json").write_text(json.dumps(history.as_json()))
        _measure(run)
        if row.served_bound is not None:
            served = every_vm_served_again_s(run)
            run.measures["all_served_again_s"] = served if served is None else round(served, 2)
            run.expect(
                served is not None and served <= row.served_bound,
                f"every VM served again {served}s after the fault (bound {row.served_bound:g}s)",
            )
        detected = run.measures.get("detect_s")
        if row.detect_bound is not None and detected is not None:
            run.expect(
                detected <= row.detect_bound,
                f"every ring dropped the victim after {detected}s (bound {row.detect_bound:g}s)",
            )
        unexpected = {c: n for c, n in verdict.errors.items() if c not in row.allowed_errors}
        run.expect(not unexpected, f"errors a client should not see under this fault: {unexpected}")
        return Report(
            row.name,
            seed,
            verdict.holds and not run.problems,
            verdict.as_json(),
            run.problems,
            run.measures,
            round(time.monotonic() - started, 1),
        )
    finally:
        faulthandler.cancel_dump_traceback_later()
        stuck_threads.close()
        if (workdir / "stuck-threads.txt").stat().st_size == 0:
            (workdir / "stuck-threads.txt").unlink()
        watchdog.cancel()
        if workload is not None:
            with contextlib.suppress(Exception):
                await workload.stop()
        await observer.close()
        for proxy in proxies.values():
            proxy.heal()
        await harness.close()
        for proxy in proxies.values():
            await proxy.close()


async def _report_stuck_tasks(after: float, workdir: Path) -> None:
    """A run taking longer than ``after`` writes every task's stack to ``stuck-tasks.txt`` in its
    directory (and stderr): a hang must name the await it hangs on. (``faulthandler`` writes the
    threads' stacks to ``stuck-threads.txt`` at the same moment, for a loop blocked by a call.)"""
    await asyncio.sleep(after)
    buffer = io.StringIO()
    for task in asyncio.all_tasks():
        buffer.write(f"--- {task.get_name()}\n")
        task.print_stack(limit=12, file=buffer)
    (workdir / "stuck-tasks.txt").write_text(buffer.getvalue())
    print(f"run still going after {after:g}s; task stacks in {workdir / 'stuck-tasks.txt'}", file=sys.stderr)


async def _setup_vms(harness: ClusterHarness, agent_url: str, history: History, count: int) -> dict[str, str]:
    client = make_client(harness.urls(), DEADLINE_S, ATTEMPT_TIMEOUT_S)
    try:
        for i in range(2):
            await client.add_host(f"h{i}", f"{agent_url}/hosts/h{i}")

        async def create(name: str) -> Op:
            return await history.record(
                -1, "create", "", lambda k: client.create_vm(name, cpu_num=1, memory_size="64M", key=k)
            )

        ops = await asyncio.gather(*(create(f"vm{i}") for i in range(count)))
    finally:
        await client.close()
    failed = [op for op in ops if op.outcome != OK]
    if failed:
        raise RuntimeError(f"setup: {len(failed)} creates failed: {failed[:3]}")
    return {op.vm: op.state or "Running" for op in ops}


async def _quiesce(run: Run) -> None:
    """Wait until no VM is in a transient state and the live nodes' rings agree (bounded)."""
    db = Database(run.harness.database_url, timeout=5)

    async def settled() -> bool:
        t = VmInstance.__table__
        async with db.begin() as conn:
            busy = (await conn.execute(select(func.count()).where(t.c.state.in_(TRANSIENT)))).scalar_one()
        live = {n.uuid for n in run.nodes if n.alive}
        return busy == 0 and await run.harness.rings_agree(live)

    try:
        await run.wait_for(settled, QUIESCE_BOUND_S, "quiescence (no transient VM, rings agree)")
    finally:
        await db.close()


async def _agent_view(agent_url: str) -> AgentView:
    stats = await agent_stats(agent_url)
    async with httpx.AsyncClient(timeout=30) as http:
        audit = (await http.get(f"{agent_url}/admin/audit")).json()
    return AgentView(stats["effects"], stats["vms"], audit["entries"])


def _measure(run: Run) -> None:
    """Detection and take-over times for rows with a victim (seconds from the injection)."""
    if run.victim is None or run.ring_at_injection is None:
        return
    dropped = run.observer.timeline.first_without(run.victim_uuid, run.injected_at)
    if dropped is not None:
        run.measures["detect_s"] = round(dropped - run.injected_at, 2)
    owned = {v for v in run.vms if run.ring_at_injection.owner_of(v) == run.victim_uuid}
    served = [
        (op.answered, op.handled_by)
        for op in run.history.ops
        if op.vm in owned and op.outcome == OK and op.answered is not None and op.sent >= run.injected_at
    ]
    if served:
        run.measures["served_again_s"] = round(min(at for at, _ in served) - run.injected_at, 2)
    by_others = [at for at, node in served if node not in (None, run.victim_uuid)]
    if by_others:
        run.measures["takeover_s"] = round(min(by_others) - run.injected_at, 2)


# ---------------------------------------------------------------- command line


async def run_on(
    row: Row, workdir: Path, *, amqp_url: str, database_url: str, seed: int | None = None, queue_type: str = "classic"
) -> Report:
    """One run of ``row`` (bounded by RUN_BOUND_S) on the broker and database given; a row on the
    ``ha`` backend runs instead on a RabbitMQ cluster (quorum queues) and a PostgreSQL pair of its
    own, started here and stopped afterwards."""
    if row.backend != "ha":
        run = run_row(row, workdir, amqp_url=amqp_url, database_url=database_url, seed=seed, queue_type=queue_type)
        return await asyncio.wait_for(run, RUN_BOUND_S)
    async with RabbitCluster(workdir) as rabbit, PgPair(workdir) as pg:
        run = run_row(
            row,
            workdir,
            amqp_url=",".join(rabbit.urls),
            database_url=pg.url,
            seed=seed,
            queue_type="quorum",
            ha=HaServers(rabbit, pg),
        )
        return await asyncio.wait_for(run, RUN_BOUND_S)


async def run_isolated(row: Row, workdir: Path, seed: int | None, queue_type: str = "classic") -> Report:
    """A run with its own vhost and database, both removed afterwards (or its own servers)."""
    if row.backend == "ha":
        return await run_on(row, workdir, amqp_url="", database_url="", seed=seed)
    vhost = servers.new_vhost()
    db_name = await servers.create_database()
    try:
        return await run_on(
            row,
            workdir,
            amqp_url=servers.amqp_url(vhost),
            database_url=servers.pg_url(db_name),
            seed=seed,
            queue_type=queue_type,
        )
    finally:
        await servers.drop_database(db_name)
        servers.delete_vhost(vhost)


async def run_recorded(row: Row, workdir: Path, seed: int, queue_type: str = "classic") -> Report:
    """``run_isolated``, with a run that could not finish (its cluster or servers did not start,
    it outran RUN_BOUND_S) recorded as a run that failed, with the reason, so that a batch of
    many runs goes on and reports it instead of stopping at it."""
    started = time.monotonic()
    try:
        return await run_isolated(row, workdir, seed, queue_type)
    except Exception as exc:
        (workdir / FAILURE_FILE).write_text("".join(traceback.format_exception(exc)))
        what = str(exc) or (f"over its {RUN_BOUND_S:g} s bound" if isinstance(exc, TimeoutError) else "")
        reason = f"the run did not complete: {type(exc).__name__}: {what} (traceback in {workdir / FAILURE_FILE})"
        return Report(row.name, seed, False, Verdict().as_json(), [reason], {}, round(time.monotonic() - started, 1))


def summarize(reports: list[Report]) -> dict[str, Any]:
    rows: dict[str, dict[str, Any]] = {}
    for r in reports:
        s = rows.setdefault(
            r.row,
            {
                "runs": 0,
                "held": 0,
                "lost": 0,
                "hung": 0,
                "duplicated": 0,
                "dual_ownership": 0,
                "detect_s": [],
                "takeover_s": [],
            },
        )
        s["runs"] += 1
        s["held"] += r.holds
        for k in ("lost", "hung", "duplicated", "dual_ownership"):
            s[k] += r.verdict["counts"][k]
        for k in ("detect_s", "takeover_s"):
            if k in r.measures:
                s[k].append(r.measures[k])
    for s in rows.values():
        for k in ("detect_s", "takeover_s"):
            vals = sorted(s.pop(k))
            s[k] = {"min": vals[0], "median": vals[len(vals) // 2], "max": vals[-1]} if vals else None
    return {"rows": rows, "runs": [r.__dict__ for r in reports]}


def format_summary(summary: dict[str, Any]) -> str:
    """The per-row table a person reads: runs that held, violation totals, detection and
    take-over times (seconds from the injection, min/median/max)."""
    lines = ["row                held   lost hung dup dual   detect s min/med/max   take-over s min/med/max"]
    for name, s in summary["rows"].items():
        d = s["detect_s"] and "/".join(f"{s['detect_s'][k]:.2f}" for k in ("min", "median", "max"))
        t = s["takeover_s"] and "/".join(f"{s['takeover_s'][k]:.2f}" for k in ("min", "median", "max"))
        lines.append(
            f"{name:18} {s['held']:3}/{s['runs']:<3} {s['lost']:4} {s['hung']:4} {s['duplicated']:3} "
            f"{s['dual_ownership']:4}   {d or '-':22} {t or '-'}"
        )
    return "\n".join(lines)


def markdown_summary(summary: dict[str, Any]) -> str:
    """The same table for the benchmark report (README and ``benchmarks/results``)."""

    def spread(v: dict[str, float] | None) -> str:
        return "–" if not v else f"{v['min']:.2f} / {v['median']:.2f} / {v['max']:.2f}"

    lines = [
        "| row | runs held | lost | hung | duplicated | dual ownership | detection s (min / median / max) "
        "| take-over s (min / median / max) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary["rows"].items():
        lines.append(
            f"| {name} | {s['held']}/{s['runs']} | {s['lost']} | {s['hung']} | {s['duplicated']} | "
            f"{s['dual_ownership']} | {spread(s['detect_s'])} | {spread(s['takeover_s'])} |"
        )
    return "\n".join(lines)


def write_summary(summary: dict[str, Any], path: Path) -> None:
    """The summary and every run as JSON at ``path``, and the table beside it (``.md``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2, default=str))
    path.with_suffix(".md").write_text(markdown_summary(summary) + "\n")


async def _main(names: list[str], runs: int, seed: int | None, out: Path | None, workdir: Path, queue_type: str) -> int:
    print(f"queue type: {queue_type}", flush=True)
    reports = []
    for name in names:
        for i in range(runs):
            run_dir = workdir / f"{name}-{i}"
            run_dir.mkdir(parents=True, exist_ok=True)
            run_seed = random.SystemRandom().randrange(1 << 30) if seed is None else seed + i
            report = await run_recorded(ROWS[name], run_dir, run_seed, queue_type)
            reports.append(report)
            print(report.line(), flush=True)
            for p in report.problems:
                print(f"      problem: {p}", flush=True)
            for kind, examples in [*report.verdict["examples"].items(), *report.verdict["error_examples"].items()]:
                print(f"      {kind}: {examples}", flush=True)
    summary = summarize(reports)
    print("\n" + format_summary(summary))
    if out is not None:
        write_summary(summary, out)
        print(f"\nwritten: {out}")
    return 0 if all(r.holds for r in reports) else 1


def main() -> None:
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rows", nargs="*", help=f"rows to run (default: all): {', '.join(ROWS)}")
    parser.add_argument("--runs", type=int, default=1, help="runs of each row, each at a random moment")
    parser.add_argument("--seed", type=int, default=None, help="first seed (run i uses seed + i)")
    parser.add_argument("--json", type=Path, default=None, help="write the summary and every run here")
    parser.add_argument("--keep-logs", type=Path, default=None, help="keep node logs in this directory")
    parser.add_argument("--queue-type", choices=QUEUE_TYPES, default="classic", help="the nodes' ZSTACK_MN_QUEUE_TYPE")
    args = parser.parse_args()
    names = args.rows or list(ROWS)
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stopped as by ^C: each run's servers restored
    if args.keep_logs:
        raise SystemExit(asyncio.run(_main(names, args.runs, args.seed, args.json, args.keep_logs, args.queue_type)))
    with tempfile.TemporaryDirectory(prefix="zstack-faults-") as tmp:
        raise SystemExit(asyncio.run(_main(names, args.runs, args.seed, args.json, Path(tmp), args.queue_type)))


if __name__ == "__main__":
    main()
