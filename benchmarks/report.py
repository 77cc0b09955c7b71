"""The markdown table of a benchmark run."""

from __future__ import annotations

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
    r = data["results"]
    if "b1" in r:
        lines += ["## B1 — bus call vs raw aio-pika request/reply (same run)", "",
                  "| c | raw calls/s | bus calls/s | ratio | raw p50/p99 ms | bus p50/p99 ms | bus CPU µs/call client·server·broker |",
                  "|---|---|---|---|---|---|---|"]
        for c, row in r["b1"]["concurrency"].items():
            raw, bus = row["raw"], row["bus"]
            cpu = bus["cpuUsPerCall"]
            lines.append(
                f"| {c} | {raw['callsPerSecond']:.0f} | {bus['callsPerSecond']:.0f} | **{row['ratio']:.2f}×** | "
                f"{raw['p50Ms']:.2f}/{raw['p99Ms']:.2f} | {bus['p50Ms']:.2f}/{bus['p99Ms']:.2f} | "
                f"{cpu.get('client', 0):.0f}·{cpu.get('server', 0):.0f}·{cpu.get('broker', 0):.0f} |"
            )
        lines.append("")
    if "b2" in r:
        lines += ["## B2 — VM start/stop end to end (ratio to the raw request/reply rate of the same run, c=16)", "",
                  "| path | nodes | ops/s | p50 ms | p99 ms | errors | ratio to raw |", "|---|---|---|---|---|---|---|"]
        for row in r["b2"]["rows"]:
            lines.append(f"| {row['path']} | {row['nodes']} | {row['opsPerSecond']:.0f} | {row['p50Ms']:.1f} | "
                         f"{row['p99Ms']:.1f} | {row['errors']} | **{row['ratioToRaw']:.2f}×** |")
        lines += ["", f"raw request/reply in this run: {r['b2']['rawCallsPerSecond']:.0f} calls/s", ""]
    if "b3" in r:
        b = r["b3"]
        lines += ["## B3 — VMs created concurrently on 3 nodes (simulated agent)", "",
                  f"{b['vms']} VMs in **{b['seconds']:.1f} s** ({b['vms'] / b['seconds']:.0f}/s), errors {b['errors']}, "
                  f"shares by node: {', '.join(f'{v}' for v in b['shareByNode'].values())}", ""]
    if "b4" in r:
        lines += ["## B4 — fail-over of one of 3 nodes under load (default timings)", "",
                  "| fault | rings agree after | first moved VM served | last moved VM served | lost | hung | failed calls |",
                  "|---|---|---|---|---|---|---|"]
        for fault, row in r["b4"].items():
            lines.append(f"| {fault} | {row['ringsAgreeS']:.2f} s | {row['firstServedS']:.2f} s | {row['lastServedS']:.2f} s | "
                         f"{row['lost']} | {row['hung']} | {row['failedCalls']} |")
        lines.append("")
    if "b5" in r:
        lines += ["## B5 — ring balance, 100,000 uuids, 2–10 nodes", "",
                  "| ring | worst largest share ÷ fair | worst moved ÷ ideal | lookup µs (10 nodes) |", "|---|---|---|---|"]
        for name, row in r["b5"].items():
            lines.append(f"| {name} | {row['worstShare']:.3f} | {row['worstMoved']:.3f} | {row['lookupUsAt10']:.2f} |")
        lines.append("")
    if "b6" in r:
        b = r["b6"]
        lines += ["## B6 — node memory with few vs many VMs in the database", "",
                  f"RSS with {b['small']} VMs: {b['rssSmallMiB']:.1f} MiB; with {b['large']} VMs: {b['rssLargeMiB']:.1f} MiB; "
                  f"ratio **{b['ratio']:.3f}×**", ""]
    return "\n".join(lines)
