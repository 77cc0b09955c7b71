"""ZStack's REST API under ``/zstack/v1``, read and written as ZStack's ``RestServer`` does
(``rest/src/main/java/org/zstack/rest/RestServer.java``) and its SDK expects
(``sdk/src/main/java/org/zstack/sdk/ZSClient.java``):

* the session in ``Authorization: OAuth <session uuid>``; a client may name the job with
  ``X-Job-UUID`` (32 hex characters);
* a create's parameters in ``{"params": {...}}``, an action's in ``{"<action>": {...}}``, with
  ``systemTags`` / ``userTags`` beside them; GET and DELETE parameters in the query string;
* a query answers 200 with ``{"inventories": [...]}`` (``total`` with ``count`` or
  ``replyWithCount``); ``GET /<resources>/<uuid>`` is the query of that uuid;
* an asynchronous API answers 202 with ``{"location": ".../zstack/v1/api-jobs/<uuid>"}``; a poll
  of that location answers 202 (empty body) while the job runs, 200 with the API's reply when it
  succeeded, 503 with ``{"error": {...}}`` when it failed, 404 for an unknown job;
* a request refused before it runs (no session, a bad field, a malformed body) is answered at
  once with the status of its error code and ``{"error": {...}}``, and nothing is written.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import orjson
import structlog
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.convertors import CONVERTOR_TYPES, Convertor, register_url_convertor

from zstack_mn.messages import ErrorCode, ZStackError
from zstack_mn.web.zstack.catalog import APIS, Kind, ZApi
from zstack_mn.web.zstack.conditions import QuerySpec
from zstack_mn.web.zstack.service import ZStackApi, job_uuid_of
from zstack_mn.web.zstack.sessions import session_of_authorization
from zstack_mn.web.zstack.wire import error_body, internal_error

log = structlog.get_logger(__name__)

PREFIX = "/zstack/v1"
JOBS_PATH = "/api-jobs"
JOB_HEADER = "X-Job-UUID"
BODY_EXTRAS = ("systemTags", "userTags")
"""Top-level body keys RestServer reads beside the parameters."""


def _json(body: dict[str, Any], status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def error_response(err: ZStackError, status: int | None = None) -> Response:
    return _json({"error": error_body(err)}, status or err.code.http_status)


def session_of(request: Request) -> str:
    """The session uuid of ``Authorization: OAuth <uuid>``."""
    return session_of_authorization(request.headers.get("authorization"))


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ZStackError(ErrorCode.MALFORMED_MESSAGE, "the body is not JSON") from None
    if not isinstance(data, dict):
        raise ZStackError(ErrorCode.MALFORMED_MESSAGE, "the body must be a JSON object")
    return data


def normalise(path: str) -> str:
    """``/vm-instances/{vmInstanceUuid}/actions`` and ``/vm-instances/{uuid}/actions`` are one
    route (as RestServer normalises them); the variable is then named ``id``."""
    return re.sub(r"\{\w+\}", "{id}", path)


def _any_but(literals: list[str]) -> Convertor[str]:
    """A path segment other than the given literals."""

    class AnyBut(Convertor[str]):
        regex = "(?!(?:" + "|".join(re.escape(w) for w in literals) + ")$)[^/]+"

        def convert(self, value: str) -> str:
            return value

        def to_string(self, value: str) -> str:
            return value

    return AnyBut()


def routed(path: str, paths: list[str]) -> str:
    """``path`` as routed: its ``{id}`` never takes a segment that is a literal of another path at
    the same place (``/hosts/{id}`` is not ``/hosts/kvm``, so a request there is answered 405 with
    ``Allow: POST``, as ``/openapi.json`` says)."""
    parts = path.split("/")
    if "{id}" not in parts:
        return path
    at = parts.index("{id}")
    literals = sorted(
        {q[at] for q in (p.split("/") for p in paths) if len(q) > at and q[:at] == parts[:at] and "{" not in q[at]}
    )
    if not literals:
        return path
    name = "zstack_not_" + "_".join(re.sub(r"\W", "_", w) for w in literals)
    if name not in CONVERTOR_TYPES:
        register_url_convertor(name, _any_but(literals))
    parts[at] = "{id:" + name + "}"
    return "/".join(parts)


def mount_rest(app: FastAPI, zapi: ZStackApi) -> None:
    groups: dict[tuple[str, str], list[ZApi]] = defaultdict(list)
    for api in APIS:
        groups[(api.method, normalise(api.path))].append(api)
        if api.kind is Kind.QUERY:  # each query's ``optionalPaths``: ``<path>/{uuid}``
            groups[("GET", api.path + "/{id}")].append(api)

    def pick(apis: list[ZApi], body: dict[str, Any]) -> ZApi:
        if len(apis) == 1:
            return apis[0]
        keyed = [a for a in apis if a.body_key in body]
        if len(keyed) != 1:
            names = ", ".join(str(a.body_key) for a in apis)
            raise ZStackError(
                ErrorCode.INVALID_ARGUMENT, f"the body must name exactly one action of: {names}", field="body"
            )
        return keyed[0]

    async def handle(request: Request, apis: list[ZApi]) -> Response:
        body = await _body(request)
        api = pick(apis, body)
        path_id = request.path_params.get("id")
        if api.kind is Kind.QUERY:

            def spec() -> QuerySpec:
                given = QuerySpec.from_rest(list(request.query_params.multi_items()))
                return given if path_id is None else given.with_uuid(path_id)

            return _json(await zapi.query(api, session_of(request), spec))
        session = session_of(request) if api.kind is Kind.ACTION else None
        params = _params(api, body, request)
        if path_id is not None:
            params[api.path_vars()[0]] = path_id
        if api.kind is Kind.SESSION:
            reply = await zapi.session_api(api, params)
            if api.name == "ValidateSession":
                reply = {"valid": reply["validSession"]}
            return _json(reply)
        header = request.headers.get(JOB_HEADER)
        job = job_uuid_of(header)
        if header is not None and job is None:
            raise ZStackError(
                ErrorCode.INVALID_ARGUMENT, f"{JOB_HEADER}: must be a uuid with '-' stripped", field=JOB_HEADER
            )
        job = await zapi.submit(api, params, session, job)
        return _json({"location": f"{str(request.base_url).rstrip('/')}{PREFIX}{JOBS_PATH}/{job}"}, 202)

    paths = sorted({path for _, path in groups})
    for (method, path), apis in groups.items():
        app.add_api_route(
            PREFIX + routed(path, paths),
            _endpoint(handle, apis),
            methods=[method],
            include_in_schema=False,
            name=apis[0].name,
        )

    async def poll(uuid: str) -> Response:
        try:
            job = await zapi.jobs.poll(uuid) if job_uuid_of(uuid) else None
            if job is None:
                return error_response(ZStackError(ErrorCode.RESOURCE_NOT_FOUND, f"no job {uuid} (or it expired)"))
        except ZStackError as err:
            return error_response(err)
        except Exception as exc:  # the SDK reads a ZStack error body, whatever went wrong
            log.exception("ZStack job poll failed", job=uuid)
            return error_response(internal_error(exc))
        if not job.done:
            return Response(status_code=202)
        assert job.result is not None
        return _json(job.result, 200 if job.success else 503)

    app.add_api_route(PREFIX + JOBS_PATH + "/{uuid}", poll, methods=["GET"], include_in_schema=False)


def _endpoint(handle: Any, apis: list[ZApi]) -> Any:
    async def endpoint(request: Request) -> Response:
        try:
            response: Response = await handle(request, apis)
        except ZStackError as err:
            return error_response(err)
        except Exception as exc:  # a ZStack client reads a ZStack error body, whatever went wrong
            log.exception("ZStack REST request failed", path=request.url.path)
            return error_response(internal_error(exc))
        return response

    return endpoint


def _params(api: ZApi, body: dict[str, Any], request: Request) -> dict[str, Any]:
    """The API's parameters: the body's ``params`` / action object (POST, PUT) or the query
    string (GET, DELETE), with ``systemTags`` / ``userTags`` from beside them."""
    if api.body_key is None:
        params: dict[str, Any] = {}
        for key, value in request.query_params.multi_items():
            if key in params:
                raise ZStackError(ErrorCode.INVALID_ARGUMENT, f"{key}: given more than once", field=key)
            params[key] = value
        return params
    for key in body:
        if key != api.body_key and key not in BODY_EXTRAS:
            raise ZStackError(
                ErrorCode.INVALID_ARGUMENT, f"{key}: not expected beside {api.body_key!r} in the body", field=key
            )
    inner = body.get(api.body_key) or {}
    if not isinstance(inner, dict):
        raise ZStackError(ErrorCode.INVALID_ARGUMENT, f"{api.body_key}: must be an object", field=api.body_key)
    params = dict(inner)
    for key in BODY_EXTRAS:
        if key in body:
            params[key] = body[key]
    return params
