"""structlog set-up: JSON lines (readable console on a TTY), stdlib logs routed through it.

The node uuid is bound once (``bind_node``); message id / type / resource uuid are bound per
handled message with ``structlog.contextvars.bound_contextvars``. URLs with credentials are
redacted on every line.

    configure_logging("info", "auto"); log = structlog.get_logger(__name__)
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import structlog

_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]*)@", re.I)


def redact(text: str) -> str:
    """Replace the password of every ``scheme://user:password@`` in ``text``."""
    return _CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)


def _redact_processor(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    for key, value in event.items():
        if isinstance(value, str) and "://" in value:
            event[key] = redact(value)
    return event


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    """Route structlog and the stdlib loggers (aio-pika, SQLAlchemy, uvicorn) to stderr."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact_processor,
    ]
    renderer: Any = structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aio_pika", "aiormq", "sqlalchemy", "uvicorn.access", "httpx", "alembic"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def bind_node(node_uuid: str) -> None:
    """Put the node uuid on every following log line of this process."""
    structlog.contextvars.bind_contextvars(node=node_uuid)
