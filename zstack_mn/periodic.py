"""Periodic work, one way for every loop of a node (heartbeat, host tracker, VM reconcile, reply
sweep): runs never overlap and never drift (the n-th is due at ``start + n × interval``; a run that
overruns skips the ticks it missed), a ``wake()`` runs the work at once, an optional jitter spreads
nodes that started together, and one error policy: a failed run is logged and the loop goes on.
``stop()`` cancels it and waits, within a bound, for the run in progress.

    beat = Periodic("heartbeat", membership.round, interval=2.0)
    beat.start()
    ...
    await beat.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable

import structlog

from zstack_mn.messages import ZStackError

log = structlog.get_logger(__name__)

STOP_TIMEOUT_S = 10.0


class Periodic:
    """Run ``work`` every ``interval`` seconds (a number, or a function read at each tick).

    ``stop()`` also ends the loop after the run in progress when that run swallowed the
    cancellation (Python 3.11's ``wait_for`` can, when it races the awaited call)."""

    def __init__(
        self,
        name: str,
        work: Callable[[], Awaitable[object]],
        interval: float | Callable[[], float],
        *,
        jitter: float = 0.0,
        first_run_delayed: bool = False,
        cooldown: float = 0.0,
        stop_timeout: float = STOP_TIMEOUT_S,
    ) -> None:
        """``jitter``: a fraction of the interval (0.1 = ±10 %) added at random to each wait.
        ``first_run_delayed``: wait one interval before the first run instead of running at once.
        ``cooldown``: the least time between the end of a run and the next, even when woken (a
        burst of wakes costs one run per cooldown)."""
        self.name = name
        self._work = work
        self._interval = interval
        self._jitter = jitter
        self._first_run_delayed = first_run_delayed
        self._cooldown = cooldown
        self._stop_timeout = stop_timeout
        self._stopped = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.runs = 0
        self.failures = 0

    @property
    def interval(self) -> float:
        return self._interval() if callable(self._interval) else self._interval

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name=self.name)

    def wake(self) -> None:
        """Run as soon as the run in progress (if any) ends."""
        self._wake.set()

    async def stop(self) -> None:
        """Cancel the loop; wait up to ``stop_timeout`` for the run in progress to unwind."""
        self._stopped = True
        task, self._task = self._task, None
        if task is None or task.done():
            return
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=self._stop_timeout)
        if not done:
            log.warning("periodic task did not stop in time", task=self.name, timeout=self._stop_timeout)

    async def run_once(self) -> bool:
        """One run under the error policy; False when it failed (and was logged)."""
        self.runs += 1
        try:
            await self._work()
        except asyncio.CancelledError:
            raise
        except ZStackError as exc:
            self.failures += 1
            log.warning("periodic run failed", task=self.name, code=exc.code.value, error=exc.description)
            return False
        except Exception:
            self.failures += 1
            log.exception("periodic run failed", task=self.name)
            return False
        return True

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        start, n = loop.time(), 0
        if self._first_run_delayed:
            await self._wait_until(start + self._next_wait())
            start, n = loop.time(), 0
        while not self._stopped:
            self._wake.clear()
            await self.run_once()
            if self._cooldown:
                await asyncio.sleep(self._cooldown)
            interval = self.interval
            n += 1
            now = loop.time()
            if start + n * interval < now:
                n = int((now - start) / interval) + 1
            await self._wait_until(start + n * interval + self._spread(interval))

    def _next_wait(self) -> float:
        interval = self.interval
        return interval + self._spread(interval)

    def _spread(self, interval: float) -> float:
        return random.uniform(-self._jitter, self._jitter) * interval if self._jitter else 0.0

    async def _wait_until(self, due: float) -> None:
        """Sleep until ``due`` (loop time) or a ``wake()``, whichever comes first."""
        delay = due - asyncio.get_running_loop().time()
        if delay <= 0 or self._wake.is_set():
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._wake.wait()
