"""Access to the real RabbitMQ and PostgreSQL for the integration tests.

Each test session gets its own RabbitMQ vhost and its own PostgreSQL database, both removed at the
end, so runs never see each other. Set ``ZSTACK_MN_REQUIRE_INTEGRATION=1`` (as ``.ci/run`` does)
to make a missing server a failure instead of a skip.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid

RABBIT_HOST = os.environ.get("ZSTACK_MN_TEST_RABBIT_HOST", "127.0.0.1")
RABBIT_PORT = int(os.environ.get("ZSTACK_MN_TEST_RABBIT_PORT", "5672"))
PG_HOST = os.environ.get("ZSTACK_MN_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("ZSTACK_MN_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("ZSTACK_MN_TEST_PG_USER", "postgres")
PG_ADMIN_DB = os.environ.get("ZSTACK_MN_TEST_PG_DB", "test")

REQUIRED = os.environ.get("ZSTACK_MN_REQUIRE_INTEGRATION") == "1"


def reachable(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def rabbit_up() -> bool:
    return reachable(RABBIT_HOST, RABBIT_PORT)


def postgres_up() -> bool:
    return reachable(PG_HOST, PG_PORT)


def rabbitmqctl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout, check=False)


def new_vhost() -> str:
    name = f"zstack-test-{uuid.uuid4().hex[:10]}"
    rabbitmqctl("add_vhost", name)
    rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    return name


def delete_vhost(name: str) -> None:
    rabbitmqctl("delete_vhost", name)


def amqp_url(vhost: str) -> str:
    return f"amqp://guest:guest@{RABBIT_HOST}:{RABBIT_PORT}/{vhost}"


def pg_admin_dsn() -> str:
    return f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{PG_ADMIN_DB}"


def pg_url(database: str) -> str:
    return f"postgresql+asyncpg://{PG_USER}@{PG_HOST}:{PG_PORT}/{database}"


async def create_database() -> str:
    import asyncpg

    name = f"zstack_test_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(pg_admin_dsn(), timeout=10)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name


async def drop_database(name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(pg_admin_dsn(), timeout=10)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def pg_cluster() -> tuple[str, str]:
    version = sorted(os.listdir("/etc/postgresql"))[0]
    return version, "main"


def pg_ctl(action: str, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    version, name = pg_cluster()
    return subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, name, action, *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
