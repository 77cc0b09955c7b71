"""The one helper every periodic loop of a node runs on."""

from __future__ import annotations

import asyncio

import pytest

from zstack_mn.messages import ErrorCode, ZStackError
from zstack_mn.periodic import Periodic

pytestmark = pytest.mark.timeout(30)


class Work:
    """Counts runs; lets a test await the n-th one."""

    def __init__(self, fail_first: BaseException | None = None, takes: float = 0.0) -> None:
        self.runs = 0
        self.active = 0
        self.most_at_once = 0
        self.fail_first = fail_first
        self.takes = takes
        self._ran = asyncio.Condition()

    async def __call__(self) -> None:
        self.active += 1
        self.most_at_once = max(self.most_at_once, self.active)
        try:
            if self.takes:
                await asyncio.sleep(self.takes)
            async with self._ran:
                self.runs += 1
                self._ran.notify_all()
            if self.runs == 1 and self.fail_first is not None:
                raise self.fail_first
        finally:
            self.active -= 1

    async def until(self, runs: int, timeout: float = 10) -> None:
        async with asyncio.timeout(timeout), self._ran:
            await self._ran.wait_for(lambda: self.runs >= runs)


async def test_it_runs_at_once_then_every_interval():
    work = Work()
    p = Periodic("t", work, 0.05)
    p.start()
    try:
        await work.until(3)
    finally:
        await p.stop()
    assert p.failures == 0


@pytest.mark.parametrize(
    "error", [RuntimeError("boom"), ZStackError(ErrorCode.DATABASE_UNAVAILABLE, "db down")], ids=["bug", "zstack"]
)
async def test_a_failed_run_is_counted_and_the_loop_goes_on(error: BaseException):
    work = Work(fail_first=error)
    p = Periodic("t", work, 0.05)
    p.start()
    try:
        await work.until(2)
    finally:
        await p.stop()
    assert p.failures == 1


async def test_wake_runs_at_once_whatever_the_interval():
    work = Work()
    p = Periodic("t", work, 3600)
    p.start()
    try:
        await work.until(1)
        p.wake()
        await work.until(2, timeout=5)
    finally:
        await p.stop()


async def test_first_run_delayed_waits_for_a_wake_or_the_interval():
    work = Work()
    p = Periodic("t", work, 3600, first_run_delayed=True)
    p.start()
    try:
        await asyncio.sleep(0.1)
        assert work.runs == 0
        p.wake()
        await work.until(1, timeout=5)
    finally:
        await p.stop()


async def test_runs_never_overlap_even_when_they_overrun_and_are_woken():
    work = Work(takes=0.05)
    p = Periodic("t", work, 0.01)
    p.start()
    try:
        for _ in range(5):
            p.wake()
        await work.until(4)
    finally:
        await p.stop()
    assert work.most_at_once == 1


async def test_stop_ends_the_loop_even_when_a_run_swallows_the_cancellation():
    swallowed = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            swallowed.set()

    p = Periodic("t", stubborn, 0.01, stop_timeout=5)
    p.start()
    await asyncio.sleep(0.05)
    await p.stop()
    assert swallowed.is_set()
    assert not p.running
    runs = p.runs
    await asyncio.sleep(0.05)
    assert p.runs == runs
