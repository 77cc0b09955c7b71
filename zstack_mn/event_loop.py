"""Which event loop a node runs on: uvloop where it is installed (measured faster on the node's
hot path: AMQP, HTTP and database I/O), the standard asyncio loop otherwise or when asked.

    exit_code = run(main(), settings.event_loop)
"""

from __future__ import annotations

import asyncio
import gc
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


GC_THRESHOLDS = (20_000, 20, 10)
"""The collector's thresholds for a node (CPython's defaults: 700, 10, 10). A node with a thousand
operations in flight allocates fast and keeps many objects alive; at the defaults, B7's burst of
10,000 operations spent 11 % of the node's CPU in the collector; with these and the freeze, 0.5 %
(the node's CPU for the burst fell by 7 %)."""


def settle_heap() -> None:
    """Once a node has started: collect, move every object alive now (modules, models, the web
    app, pools: hundreds of thousands) out of the collector's sight (``gc.freeze``), and collect
    young objects less often (``GC_THRESHOLDS``). Full collections then walk only what came after
    start-up. On a rejoin the previous incarnation's objects are unfrozen first, so what is
    garbage of it can be collected."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def run(main: Coroutine[Any, Any, T], choice: str = "auto") -> T:
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(main)
