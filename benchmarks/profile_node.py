"""``python -m benchmarks.profile_node [--seconds S] [--concurrency C]``: where one node's CPU goes
under B2's load (HTTP VM start/stop on 1 node, the real RabbitMQ and PostgreSQL, the simulated
agent): py-spy samples the node process at RATE_HZ for S seconds while C clients flip VMs, and the
samples are summed by the package of their innermost frame and, inclusively, by the libraries
the hot path goes through. Writes the folded stacks and a markdown summary under
``benchmarks/results/`` (issue 11 asks for this profile before and after each change).

py-spy needs to read the node's memory (root, or ``ptrace`` allowed)."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import re
import shutil
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.__main__ import RESULTS, commit
from benchmarks.b2_api import VMS, WARMUP_S, WARMUP_S_PER_WORKER, window_load
from benchmarks.cluster_util import Toggler, cluster, make_vms
from zstack_mn.testing import servers

RATE_HZ = 200
CALL_TIMEOUT = 30.0
INCLUSIVE = {
    "FastAPI / Starlette / uvicorn": ("fastapi", "starlette", "uvicorn", "h11", "httptools"),
    "SQLAlchemy": ("sqlalchemy",),
    "asyncpg": ("asyncpg",),
    "aio-pika / aiormq / pamqp": ("aio_pika", "aiormq", "pamqp"),
    "pydantic": ("pydantic", "pydantic_core"),
    "aiohttp (agent calls)": ("aiohttp",),
    "structlog / logging": ("structlog", "logging"),
    "prometheus-client": ("prometheus_client",),
}
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:]*)(?::\d+)?\)$")


def package_of(frame: str) -> str:
    """``function (/full/path/to/file.py:line)`` (py-spy ``--full-filenames``) → the top-level
    package: ``zstack_mn.<sub>`` for ours, ``stdlib <module>`` for the standard library."""
    match = _FRAME.match(frame)
    if match is None:
        return frame
    path = match["file"]
    if "zstack_mn/" in path:
        return "zstack_mn." + path.split("zstack_mn/", 1)[1].split("/")[0].removesuffix(".py")
    for marker in ("site-packages/", "dist-packages/"):
        if marker in path:
            return path.split(marker, 1)[1].split("/", 1)[0].removesuffix(".py")
    if "/lib/python3" in path:
        rest = path.split("/lib/python3", 1)[1].split("/", 1)
        return "stdlib " + (rest[1].split("/", 1)[0].removesuffix(".py") if len(rest) > 1 else "?")
    return path or match["func"]


def py_spy() -> str | None:
    """py-spy beside this interpreter (a virtualenv not on PATH), else on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def summarize(folded: str, top: int = 15) -> tuple[int, list[tuple[str, float]], list[tuple[str, float]]]:
    """(samples, the ``top`` innermost packages by share, the INCLUSIVE groups by share)."""
    innermost: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in folded.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f]
        total += count
        packages = [package_of(f) for f in frames]
        innermost[packages[-1] if packages else "(no Python frame)"] += count
        for group, names in INCLUSIVE.items():
            if any(p.removeprefix("stdlib ") in names for p in packages):
                inclusive[group] += count
    share = lambda c: c / max(total, 1)  # noqa: E731
    return (
        total,
        [(k, share(v)) for k, v in innermost.most_common(top)],
        [(k, share(v)) for k, v in inclusive.most_common()],
    )


async def profile(spy_path: str, seconds: float, concurrency: int) -> tuple[str, float]:
    """The node's folded stacks under load, and the load's ops/s meanwhile."""
    vhost = servers.new_vhost()
    prefix = f"prof{uuid.uuid4().hex[:6]}"
    try:
        async with cluster(servers.amqp_url(vhost), prefix, 1) as h:
            agent = await h.start_agent(cpu=4 * VMS, memory="1T")
            async with h.client(h.urls(), timeout=CALL_TIMEOUT) as setup:
                toggler = Toggler(await make_vms(setup, agent, VMS))
            node = h.nodes[0]
            clients = [h.client(h.urls(), timeout=CALL_TIMEOUT) for _ in range(max(1, concurrency // 16))]
            out = h.workdir / "node.folded"
            load: asyncio.Future[Any] | None = None
            try:
                load = asyncio.ensure_future(
                    window_load(lambda i: toggler.flip(clients[i % len(clients)]), concurrency, seconds)
                )
                await asyncio.sleep(WARMUP_S + WARMUP_S_PER_WORKER * concurrency)
                spy = await asyncio.create_subprocess_exec(
                    spy_path, "record", "--pid", str(node.popen.pid), "--rate", str(RATE_HZ),
                    "--duration", str(max(1, round(seconds))), "--format", "raw", "--output", str(out),
                    "--nonblocking", "--full-filenames", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                )  # fmt: skip
                try:
                    _, err = await asyncio.wait_for(spy.communicate(), seconds + 30)
                finally:
                    if spy.returncode is None:
                        spy.kill()
                        await spy.wait()
                if spy.returncode != 0:
                    raise RuntimeError(f"py-spy failed: {err.decode(errors='replace')[-500:]}")
                rate = (await load).rate
            finally:
                if load is not None and not load.done():
                    load.cancel()
                for client in clients:
                    await client.close()
            return out.read_text(), rate
    finally:
        servers.delete_vhost(vhost)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    spy_path = py_spy()
    if spy_path is None:
        sys.exit("py-spy not found: pip install py-spy (it is in the project's bench extra)")
    folded, rate = asyncio.run(profile(spy_path, args.seconds, args.concurrency))
    total, innermost, inclusive = summarize(folded)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    name = f"profile-{stamp}-{commit()}"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.folded").write_text(folded)
    lines = [
        f"# Node CPU under HTTP VM start/stop, 1 node, c = {args.concurrency} ({commit()}, {stamp})",
        "",
        f"py-spy {RATE_HZ} Hz for {args.seconds:g} s: {total} samples; load {rate:.0f} ops/s meanwhile.",
        "",
        "| innermost frame's package | share |",
        "|---|---|",
        *(f"| {k} | {v:.1%} |" for k, v in innermost),
        "",
        "| inclusive (any frame of) | share |",
        "|---|---|",
        *(f"| {k} | {v:.1%} |" for k, v in inclusive),
        "",
    ]
    (RESULTS / f"{name}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"written: {RESULTS / name}.md and .folded")


if __name__ == "__main__":
    main()
