"""Shared pieces of the benchmarks: load loops, percentiles, CPU accounting, environment."""

from __future__ import annotations

import asyncio
import os
import platform
import resource
import statistics
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import psutil

PAYLOAD_TEXT = "x" * 40


def percentile(ordered: list[float], q: float) -> float:
    """The ``q`` quantile (0–1) of ascending ``ordered`` values, nearest rank; NaN when empty."""
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class LoadResult:
    calls: int
    errors: int
    seconds: float
    latencies_ms: list[float] = field(repr=False)
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        return percentile(sorted(self.latencies_ms), q)

    def summary(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "errors": self.errors,
            "seconds": round(self.seconds, 3),
            "callsPerSecond": round(self.rate, 1),
            "p50Ms": round(self.pct(0.5), 3),
            "p99Ms": round(self.pct(0.99), 3),
            "cpuUsPerCall": {k: round(v, 1) for k, v in self.cpu.items()},
        }


def broker_process() -> psutil.Process | None:
    for p in psutil.process_iter(["name", "cmdline"]):
        if p.info["name"] == "beam.smp" and "rabbit" in " ".join(p.info["cmdline"] or []):
            return p
    return None


def cpu_seconds(proc: psutil.Process | None) -> float:
    if proc is None:
        return 0.0
    try:
        t = proc.cpu_times()
        return float(t.user + t.system)
    except psutil.Error:
        return 0.0


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def run_load(
    call: Callable[[int], Awaitable[Any]],
    concurrency: int,
    seconds: float,
    *,
    warmup: float = 1.0,
    processes: dict[str, psutil.Process | None] | None = None,
    max_calls: int | None = None,
) -> LoadResult:
    """``concurrency`` workers call ``call(i)`` in a loop for ``seconds`` (after ``warmup``)."""
    latencies: list[float] = []
    counters = {"calls": 0, "errors": 0, "n": 0}
    recording = False
    stop_at = 0.0

    async def worker() -> None:
        while True:
            now = time.perf_counter()
            if recording and now >= stop_at:
                return
            if max_calls is not None and counters["n"] >= max_calls:
                return
            counters["n"] += 1
            started = time.perf_counter()
            try:
                await call(counters["n"])
                ok = True
            except Exception:
                ok = False
            if recording and started < stop_at:
                latencies.append((time.perf_counter() - started) * 1000)
                counters["calls" if ok else "errors"] += 1

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    await asyncio.sleep(warmup)
    procs = processes or {}
    cpu0 = {name: cpu_seconds(p) for name, p in procs.items()}
    client0 = self_cpu()
    recording = True
    begun = time.perf_counter()
    stop_at = begun + seconds
    await asyncio.gather(*tasks)
    elapsed = min(time.perf_counter(), stop_at) - begun
    calls = counters["calls"]
    cpu = {"client": (self_cpu() - client0) * 1e6 / max(calls, 1)}
    for name, p in procs.items():
        cpu[name] = (cpu_seconds(p) - cpu0[name]) * 1e6 / max(calls, 1)
    return LoadResult(calls, counters["errors"], elapsed, latencies, cpu)


def machine() -> dict[str, Any]:
    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {}
    for pkg in ("aio-pika", "aiormq", "sqlalchemy", "asyncpg", "pydantic", "fastapi", "uvicorn", "orjson"):
        try:
            from importlib.metadata import version

            versions[pkg] = version(pkg)
        except Exception:
            pass
    rabbit = _cmd(["rabbitmqctl", "version"])
    pg = _cmd(["psql", "--version"])
    return {
        "cores": os.cpu_count(),
        "cpuModel": cpu_model,
        "python": platform.python_version(),
        "rabbitmq": rabbit,
        "postgresql": pg,
        "packages": versions,
    }


def _cmd(args: list[str]) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[-1]
    except Exception:
        return "unknown"


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
