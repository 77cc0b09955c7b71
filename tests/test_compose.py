"""The project's own docker-compose.yml on a real Docker engine.

``.ci/docker-up`` installs Docker and docker-compose when missing and starts dockerd; the stand-in
images (tests/compose/) replace the official ones no registry serves here. The stack comes up with
its published ports on free ports of 127.0.0.1, and the checks go through those ports: a host, the
VM lifecycle through each node, ring agreement, ``zstack-mn status``; then ``docker kill`` of one
node under load, after which its VMs must be served again with nothing lost. ``docker-compose
down -v`` removes everything the test started, whatever happened.

Without an engine the tests are skipped with a red banner at the end of the run; under
``ZSTACK_MN_REQUIRE_INTEGRATION=1`` (CI) that is a failure. ``-m "not compose"`` leaves them out.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.compose import standins
from tests.embedded import session_headers
from zstack_mn.client import Client
from zstack_mn.cluster.ring import HashRing
from zstack_mn.messages import ZStackError
from zstack_mn.testing import servers

pytestmark = [pytest.mark.compose, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"
# The state of .ci/docker-up and .ci/docker-down (the same default as theirs).
DOCKER_STATE = Path(os.environ.get("ZSTACK_MN_DOCKER_STATE", f"/tmp/zstack-mn-docker-{os.getuid()}"))
NODES = ("node1", "node2", "node3")
SERVICES = ("rabbitmq", "postgres", "migrate", *NODES, "agent")
LONG_RUNNING = tuple(s for s in SERVICES if s != "migrate")
TEST_IMAGE = "zstack-mn:compose-test"
IMAGE_LABEL = "label=org.opencontainers.image.title=zstack-mn"  # set by the Dockerfile
AGENT = "http://agent:9100"  # as the nodes see it, on the compose network
ADMIN_PASSWORD = "zstack"  # the compose file's default ZSTACK_MN_ADMIN_PASSWORD
HEALTHY_WITHIN = 180.0
PORT_VARIABLES = {
    "node1": "ZSTACK_MN_NODE1_PORT",
    "node2": "ZSTACK_MN_NODE2_PORT",
    "node3": "ZSTACK_MN_NODE3_PORT",
    "agent": "ZSTACK_MN_AGENT_PORT",
    "rabbitmq": "ZSTACK_MN_RABBITMQ_PORT",
    "rabbitmq-management": "ZSTACK_MN_RABBITMQ_MANAGEMENT_PORT",
    "postgres": "ZSTACK_MN_POSTGRES_PORT",
}


class _SkipBanner:
    """A plugin registered when the compose tests cannot run: a red banner closes the run."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        bar = "!" * 78
        for line in (bar, f"SKIPPED the compose tests: {self.reason}", bar):
            terminalreporter.write_line(line, red=True, bold=True)


def _run(args: list[str], *, timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO, check=False)


def _free_ports(n: int) -> list[int]:
    """Ports nobody listens on now (held open together, so they are distinct)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Stack:
    project: str
    env: dict[str, str]
    ports: dict[str, int]
    log_dir: Path
    ids: dict[str, str] = field(default_factory=dict)

    def compose(self, *args: str, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = ["docker-compose", "-p", self.project, "-f", str(COMPOSE_FILE), "--project-directory", str(REPO)]
        done = _run([*cmd, *args], timeout=timeout, env=self.env)
        if check and done.returncode != 0:
            raise AssertionError(f"docker-compose {' '.join(args)} exited {done.returncode}:\n{done.stderr[-4000:]}")
        return done

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.ports[service]}"

    @property
    def urls(self) -> list[str]:
        return [self.url(n) for n in NODES]

    @property
    def database_url(self) -> str:
        return f"postgresql://zstack:zstack@127.0.0.1:{self.ports['postgres']}/zstack"

    def container(self, service: str) -> str:
        if service not in self.ids:
            cid = self.compose("ps", "-q", service, timeout=60).stdout.strip()
            assert cid, f"no container for {service}"
            self.ids[service] = cid
        return self.ids[service]

    def inspect(self, service: str) -> dict[str, Any]:
        done = _run(["docker", "inspect", self.container(service)], timeout=30)
        assert done.returncode == 0, done.stderr
        state: dict[str, Any] = json.loads(done.stdout)[0]
        return state

    def logs(self, *services: str, tail: int = 40) -> str:
        return self.compose("logs", "--no-color", "--tail", str(tail), *services, timeout=60, check=False).stdout

    def leftovers(self) -> list[str]:
        """Containers, volumes and networks of this project that still exist."""
        label = f"label=com.docker.compose.project={self.project}"
        found = []
        for kind, listing in (
            ("container", ["docker", "ps", "-aq"]),
            ("volume", ["docker", "volume", "ls", "-q"]),
            ("network", ["docker", "network", "ls", "-q"]),
        ):
            out = _run([*listing, "--filter", label], timeout=30).stdout.split()
            found += [f"{kind} {name}" for name in out]
        return found

    def wait_healthy(self, deadline: float) -> None:
        """Every long-running service healthy and the migration exited 0; fails at once on a
        container that exited or turned unhealthy, with its log."""
        pending: set[str] = set(SERVICES)
        while pending:
            for service in sorted(pending):
                state = self.inspect(service)["State"]
                health = (state.get("Health") or {}).get("Status")
                if service == "migrate":
                    if state["Status"] == "exited":
                        assert state["ExitCode"] == 0, f"migrate exited {state['ExitCode']}:\n{self.logs('migrate')}"
                        pending.discard(service)
                    continue
                assert state["Status"] == "running", f"{service} is {state['Status']}:\n{self.logs(service)}"
                assert health != "unhealthy", f"{service} is unhealthy:\n{self.logs(service)}"
                if health == "healthy":
                    pending.discard(service)
            if pending:
                assert time.monotonic() < deadline, f"not healthy in time: {sorted(pending)}\n{self.logs(*pending)}"
                time.sleep(1)


@pytest.fixture(scope="module")
def docker_engine(request: pytest.FixtureRequest) -> Iterator[None]:
    """A Docker engine for the module's lifetime; the one .ci/docker-up started is stopped after
    (by .ci/docker-down, once no other run uses it)."""
    DOCKER_STATE.mkdir(parents=True, exist_ok=True)
    users = (DOCKER_STATE / "users.lock").open("a")
    fcntl.flock(users, fcntl.LOCK_SH)
    try:
        up = _run([str(REPO / ".ci" / "docker-up")], timeout=900)
        if up.returncode != 0:
            reason = (up.stderr.strip() or up.stdout.strip() or "docker-up failed").replace("\n", " | ")
            if servers.REQUIRED:
                pytest.fail(f"ZSTACK_MN_REQUIRE_INTEGRATION=1 but no Docker engine: {reason}", pytrace=False)
            if not request.config.pluginmanager.has_plugin("zstack-compose-skip-banner"):
                request.config.pluginmanager.register(_SkipBanner(reason), "zstack-compose-skip-banner")
            pytest.skip(f"no Docker engine: {reason}")
        print(up.stdout.strip(), file=sys.stderr)
        yield
    finally:
        fcntl.flock(users, fcntl.LOCK_UN)
        users.close()
        down = _run([str(REPO / ".ci" / "docker-down")], timeout=120)
        if said := (down.stdout + down.stderr).strip():
            print(said, file=sys.stderr)
        assert down.returncode == 0, f".ci/docker-down exited {down.returncode}: {said}"


@pytest.fixture(scope="module")
def standin_images(docker_engine: None) -> dict[str, str]:
    started = time.monotonic()
    images = standins.ensure(lambda line: print(line, file=sys.stderr))
    print(f"stand-in images ready in {time.monotonic() - started:.1f} s: {images}", file=sys.stderr)
    return images


def _tear_down(s: Stack) -> None:
    """``docker-compose down -v``, whatever state the stack is in; then anything of the project
    still present is removed by force and fails the run."""
    try:
        (s.log_dir / "compose.log").write_text(s.logs(tail=2000))
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"compose: could not save the logs: {exc!r}", file=sys.stderr)
    try:
        down = s.compose("down", "-v", "--remove-orphans", "--timeout", "5", timeout=180, check=False)
        outcome = f"exit {down.returncode}: {down.stderr[-2000:]}"
    except subprocess.TimeoutExpired as exc:
        outcome = repr(exc)
    left = s.leftovers()
    for item in left:
        kind, name = item.split(" ", 1)
        _run(["docker", "rm", "-f", name] if kind == "container" else ["docker", kind, "rm", name], timeout=60)
    assert not left, f"docker-compose down left {left} ({outcome})"
    # Earlier builds of the zstack-mn image that lost their tag to this one (kept if in use).
    stale = _run(["docker", "image", "ls", "-q", "--filter", "dangling=true", "--filter", IMAGE_LABEL], timeout=30)
    for image in stale.stdout.split():
        _run(["docker", "image", "rm", image], timeout=60)


@pytest.fixture(scope="module")
def stack(standin_images: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    ports = dict(zip(PORT_VARIABLES, _free_ports(len(PORT_VARIABLES)), strict=True))
    env = {
        **os.environ,
        **standin_images,
        **{PORT_VARIABLES[k]: str(p) for k, p in ports.items()},
        "ZSTACK_MN_IMAGE": TEST_IMAGE,
        "DOCKER_BUILDKIT": "0",
    }
    env.pop("ZSTACK_MN_ADMIN_PASSWORD", None)  # the compose file's default, ADMIN_PASSWORD
    s = Stack(f"zstackmntest{uuid.uuid4().hex[:8]}", env, ports, tmp_path_factory.mktemp("compose"))
    try:
        started = time.monotonic()
        s.compose("build", timeout=1200)
        built = time.monotonic()
        s.compose("up", "-d", timeout=600)
        s.wait_healthy(time.monotonic() + HEALTHY_WITHIN)
        print(
            f"compose: image built in {built - started:.1f} s, stack healthy {time.monotonic() - built:.1f} s later",
            file=sys.stderr,
        )
        yield s
    finally:
        _tear_down(s)
        print(f"compose: removed {s.project}; its logs are in {s.log_dir / 'compose.log'}", file=sys.stderr)


async def _node_uuid(url: str) -> str:
    async with httpx.AsyncClient(timeout=5) as http:
        node: str = (await http.get(url + "/healthz")).json()["node"]
        return node


async def _status(stack: Stack) -> dict[str, Any]:
    """``zstack-mn status --json`` of this checkout, against the stack's published PostgreSQL."""
    cli = Path(sys.executable).parent / "zstack-mn"
    proc = await asyncio.create_subprocess_exec(
        str(cli),
        "status",
        "--json",
        "--database-url",
        stack.database_url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    report: dict[str, Any] = json.loads(out)
    return report


async def _wait_status(stack: Stack, nodes: set[str], within: float) -> dict[str, Any]:
    """Poll ``zstack-mn status`` until exactly ``nodes`` run and their rings agree."""
    deadline = time.monotonic() + within
    while True:
        report = await _status(stack)
        running = {n["uuid"] for n in report["nodes"] if n["state"] == "RUNNING"}
        if running == nodes and report["ringsAgree"]:
            return report
        assert time.monotonic() < deadline, f"status never showed {nodes} agreeing: {report}"
        await asyncio.sleep(0.5)


def _resolved(env: dict[str, str]) -> tuple[set[str], set[tuple[str, int]]]:
    """``docker-compose config`` under ``env``: the images it names (build arguments included) and
    its published (address, port) pairs."""
    done = _run(["docker-compose", "-f", str(COMPOSE_FILE), "config"], timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    images: set[str] = set()
    published: set[tuple[str, int]] = set()
    for line in done.stdout.splitlines():
        if m := re.fullmatch(r"\s*(?:image|PYTHON_IMAGE): (\S+)", line):
            images.add(m[1])
        elif m := re.fullmatch(r"\s*- (\S+?):(\d+):\d+/tcp", line):
            published.add((m[1], int(m[2])))
    return images, published


@pytest.mark.timeout(1800)  # a cold run builds the stand-ins (minutes) before the first assertion
def test_compose_file_defaults_to_the_official_images_and_takes_overrides(standin_images: dict[str, str]) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ZSTACK_MN_")}
    images, published = _resolved(clean)
    assert images == {"python:3.11-slim", "rabbitmq:3.12-management", "postgres:15", "zstack-mn:latest"}
    assert published == {("127.0.0.1", p) for p in (8081, 8082, 8083, 9100, 5672, 15672, 5432)}

    ports = {v: 20001 + i for i, v in enumerate(PORT_VARIABLES.values())}
    images, published = _resolved(
        {**clean, **standin_images, "ZSTACK_MN_IMAGE": TEST_IMAGE, **{v: str(p) for v, p in ports.items()}}
    )
    assert images == {*standin_images.values(), TEST_IMAGE}
    assert published == {("127.0.0.1", p) for p in ports.values()}


@pytest.mark.timeout(1800)  # the first build of the zstack-mn image downloads its dependencies
def test_every_service_healthy_and_published_on_loopback_only(stack: Stack) -> None:
    for service in LONG_RUNNING:
        info = stack.inspect(service)
        assert info["State"]["Health"]["Status"] == "healthy", service
        bindings = [b for spec in (info["HostConfig"]["PortBindings"] or {}).values() for b in spec]
        assert bindings, f"{service} publishes nothing"
        assert {b["HostIp"] for b in bindings} == {"127.0.0.1"}, (service, bindings)
    assert stack.inspect("migrate")["State"]["ExitCode"] == 0


async def test_cluster_through_every_node(stack: Stack) -> None:
    nodes = {n: await _node_uuid(stack.url(n)) for n in NODES}
    assert len(set(nodes.values())) == 3
    async with Client.http(stack.urls, password=ADMIN_PASSWORD) as client:
        host = await client.add_host("compose-h1", f"{AGENT}/hosts/compose-h1")
    assert host["status"] == "Connected"
    ring = HashRing(nodes.values())
    for node in NODES:
        async with Client.http(stack.url(node), password=ADMIN_PASSWORD) as client:
            vm = await client.create_vm(f"compose-{node}", cpu_num=1, memory_size="64M")
            assert (vm["state"], vm["hostUuid"]) == ("Running", host["uuid"])
            assert (await client.stop_vm(vm["uuid"]))["state"] == "Stopped"
            # Whichever node took the call, the VM's owner on the ring ran it (across containers).
            assert client.last_handled_by == ring.owner_of(vm["uuid"]), node
            assert (await client.start_vm(vm["uuid"]))["state"] == "Running"
            assert (await client.reboot_vm(vm["uuid"]))["state"] == "Running"
            listed = await client.management_nodes()
        assert {n["uuid"] for n in listed["inventories"]} == set(nodes.values()), node
        assert abs(sum(n["ringShare"] for n in listed["inventories"]) - 1.0) < 0.01
        auth = {"Authorization": f"OAuth {await client.login()}"}
        for other in NODES:  # every node reads what this one wrote
            async with httpx.AsyncClient(timeout=10, headers=auth) as http:
                got = await http.get(f"{stack.url(other)}/v1/vm-instances/{vm['uuid']}")
            assert got.json()["inventory"]["state"] == "Running", other
        async with Client.http(stack.url(node), password=ADMIN_PASSWORD) as client:
            assert (await client.destroy_vm(vm["uuid"]))["state"] == "Destroyed"

    # ZStack's API: the admin account the compose file sets up logs in through any node
    async with Client.zstack(stack.urls, password=ADMIN_PASSWORD) as zclient:
        listed = await zclient.management_nodes()
    assert {n["uuid"] for n in listed["inventories"]} == {u.replace("-", "") for u in nodes.values()}

    report = await _wait_status(stack, set(nodes.values()), 15)
    assert len(report["nodes"]) == 3
    inside = stack.compose("exec", "-T", "node1", "zstack-mn", "status", timeout=60)
    assert "3 node(s); rings agree: yes" in inside.stdout, inside.stdout


@dataclass
class Churn:
    """One VM stopped and started in a loop: every acknowledged state with its time, and failures."""

    uuid: str
    name: str
    acked: list[tuple[float, str]] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


async def _churn(client: Client, vm: Churn, stop: asyncio.Event) -> None:
    state = "Running"
    while not stop.is_set():
        try:
            inv = await (client.stop_vm if state == "Running" else client.start_vm)(vm.uuid)
        except ZStackError as exc:
            vm.failed.append(f"{exc.code.value}: {exc}")
            # Carry on from wherever the failed operation left the VM.
            state = (await client.query_vms(name=vm.name))["inventories"][0]["state"]
            continue
        state = inv["state"]
        vm.acked.append((time.monotonic(), state))


async def _wait_for(check: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def test_docker_kill_a_node_under_load(stack: Stack) -> None:
    victim = "node2"
    nodes = {n: await _node_uuid(stack.url(n)) for n in NODES}
    async with Client.http(stack.urls, password=ADMIN_PASSWORD) as setup:
        host = await setup.add_host("kill-h1", f"{AGENT}/hosts/kill-h1")
        created = await asyncio.gather(
            *(setup.create_vm(f"kill-{i}", cpu_num=1, memory_size="16M", host_uuid=host["uuid"]) for i in range(24))
        )
    ring = HashRing(nodes.values())
    owned = {vm["uuid"] for vm in created if ring.owner_of(vm["uuid"]) == nodes[victim]}
    assert owned, "the victim owns none of the VMs"

    vms = [Churn(vm["uuid"], vm["name"]) for vm in created]
    stop = asyncio.Event()
    async with Client.http(stack.urls, password=ADMIN_PASSWORD) as client:
        workers = [asyncio.create_task(_churn(client, vm, stop)) for vm in vms]
        try:
            await _wait_for(lambda: all(len(vm.acked) >= 2 for vm in vms), 30, "the load to run on every VM")
            done = _run(["docker", "kill", stack.container(victim)], timeout=30)
            assert done.returncode == 0, done.stderr
            killed_at = time.monotonic()
            before = sum(len(vm.acked) for vm in vms)

            def after(vm: Churn) -> list[float]:
                return [t for t, _ in vm.acked if t > killed_at]

            # Served again: two operations of every VM acknowledged after the kill (the second was
            # sent after it, so the victim cannot have served it).
            await _wait_for(lambda: all(len(after(vm)) >= 2 for vm in vms), 60, "every VM served again")
            served_again = max(after(vm)[1] for vm in vms if vm.uuid in owned) - killed_at
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*workers), 60)
    total = sum(len(vm.acked) for vm in vms)
    print(
        f"compose: {total} operations on {len(vms)} VMs ({before} before the kill); the victim's "
        f"{len(owned)} VMs were all served again {served_again:.2f} s after it"
    )
    assert [(vm.name, vm.failed) for vm in vms if vm.failed] == []

    # Nothing lost: the database and the agent both hold each VM in the state its last
    # acknowledged operation left it in.
    auth = await session_headers(stack.url("node1"), ADMIN_PASSWORD)
    async with httpx.AsyncClient(timeout=10, headers=auth) as http:
        on_agent = (await http.get(f"{stack.url('agent')}/hosts/kill-h1/vms")).json()["vms"]
        agent_states = {v["uuid"]: v["state"] for v in on_agent}
        for vm in vms:
            got = await http.get(f"{stack.url('node1')}/v1/vm-instances/{vm.uuid}")
            assert got.status_code == 200, (vm.name, got.text)
            assert got.json()["inventory"]["state"] == vm.acked[-1][1], vm.name
            assert agent_states.get(vm.uuid) == vm.acked[-1][1], (vm.name, agent_states.get(vm.uuid))

    # The victim's row is gone and the survivors' rings agree. (`docker kill` is a manual stop:
    # the restart policy does not bring the container back.)
    assert stack.inspect(victim)["State"]["Running"] is False
    report = await _wait_status(stack, {nodes[n] for n in NODES if n != victim}, 30)
    assert len(report["nodes"]) == 2
