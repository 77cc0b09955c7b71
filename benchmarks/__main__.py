"""``python -m benchmarks [b1 … b9] [--seconds S] [--quick]``: run the scenarios of
docs/BENCH.md against the real RabbitMQ and PostgreSQL (a fresh vhost and database per run,
removed afterwards), write JSON and a markdown table under ``benchmarks/results/``, and leave
nothing running."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import inspect
import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

from tqdm import tqdm

from benchmarks import report
from benchmarks.common import machine
from zstack_mn.testing import servers

RESULTS = Path(__file__).parent / "results"
ALL = ("b1", "b2", "b3", "b4", "b5", "b6", "b7", "b8", "b9")


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except Exception:
        return "unknown"


async def main(scenarios: list[str], seconds: float, quick: bool) -> dict[str, Any]:
    from benchmarks import (
        b1_bus,
        b2_api,
        b3_scale,
        b4_failover,
        b5_ring,
        b6_memory,
        b7_inflight,
        b8_nodes,
        b9_queries,
    )

    modules = {
        "b1": b1_bus,
        "b2": b2_api,
        "b3": b3_scale,
        "b4": b4_failover,
        "b5": b5_ring,
        "b6": b6_memory,
        "b7": b7_inflight,
        "b8": b8_nodes,
        "b9": b9_queries,
    }
    vhost = servers.new_vhost() if any(s != "b5" for s in scenarios) else ""
    url = servers.amqp_url(vhost) if vhost else ""
    out: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": commit(),
        "machine": machine(),
        "quick": quick,
        "results": {},
    }
    steps = sum(modules[s].STEPS for s in scenarios)
    try:
        with tqdm(total=steps, desc="benchmarks", unit="step") as progress:
            for name in scenarios:
                progress.set_postfix_str(name)
                prefix = f"bench{uuid.uuid4().hex[:6]}"
                extras = {"quick": quick, "results": out["results"]}
                wanted = inspect.signature(modules[name].run).parameters
                out["results"][name] = await modules[name].run(
                    url, prefix, seconds, progress, **{k: v for k, v in extras.items() if k in wanted}
                )
    finally:
        if vhost:
            servers.delete_vhost(vhost)
    return out


def cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("scenarios", nargs="*", help=f"any of {' '.join(ALL)} (default: all)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per load point")
    parser.add_argument("--quick", action="store_true", help="smaller B3/B6/B7/B8/B9 sizes, for a smoke run")
    args = parser.parse_args()
    scenarios = args.scenarios or list(ALL)
    unknown = [s for s in scenarios if s not in ALL]
    if unknown:
        parser.error(f"unknown scenario(s): {' '.join(unknown)}; choose from {' '.join(ALL)}")
    data = asyncio.run(main(scenarios, args.seconds, args.quick))
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    base = RESULTS / f"{stamp}-{data['commit']}"
    base.with_suffix(".json").write_text(json.dumps(data, indent=2))
    table = report.markdown(data)
    base.with_suffix(".md").write_text(table)
    (RESULTS / "latest.md").write_text(table)
    print(table)
    print(f"written: {base.with_suffix('.json')} and {base.with_suffix('.md')}")


if __name__ == "__main__":
    cli()
