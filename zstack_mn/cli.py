"""The ``zstack-mn`` command.

zstack-mn start [--config FILE] [--broker-url URL] [--database-url URL] [--http-port N]
zstack-mn migrate
zstack-mn agent --port 9100
zstack-mn status [--json]
zstack-mn api CreateVmInstance name=web1 cpuNum=1 memorySize=1G
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import typer

from zstack_mn.config import ZSTACK_ADMIN_ACCOUNT, ZSTACK_DEFAULT_PASSWORD, ConfigError, Settings, load_settings
from zstack_mn.logging import configure_logging, redact

app = typer.Typer(add_completion=False, no_args_is_help=True, help="zstack-mn: a stateless management node.")

ConfigOpt = typer.Option(None, "--config", help="TOML file of settings (names as in ZSTACK_MN_*).")


def _settings(config: Path | None, **overrides: Any) -> Settings:
    try:
        return load_settings(config, overrides)
    except ConfigError as exc:
        typer.echo(f"zstack-mn: {exc}", err=True)
        raise typer.Exit(2) from None


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"zstack-mn: {redact(message)}", err=True)
    raise typer.Exit(code)


@app.command()
def start(
    config: Path | None = ConfigOpt,
    broker_url: str | None = typer.Option(
        None, help="amqp://user:pw@host:5672/vhost (several comma-separated: a cluster's members), or memory://."
    ),
    database_url: str | None = typer.Option(None, help="postgresql://... or sqlite:///path (embedded)."),
    http_host: str | None = typer.Option(None),
    http_port: int | None = typer.Option(None),
    queue_prefix: str | None = typer.Option(None),
    log_level: str | None = typer.Option(None),
) -> None:
    """Run a management node until SIGTERM / SIGINT (a second signal stops at once)."""
    settings = _settings(
        config,
        broker_url=broker_url,
        database_url=database_url,
        http_host=http_host,
        http_port=http_port,
        queue_prefix=queue_prefix,
        log_level=log_level,
    )
    configure_logging(settings.log_level, settings.log_format)
    from zstack_mn.node import Node

    async def main() -> int:
        node = Node(settings)
        loop = asyncio.get_running_loop()
        signals = {"count": 0}

        def on_signal() -> None:
            signals["count"] += 1
            if signals["count"] > 1:
                os._exit(130)
            node.request_stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        return await node.run(on_started=settle_heap)

    from zstack_mn.event_loop import run, settle_heap

    try:
        code = run(main(), settings.event_loop)
    except Exception as exc:
        _fail(f"start failed: {type(exc).__name__}: {exc}")
    raise typer.Exit(code)


@app.command()
def migrate(config: Path | None = ConfigOpt, database_url: str | None = typer.Option(None)) -> None:
    """Apply pending database migrations (the same as `alembic upgrade head`)."""
    settings = _settings(config, database_url=database_url)
    configure_logging(settings.log_level, settings.log_format)
    from zstack_mn.db.engine import Database

    async def main() -> None:
        db = Database(settings.database_url)
        try:
            await db.migrate()
        finally:
            await db.close()

    try:
        asyncio.run(main())
    except Exception as exc:
        _fail(f"migration failed: {type(exc).__name__}: {exc}")
    typer.echo("database is at the latest schema")


@app.command()
def agent(
    host: str = typer.Option("127.0.0.1", help="Address to bind."),
    port: int = typer.Option(9100, min=0, max=65535),
    cpu: int = typer.Option(64, min=1, help="CPUs of each simulated host."),
    memory: str = typer.Option("256G", help="Memory of each simulated host."),
) -> None:
    """Run the simulated hypervisor agent (many hosts: /hosts/<id>)."""
    import uvicorn

    from zstack_mn.agent.simulator import SimulatedAgent, create_app
    from zstack_mn.messages.types import parse_size

    try:
        mem = parse_size(memory)
    except ValueError as exc:
        _fail(f"--memory: {exc}", 2)
    configure_logging("info", "auto")
    uvicorn.run(create_app(SimulatedAgent(cpu, mem)), host=host, port=port, log_config=None, access_log=False)


@app.command()
def status(
    config: Path | None = ConfigOpt,
    database_url: str | None = typer.Option(None),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """The nodes: uuid, address, state, heartbeat age, ring share, and whether all rings agree."""
    settings = _settings(config, database_url=database_url)
    configure_logging("warning", settings.log_format)
    from zstack_mn.cluster.status import cluster_status

    try:
        report = asyncio.run(cluster_status(settings.database_url))
    except Exception as exc:
        _fail(f"cannot read the cluster state: {type(exc).__name__}: {exc}")
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(f"{'UUID':36}  {'STATE':8} {'HEARTBEAT':>9}  {'SHARE':>6}  {'RING':12}  ADDRESS")
    for n in report["nodes"]:
        typer.echo(
            f"{n['uuid']:36}  {n['state']:8} {n['heartbeatAge']:8.1f}s  {n['ringShare'] * 100:5.1f}%  "
            f"{n['ringDigest'] or '-':12}  {n['httpAddress'] or '-'}"
        )
    typer.echo(f"{len(report['nodes'])} node(s); rings agree: {'yes' if report['ringsAgree'] else 'NO'}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def api(
    ctx: typer.Context,
    name: str = typer.Argument(None, help="API name, e.g. CreateVmInstance (APICreateVmInstanceMsg also works)."),
    url: str = typer.Option(
        None, "--url", envvar="ZSTACK_MN_API_URL", help="Node URL(s), comma-separated; default http://127.0.0.1:8080."
    ),
    list_apis: bool = typer.Option(False, "--list", help="List the APIs and their fields."),
    timeout: float = typer.Option(30.0, min=0.1),
    plain: bool = typer.Option(False, "--plain", help="Use the plain /v1 API instead of ZStack's /zstack/v1."),
    account: str = typer.Option(
        ZSTACK_ADMIN_ACCOUNT, "--account", envvar="ZSTACK_MN_API_ACCOUNT", help="ZStack API account."
    ),
    password: str = typer.Option(
        ZSTACK_DEFAULT_PASSWORD, "--password", envvar="ZSTACK_MN_API_PASSWORD", help="ZStack API password (plain text)."
    ),
) -> None:
    """Call an API in the manner of zstack-cli: `zstack-mn api StartVmInstance uuid=...`."""
    from zstack_mn.cli_api import describe_apis, parse_call, run_call

    if list_apis:
        typer.echo(describe_apis())
        return
    if not name:
        _fail("give an API name, or --list", 2)
    try:
        msg = parse_call(name, ctx.args)
    except ValueError as exc:
        _fail(str(exc), 2)
    urls = (url or "http://127.0.0.1:8080").split(",")
    ok, payload = asyncio.run(run_call(msg, urls, timeout, plain=plain, account=account, password=password))
    typer.echo(json.dumps(payload, indent=2, default=str))
    if not ok:
        raise typer.Exit(1)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
