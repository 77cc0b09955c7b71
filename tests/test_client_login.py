"""The client's shared login (``zstack_mn.client.SessionLogin``) with a fake ``log_in``."""

from __future__ import annotations

import asyncio

import pytest

from zstack_mn.client import SessionLogin
from zstack_mn.messages import ErrorCode, ZStackError


class FakeNode:
    """Answers a login after ``delay`` seconds with a new session, or with ``refuse``; gives up,
    as a real login does, at the caller's deadline."""

    def __init__(self, delay: float = 0.0, refuse: ErrorCode | None = None) -> None:
        self.delay = delay
        self.refuse = refuse
        self.logins: list[float] = []

    async def log_in(self, deadline: float) -> str:
        self.logins.append(deadline)
        loop = asyncio.get_running_loop()
        if loop.time() + self.delay > deadline:
            await asyncio.sleep(max(deadline - loop.time(), 0))
            raise ZStackError(ErrorCode.TIMEOUT, "no node answered in time")
        await asyncio.sleep(self.delay)
        if self.refuse is not None:
            raise ZStackError(self.refuse, "refused")
        return f"session-{len(self.logins)}"


async def test_concurrent_callers_share_one_login() -> None:
    node = FakeNode(delay=0.05)
    auth = SessionLogin(node.log_in)
    sessions = await asyncio.gather(*(auth.login(5) for _ in range(10)))
    assert set(sessions) == {"session-1"}
    assert len(node.logins) == 1


async def test_a_short_caller_that_began_the_login_does_not_fail_a_long_one() -> None:
    node = FakeNode(delay=0.3)
    auth = SessionLogin(node.log_in)
    short = asyncio.create_task(auth.login(0.1))
    await asyncio.sleep(0)
    long = asyncio.create_task(auth.login(5))
    with pytest.raises(ZStackError) as err:
        await short
    assert err.value.code is ErrorCode.TIMEOUT
    assert await long == "session-2"
    assert len(node.logins) == 2


async def test_a_refused_account_fails_every_caller_at_once() -> None:
    node = FakeNode(refuse=ErrorCode.AUTHENTICATION_ERROR)
    auth = SessionLogin(node.log_in)
    results = await asyncio.gather(auth.login(0.5), auth.login(5), return_exceptions=True)
    assert [r.code for r in results if isinstance(r, ZStackError)] == [ErrorCode.AUTHENTICATION_ERROR] * 2
    assert len(node.logins) == 1


async def test_an_ended_session_is_renewed_once_then_the_error_stands() -> None:
    node = FakeNode()
    auth = SessionLogin(node.log_in)
    seen: list[str] = []

    async def ended(session: str) -> str:
        seen.append(session)
        raise ZStackError(ErrorCode.INVALID_SESSION, "session ended")

    loop = asyncio.get_running_loop()
    with pytest.raises(ZStackError) as err:
        await auth.call(loop.time() + 5, ended)
    assert err.value.code is ErrorCode.INVALID_SESSION
    assert seen == ["session-1", "session-2"]

    async def ok(session: str) -> str:
        return session

    assert await auth.call(loop.time() + 5, ok) == "session-2"
