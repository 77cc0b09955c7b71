"""B4: fail-over under load with the default timings (heartbeat 2 s, node timeout 10 s): SIGKILL,
SIGSTOP (held past the timeout) and SIGTERM of one of 3 nodes. Reported from the clients' side:
time until every survivor's ring agrees, until the first and the last VM the victim owned is
served again, and requests lost (no answer by the deadline) or hung (none by deadline + 1 s)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

from benchmarks.cluster_util import Toggler, cluster, make_vms
from zstack_mn.client import Client
from zstack_mn.cluster.ring import HashRing
from zstack_mn.messages import ErrorCode, ZStackError

FAULTS = {"SIGKILL": signal.SIGKILL, "SIGSTOP": signal.SIGSTOP, "SIGTERM": signal.SIGTERM}
ONLY = [f for f in os.environ.get("ZSTACK_MN_BENCH_FAULTS", "").split(",") if f]
WORKERS = 12
CALL_DEADLINE = 30.0
STEPS = len(FAULTS)


async def one_fault(url: str, prefix: str, name: str, sig: int) -> dict[str, Any]:
    async with cluster(url, prefix, 3, heartbeat=2.0, node_timeout=10.0) as h:
        agent = await h.start_agent()
        async with Client.http(h.urls(), timeout=60) as setup:
            vms = await make_vms(setup, agent, 36)
        ring = HashRing({n.uuid for n in h.nodes})
        victim = h.nodes[1]
        moved = {vm["uuid"] for vm in vms if ring.owner_of(vm["uuid"]) == victim.uuid}
        survivors = [n for n in h.nodes if n is not victim]
        toggler = Toggler(vms)
        client = Client.http(h.urls(), timeout=CALL_DEADLINE)
        served_after: dict[str, float] = {}
        stats = {"ok": 0, "failed": 0, "lost": 0, "hung": 0}
        codes: dict[str, int] = {}
        stop = asyncio.Event()
        t0 = 0.0

        async def worker() -> None:
            while not stop.is_set():
                vm = await toggler.free.get()
                started = time.monotonic()
                try:
                    want = "stop" if toggler.state[vm] == "Running" else "start"
                    inv = await asyncio.wait_for(getattr(client, f"{want}_vm")(vm), CALL_DEADLINE + 1)
                    toggler.state[vm] = inv["state"]
                    stats["ok"] += 1
                    if t0 and vm in moved and started >= t0 and vm not in served_after:
                        served_after[vm] = time.monotonic() - t0
                except TimeoutError:
                    stats["hung"] += 1
                except ZStackError as exc:
                    stats["lost" if exc.code is ErrorCode.TIMEOUT else "failed"] += 1
                    codes[f"{exc.code.name}: {exc.description[:80]}"] = (
                        codes.get(f"{exc.code.name}: {exc.description[:80]}", 0) + 1
                    )
                    if exc.code is ErrorCode.INVALID_STATE:
                        toggler.state[vm] = "Unknown-check"
                        inv = (await client.query_vms(uuid=vm))["inventories"][0]
                        toggler.state[vm] = inv["state"]
                finally:
                    toggler.free.put_nowait(vm)

        tasks = [asyncio.create_task(worker()) for _ in range(WORKERS)]
        await asyncio.sleep(3)
        t0 = time.monotonic()
        victim.signal(sig)
        expected = {n.uuid for n in survivors}
        agree = await h.wait_until(lambda: h.rings_agree(expected), 60, "survivors agree", interval=0.05)
        deadline = time.monotonic() + 40
        while len(served_after) < len(moved) and time.monotonic() < deadline:  # noqa: ASYNC110 - 48 workers fill it
            await asyncio.sleep(0.05)
        if sig == signal.SIGSTOP:
            victim.signal(signal.SIGCONT)
        stop.set()
        await asyncio.gather(*tasks)
        await client.close()
    return {
        "ringsAgreeS": round(agree, 3),
        "firstServedS": round(min(served_after.values(), default=float("nan")), 3),
        "lastServedS": round(max(served_after.values(), default=float("nan")), 3),
        "movedVms": len(moved),
        "servedVms": len(served_after),
        "okCalls": stats["ok"],
        "failedCalls": stats["failed"],
        "lost": stats["lost"],
        "hung": stats["hung"],
        "errorCodes": codes,
    }


async def run(url: str, prefix: str, seconds: float, progress: Any) -> dict[str, Any]:
    out = {}
    for name, sig in FAULTS.items():
        if ONLY and name not in ONLY:
            continue
        out[name] = await one_fault(url, f"{prefix}{name.lower()}", name, sig)
        progress.update(1)
    return out
