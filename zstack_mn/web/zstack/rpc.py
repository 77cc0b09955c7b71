"""ZStack's RPC endpoint: ``POST /zstack/api`` with ``{"<message class>": {...}}`` and the
results at ``GET /zstack/api/result/<uuid>``, as ZStack's Python binding speaks it
(``zstack-utility/apibinding/apibinding/api.py``: ``sync_call``, ``async_call_wait_for_complete``).

Every answer is ZStack's ``RestAPIResponse`` (``header/.../rest/RestAPIResponse.java``):
``{"uuid", "state": "Done" | "Processing", "result", "createdDate", "finishedDate"}`` where
``result`` is a JSON *string* ``{"<reply class>": {..., "success": true|false, "error"?}}``.
Logins, logouts, session checks and queries are ``Done`` at once; the actions answer
``Processing`` and their job's uuid, polled at the result URL until ``Done``. An API error is a
``Done`` answer whose reply has ``success: false`` and ZStack's ``error``; only a body that is not
a message at all gets an HTTP 400.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import structlog
from fastapi import FastAPI, Request
from fastapi.responses import Response

from zstack_mn.messages import ErrorCode, ZStackError
from zstack_mn.web.zstack.catalog import BY_CLASS, BY_NAME, COMMON_FIELDS, Ignore, Kind
from zstack_mn.web.zstack.conditions import QuerySpec
from zstack_mn.web.zstack.service import ZStackApi, job_uuid_of
from zstack_mn.web.zstack.wire import error_body, internal_error, new_uuid, zstack_date

log = structlog.get_logger(__name__)

API_PATH = "/zstack/api"
RESULT_PATH = "/zstack/api/result"
GENERIC_REPLY = "org.zstack.header.message.APIReply"
QUERY_FIELDS_NOT_PARAMS = frozenset(k for k, rule in COMMON_FIELDS.items() if isinstance(rule, Ignore)) | {"filterName"}
"""Fields of an RPC query message that are not query parameters (``filterName``: ZStack's
server-side filter extensions, which zstack-mn has none of, so only a null one is accepted)."""


def _now() -> str | None:
    return zstack_date(datetime.now(UTC))


def _done(uuid: str, reply_class: str, reply: dict[str, Any]) -> Response:
    result = orjson.dumps({reply_class: reply}).decode()
    now = _now()
    body = {"uuid": uuid, "state": "Done", "result": result, "createdDate": now, "finishedDate": now}
    return Response(orjson.dumps(body), media_type="application/json")


def _failed(uuid: str, reply_class: str, err: ZStackError) -> Response:
    return _done(uuid, reply_class, {"success": False, "error": error_body(err)})


def _processing(uuid: str) -> Response:
    body = {"uuid": uuid, "state": "Processing", "createdDate": _now()}
    return Response(orjson.dumps(body), media_type="application/json")


def _error(err: ZStackError, status: int | None = None) -> Response:
    """An HTTP error (not an API reply): for a body that is no message, or an unknown result."""
    body = orjson.dumps({"error": error_body(err)})
    return Response(body, status_code=status or err.code.http_status, media_type="application/json")


def _session_of(msg: dict[str, Any]) -> object:
    session = msg.get("session")
    return session.get("uuid") if isinstance(session, dict) else session


def _query_spec(msg: dict[str, Any]) -> QuerySpec:
    """An RPC query message's parameters; its other fields are accepted when ZStack's bindings
    send them empty."""
    if msg.get("filterName") is not None:
        raise ZStackError(ErrorCode.INVALID_ARGUMENT, "filterName: zstack-mn has no query filters", field="filterName")
    for tags in ("systemTags", "userTags"):
        if msg.get(tags):
            raise ZStackError(ErrorCode.INVALID_ARGUMENT, f"{tags}: zstack-mn has no tag service", field=tags)
    skip = QUERY_FIELDS_NOT_PARAMS | {"systemTags", "userTags"}
    return QuerySpec.from_rpc({k: v for k, v in msg.items() if k not in skip})


def mount_rpc(app: FastAPI, zapi: ZStackApi) -> None:
    async def call(request: Request) -> Response:
        try:
            data = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            data = None
        if not isinstance(data, dict) or len(data) != 1 or not isinstance(next(iter(data.values())), dict):
            return _error(ZStackError(ErrorCode.MALFORMED_MESSAGE, 'the body must be {"<message class>": {...}}'))
        ((cls, msg),) = data.items()
        uuid = job_uuid_of(msg.get("id")) or new_uuid()
        api = BY_CLASS.get(cls)
        if api is None:
            known = ", ".join(sorted(BY_CLASS))
            err = ZStackError(
                ErrorCode.UNKNOWN_MESSAGE_TYPE, f"{cls} is not an API zstack-mn serves; it serves {known}"
            )
            return _failed(uuid, GENERIC_REPLY, err)
        try:
            if api.kind is Kind.SESSION:
                return _done(uuid, api.reply_class, {**await zapi.session_api(api, msg), "success": True})
            if api.kind is Kind.QUERY:
                reply = await zapi.query(api, _session_of(msg), lambda: _query_spec(msg))
                return _done(uuid, api.reply_class, {**reply, "success": True})
            job = await zapi.submit(api, msg, _session_of(msg), uuid)
        except ZStackError as err:
            return _failed(uuid, api.reply_class, err)
        except Exception as exc:  # apibinding reads every answer as a RestAPIResponse
            log.exception("ZStack RPC call failed", api=api.name)
            return _failed(uuid, api.reply_class, internal_error(exc))
        return _processing(job)

    async def result(uuid: str) -> Response:
        try:
            job = await zapi.jobs.poll(uuid) if job_uuid_of(uuid) else None
        except ZStackError as failed:
            return _error(failed)
        except Exception as exc:  # apibinding reads every answer as a RestAPIResponse or an error
            log.exception("ZStack RPC result failed", job=uuid)
            return _error(internal_error(exc))
        if job is None:
            return _error(ZStackError(ErrorCode.RESOURCE_NOT_FOUND, f"no result {uuid} (or it expired)"))
        if not job.done:
            return _processing(job.uuid)
        assert job.result is not None
        return _done(job.uuid, BY_NAME[job.api].reply_class, {**job.result, "success": bool(job.success)})

    # apibinding posts to ``/zstack/api/`` (zstacklib's ``http.build_url`` ends every URL with a slash)
    app.add_api_route(API_PATH, call, methods=["POST"], include_in_schema=False)
    app.add_api_route(API_PATH + "/", call, methods=["POST"], include_in_schema=False)
    app.add_api_route(RESULT_PATH + "/{uuid}", result, methods=["GET"], include_in_schema=False)
    app.add_api_route(RESULT_PATH + "{uuid}", result, methods=["GET"], include_in_schema=False)
