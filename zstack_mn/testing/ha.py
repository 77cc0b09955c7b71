"""A RabbitMQ cluster and a PostgreSQL primary + streaming standby on this machine, for the HA
tests and fault rows.

    async with RabbitCluster(workdir) as rc:      # 3 nodes <prefix>-1@localhost …, joined
        await rc.kill(await rc.queue_leader("q"))
    async with PgPair(workdir) as pg:             # primary + standby, pg.url names both
        await pg.fail_over()

Nothing here touches the machine's own servers (``rabbit@localhost`` on 5672, PostgreSQL on
5432): each node has its own name, ports, Erlang cookie and directories under ``workdir``, every
``rabbitmqctl`` names its node with ``-n``, and only processes started here (by the process group
or postmaster pid recorded when they started) are ever signalled. Leaving the context stops every
process, even after a kill or a start that failed half-way, and removes the directories.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

from zstack_mn.testing.cluster import free_port

RABBIT_BIN = Path(os.environ.get("ZSTACK_MN_HA_RABBIT_BIN", "/usr/lib/rabbitmq/bin"))
PG_BIN = Path(os.environ.get("ZSTACK_MN_HA_PG_BIN", "/usr/lib/postgresql/15/bin"))
PG_OS_USER = "postgres"
SHARED_PORTS = frozenset({4369, 5432, 5672, 15672, 25672, *range(35672, 35683)})
"""The shared servers' ports, epmd's, and the range ``rabbitmqctl`` itself listens on."""

COMMAND_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0

Role = Literal["primary", "standby", "down"]


class CommandFailed(RuntimeError):
    """A helper command exited non-zero; the message carries its output."""


def available() -> bool:
    """Whether this machine has the RabbitMQ and PostgreSQL 15 binaries the harness runs."""
    return (RABBIT_BIN / "rabbitmq-server").exists() and (PG_BIN / "pg_ctl").exists()


def pick_ports(n: int, base_port: int | None = None) -> list[int]:
    """``n`` distinct TCP ports: ``base_port, base_port + 1, …`` when given, else free ones from the
    OS; never one of ``SHARED_PORTS``, so the machine's own servers are left alone."""
    if base_port is not None:
        ports = list(range(base_port, base_port + n))
        if clash := SHARED_PORTS.intersection(ports):
            raise ValueError(f"ports {sorted(clash)} belong to the shared servers")
        return ports
    picked: list[int] = []
    while len(picked) < n:
        port = free_port()
        if port not in SHARED_PORTS and port not in picked:
            picked.append(port)
    return picked


def _kill_session(pid: int) -> None:
    """SIGKILL the process group ``pid`` leads (a session started here); gone already is fine."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


async def run(
    argv: list[str],
    *,
    timeout: float = COMMAND_TIMEOUT_S,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in a session of its own, stdout and stderr captured together. Past ``timeout``
    (or when cancelled) the whole session is killed and TimeoutError raised; a non-zero exit
    raises CommandFailed when ``check``."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except BaseException as exc:
        _kill_session(proc.pid)
        await asyncio.shield(proc.wait())
        if isinstance(exc, TimeoutError):
            raise TimeoutError(f"{argv[:4]} did not finish within {timeout}s") from None
        raise
    done = subprocess.CompletedProcess(argv, proc.returncode or 0, out.decode(errors="replace"), "")
    if check and done.returncode != 0:
        raise CommandFailed(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout[-3000:]}")
    return done


async def wait_until(probe: Callable[[], Awaitable[bool]], timeout: float, what: str, interval: float = 0.2) -> float:
    """Await ``probe()`` until it is true; the seconds it took, or TimeoutError after ``timeout``."""
    started = time.monotonic()
    while not await probe():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(interval)
    return time.monotonic() - started


async def all_of(*aws: Awaitable[None]) -> None:
    """Await ``aws`` concurrently; the first failure cancels the rest (so none outlives a failed
    start) and is raised."""
    tasks = [asyncio.ensure_future(aw) for aw in aws]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def port_open(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (an orphan nobody reaped is as good as gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return fields[0] != "Z"


def read_pid(path: Path) -> int | None:
    """The pid on the first line of ``path`` (a pid file), None when absent or unreadable."""
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` of ``path`` ("" when it does not exist)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def open_path_for(path: Path, uid: int) -> None:
    """Let user ``uid`` reach ``path``: add the others' search bit (o+x, not read) to every
    ancestor owned by us that lacks it (e.g. pytest's 0700 ``/tmp/pytest-of-root``)."""
    for parent in [path, *path.parents]:
        info = parent.stat()
        if info.st_uid == uid or info.st_mode & stat.S_IXOTH:
            continue
        if info.st_uid == os.geteuid():
            parent.chmod(stat.S_IMODE(info.st_mode) | stat.S_IXOTH)


class _Servers:
    """Servers started by ``async with`` and stopped when it ends, also when starting fails
    half-way (``close`` stops whatever did start)."""

    async def start(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


@dataclass
class RabbitMember:
    """One ``rabbitmq-server`` of the cluster: its node name, ports, directory, and the wrapper
    process (leader of its own process group, which holds beam.smp) when started."""

    index: int
    node: str
    amqp_port: int
    dist_port: int
    dir: Path
    popen: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"

    @property
    def pid_file(self) -> Path:
        return self.dir / "beam.pid"

    @property
    def log(self) -> Path:
        return self.dir / "log" / f"{self.node}.log"

    @property
    def console(self) -> Path:
        return self.dir / "console.log"

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def beam_pid(self) -> int | None:
        """The OS pid of this member's beam.smp, from its pid file, when that process is alive and
        in this member's process group (so never another node's)."""
        pid = read_pid(self.pid_file)
        if pid is None or self.popen is None or not pid_alive(pid):
            return None
        try:
            return pid if os.getpgid(pid) == self.popen.pid else None
        except ProcessLookupError:
            return None

    def kill(self) -> None:
        """kill -9 the beam.smp, then the rest of the process group (the wrapper script and
        Erlang's helpers), as a crash of the machine would."""
        if self.popen is None:
            return
        beam = self.beam_pid()
        if beam is not None:
            os.kill(beam, signal.SIGKILL)
        _kill_session(self.popen.pid)

    async def reap(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Wait until the wrapper has exited and the beam.smp is gone."""
        beam = self.beam_pid()

        async def gone() -> bool:
            return not self.alive and (beam is None or not pid_alive(beam))

        await wait_until(gone, timeout, f"{self.node} gone", 0.05)


class RabbitCluster(_Servers):
    """``size`` RabbitMQ nodes ``<prefix>-<i>@localhost`` (i from 1) clustered with ``join_cluster``
    to the first, plugins (management included) off, each listening only on 127.0.0.1. Indexes of
    the methods are 0-based. With ``base_port`` the AMQP ports are ``base_port + i`` and the
    distribution ports ``base_port + size + i``. ``prefix`` defaults to a random ``zha<hex>`` so harnesses never share
    an epmd name."""

    def __init__(
        self,
        workdir: Path,
        *,
        size: int = 3,
        base_port: int | None = None,
        prefix: str | None = None,
        boot_timeout: float = 120.0,
        config: str = "",
        keep: bool = False,
    ) -> None:
        self.prefix = prefix or f"zha{secrets.token_hex(3)}"
        self.root = Path(workdir) / f"rabbit-{self.prefix}"
        self.boot_timeout = boot_timeout
        self.config = config
        self.keep = keep
        self.started_in = 0.0
        ports = pick_ports(2 * size, base_port)
        self.members = [
            RabbitMember(i, f"{self.prefix}-{i + 1}@localhost", ports[i], ports[size + i], self.root / f"n{i + 1}")
            for i in range(size)
        ]

    @property
    def urls(self) -> list[str]:
        """Every member's AMQP URL (guest, default vhost), in member order."""
        return [m.url for m in self.members]

    @property
    def nodes(self) -> list[str]:
        return [m.node for m in self.members]

    @property
    def home(self) -> Path:
        return self.root / "home"

    async def start(self) -> None:
        """Boot every member at once, then join the others to the first one by one; returns once
        the first reports every member running."""
        started = time.monotonic()
        self._write_files()
        for member in self.members:
            self._spawn(member)
        await all_of(*(self._wait_booted(m) for m in self.members))
        for member in self.members[1:]:
            await self._join(member)
        await self.wait_running(len(self.members))
        self.started_in = time.monotonic() - started

    def _write_files(self) -> None:
        """The shared cookie (in a HOME of the cluster's own) and each member's config, empty
        plugin list and an empty env file (so /etc/rabbitmq/rabbitmq-env.conf is not read)."""
        self.home.mkdir(parents=True)
        cookie = self.home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16).upper())
        cookie.chmod(0o400)
        (self.root / "rabbitmq-env.conf").write_text("")
        for member in self.members:
            member.dir.mkdir()
            (member.dir / "rabbitmq.conf").write_text(f"loopback_users.guest = true\n{self.config}\n")
            (member.dir / "enabled_plugins").write_text("[].\n")

    def _cli_env(self) -> dict[str, str]:
        """The environment of this cluster's CLI tools: its HOME (hence its cookie), its env file."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(HOME=str(self.home), RABBITMQ_CONF_ENV_FILE=str(self.root / "rabbitmq-env.conf"))
        return env

    def _server_env(self, member: RabbitMember) -> dict[str, str]:
        """The CLI environment plus ``member``'s node name, ports and directories."""
        env = self._cli_env()
        env.update(
            RABBITMQ_NODENAME=member.node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(member.amqp_port),
            RABBITMQ_DIST_PORT=str(member.dist_port),
            RABBITMQ_MNESIA_BASE=str(member.dir / "mnesia"),
            RABBITMQ_LOG_BASE=str(member.dir / "log"),
            RABBITMQ_CONFIG_FILE=str(member.dir / "rabbitmq.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(member.dir / "enabled_plugins"),
            RABBITMQ_PID_FILE=str(member.pid_file),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
            ERL_EPMD_ADDRESS="127.0.0.1",
        )
        return env

    def _spawn(self, member: RabbitMember) -> None:
        """Start ``member``'s ``rabbitmq-server`` in a session of its own, output to its console log."""
        member.pid_file.unlink(missing_ok=True)
        with member.console.open("ab") as out:
            member.popen = subprocess.Popen(
                [str(RABBIT_BIN / "rabbitmq-server")],
                env=self._server_env(member),
                cwd=member.dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    async def ctl(self, i: int, *args: str, timeout: float = COMMAND_TIMEOUT_S, check: bool = True) -> str:
        """``rabbitmqctl -n <member i> <args>`` with the cluster's cookie; its output."""
        argv = [str(RABBIT_BIN / "rabbitmqctl"), "-n", self.members[i].node, *args]
        done = await run(argv, timeout=timeout, env=self._cli_env(), cwd=self.root, check=check)
        return done.stdout

    async def _wait_booted(self, member: RabbitMember) -> None:
        """Wait until ``member`` listens for AMQP and ``await_startup`` confirms its boot finished;
        RuntimeError with its log's tail if it exits first."""

        async def listening() -> bool:
            if not member.alive:
                raise RuntimeError(f"{member.node} exited:\n{tail(member.console)}\n{tail(member.log)}")
            return await asyncio.to_thread(port_open, member.amqp_port)

        await wait_until(listening, self.boot_timeout, f"{member.node} listening", 0.1)
        await self.ctl(member.index, "await_startup", timeout=self.boot_timeout)

    async def _join(self, member: RabbitMember) -> None:
        """``stop_app; join_cluster <first>; start_app`` on ``member``."""
        await self.ctl(member.index, "stop_app")
        await self.ctl(member.index, "join_cluster", self.members[0].node)
        await self.ctl(member.index, "start_app", timeout=self.boot_timeout)
        await self._wait_booted(member)

    async def cluster_status(self, i: int = 0) -> dict[str, Any]:
        """``rabbitmqctl cluster_status`` of member ``i``, as JSON."""
        out = await self.ctl(i, "cluster_status", "--formatter", "json")
        return dict(json.loads(out))

    async def running_nodes(self, i: int | None = None) -> list[str]:
        """The members running the broker app, as member ``i`` (the first live one by default)
        sees them."""
        status = await self.cluster_status(self._live_index() if i is None else i)
        return sorted(status.get("running_nodes", []))

    async def wait_running(self, n: int, timeout: float | None = None) -> float:
        """Wait until exactly ``n`` members are running; the seconds it took."""

        async def enough() -> bool:
            try:
                return len(await self.running_nodes()) == n
            except (CommandFailed, TimeoutError, LookupError):
                return False

        return await wait_until(enough, timeout or self.boot_timeout, f"{n} running RabbitMQ members", 0.5)

    def _live_index(self) -> int:
        """The first member whose process is alive (LookupError when none is)."""
        for member in self.members:
            if member.alive:
                return member.index
        raise LookupError("no RabbitMQ member is alive")

    async def kill(self, i: int) -> None:
        """kill -9 member ``i`` (its beam.smp and process group) and wait until it is gone."""
        member = self.members[i]
        member.kill()
        await member.reap()

    async def start_member(self, i: int) -> None:
        """Start member ``i`` again (after ``kill``) on its own data; returns once it has rejoined."""
        member = self.members[i]
        if member.alive:
            raise RuntimeError(f"{member.node} is still running")
        self._spawn(member)
        await self._wait_booted(member)

    async def restart(self, i: int) -> None:
        """kill -9 member ``i`` if it runs, then start it again and wait until it has rejoined."""
        if self.members[i].alive:
            await self.kill(i)
        await self.start_member(i)

    async def stop_app(self, i: int) -> None:
        """``rabbitmqctl stop_app`` on member ``i``: the broker stops, the Erlang node stays."""
        await self.ctl(i, "stop_app")

    async def start_app(self, i: int) -> None:
        """``rabbitmqctl start_app`` on member ``i``; returns once it accepts AMQP again."""
        await self.ctl(i, "start_app", timeout=self.boot_timeout)
        await self._wait_booted(self.members[i])

    async def queues(self, vhost: str = "/") -> list[dict[str, Any]]:
        """``list_queues name leader type members`` of ``vhost``, asked of the first member that
        answers."""
        last: Exception | None = None
        for member in self.members:
            if not member.alive:
                continue
            try:
                out = await self.ctl(
                    member.index, "list_queues", "-p", vhost, "name", "leader", "type", "members", "--formatter", "json"
                )
            except (CommandFailed, TimeoutError) as exc:
                last = exc
                continue
            return list(json.loads(out))
        raise LookupError(f"no RabbitMQ member answered list_queues: {last}")

    async def queue_leader(self, queue: str, vhost: str = "/") -> int:
        """The index of the member leading quorum queue ``queue``; LookupError when the queue or
        its leader is unknown (e.g. during an election)."""
        for row in await self.queues(vhost):
            if row.get("name") == queue and row.get("leader") in self.nodes:
                return self.nodes.index(row["leader"])
        raise LookupError(f"no leader of queue {queue!r} in vhost {vhost!r}")

    async def close(self) -> None:
        """kill -9 every member still running, reap it, and remove the cluster's directory."""
        for member in self.members:
            member.kill()
        for member in self.members:
            try:
                await member.reap()
            except TimeoutError:
                pass
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)


PG_CONF = """
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
wal_level = replica
max_wal_senders = 8
wal_keep_size = '256MB'
hot_standby = on
fsync = off
shared_buffers = '32MB'
max_connections = 100
include_if_exists = 'node.conf'
"""
"""Settings both servers share (the standby copies them with the base backup); ``node.conf`` holds
each one's port and, on a synchronous primary, its standby names. fsync is off: the OS never
crashes under these tests, only the servers do."""


@dataclass
class PgNode:
    """One PostgreSQL server of the pair: its port, data directory, log, and the postmaster pid
    recorded when it last started."""

    name: str
    port: int
    data: Path
    pid: int | None = None

    @property
    def log(self) -> Path:
        return self.data.parent / f"{self.name}.log"

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{PG_OS_USER}@127.0.0.1:{self.port}/{database}"

    def ours(self, pid: int) -> bool:
        """Whether ``pid`` is alive and a postgres started on this node's data directory."""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        return pid_alive(pid) and str(self.data).encode() in cmdline


class PgPair(_Servers):
    """A PostgreSQL 15 primary and a streaming standby (``pg_basebackup -R``) on 127.0.0.1, trust
    auth, no Unix sockets, run as the ``postgres`` OS user when we are root (PostgreSQL refuses
    root). With ``synchronous`` (the default) a commit on the primary returns only once the
    standby has it, so an acknowledged write survives ``fail_over``; while the standby is down,
    such commits wait. With ``base_port`` the servers listen on ``base_port`` and ``base_port + 1``."""

    def __init__(
        self,
        workdir: Path,
        *,
        base_port: int | None = None,
        database: str = "zstack",
        synchronous: bool = True,
        boot_timeout: float = 60.0,
        keep: bool = False,
    ) -> None:
        self.root = Path(workdir) / f"pg-{secrets.token_hex(3)}"
        self.database = database
        self.synchronous = synchronous
        self.boot_timeout = boot_timeout
        self.keep = keep
        self.started_in = 0.0
        ports = pick_ports(2, base_port)
        self.nodes = [PgNode(f"pg{i + 1}", ports[i], self.root / f"pg{i + 1}") for i in range(2)]
        self._primary = 0

    @property
    def primary(self) -> PgNode:
        return self.nodes[self._primary]

    @property
    def standby(self) -> PgNode:
        return self.nodes[1 - self._primary]

    @property
    def primary_port(self) -> int:
        return self.primary.port

    @property
    def standby_port(self) -> int:
        return self.standby.port

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    @property
    def url(self) -> str:
        """SQLAlchemy + asyncpg URL naming both servers; asyncpg connects to whichever accepts
        writes (``target_session_attrs=read-write``), so it follows a fail-over."""
        hosts = "&".join(f"host=127.0.0.1:{n.port}" for n in self.nodes)
        return f"postgresql+asyncpg://{PG_OS_USER}@/{self.database}?{hosts}&target_session_attrs=read-write"

    @property
    def multi_dsn(self) -> str:
        """The same two-host, read-write target as ``url``, as a plain asyncpg / libpq DSN."""
        hosts = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)
        return f"postgresql://{PG_OS_USER}@{hosts}/{self.database}?target_session_attrs=read-write"

    def node_url(self, port: int) -> str:
        """SQLAlchemy + asyncpg URL of the one server on ``port``."""
        return f"postgresql+asyncpg://{PG_OS_USER}@127.0.0.1:{port}/{self.database}"

    def dsn(self, port: int) -> str:
        """Plain (asyncpg / libpq) DSN of the pair's database on the server on ``port``."""
        return f"postgresql://{PG_OS_USER}@127.0.0.1:{port}/{self.database}"

    def _node_at(self, port: int) -> PgNode:
        for node in self.nodes:
            if node.port == port:
                return node
        raise LookupError(f"no server of this pair on port {port}")

    async def start(self) -> None:
        """initdb the primary, start it, create the database, base-backup the standby from it,
        start that, and wait until it streams."""
        started = time.monotonic()
        self._prepare_root()
        await self._initdb(self.primary)
        await self._start_node(self.primary)
        await self._create_database()
        await self._clone_standby()
        self.started_in = time.monotonic() - started

    def _prepare_root(self) -> None:
        """Create the pair's directory, owned by the postgres user and reachable by it."""
        self.root.mkdir(parents=True)
        if os.geteuid() == 0:
            user = pwd.getpwnam(PG_OS_USER)
            os.chown(self.root, user.pw_uid, user.pw_gid)
            open_path_for(self.root, user.pw_uid)

    def _as_pg(self, argv: list[str]) -> list[str]:
        """``argv`` run as the postgres user when we are root (as ourselves otherwise)."""
        if os.geteuid() != 0:
            return argv
        return [shutil.which("runuser") or "/usr/sbin/runuser", "-u", PG_OS_USER, "--", *argv]

    async def _pg(self, tool: str, *args: str, timeout: float | None = None, check: bool = True) -> str:
        """Run PostgreSQL's ``tool`` with ``args`` as the postgres user; its output."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        argv = self._as_pg([str(PG_BIN / tool), *args])
        done = await run(argv, timeout=timeout or self.boot_timeout, env=env, cwd=self.root, check=check)
        return done.stdout

    def _write_node_conf(self, node: PgNode, synchronous: bool = False) -> None:
        """``node.conf`` of ``node``: its port, and with ``synchronous`` the standby names a
        commit waits for."""
        lines = [f"port = {node.port}"]
        if synchronous:
            lines.append("synchronous_standby_names = '*'")
        path = node.data / "node.conf"
        path.write_text("\n".join(lines) + "\n")
        if os.geteuid() == 0:
            user = pwd.getpwnam(PG_OS_USER)
            os.chown(path, user.pw_uid, user.pw_gid)

    async def _initdb(self, node: PgNode) -> None:
        """A new cluster in ``node``'s data directory, trust auth, with the shared settings."""
        await self._pg(
            "initdb", "-D", str(node.data), "-U", PG_OS_USER, "--auth=trust", "--no-locale", "-E", "UTF8", "-N"
        )
        with (node.data / "postgresql.conf").open("a") as conf:
            conf.write(PG_CONF)
        self._write_node_conf(node)

    async def _start_node(self, node: PgNode) -> None:
        """``pg_ctl start -w`` on ``node``, then record its postmaster pid."""
        try:
            await self._pg(
                "pg_ctl", "start", "-D", str(node.data), "-l", str(node.log), "-w", "-t", str(int(self.boot_timeout))
            )
        except CommandFailed as exc:
            raise CommandFailed(f"{exc}\n{tail(node.log)}") from None
        node.pid = read_pid(node.data / "postmaster.pid")

    async def _create_database(self) -> None:
        """The pair's database, on the primary."""
        conn = await self._connect(self.primary.port, "postgres")
        try:
            await conn.execute(f'CREATE DATABASE "{self.database}"', timeout=COMMAND_TIMEOUT_S)
        finally:
            await conn.close()

    async def _clone_standby(self) -> None:
        """Base-backup the standby's data directory from the primary (``-R`` writes the
        replication settings), start it, wait until the primary sees it streaming, and only then
        (with ``synchronous``) make the primary's commits wait for it."""
        standby = self.standby
        await self._pg(
            "pg_basebackup",
            "-D",
            str(standby.data),
            "-h",
            "127.0.0.1",
            "-p",
            str(self.primary.port),
            "-U",
            PG_OS_USER,
            "-R",
            "-X",
            "stream",
            "-c",
            "fast",
        )
        self._write_node_conf(standby)
        await self._start_node(standby)
        await self.wait_streaming()
        if self.synchronous:
            await self._make_synchronous()

    async def _make_synchronous(self) -> None:
        """Name the standby in the primary's ``synchronous_standby_names``, reload, and wait
        until the primary reports it as its synchronous standby."""
        self._write_node_conf(self.primary, synchronous=True)
        await self._pg("pg_ctl", "reload", "-D", str(self.primary.data))

        async def synchronous() -> bool:
            try:
                n = await self.fetchval(
                    self.primary.port, "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'"
                )
            except Exception:
                return False
            return bool(n)

        await wait_until(synchronous, self.boot_timeout, "synchronous standby")

    async def _connect(self, port: int, database: str | None = None, timeout: float = 3.0) -> Any:
        """An asyncpg connection to the server on ``port`` (the pair's database by default)."""
        import asyncpg

        return await asyncpg.connect(
            host="127.0.0.1", port=port, user=PG_OS_USER, database=database or self.database, timeout=timeout
        )

    async def fetchval(self, port: int, query: str, *args: Any, database: str = "postgres") -> Any:
        """The first value of ``query`` on the server on ``port``."""
        conn = await self._connect(port, database)
        try:
            return await asyncio.wait_for(conn.fetchval(query, *args), 10)
        finally:
            await conn.close()

    async def role(self, port: int) -> Role:
        """What the server on ``port`` is now: "primary" (accepts writes), "standby" (in
        recovery) or "down" (any failure to answer)."""
        try:
            in_recovery = await self.fetchval(port, "SELECT pg_is_in_recovery()")
        except Exception:
            return "down"
        return "standby" if in_recovery else "primary"

    async def primary_is(self, port: int) -> bool:
        """Whether the server on ``port`` is up and accepts writes."""
        return await self.role(port) == "primary"

    async def wait_streaming(self, timeout: float | None = None) -> float:
        """Wait until the primary has a standby streaming from it; the seconds it took."""

        async def streaming() -> bool:
            try:
                n = await self.fetchval(
                    self.primary.port, "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"
                )
            except Exception:
                return False
            return bool(n)

        return await wait_until(streaming, timeout or self.boot_timeout, "standby streaming")

    async def wait_writable(self, port: int, timeout: float | None = None) -> float:
        """Wait until the server on ``port`` assigns a transaction id (so it accepts writes)."""

        async def writable() -> bool:
            try:
                await self.fetchval(port, "SELECT txid_current()")
            except Exception:
                return False
            return True

        return await wait_until(writable, timeout or self.boot_timeout, f"port {port} writable", 0.05)

    async def stop(self, port: int, mode: str = "immediate") -> None:
        """``pg_ctl stop -m <mode>`` the server on ``port`` (immediate: no checkpoint, as a crash)."""
        node = self._node_at(port)
        await self._pg("pg_ctl", "stop", "-D", str(node.data), "-m", mode, "-w", "-t", str(int(STOP_TIMEOUT_S)))

    async def start_server(self, port: int) -> None:
        """``pg_ctl start`` the (stopped) server on ``port`` again, in whatever role its data says."""
        await self._start_node(self._node_at(port))

    async def stop_primary(self) -> None:
        """Stop the primary with ``-m immediate``."""
        await self.stop(self.primary.port)

    async def promote(self) -> float:
        """``pg_ctl promote`` the standby and wait until it accepts writes; it becomes the pair's
        primary. The seconds the promotion took."""
        started = time.monotonic()
        standby = self.standby
        await self._pg("pg_ctl", "promote", "-D", str(standby.data), "-w", "-t", str(int(self.boot_timeout)))
        await self.wait_writable(standby.port)
        self._primary = self.nodes.index(standby)
        return time.monotonic() - started

    async def fail_over(self) -> float:
        """Stop the primary (``-m immediate``) and promote the standby; the seconds from the stop
        until the new primary accepts writes."""
        started = time.monotonic()
        await self.stop_primary()
        await self.promote()
        return time.monotonic() - started

    async def rejoin(self) -> float:
        """Rebuild the stopped former primary as a standby of the current one (fresh base backup),
        so the pair can fail over again; the seconds it took."""
        started = time.monotonic()
        standby = self.standby
        if await self.role(standby.port) != "down":
            await self.stop(standby.port)
        await asyncio.to_thread(shutil.rmtree, standby.data)
        await self._clone_standby()
        return time.monotonic() - started

    async def _stop_for_good(self, node: PgNode) -> None:
        """Stop ``node`` immediately if it runs, and SIGKILL its postmaster if that did not work."""
        if (node.data / "postmaster.pid").exists():
            try:
                await self.stop(node.port)
            except (CommandFailed, TimeoutError, OSError):
                pass
        for pid in {node.pid, read_pid(node.data / "postmaster.pid")}:
            if pid is not None and node.ours(pid):
                os.kill(pid, signal.SIGKILL)

    async def close(self) -> None:
        """Stop both servers and remove the pair's directory."""
        for node in self.nodes:
            await self._stop_for_good(node)
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)
