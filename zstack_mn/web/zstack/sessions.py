"""Who may call: ZStack's accounts and sessions, the one model for every way in.

A node has one ``SessionGuard``. ZStack's REST and RPC adapters call ``require`` before they
build a message; the plain ``/v1`` API's gate calls it on every request (``Authorization: OAuth
<session>``, ZStack's own header); and the node serves ``api.portal`` through ``guarded``, so a
message published straight onto the queue without a live session in its ``session`` header is
refused with the same error. The cluster's own nodes never publish onto ``api.portal``: they talk
on their service queues, which only holders of the broker's credentials can reach (the README
says what those credentials grant).

A session found live is trusted for at most ``RECHECK_S`` seconds (never past its expiry) before
it is read again, so a busy client costs no database read per call; a logout takes effect at once
on the node that served it and within ``RECHECK_S`` on the others.

The ``admin`` account is created on first use of the accounts (a login, or a node's start-up
through ``ensure_admin``) with ``Settings.initial_admin_password``; an existing account keeps
its password. Logins, validations and logouts answer ZStack's error codes: ``ID.1000`` for a
wrong name or password, ``ID.1001`` for a missing, unknown or expired session.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Any

import structlog

from zstack_mn.bus.cloudbus import Dispatcher, Request
from zstack_mn.config import Settings
from zstack_mn.db.accounts import ADMIN_ACCOUNT, AccountRepository, Session, sha512_hex
from zstack_mn.db.engine import Database
from zstack_mn.messages import ErrorCode, ZStackError
from zstack_mn.messages.ids import SESSION_HEADER

log = structlog.get_logger(__name__)

SWEEP_EVERY_S = 600.0
RECHECK_S = 5.0
"""How long a session found live is trusted without reading it again."""
CACHED_SESSIONS = 10_000
"""At most this many sessions are remembered; past it the memory starts again empty."""
_HEX_DIGEST = re.compile(r"^[0-9a-fA-F]{128}$")
_SESSION_UUID = re.compile(r"^[0-9a-fA-F]{32}$")
ACCOUNT_TYPES = (None, "", "iam1", "ZStack")
LOGIN_FIELDS: dict[str, dict[str, Any]] = {
    "accountName": {"type": "string", "minLength": 1},
    "password": {"type": "string", "pattern": _HEX_DIGEST.pattern, "description": "its SHA-512 hex digest"},
    "accountType": {"enum": list(ACCOUNT_TYPES)},
}
"""What ``login`` reads (``/openapi.json`` states the same); ``accountName`` and ``password`` are
required."""


def invalid_session(why: str) -> ZStackError:
    return ZStackError(ErrorCode.INVALID_SESSION, f"invalid session: {why}")


def session_of_authorization(value: str | None) -> str:
    """The session uuid of an ``Authorization: OAuth <uuid>`` header (ZStack's form)."""
    if value is None:
        raise invalid_session("missing header 'Authorization' (OAuth <session uuid>)")
    kind, _, session = value.strip().partition(" ")
    if kind != "OAuth":
        raise invalid_session("Authorization type must be 'OAuth'")
    return session.strip()


class SessionGuard:
    def __init__(self, db: Database, settings: Settings) -> None:
        self.accounts = AccountRepository(db)
        self.settings = settings
        self._admin_checked = False
        self._next_sweep = 0.0
        self._live: dict[str, tuple[Session, float]] = {}
        self._ended: dict[str, float] = {}

    async def ensure_admin(self) -> None:
        """Create the ``admin`` account unless it exists (once per process)."""
        if self._admin_checked:
            return
        password = self.settings.initial_admin_password
        if password is not None and await self.accounts.ensure_account(ADMIN_ACCOUNT, sha512_hex(password)):
            log.info("created the ZStack API admin account")
        self._admin_checked = True

    async def login(self, params: Mapping[str, Any]) -> Session:
        """``LogInByAccount``: ``accountName`` and ``password`` (its SHA-512 hex digest)."""
        name = params.get("accountName")
        digest = params.get("password")
        if not isinstance(name, str) or not name:
            raise ZStackError(ErrorCode.INVALID_ARGUMENT, "accountName: required", field="accountName")
        if not isinstance(digest, str) or not _HEX_DIGEST.match(digest):
            raise ZStackError(
                ErrorCode.INVALID_ARGUMENT, "password: must be the SHA-512 hex digest of the password", field="password"
            )
        account_type = params.get("accountType")
        if account_type not in ACCOUNT_TYPES:
            raise ZStackError(
                ErrorCode.INVALID_ARGUMENT, "accountType: zstack-mn has only ZStack accounts", field="accountType"
            )
        await self.ensure_admin()
        await self._sweep()
        account = await self.accounts.check_password(name, digest)
        if account is None:
            raise ZStackError(ErrorCode.AUTHENTICATION_ERROR, "wrong account name or password")
        return await self.accounts.open_session(account.uuid, self.settings.session_timeout)

    async def logout(self, session_uuid: object) -> None:
        """``LogOut``: ending a session that is gone already is not an error (as in ZStack)."""
        if isinstance(session_uuid, str) and _SESSION_UUID.match(session_uuid):
            key = session_uuid.lower()
            self._ended[key] = time.monotonic() + RECHECK_S
            self._live.pop(key, None)
            await self.accounts.close_session(key)
            self._live.pop(key, None)

    async def validate(self, session_uuid: object) -> bool:
        """``ValidateSession``: always read from the database."""
        if not isinstance(session_uuid, str) or not _SESSION_UUID.match(session_uuid):
            return False
        return await self._read(session_uuid.lower()) is not None

    async def require(self, session_uuid: object) -> Session:
        """The live session, or ZStack's invalid-session error."""
        if session_uuid is None or session_uuid == "":
            raise invalid_session("no session given; log in with LogInByAccount first")
        if not isinstance(session_uuid, str) or not _SESSION_UUID.match(session_uuid):
            raise invalid_session("a session uuid is 32 hex characters")
        key = session_uuid.lower()
        cached = self._live.get(key)
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        session = await self._read(key)
        if session is None:
            raise invalid_session(f"session {session_uuid} does not exist or has expired")
        return session

    async def _read(self, key: str) -> Session | None:
        """The session from the database, remembered for RECHECK_S (or until it expires)."""
        session = await self.accounts.valid_session(key)
        if session is None:
            self._live.pop(key, None)
            return None
        now = time.monotonic()
        if self._ended and self._ended.get(key, 0.0) > now:
            return session  # read before a logout here finished: answered once, never remembered
        if self._ended:
            self._ended = {k: until for k, until in self._ended.items() if until > now}
        if len(self._live) >= CACHED_SESSIONS:
            self._live.clear()
        trust = RECHECK_S if session.seconds_left is None else min(RECHECK_S, session.seconds_left)
        self._live[key] = (session, now + trust)
        return session

    async def check_headers(self, headers: Mapping[str, Any]) -> Session:
        """The bus-side check for ``api.portal``: the ``session`` envelope header must name a
        live session (raises INVALID_SESSION otherwise)."""
        return await self.require(headers.get(SESSION_HEADER))

    async def _sweep(self) -> None:
        """Forget expired sessions, at most every SWEEP_EVERY_S per process."""
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_EVERY_S
        removed = await self.accounts.expire_sessions()
        if removed:
            log.info("expired ZStack API sessions", removed=removed)


def guarded(dispatch: Dispatcher, guard: SessionGuard) -> Dispatcher:
    """The portal's bus entry behind the session check: a message on ``api.portal`` without a
    live session in its ``session`` header is answered with ZStack's invalid-session error
    (``ID.1001``) and never reaches the portal."""

    async def checked(req: Request) -> dict[str, Any]:
        await guard.check_headers(req.envelope.headers)
        return await dispatch(req)

    return checked
