"""Settings: environment (``ZSTACK_MN_*``), an optional TOML file, then CLI flags.

Defaults give the embedded single-node mode (in-process bus, SQLite, simulated agent).

    settings = load_settings(config_file=None, overrides={"http_port": 9090})
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "ZSTACK_MN_"
DEFAULT_DATA_DIR = Path.home() / ".zstack-mn"
ZSTACK_ADMIN_ACCOUNT = "admin"
"""The name of ZStack's initial account (the ZStack API's ``admin``; its clients log in as it)."""
ZSTACK_DEFAULT_PASSWORD = "password"
"""The password of ZStack's initial ``admin`` account, which its clients assume out of the box."""


class ConfigError(Exception):
    """A setting is invalid; the message names it and says why."""


class Settings(BaseSettings):
    """Every tunable of a node, with its default."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    broker_url: str = "memory://"
    """``memory://`` (embedded), or ``amqp://…``; several comma-separated (a RabbitMQ cluster's
    members) are tried in turn on connect and on every reconnect."""
    database_url: str = f"sqlite+aiosqlite:///{DEFAULT_DATA_DIR / 'zstack-mn.db'}"
    queue_prefix: str = Field("zstack", pattern=r"^[A-Za-z0-9_-]{1,32}$")
    queue_type: Literal["classic", "quorum"] = "classic"
    """``quorum`` for a RabbitMQ cluster: the durable queues are replicated over its members, so
    losing one loses no queue. Every node of a cluster needs the same value."""
    http_host: str = "127.0.0.1"
    http_port: int = Field(8080, ge=0, le=65535)
    http_enabled: bool = True

    heartbeat_interval: float = Field(2.0, gt=0, le=60)
    node_timeout: float = Field(10.0, gt=0, le=600)
    fence_after: float | None = Field(None, gt=0)
    on_evicted: Literal["rejoin", "exit"] = "rejoin"
    rejoin_timeout: float = Field(300.0, ge=0, le=86_400)
    drain_timeout: float = Field(15.0, ge=0, le=600)

    db_pool_size: int = Field(10, ge=1, le=1_000)
    db_max_overflow: int = Field(0, ge=0, le=1_000)

    call_timeout: float = Field(30.0, gt=0, le=3600)
    job_timeout: float = Field(600.0, gt=0, le=86_400)
    """How long an operation answered with a job (ZStack's asynchronous API, a ``/v1`` 202) may
    run, in runs of up to ``call_timeout`` each, before its job ends with a timeout error."""
    publish_timeout: float = Field(5.0, gt=0, le=120)
    amqp_heartbeat: int = Field(5, ge=1, le=600)
    max_message_bytes: int = Field(1 << 20, ge=1024, le=(16 << 20) - 1024)
    max_in_flight: int = Field(2_000, ge=1, le=65_535)
    max_hops: int = Field(3, ge=0, le=16)

    agent_timeout: float = Field(10.0, gt=0, le=600)
    agent_max_connections: int = Field(2_000, ge=1, le=100_000)
    host_ping_interval: float = Field(5.0, gt=0, le=3600)
    host_ping_failures: int = Field(2, ge=1, le=100)
    vm_sync_interval: float = Field(30.0, gt=0, le=86400)
    """How often each node compares the VMs of the hosts it owns with what their agents report."""
    embedded_agent: bool | None = None
    embedded_agent_port: int = Field(0, ge=0, le=65535)

    admin_password: str | None = Field(None, min_length=1, max_length=255)
    """The ZStack API's ``admin`` account, created at first start with this password. Embedded
    mode defaults to ZStack's own default (``password``); a cluster creates no admin account
    without it, and refuses ZStack's default unless ``allow_default_admin_password`` is set."""
    allow_default_admin_password: bool = False
    session_timeout: float = Field(7200.0, gt=0, le=30 * 86400)
    """Seconds a ZStack API session lasts after its login (ZStack's default: 7200)."""
    kvm_agent_url: str = Field(
        "http://{managementIp}:7070/hosts/{managementIp}", pattern=r"^https?://.*\{managementIp\}", max_length=512
    )
    """ZStack's AddKVMHost names a host by ``managementIp``; this template makes its agent URL."""

    event_loop: Literal["auto", "asyncio", "uvloop"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"

    @model_validator(mode="after")
    def _check_timings(self) -> Settings:
        if self.heartbeat_interval >= self.node_timeout:
            raise ValueError("heartbeat_interval must be shorter than node_timeout")
        if self.fence_after is not None and self.fence_after >= self.node_timeout:
            raise ValueError("fence_after must be shorter than node_timeout")
        return self

    @model_validator(mode="after")
    def _check_broker_urls(self) -> Settings:
        urls = split_urls(self.broker_url)
        if self.is_embedded and len(urls) > 1:
            raise ValueError("broker_url: memory:// is one in-process bus; it takes no other URL")
        if not self.is_embedded and not all(u.startswith(("amqp://", "amqps://")) for u in urls):
            raise ValueError("broker_url: every URL must be amqp:// or amqps:// (comma-separated for several)")
        return self

    @model_validator(mode="after")
    def _check_database_hosts(self) -> Settings:
        # Imported here: the clients and the CLI load the settings too, without the database layer.
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        from zstack_mn.db.pg_hosts import checked_hosts

        if self.database_url.startswith(("postgresql", "postgres:")):
            try:
                url = make_url(self.database_url)
            except (ArgumentError, ValueError) as exc:
                raise ValueError(f"database_url: {exc} (several hosts are written ?host=a:5432&host=b:5432)") from None
            checked_hosts(url)
        return self

    @model_validator(mode="after")
    def _check_admin_password(self) -> Settings:
        if (
            not self.is_embedded
            and self.admin_password == ZSTACK_DEFAULT_PASSWORD
            and not self.allow_default_admin_password
        ):
            raise ValueError(
                "admin_password: ZStack's default password is refused for a cluster; choose another "
                "or set allow_default_admin_password=true"
            )
        return self

    @model_validator(mode="after")
    def _check_kvm_agent_url(self) -> Settings:
        try:  # checked at start, or every AddKVMHost would fail on it
            self.kvm_agent_url.format(managementIp="10.0.0.1")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"kvm_agent_url: {{managementIp}} is its only placeholder (write a literal brace twice): {exc!r}"
            ) from None
        return self

    @property
    def initial_admin_password(self) -> str | None:
        """The password the ``admin`` account gets when it is created; None: no admin account."""
        if self.admin_password is not None:
            return self.admin_password
        return ZSTACK_DEFAULT_PASSWORD if self.is_embedded else None

    @property
    def fence_after_s(self) -> float:
        """How long a node may miss heartbeat writes before it pauses resource work."""
        return self.fence_after if self.fence_after is not None else self.node_timeout / 2

    @property
    def is_embedded(self) -> bool:
        return self.broker_url.startswith("memory://")

    @property
    def run_embedded_agent(self) -> bool:
        return self.is_embedded if self.embedded_agent is None else self.embedded_agent


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        name = ".".join(str(p) for p in item["loc"]) or "settings"
        env = f" ({ENV_PREFIX}{name.upper()})" if item["loc"] else ""
        parts.append(f"{name}{env}: {item['msg']}")
    return "; ".join(parts)


def split_urls(value: str) -> list[str]:
    """Broker URLs given as one comma-separated setting (a RabbitMQ cluster's members), in the
    order they are tried."""
    return [part.strip() for part in value.split(",") if part.strip()]


REMOVED_SETTINGS = {
    "api_token": "every API takes a ZStack session now (Authorization: OAuth <session>); log in as admin",
}
"""Settings that no longer exist and would otherwise be ignored silently when set in the
environment: refused, naming what replaced them."""


def load_settings(config_file: Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Build settings from the environment, then ``config_file``, then ``overrides``.

    Raises ConfigError with one line naming the bad setting.
    """
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            values.update(tomllib.loads(config_file.read_text()))
        except OSError as exc:
            raise ConfigError(f"config file {config_file}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {config_file}: {exc}") from exc
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    for name, why in REMOVED_SETTINGS.items():
        if name in values or f"{ENV_PREFIX}{name.upper()}" in os.environ:
            raise ConfigError(f"invalid setting: {name} ({ENV_PREFIX}{name.upper()}) is gone: {why}")
    try:
        return Settings(**values)
    except ValidationError as exc:
        raise ConfigError(f"invalid setting: {_describe(exc)}") from exc
