"""What ``/openapi.json`` says beyond what FastAPI derives from the routes: the error answers of
each operation (from ``ErrorCode``, the one list of codes), the session scheme every API call
needs (ZStack's ``Authorization: OAuth <session>``), and no trace of FastAPI's own 422, which this
API never sends (a bad field is a 400)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from zstack_mn.messages.errors import ErrorCode, ErrorReply

SESSION_SCHEME = "session"
"""The plain API's security scheme; ZStack's API names the same header ``ZSTACK_SESSION_SCHEME``
(two names, so that a fuzzer can be given a session for one API and not the other)."""
ZSTACK_SESSION_SCHEME = "zstackSession"
SESSION_SECURITY_SCHEME: dict[str, Any] = {
    "type": "apiKey",
    "in": "header",
    "name": "Authorization",
    "description": "OAuth <session uuid> (the uuid LogInByAccount answers, 32 hex characters); one "
    "session serves the plain API and ZStack's",
}
TEXT_PLAIN = "text/plain"

QUERY_ERRORS = (400, 413, 503)
"""What a query can answer besides its page: a bad field, a body over the limit, the database or
the node unavailable (503 also comes as plain text when the node has more requests in flight
than it takes)."""
READ_ERRORS = (*QUERY_ERRORS, 404)
ACTION_ERRORS = (400, 404, 409, 413, 502, 503, 504)
"""An action can also meet a state conflict (409), its agent failing or unreachable (502) and a
deadline (504)."""
OPS_ERRORS = (413, 503)


JOB_HEADERS: dict[str, Any] = {
    "Location": {"description": "the job to poll: /v1/jobs/{uuid}", "schema": {"type": "string"}},
    "Preference-Applied": {
        "description": "respond-async, when the job was made because the request's Prefer asked for it",
        "schema": {"type": "string"},
    },
}


class JobRef(BaseModel):
    uuid: str
    state: Literal["Processing"]


class JobAccepted(BaseModel):
    """An operation still running when its caller's wait ended: poll ``/v1/jobs/{uuid}``."""

    job: JobRef


def accepted() -> dict[int | str, dict[str, Any]]:
    """The ``responses`` entry of an operation that may answer with a job."""
    return {
        202: {
            "model": JobAccepted,
            "description": "still running when the caller's wait ended (the request's Prefer: respond-async "
            "or wait=N, else the call deadline): poll the job at Location until it answers other than 202",
            "headers": JOB_HEADERS,
        }
    }


class Health(BaseModel):
    status: str
    node: str


class Readiness(BaseModel):
    ready: bool
    checks: dict[str, bool]


def _codes_with(status: int) -> str:
    return ", ".join(f"{c.value} {c.name}" for c in ErrorCode if c.http_status == status)


def status_description(status: int) -> str:
    """The error codes answered with ``status``, as the document names them."""
    return _codes_with(status)


def errors(statuses: tuple[int, ...]) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` entry of a route for these error statuses, each naming its codes."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {"model": ErrorReply, "description": _codes_with(status) or "error"}
        if status == 503:
            entry["content"] = {TEXT_PLAIN: {"schema": {"type": "string"}}}
            entry["description"] += "; or plain text when the node is at its limit of requests in flight"
        out[status] = entry
    return out


def install(app: FastAPI, *, api_prefix: str) -> None:
    """Make ``app.openapi()`` return the shaped document (built once, on first use)."""
    cache: dict[str, Any] = {}

    def build() -> dict[str, Any]:
        if "doc" not in cache:
            doc = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
                separate_input_output_schemas=False,
            )
            cache["doc"] = _shaped(doc, api_prefix)
        shaped: dict[str, Any] = cache["doc"]
        return shaped

    setattr(app, "openapi", build)  # noqa: B010  # FastAPI's documented way to replace the schema generator


def _shaped(doc: dict[str, Any], api_prefix: str) -> dict[str, Any]:
    for path, operations in doc.get("paths", {}).items():
        for operation in operations.values():
            operation.get("responses", {}).pop("422", None)
            if path.startswith(api_prefix):
                operation["security"] = [{SESSION_SCHEME: []}]
                operation["responses"]["401"] = {
                    "description": _codes_with(401),
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorReply"}}},
                }
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    doc["components"]["securitySchemes"] = {SESSION_SCHEME: SESSION_SECURITY_SCHEME}
    return doc
