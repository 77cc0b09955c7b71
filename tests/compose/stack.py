"""What the compose tests share: a lease on a Docker engine (``engine_lease``), the stand-in
images (``ensure_standin_images``), a stack brought up under a project name of its own
(``Stack``), and its removal (``tear_down``).

tests/test_compose.py runs docker-compose.yml alone; tests/test_compose_ha.py adds
docker-compose.ha.yml. Both bring theirs up with ``running_stack``; the engine lease and the
stand-ins are the session fixtures ``docker_engine`` and ``standin_images`` (tests/conftest.py).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.compose import standins
from zstack_mn.testing import servers

REPO = Path(__file__).resolve().parent.parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"
# The state of .ci/docker-up and .ci/docker-down (the same default as theirs).
DOCKER_STATE = Path(os.environ.get("ZSTACK_MN_DOCKER_STATE", f"/tmp/zstack-mn-docker-{os.getuid()}"))
NODES = ("node1", "node2", "node3")
SERVICES = ("rabbitmq", "postgres", "migrate", *NODES, "agent")
TEST_IMAGE = "zstack-mn:compose-test"
IMAGE_LABEL = "label=org.opencontainers.image.title=zstack-mn"  # set by the Dockerfile
# The compose file's variable for each published port.
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


def run(args: list[str], *, timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command in the repository, output captured as text; a non-zero exit is the caller's."""
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO, check=False)


def free_ports(n: int) -> list[int]:
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
    """One compose project: its files, environment, published ports and log directory.
    ``services`` are those ``wait_healthy`` waits for (``migrate`` to exit 0, the others healthy)."""

    project: str
    env: dict[str, str]
    ports: dict[str, int]
    log_dir: Path
    files: tuple[Path, ...] = (COMPOSE_FILE,)
    services: tuple[str, ...] = SERVICES
    ids: dict[str, str] = field(default_factory=dict)

    def compose(self, *args: str, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = ["docker-compose", "-p", self.project, *(a for f in self.files for a in ("-f", str(f)))]
        done = run([*cmd, "--project-directory", str(REPO), *args], timeout=timeout, env=self.env)
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
        done = run(["docker", "inspect", self.container(service)], timeout=30)
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
            out = run([*listing, "--filter", label], timeout=30).stdout.split()
            found += [f"{kind} {name}" for name in out]
        return found

    def wait_healthy(self, deadline: float) -> None:
        """Every long-running service healthy and the migration exited 0; fails at once on a
        container that exited or turned unhealthy, with its log."""
        pending: set[str] = set(self.services)
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


@contextmanager
def engine_lease(config: pytest.Config) -> Iterator[None]:
    """A Docker engine while the block runs (a test module's fixture wraps it): .ci/docker-up
    starts one unless an engine answers, and .ci/docker-down stops the one it started once no
    other run uses it. Without an engine the block is skipped with a red banner at the end of the
    run, or fails under ZSTACK_MN_REQUIRE_INTEGRATION=1."""
    DOCKER_STATE.mkdir(parents=True, exist_ok=True)
    users = (DOCKER_STATE / "users.lock").open("a")
    fcntl.flock(users, fcntl.LOCK_SH)
    try:
        up = run([str(REPO / ".ci" / "docker-up")], timeout=900)
        if up.returncode != 0:
            reason = (up.stderr.strip() or up.stdout.strip() or "docker-up failed").replace("\n", " | ")
            if servers.REQUIRED:
                pytest.fail(f"ZSTACK_MN_REQUIRE_INTEGRATION=1 but no Docker engine: {reason}", pytrace=False)
            if not config.pluginmanager.has_plugin("zstack-compose-skip-banner"):
                config.pluginmanager.register(_SkipBanner(reason), "zstack-compose-skip-banner")
            pytest.skip(f"no Docker engine: {reason}")
        print(up.stdout.strip(), file=sys.stderr)
        yield
    finally:
        fcntl.flock(users, fcntl.LOCK_UN)
        users.close()
        down = run([str(REPO / ".ci" / "docker-down")], timeout=120)
        if said := (down.stdout + down.stderr).strip():
            print(said, file=sys.stderr)
        assert down.returncode == 0, f".ci/docker-down exited {down.returncode}: {said}"


def ensure_standin_images() -> dict[str, str]:
    """The stand-in images, built when missing; the compose variables that select them."""
    started = time.monotonic()
    images = standins.ensure(lambda line: print(line, file=sys.stderr))
    print(f"stand-in images ready in {time.monotonic() - started:.1f} s: {images}", file=sys.stderr)
    return images


def tear_down(s: Stack) -> None:
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
        run(["docker", "rm", "-f", name] if kind == "container" else ["docker", kind, "rm", name], timeout=60)
    assert not left, f"docker-compose down left {left} ({outcome})"
    # Earlier builds of the zstack-mn image that lost their tag to this one (kept if in use).
    stale = run(["docker", "image", "ls", "-q", "--filter", "dangling=true", "--filter", IMAGE_LABEL], timeout=30)
    for image in stale.stdout.split():
        run(["docker", "image", "rm", image], timeout=60)


@contextmanager
def running_stack(
    name: str,
    standin_images: dict[str, str],
    log_dir: Path,
    *,
    files: tuple[Path, ...] = (COMPOSE_FILE,),
    services: tuple[str, ...] = SERVICES,
    healthy_within: float,
) -> Iterator[Stack]:
    """A stack of ``files`` on the stand-in images, every published port on a free loopback
    port, the compose file's default admin password; built, up and healthy (``services``) within
    ``healthy_within`` seconds of ``up``; torn down (``tear_down``) at the end, whatever happened."""
    ports = dict(zip(PORT_VARIABLES, free_ports(len(PORT_VARIABLES)), strict=True))
    env = {
        **os.environ,
        **standin_images,
        **{PORT_VARIABLES[k]: str(p) for k, p in ports.items()},
        "ZSTACK_MN_IMAGE": TEST_IMAGE,
        "DOCKER_BUILDKIT": "0",
    }
    env.pop("ZSTACK_MN_ADMIN_PASSWORD", None)
    s = Stack(f"zstackmn{name}{uuid.uuid4().hex[:8]}", env, ports, log_dir, files=files, services=services)
    try:
        started = time.monotonic()
        s.compose("build", timeout=1200)
        built = time.monotonic()
        s.compose("up", "-d", timeout=600)
        s.wait_healthy(time.monotonic() + healthy_within)
        print(
            f"compose {name}: image built in {built - started:.1f} s, stack healthy {time.monotonic() - built:.1f} s later",
            file=sys.stderr,
        )
        yield s
    finally:
        tear_down(s)
        print(f"compose {name}: removed {s.project}; its logs are in {log_dir / 'compose.log'}", file=sys.stderr)
