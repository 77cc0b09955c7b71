"""Which event loop a node runs on: uvloop where it is installed (measured faster on the node's
hot path: AMQP, HTTP and database I/O), the standard asyncio loop otherwise or when asked.

    exit_code = run(main(), settings.event_loop)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The loop factory for ``choice`` (``auto``, ``uvloop`` or ``asyncio``); None is asyncio's own.
    ``uvloop`` when it is not installed raises ImportError naming the package."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ImportError("event_loop = uvloop, but the uvloop package is not installed") from None
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], choice: str = "auto") -> T:
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(main)
