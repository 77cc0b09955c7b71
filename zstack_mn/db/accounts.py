"""Accounts and sessions of the ZStack API (``zstack_account``, ``zstack_session``; migration 0004).

A ZStack client sends its password as the SHA-512 hex digest of the plain text; that digest is
what is stored, salted and stretched (PBKDF2-HMAC-SHA256), never the digest itself. A session is
valid for ``timeout_s`` seconds from its creation, measured by the database clock, so every node
agrees on when it ends.

    repo = AccountRepository(db)
    await repo.ensure_account("admin", sha512_hex("password"))
    account = await repo.check_password("admin", digest)       # None when wrong
    session = await repo.open_session(account.uuid, 7200)
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import uuid as uuidlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Column, DateTime, Float, MetaData, String, Table, delete, func, insert, select
from sqlalchemy.exc import IntegrityError

from zstack_mn.config import ZSTACK_ADMIN_ACCOUNT
from zstack_mn.db.engine import Database

_META = MetaData()

ACCOUNT = Table(
    "zstack_account",
    _META,
    Column("uuid", String(32), primary_key=True),
    Column("name", String(255), nullable=False, unique=True),
    Column("type", String(32), nullable=False),
    Column("password_hash", String(255), nullable=False),
    Column("created_at", DateTime(timezone=True), server_default=func.now()),
)
SESSION = Table(
    "zstack_session",
    _META,
    Column("uuid", String(32), primary_key=True),
    Column("account_uuid", String(32), nullable=False),
    Column("timeout_s", Float, nullable=False),
    Column("created_at", DateTime(timezone=True), server_default=func.now()),
)

ADMIN_ACCOUNT = ZSTACK_ADMIN_ACCOUNT
ADMIN_TYPE = "SystemAdmin"
PBKDF2_ITERATIONS = 60_000
"""Stretching of the stored digest: a stolen table costs an attacker this many hashes per guess."""


def sha512_hex(password: str) -> str:
    """What a ZStack client sends as ``password``: the SHA-512 hex digest of the plain text."""
    return hashlib.sha512(password.encode()).hexdigest()


def _stretch(digest: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", digest.lower().encode(), salt, iterations)


def hash_digest(digest: str) -> str:
    """The stored form of a client's password digest: ``pbkdf2_sha256$<iterations>$<salt>$<hash>``."""
    salt = secrets.token_bytes(16)
    return f"pbkdf2_sha256${PBKDF2_ITERATIONS}${salt.hex()}${_stretch(digest, salt, PBKDF2_ITERATIONS).hex()}"


_UNKNOWN_ACCOUNT = f"pbkdf2_sha256${PBKDF2_ITERATIONS}${secrets.token_hex(16)}${secrets.token_hex(32)}"
"""A stored form with a random hash, which no digest matches: what an unknown account name is
checked against."""


def digest_matches(digest: str, stored: str) -> bool:
    try:
        scheme, iterations, salt, expected = stored.split("$")
    except ValueError:
        return False
    if scheme != "pbkdf2_sha256":
        return False
    return hmac.compare_digest(_stretch(digest, bytes.fromhex(salt), int(iterations)).hex(), expected)


@dataclass(frozen=True, slots=True)
class Account:
    uuid: str
    name: str
    type: str


@dataclass(frozen=True, slots=True)
class Session:
    """A live session: its uuid, its account, when it was opened and when it ends, and (when read
    back) how many seconds it had left by the database clock."""

    uuid: str
    account_uuid: str
    created_at: datetime
    expires_at: datetime
    seconds_left: float | None = None


def _aware(value: datetime) -> datetime:
    """SQLite hands back naive datetimes (stored as UTC); PostgreSQL aware ones."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


class AccountRepository:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def ensure_account(self, name: str, digest: str, type_: str = ADMIN_TYPE) -> bool:
        """Create the account unless one of that name exists (its password is then left as it
        is); True when this call created it. Safe when several nodes start at once."""
        stored = await asyncio.to_thread(hash_digest, digest)
        try:
            async with self.db.begin() as conn:
                exists = (await conn.execute(select(ACCOUNT.c.uuid).where(ACCOUNT.c.name == name))).first()
                if exists is not None:
                    return False
                await conn.execute(
                    insert(ACCOUNT).values(uuid=uuidlib.uuid4().hex, name=name, type=type_, password_hash=stored)
                )
        except IntegrityError:
            return False
        return True

    async def check_password(self, name: str, digest: str) -> Account | None:
        """The account when ``digest`` is its password's SHA-512 hex digest, else None. An
        unknown name costs the same stretching as a wrong password, so that the time of an
        answer does not tell which account names exist."""
        async with self.db.begin() as conn:
            row = (await conn.execute(select(ACCOUNT).where(ACCOUNT.c.name == name))).first()
        stored = _UNKNOWN_ACCOUNT if row is None else row.password_hash
        if not await asyncio.to_thread(digest_matches, digest, stored) or row is None:
            return None
        return Account(uuid=row.uuid, name=row.name, type=row.type)

    async def open_session(self, account_uuid: str, timeout_s: float) -> Session:
        session_uuid = uuidlib.uuid4().hex
        async with self.db.begin() as conn:
            await conn.execute(
                insert(SESSION).values(uuid=session_uuid, account_uuid=account_uuid, timeout_s=timeout_s)
            )
        found = await self.valid_session(session_uuid)
        assert found is not None
        return found

    async def valid_session(self, session_uuid: str) -> Session | None:
        """The session if it exists and has not expired (database clock), else None."""
        age = self.db.age_seconds(SESSION.c.created_at)
        async with self.db.begin() as conn:
            row = (
                await conn.execute(
                    select(
                        SESSION.c.uuid,
                        SESSION.c.account_uuid,
                        SESSION.c.timeout_s,
                        SESSION.c.created_at,
                        (SESSION.c.timeout_s - age).label("seconds_left"),
                    ).where(SESSION.c.uuid == session_uuid, age < SESSION.c.timeout_s)
                )
            ).first()
        if row is None:
            return None
        created = _aware(row.created_at)
        return Session(
            uuid=row.uuid,
            account_uuid=row.account_uuid,
            created_at=created,
            expires_at=created + timedelta(seconds=row.timeout_s),
            seconds_left=float(row.seconds_left),
        )

    async def close_session(self, session_uuid: str) -> None:
        async with self.db.begin() as conn:
            await conn.execute(delete(SESSION).where(SESSION.c.uuid == session_uuid))

    async def expire_sessions(self) -> int:
        """Delete sessions past their timeout; returns how many."""
        async with self.db.begin() as conn:
            result = await conn.execute(
                delete(SESSION).where(self.db.age_seconds(SESSION.c.created_at) >= SESSION.c.timeout_s)
            )
            return result.rowcount
