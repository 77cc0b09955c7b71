"""Error codes (one place), the wire form of an error, and the exception that carries one.

Codes follow ZStack's families (SYS, VM, HOST, ...); each code knows its HTTP status and
whether a caller may retry it.

    raise ZStackError(ErrorCode.INVALID_ARGUMENT, "memorySize must be positive", field="memorySize")
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from pydantic import BaseModel, Field


class ErrorCode(str, Enum):
    """Every error a reply can carry: (code, HTTP status, retryable)."""

    http_status: int
    retryable: bool

    def __new__(cls, code: str, http_status: int = 500, retryable: bool = False) -> ErrorCode:
        obj = str.__new__(cls, code)
        obj._value_ = code
        obj.http_status = http_status
        obj.retryable = retryable
        return obj

    INVALID_ARGUMENT = ("SYS.1001", 400, False)
    MALFORMED_MESSAGE = ("SYS.1002", 400, False)
    UNKNOWN_MESSAGE_TYPE = ("SYS.1003", 400, False)
    MESSAGE_TOO_LARGE = ("SYS.1004", 413, False)
    RESOURCE_NOT_FOUND = ("SYS.1006", 404, False)
    METHOD_NOT_ALLOWED = ("SYS.1007", 405, False)
    NO_ROUTE = ("SYS.1010", 503, True)
    TIMEOUT = ("SYS.1011", 504, True)
    BUS_UNAVAILABLE = ("SYS.1012", 503, True)
    DATABASE_UNAVAILABLE = ("SYS.1013", 503, True)
    NODE_FENCED = ("SYS.1014", 503, True)
    NODE_STOPPING = ("SYS.1015", 503, True)
    NO_HANDLER = ("SYS.1016", 400, False)
    INTERNAL_ERROR = ("SYS.1099", 500, False)

    INVALID_STATE = ("VM.1001", 409, False)
    CONCURRENT_MODIFICATION = ("VM.1002", 409, True)
    HOST_IN_USE = ("HOST.1001", 409, False)
    NO_CAPACITY = ("HOST.1002", 409, False)
    DUPLICATE_RESOURCE = ("SYS.1020", 409, False)
    AUTHENTICATION_ERROR = ("ID.1000", 401, False)
    """Wrong account name or password (ZStack's IdentityErrors.AUTHENTICATION_ERROR)."""
    INVALID_SESSION = ("ID.1001", 401, False)
    """No session, an unknown one or an expired one (ZStack's IdentityErrors.INVALID_SESSION)."""

    AGENT_ERROR = ("AGENT.1001", 502, False)
    AGENT_UNREACHABLE = ("AGENT.1002", 502, True)
    AGENT_TIMEOUT = ("AGENT.1003", 504, True)

    @classmethod
    def parse(cls, code: str) -> ErrorCode:
        try:
            return cls(code)
        except ValueError:
            return cls.INTERNAL_ERROR


class ErrorInfo(BaseModel):
    """An error on the wire: ``{code, description, details}``."""

    code: str
    description: str
    details: dict[str, Any] = Field(default_factory=dict)


class ErrorReply(BaseModel):
    """The body of every error answer on the HTTP API: ``{"error": {code, description, details}}``."""

    error: ErrorInfo


class ZStackError(Exception):
    """An error that becomes an error reply (on the bus) or an HTTP error (on the API)."""

    def __init__(self, code: ErrorCode, description: str, **details: Any) -> None:
        super().__init__(f"{code.value} {code.name}: {description}")
        self.code = code
        self.description = description
        self.details = details

    @property
    def retryable(self) -> bool:
        return self.code.retryable

    def to_info(self) -> ErrorInfo:
        return ErrorInfo(code=self.code.value, description=self.description, details=self.details)

    @classmethod
    def from_info(cls, info: ErrorInfo) -> ZStackError:
        return cls(ErrorCode.parse(info.code), info.description, **info.details)
