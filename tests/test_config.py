"""Settings: defaults are the embedded mode; a bad value is one clear line naming the setting."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from zstack_mn.config import ConfigError, load_settings


def test_defaults_are_embedded(monkeypatch: pytest.MonkeyPatch):
    for key in ("ZSTACK_MN_BROKER_URL", "ZSTACK_MN_DATABASE_URL"):
        monkeypatch.delenv(key, raising=False)
    s = load_settings()
    assert s.is_embedded
    assert s.run_embedded_agent
    assert s.database_url.startswith("sqlite+aiosqlite:///")
    assert (s.http_host, s.http_port, s.heartbeat_interval, s.node_timeout) == ("127.0.0.1", 8080, 2.0, 10.0)
    assert s.fence_after_s == 5.0


def test_environment_file_and_flags_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ZSTACK_MN_HTTP_PORT", "9001")
    assert load_settings().http_port == 9001
    cfg = tmp_path / "mn.toml"
    cfg.write_text("http_port = 9002\nqueue_prefix = 'blue'\n")
    assert load_settings(cfg).http_port == 9002
    assert load_settings(cfg, {"http_port": 9003}).http_port == 9003


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"ZSTACK_MN_HTTP_PORT": "eighty"}, "http_port"),
        ({"ZSTACK_MN_HEARTBEAT_INTERVAL": "-1"}, "heartbeat_interval"),
        ({"ZSTACK_MN_HEARTBEAT_INTERVAL": "20", "ZSTACK_MN_NODE_TIMEOUT": "10"}, "heartbeat_interval"),
    ],
)
def test_bad_value_names_the_setting(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], names: str):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=names):
        load_settings()


def test_cli_start_with_a_bad_setting_exits_2_with_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "zstack_mn", "start"],
        env={"ZSTACK_MN_HTTP_PORT": "99999", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "http_port" in lines[0]
    assert "Traceback" not in proc.stderr


def test_the_removed_api_token_is_refused_not_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZSTACK_MN_API_TOKEN", "s3cret")
    with pytest.raises(ConfigError, match=r"api_token.*session"):
        load_settings()
    monkeypatch.delenv("ZSTACK_MN_API_TOKEN")
    with pytest.raises(ConfigError, match="api_token"):
        load_settings(None, {"api_token": "s3cret"})


def test_several_broker_urls_are_one_comma_separated_setting() -> None:
    both = "amqp://guest:guest@10.0.0.1:5672/, amqp://guest:guest@10.0.0.2:5672/"
    assert load_settings(None, {"broker_url": both, "admin_password": "x"}).broker_url == both
    with pytest.raises(ConfigError, match="amqp://"):
        load_settings(None, {"broker_url": "amqp://10.0.0.1/,http://10.0.0.2/"})
    with pytest.raises(ConfigError, match="memory://"):
        load_settings(None, {"broker_url": "memory://,amqp://10.0.0.2/"})
