"""A harness that runs real ``zstack-mn`` processes and a simulated agent against the real
RabbitMQ and PostgreSQL, for the cluster and fault tests (and usable from a script).

Every process it starts is stopped at the end (SIGKILL after a bounded wait), even on failure;
each node logs JSON lines to its own file under the run directory.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from zstack_mn.agent.protocol import AgentFault
from zstack_mn.client import Client
from zstack_mn.cluster.status import cluster_status


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    port: int
    uuid: str = ""
    uuids: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive:
            os.kill(self.popen.pid, sig)


def spawn(name: str, args: list[str], env: dict[str, str], log: Path, port: int) -> Proc:
    """``python -m zstack_mn <args>`` in a session of its own (so a kill reaches its children),
    its output appended to ``log``."""
    with log.open("ab") as out:
        popen = subprocess.Popen(
            [sys.executable, "-m", "zstack_mn", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return Proc(name, popen, log, port)


def tail(proc: Proc, lines: int = 30) -> str:
    """The last ``lines`` of a process's log ("" when it has none)."""
    try:
        return "\n".join(proc.log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


async def wait_http(
    proc: Proc, path: str, timeout: float = 60, http: httpx.AsyncClient | None = None
) -> dict[str, Any]:
    """Poll ``path`` on ``proc`` until it answers 200, and return its JSON body. RuntimeError (with
    the log's tail) when the process exits first, TimeoutError after ``timeout``."""
    if http is None:
        async with httpx.AsyncClient(timeout=5) as own:
            return await wait_http(proc, path, timeout, own)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{tail(proc)}")
        try:
            resp = await http.get(proc.url + path)
            if resp.status_code == 200:
                return dict(resp.json())
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{proc.name} not ready within {timeout}s:\n{tail(proc)}")


def log_events(procs: Iterable[Proc], event: str) -> list[dict[str, Any]]:
    """The JSON log records of ``procs`` whose ``event`` is ``event`` (a log not written yet,
    or gone, has none)."""
    found: list[dict[str, Any]] = []
    for proc in procs:
        try:
            text = proc.log.read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            if event not in line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("event") == event:
                found.append(record)
    return found


async def add_hosts_and_vms(
    client: Client, agent_url: str, vms: int, *, hosts: int = 1, concurrency: int = 32, prefix: str = ""
) -> list[dict[str, Any]]:
    """Add ``hosts`` simulated hosts of the agent (``<prefix>h<i>``) and create ``vms`` VMs
    (``<prefix>vm<i>``, 1 CPU, 64M each) on them, ``concurrency`` at once; their inventories."""
    for i in range(hosts):
        await client.add_host(f"{prefix}h{i}", f"{agent_url}/hosts/{prefix}h{i}")
    slots = asyncio.Semaphore(concurrency)

    async def one(i: int) -> dict[str, Any]:
        async with slots:
            return await client.create_vm(f"{prefix}vm{i}", cpu_num=1, memory_size="64M")

    return list(await asyncio.gather(*(one(i) for i in range(vms))))


async def set_agent_faults(agent_url: str, faults: list[AgentFault]) -> None:
    """Replace the simulated agent's injected faults (an empty list clears them)."""
    async with httpx.AsyncClient(timeout=10) as http:
        (await http.put(f"{agent_url}/admin/faults", json=[f.to_wire() for f in faults])).raise_for_status()


async def agent_in_flight(agent_url: str, node: str) -> int:
    """How many of ``node``'s VM operations the simulated agent has in flight now."""
    async with httpx.AsyncClient(timeout=5) as http:
        resp = await http.get(f"{agent_url}/admin/audit", params={"node": node})
        resp.raise_for_status()
        return int(resp.json()["inFlight"])


async def agent_stats(agent_url: str) -> dict[str, Any]:
    """The simulated agent's ``/admin/stats``: effects per op id, duplicates, and every VM's host
    and state."""
    async with httpx.AsyncClient(timeout=30) as http:
        resp = await http.get(f"{agent_url}/admin/stats")
        resp.raise_for_status()
        return dict(resp.json())


ADMIN_PASSWORD = "harness-admin"
"""The ``admin`` password of a harness's nodes (a cluster refuses ZStack's default)."""


class ClusterHarness:
    """N management nodes + one simulated agent, isolated by vhost, database and queue prefix."""

    def __init__(
        self,
        workdir: Path,
        *,
        amqp_url: str,
        database_url: str,
        queue_prefix: str,
        heartbeat: float = 0.5,
        node_timeout: float = 3.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.amqp_url = amqp_url
        self.database_url = database_url
        self.queue_prefix = queue_prefix
        self.heartbeat = heartbeat
        self.node_timeout = node_timeout
        self.extra_env = env or {}
        self.nodes: list[Proc] = []
        self.agent: Proc | None = None
        self._http = httpx.AsyncClient(timeout=5)

    def _env(self, port: int, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ZSTACK_MN_")}
        env.update(
            ZSTACK_MN_BROKER_URL=self.amqp_url,
            ZSTACK_MN_DATABASE_URL=self.database_url,
            ZSTACK_MN_QUEUE_PREFIX=self.queue_prefix,
            ZSTACK_MN_HTTP_PORT=str(port),
            ZSTACK_MN_HEARTBEAT_INTERVAL=str(self.heartbeat),
            ZSTACK_MN_NODE_TIMEOUT=str(self.node_timeout),
            ZSTACK_MN_DRAIN_TIMEOUT="10",
            ZSTACK_MN_HOST_PING_INTERVAL="1",
            ZSTACK_MN_LOG_FORMAT="json",
            ZSTACK_MN_EMBEDDED_AGENT="false",
            ZSTACK_MN_ADMIN_PASSWORD=ADMIN_PASSWORD,
        )
        env.update(self.extra_env)
        env.update(extra or {})
        return env

    def _spawn(self, name: str, args: list[str], port: int, extra: dict[str, str] | None = None) -> Proc:
        return spawn(name, args, self._env(port, extra), self.workdir / f"{name}.log", port)

    def client(self, urls: list[str] | str | None = None, *, timeout: float = 30.0) -> Client:
        """An HTTP client of ``urls`` (every node's by default), logged in as the harness's admin."""
        return Client.http(self.urls() if urls is None else urls, password=ADMIN_PASSWORD, timeout=timeout)

    async def auth_headers(self) -> dict[str, str]:
        """``Authorization: OAuth <session>`` of a new login of the harness's admin, for raw HTTP
        calls to the ``/v1`` API."""
        async with self.client() as http:
            return {"Authorization": f"OAuth {await http.login()}"}

    async def amqp_client(self, *, timeout: float = 30.0, session: str | None = None) -> Client:
        """A client on ``api.portal`` with ``session`` (by default a new login of the harness's
        admin through a node's HTTP API)."""
        if session is None:
            async with self.client() as http:
                session = await http.login()
        return await Client.amqp(self.amqp_url, self.queue_prefix, timeout, session=session)

    async def start_agent(self, cpu: int = 64, memory: str = "256G") -> str:
        port = free_port()
        self.agent = self._spawn("agent", ["agent", "--port", str(port), "--cpu", str(cpu), "--memory", memory], port)
        await self._wait_http(self.agent, "/admin/stats")
        return self.agent.url

    async def start_node(
        self, extra_env: dict[str, str] | None = None, wait: bool = True, port: int | None = None
    ) -> Proc:
        """Start a node (on ``port``, e.g. to restart one at the address clients know)."""
        port = port or free_port()
        proc = self._spawn(f"node{len(self.nodes) + 1}", ["start"], port, extra_env)
        self.nodes.append(proc)
        if wait:
            await self.wait_ready(proc)
        return proc

    async def start_nodes(self, n: int) -> list[Proc]:
        procs = [await self.start_node(wait=False) for _ in range(n)]
        await asyncio.gather(*(self.wait_ready(p) for p in procs))
        return procs

    async def _wait_http(self, proc: Proc, path: str, timeout: float = 60) -> dict[str, Any]:
        return await wait_http(proc, path, timeout, self._http)

    async def wait_ready(self, proc: Proc, timeout: float = 60) -> None:
        await self._wait_http(proc, "/readyz", timeout)
        proc.uuid = (await self._wait_http(proc, "/healthz", timeout))["node"]
        proc.uuids.append(proc.uuid)

    async def current_uuid(self, proc: Proc) -> str:
        return str((await self._wait_http(proc, "/healthz"))["node"])

    async def status(self) -> dict[str, Any]:
        return await cluster_status(self.database_url)

    async def wait_until(
        self,
        predicate: Callable[[], object],
        timeout: float,
        what: str,
        interval: float = 0.05,
    ) -> float:
        """Await ``predicate()`` (sync or async) becoming truthy; returns the seconds it took."""
        started = time.monotonic()
        while True:
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"{what} not reached within {timeout}s")
            await asyncio.sleep(interval)

    async def rings_agree(self, expected: set[str]) -> bool:
        """Exactly ``expected`` are RUNNING and every ring digest in the database agrees."""
        report = await self.status()
        running = {n["uuid"] for n in report["nodes"] if n["state"] == "RUNNING"}
        return running == expected and bool(report["ringsAgree"])

    async def wait_rings_agree(
        self, procs: Iterable[Proc], timeout: float, what: str = "rings agree", interval: float = 0.05
    ) -> float:
        """Wait until exactly ``procs`` are RUNNING and their rings agree; returns the seconds."""
        expected = {p.uuid for p in procs}
        return await self.wait_until(lambda: self.rings_agree(expected), timeout, what, interval)

    def urls(self, procs: list[Proc] | None = None) -> list[str]:
        return [p.url for p in (procs or self.nodes) if p.alive]

    def tail(self, proc: Proc, lines: int = 30) -> str:
        return tail(proc, lines)

    async def close(self) -> None:
        procs = [p for p in [*self.nodes, self.agent] if p is not None]
        for p in procs:
            if p.alive:
                p.signal(signal.SIGCONT)
                p.signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for p in procs:
            while p.alive and time.monotonic() < deadline:  # noqa: ASYNC110 - a Popen child's exit has no awaitable
                await asyncio.sleep(0.05)
            if p.alive:
                os.killpg(p.popen.pid, signal.SIGKILL)
            p.popen.wait(timeout=10)
        await self._http.aclose()
