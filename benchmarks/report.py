"""The markdown table of a benchmark run: one section per scenario that ran, targets beside the
measured figures where docs/BENCH.md sets one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def markdown(data: dict[str, Any]) -> str:
    m = data["machine"]
    lines = [
        f"# zstack-mn benchmarks — {data['date']} (commit {data['commit']})",
        "",
        f"{m['cores']} cores, {m['cpuModel']}; Python {m['python']}; RabbitMQ {m['rabbitmq']}; {m['postgresql']}; "
        f"aio-pika {m['packages'].get('aio-pika', '?')}.",
        "",
    ]
    for name, render in SECTIONS.items():
        if name in data["results"]:
            lines += render(data["results"][name])
    return "\n".join(lines)


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def codes(errors: dict[str, int]) -> str:
    return ", ".join(f"{k} ×{v}" for k, v in errors.items()) or "—"


def samples(rows: list[dict[str, Any]]) -> list[str]:
    """One line per error code seen in ``rows``, with its first description."""
    seen: dict[str, str] = {}
    for r in rows:
        for code, text in r.get("errorSamples", {}).items():
            seen.setdefault(code, text)
    return [f"* {code}: {text}" for code, text in seen.items()]


def _b1(b: dict[str, Any]) -> list[str]:
    lines = [
        "## B1 — bus call vs raw aio-pika request/reply (same run)",
        "",
        "| c | raw calls/s | bus calls/s | ratio | raw p50/p99 ms | bus p50/p99 ms | bus CPU µs/call client·server·broker "
        "| quorum bus calls/s | quorum ratio to raw | quorum ÷ classic | quorum p50/p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c, row in b["concurrency"].items():
        raw, bus = row["raw"], row["bus"]
        cpu = bus["cpuUsPerCall"]
        quorum = row.get("bus-quorum")
        extra = (
            f"{quorum['callsPerSecond']:.0f} | {row['quorumRatio']:.2f}× | {row['quorumToClassic']:.2f}× | "
            f"{quorum['p50Ms']:.2f}/{quorum['p99Ms']:.2f}"
            if quorum
            else "- | - | - | -"
        )
        lines.append(
            f"| {c} | {raw['callsPerSecond']:.0f} | {bus['callsPerSecond']:.0f} | **{row['ratio']:.2f}×** | "
            f"{raw['p50Ms']:.2f}/{raw['p99Ms']:.2f} | {bus['p50Ms']:.2f}/{bus['p99Ms']:.2f} | "
            f"{cpu.get('client', 0):.0f}·{cpu.get('server', 0):.0f}·{cpu.get('broker', 0):.0f} | {extra} |"
        )
    return [*lines, ""]


def _b2(b: dict[str, Any]) -> list[str]:
    cs = b["concurrency"]
    lines = [
        "## B2 — VM start/stop end to end (ratio to raw request/reply at the same c, same run)",
        "",
        "| path | nodes | c | ops/s | p50 ms | p99 ms | p99 ÷ p50 | errors | raw calls/s | ratio to raw |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in b["rows"]:
        lines.append(
            f"| {r['path']} | {r['nodes']} | {r['c']} | {r['opsPerSecond']:.0f} | {r['p50Ms']:.1f} | "
            f"{r['p99Ms']:.1f} | {r['p99OverP50']:.1f} | {r['errors']} | {r['rawCallsPerSecond']:.0f} | "
            f"**{r['ratioToRaw']:.2f}×** |"
        )
    lines += [
        "",
        "Throughput must not fall as concurrency rises (ops/s per c, side by side; "
        '"not falling": every c reaches ≥ 0.9× the best lower c):',
        "",
        "| path | nodes | " + " | ".join(f"c={c}" for c in cs) + " | not falling |",
        "|---|---|" + "---|" * (len(cs) + 1),
    ]
    by_key: dict[tuple[str, int], dict[int, float]] = {}
    for r in b["rows"]:
        by_key.setdefault((r["path"], r["nodes"]), {})[r["c"]] = r["opsPerSecond"]
    for (path, nodes), rates in by_key.items():
        if len(rates) < 2:
            continue
        cells = " | ".join(f"{rates[c]:.0f}" if c in rates else "—" for c in cs)
        lines.append(f"| {path} | {nodes} | {cells} | {verdict(b['notFalling'].get(f'{path} / {nodes}', False))} |")
    raw = " · ".join(f"c={c}: {v:.0f}" for c, v in b["rawCallsPerSecond"].items())
    lines += [
        "",
        f"raw request/reply in this run (calls/s): {raw}. Targets: HTTP on 1 node ≥ 0.4× raw, "
        "api.portal ≥ 0.5× raw, p99 ≤ 4× p50.",
        "",
    ]
    return lines


def _b3(b: dict[str, Any]) -> list[str]:
    lines = [
        f"## B3 — {b['vms']} VMs created concurrently on 3 nodes (simulated agent, {b['concurrency']} requests open)",
        "",
        "| hosts | seconds | VMs/s | errors | create p50 / p99 / max ms | share by node | target ≤ "
        f"{b['targetSeconds']:.0f} s, 0 errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in b["runs"]:
        lat = r["createLatency"]
        shares = ", ".join(f"{k} {v:.1%}" for k, v in r["shareByNode"].items())
        lines.append(
            f"| {r['hosts']} | **{r['seconds']:.1f}** | {r['vms'] / r['seconds']:.0f} | {r['errors']} "
            f"({codes(r['errorCodes'])}) | {lat['p50Ms']:.0f} / {lat['p99Ms']:.0f} / {lat['maxMs']:.0f} | "
            f"{shares} | {verdict(r['met'])} |"
        )
    lines += ["", "The target is for 10,000 VMs; a --quick run creates fewer.", ""]
    for r in b["runs"]:
        if "waitEvents" in r:
            waits = r["waitEvents"]
            classes = ", ".join(f"{k} {v:g}" for k, v in waits["sessionsPerSample"].items())
            lines.append(
                f"Database sessions during the {r['hosts']}-host run, by what they waited on "
                f"(`pg_stat_activity`, sessions per sample, {waits['samples']} samples): {classes}."
            )
            lines.append("")
    return lines


def _b4(b: dict[str, Any]) -> list[str]:
    if "faults" not in b:
        return _b4_before_issue_13(b)
    st = b["settings"]
    lines = [
        f"## B4 — fail-over of one of {b['nodes']} nodes under load, every VM it affected, {b['rounds']} rounds a fault "
        f"(heartbeat {st['heartbeatS']:g} s, node_timeout {st['nodeTimeoutS']:g} s, "
        f"agent_timeout {st['agentTimeoutS']:g} s, call_timeout {st['callTimeoutS']:g} s)",
        "",
        "| fault | VMs (owned · in flight at the fault) | worst | p99 | p50 | target | not served | "
        "worst in flight · idle | calls ok · non-retryable · failed · timed out · hung | rings agree after (worst round) | |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for fault, r in b["faults"].items():
        c = r["calls"]
        lines.append(
            f"| {fault} | {r['vms']} ({r['ownedVms']} · {r['inFlightVms']}) | **{_s(r['worstS'])}** | {_s(r['p99S'])} | "
            f"{_s(r['p50S'])} | ≤ {r['targetS']:g} s | {len(r['notServed'])} | "
            f"{_s(r['worstInFlightS'])} · {_s(r['worstIdleS'])} | "
            f"{c['ok']} · {c['definite']} · {c['failed']} · {c['timedOut']} · {c['hung']} | "
            f"{_s(r['ringsAgreeS'])} | {verdict(r['met'])} |"
        )
    lines += [
        "",
        f"Each round: a cluster of its own, {b['hosts']} simulated hosts, {b['vmsTotal']} VMs, {b['workers']} HTTP "
        "clients sending random start/stop/reboot to random VMs (every node before the fault, the survivors after "
        "it), plus one probe per measured VM from the fault on; the fault comes when the victim has operations "
        "under way. VM counts, percentiles and calls are over every round. A VM's time: from the fault to the first success or non-retryable "
        "answer (INVALID_STATE counts) to a request sent after the fault. Measured: every VM the victim owned by "
        "the ring before the fault, and every VM it had an operation in flight on. SIGSTOP is held until every "
        f"VM is served (at least node_timeout + 1 s), then SIGCONT. Not served: no such answer within "
        f"{b['serveCapS']:g} s. Hung: no answer by the call's deadline + {b['hungMarginS']:g} s. "
        f"B4 took {b['seconds']:.0f} s.",
        "",
        "Slowest VMs (s; * had an operation in flight at the fault) and the worst VM of each round:",
        "",
    ]
    for fault, r in b["faults"].items():
        slow = ", ".join(f"{_s(v['servedS'], unit='')}{'*' if v['inFlight'] else ''}" for v in r["slowest"])
        rounds = " · ".join(_s(w, unit="") for w in r["worstByRoundS"])
        lines.append(f"* {fault}: {slow or '—'}; by round {rounds}; error codes: {codes(r['errorCodes'])}")
    errors = samples(list(b["faults"].values()))
    return [*lines, "", "First error of each code:", "", *errors, ""] if errors else [*lines, ""]


def _s(value: float | None, unit: str = " s") -> str:
    return "—" if value is None else f"{value:.2f}{unit}"


def _b4_before_issue_13(b: dict[str, Any]) -> list[str]:
    """B4 results written before it measured every VM (one row per fault, idle VMs only)."""
    lines = [
        "## B4 — fail-over of one of 3 nodes under load (default timings)",
        "",
        "| fault | rings agree after | first moved VM served | last moved VM served | lost | hung | failed calls |",
        "|---|---|---|---|---|---|---|",
    ]
    for fault, row in b.items():
        lines.append(
            f"| {fault} | {row['ringsAgreeS']:.2f} s | {row['firstServedS']:.2f} s | {row['lastServedS']:.2f} s | "
            f"{row['lost']} | {row['hung']} | {row['failedCalls']} |"
        )
    return [*lines, ""]


def _b5(b: dict[str, Any]) -> list[str]:
    lines = [
        "## B5 — ring balance, 100,000 uuids, 2–10 nodes",
        "",
        "| ring | worst largest share ÷ fair | worst moved ÷ ideal | lookup µs (10 nodes) |",
        "|---|---|---|---|",
    ]
    for name, row in b.items():
        lines.append(f"| {name} | {row['worstShare']:.3f} | {row['worstMoved']:.3f} | {row['lookupUsAt10']:.2f} |")
    return [*lines, ""]


def _b6(b: dict[str, Any]) -> list[str]:
    return [
        "## B6 — node memory with few vs many VMs in the database",
        "",
        f"RSS with {b['small']} VMs: {b['rssSmallMiB']:.1f} MiB; with {b['large']} VMs: {b['rssLargeMiB']:.1f} MiB; "
        f"ratio **{b['ratio']:.3f}×**",
        "",
    ]


def _kib(value: float | None) -> str:
    return "—" if value is None else f"{value / 1024:.1f}"


def _b7(b: dict[str, Any]) -> list[str]:
    target_kib = b["targetBytesPerInFlight"] / 1024
    lines = [
        "## B7 — N VM operations at once on 1 node, slow agent (AMQP client)",
        "",
        "| N | L s | wall s | target wall s (2·L + N ÷ rate) | same formula, api.portal rate | failed | max in flight "
        f"| RSS before MiB | RSS growth MiB | KiB per in-flight (target ≤ {target_kib:.0f}) | KiB per operation "
        "| wall · failed · RSS |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in b["rows"]:
        met = r["met"]
        same_path = r.get("targetWallSamePathS")
        lines.append(
            f"| {r['n']} | {r['latencyS']:g} | **{r['wallS']:.1f}** | {r['targetWallS']:.1f} | "
            f"{'—' if same_path is None else f'{same_path:.1f}'} | {r['failed']} "
            f"({codes(r['errorCodes'])}) | {r['maxInFlight']} | {r['rssBeforeMiB']:.0f} | {r['rssGrowthMiB']:.1f} | "
            f"{_kib(r['rssBytesPerInFlight'])} | {_kib(r['rssBytesPerOperation'])} | "
            f"{verdict(met['wall'])} · {verdict(met['failed'])} · {verdict(met['rss'])} |"
        )
    rates = "; ".join(f"N={n}: {v['opsPerSecond']:.0f} ops/s ({v['source']})" for n, v in b["rate"].items())
    env = ", ".join(f"{k}={v}" for k, v in b["nodeEnv"].items())
    lines += [
        "",
        f"rate (1-node HTTP start/stop, c=16): {rates}. Node settings: {env}. In flight: the node's "
        "`zstack_messages_in_flight` gauge (messages being handled, API and VM service together). "
        "B7 sends through `api.portal`; the column beside the target puts that path's own B2 rate "
        f"(1 node, c=256: {_rate(b.get('amqpRate'))}) in the same formula (for comparison; the target stays "
        "the HTTP one).",
        "",
    ]
    errors = samples(b["rows"])
    return [*lines, "First error of each code:", "", *errors, ""] if errors else lines


def _rate(value: float | None) -> str:
    return "B2 not run" if value is None else f"{value:.0f} ops/s"


def _seconds(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.2f} s"


def _b8(b: dict[str, Any]) -> list[str]:
    load, met = b["load"], b["met"]
    peaks = ", ".join(f"{k} {v}" for k, v in b["peakDbConnectionsByPhase"].items())
    lines = [
        f"## B8 — {b['nodes']} nodes on one machine, one PostgreSQL, one RabbitMQ "
        f"(heartbeat {b['heartbeatS']:g} s, node_timeout {b['nodeTimeoutS']:g} s)",
        "",
        "| measure | value | target | |",
        "|---|---|---|---|",
        f"| failed calls ({load['okCalls']} ok over {load['seconds']:.0f} s) | {load['failedCalls']} "
        f"({codes(load['errorCodes'])}) | 0 | {verdict(met['failedCalls'])} |",
        f"| false evictions (of {b['evictions']} evictions) | {b['falseEvictions']} | 0 | {verdict(met['falseEvictions'])} |",
        f"| rings agree after the join: every ring · database digests | {_seconds(load['join']['ringsS'])} · "
        f"{_seconds(load['join']['databaseS'])} | ≤ {b['heartbeatS']:g} s (every ring) | {verdict(met['ringsAgreeJoin'])} |",
        f"| rings agree after the leave (SIGTERM): every ring · database digests | {_seconds(load['leave']['ringsS'])} · "
        f"{_seconds(load['leave']['databaseS'])} | ≤ {b['heartbeatS']:g} s (every ring) | {verdict(met['ringsAgreeLeave'])} |",
        f"| peak database connections ({peaks}) | {b['peakDbConnections']} | ≤ 80 | {verdict(met['peakDbConnections'])} |",
        "",
        "Membership cost per node at idle:",
        "",
        "| nodes | queries (transactions) per heartbeat per node | rows read per heartbeat per node |",
        "|---|---|---|",
    ]
    lines += [
        f"| {r['nodes']} | {r['queriesPerHeartbeatPerNode']:.2f} | {r['rowsPerHeartbeatPerNode']:.1f} |"
        for r in b["idle"]
    ]
    lines += [
        "",
        "Ring lookup cost:",
        "",
        "| ring nodes | LiveRing.owner_of µs (repeated uuids) | HashRing.owner_of µs (uncached) |",
        "|---|---|---|",
    ]
    lines += [f"| {r['nodes']} | {r['liveRingUs']:.2f} | {r['hashRingUncachedUs']:.2f} |" for r in b["ringLookup"]]
    env = ", ".join(f"{k}={v}" for k, v in b["nodeEnv"].items())
    lines += [
        "",
        f'Node settings: {env}. "Every ring": each node\'s `zstack_ring_nodes` gauge; "database digests": '
        "the ring digests nodes write with their heartbeat (what `zstack-mn status` reports; lags up to one heartbeat).",
        "",
    ]
    errors = samples([load])
    return [*lines, "First error of each code:", "", *errors, ""] if errors else lines


B9_LABELS = {
    "page1": "first page (limit 100)",
    "deepPage": "deep page (`after`, 200 rows from the end)",
    "byName": "filter by name",
    "byStateAndHost": "filter by state and host",
    "deepPageByStart": "deep page by `start` (offset; no target)",
    "count": "`count=true` (no target)",
}


def _b9(b: dict[str, Any]) -> list[str]:
    sizes = [r["vms"] for r in b["rows"]]
    lines = [
        "## B9 — VM queries over HTTP, one node, PostgreSQL (median / p99 ms)",
        "",
        "| query | " + " | ".join(f"{n:,} VMs" for n in sizes) + " | target at the largest |",
        "| --- | " + " | ".join("---" for _ in sizes) + " | --- |",
    ]
    for key, label in B9_LABELS.items():
        cells = [f"{r['queries'][key]['p50Ms']:.1f} / {r['queries'][key]['p99Ms']:.1f}" for r in b["rows"]]
        if key in b["targeted"]:
            ok = b["rows"][-1]["queries"][key]["p50Ms"] <= b["targetMs"]
            target = f"≤ {b['targetMs']:g} ms median: {verdict(ok)}"
        else:
            target = "—"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {target} |")
    return [*lines, ""]


SECTIONS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "b1": _b1,
    "b2": _b2,
    "b3": _b3,
    "b4": _b4,
    "b5": _b5,
    "b6": _b6,
    "b7": _b7,
    "b8": _b8,
    "b9": _b9,
}
