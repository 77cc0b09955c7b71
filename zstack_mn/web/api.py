"""The HTTP gateway of a node: REST in the style of ZStack's API, handed to this node's portal.

Request bodies are the API message models themselves (``{"params": {...}}`` for creates,
``{"<action>": {...}}`` for actions), so ``/openapi.json`` comes from the same pydantic models as
the bus messages. Errors are ``{"error": {"code", "description", "details"}}`` with the status of
their code; the node that handled a request is in ``X-Handled-By``.
"""

from __future__ import annotations

import math
import re
import time
import uuid as uuidlib
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Self

import orjson
import structlog
from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    create_model,
    model_validator,
)
from pydantic.config import JsonDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as ASGIMessage

from zstack_mn import __version__
from zstack_mn.messages import ErrorCode, Message, ZStackError
from zstack_mn.messages.api import (
    APIAddHostMsg,
    APICreateVmInstanceMsg,
    APIDeleteHostMsg,
    APIDestroyVmInstanceMsg,
    APIQueryHostMsg,
    APIQueryManagementNodeMsg,
    APIQueryVmInstanceMsg,
)
from zstack_mn.messages.envelope import validation_error
from zstack_mn.messages.ids import request_id_for_key
from zstack_mn.messages.inventory import DeletedReply, HostPage, HostReply, ManagementNodePage, VmPage, VmReply
from zstack_mn.messages.rest import HOST_ACTIONS, JOBS_PATH, VM_ACTIONS
from zstack_mn.messages.types import Uuid
from zstack_mn.services.api_portal import ApiPortal
from zstack_mn.web import openapi
from zstack_mn.web.openapi import ACTION_ERRORS, OPS_ERRORS, QUERY_ERRORS, READ_ERRORS, Health, Readiness
from zstack_mn.web.zstack import mount as mount_zstack_api
from zstack_mn.web.zstack.jobs import JobRunner
from zstack_mn.web.zstack.sessions import SessionGuard, session_of_authorization

log = structlog.get_logger(__name__)

MAX_BODY_BYTES = 64 * 1024
API_PREFIX = "/v1/"
HANDLED_BY = "X-Handled-By"
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_HTTP_CODES = {404: ErrorCode.RESOURCE_NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED}
"""The code of an error the router answers itself (no route, no such method on a route)."""
KEY_HEADER = "Idempotency-Key"
PREFER_HEADER = "Prefer"
PREFER_MAX_LENGTH = 256
KEY_MAX_LENGTH = 200
_ACTION_PATH = re.compile(r"/v1/(vm-instances|hosts)/([^/]+)/actions")
_UUID = TypeAdapter(Uuid)


def _params_of(api: type[Message]) -> type[BaseModel]:
    """The action's parameters: the API message's fields less the uuid (it is in the path)."""
    fields = {name: (f.annotation, f) for name, f in api.model_fields.items() if name != "uuid"}
    return create_model(  # type: ignore[call-overload,no-any-return]  # fields known only at import time
        f"{api.TARGET.__name__ if api.TARGET else api.__name__}Params",
        __config__=ConfigDict(
            alias_generator=api.model_config.get("alias_generator"), populate_by_name=True, extra="forbid"
        ),
        **fields,
    )


def _one_property(schema: JsonDict) -> None:
    """The JSON schema of an action body: exactly one of the actions, none of them null."""
    properties = schema.get("properties")
    assert isinstance(properties, dict)
    for name, prop in properties.items():
        assert isinstance(prop, dict)
        choices = prop.get("anyOf")
        if isinstance(choices, list):
            (only,) = [c for c in choices if c != {"type": "null"}]
            properties[name] = only
    schema["minProperties"] = 1
    schema["maxProperties"] = 1


class _OneAction(BaseModel):
    """A body that names exactly one action (``{"startVmInstance": {}}``)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_one_property)

    @model_validator(mode="after")
    def exactly_one(self) -> Self:
        """One key, and its value an object: ``{"a": {}, "b": null}`` names two."""
        given = self.model_fields_set
        if len(given) != 1 or any(getattr(self, k) is None for k in given):
            raise ValueError(f"give exactly one action of: {', '.join(type(self).model_fields)}")
        return self


def _action_body(name: str, actions: dict[str, type[Message]]) -> type[_OneAction]:
    fields: dict[str, Any] = {key: (_params_of(api) | None, Field(None)) for key, api in actions.items()}
    return create_model(name, __base__=_OneAction, **fields)


VmActionRequest = _action_body("VmActionRequest", VM_ACTIONS)
HostActionRequest = _action_body("HostActionRequest", HOST_ACTIONS)
CreateVmRequest = create_model(
    "CreateVmRequest", __config__=ConfigDict(extra="forbid"), params=(APICreateVmInstanceMsg, ...)
)
AddHostRequest = create_model("AddHostRequest", __config__=ConfigDict(extra="forbid"), params=(APIAddHostMsg, ...))


def _json(body: dict[str, Any], handled_by: str) -> Response:
    """A reply body as JSON bytes (orjson), with the node that handled it."""
    return Response(orjson.dumps(body), media_type="application/json", headers={HANDLED_BY: handled_by})


def _accepted(job: str, *, applied: bool) -> Response:
    """202: the operation goes on as job ``job``; ``applied``: because the request's Prefer asked."""
    headers = {"Location": f"{JOBS_PATH}/{job}"}
    if applied:
        headers["Preference-Applied"] = "respond-async"
    return Response(
        orjson.dumps({"job": {"uuid": job, "state": "Processing"}}),
        status_code=202,
        media_type="application/json",
        headers=headers,
    )


def preferred_wait(prefer: str | None, limit: float) -> tuple[float, bool]:
    """(Seconds the caller waits for an operation's answer before it takes a job, whether it
    asked for ``respond-async``), from RFC 7240's ``Prefer``: ``respond-async`` alone is 0,
    ``wait=N`` is N (with or without it), at most ``limit`` (the call deadline), which is also
    the wait without either. A preference it cannot read is ignored, as the RFC says."""
    if not prefer:
        return limit, False
    respond_async, wait = False, None
    for item in prefer.split(","):
        token, _, value = item.split(";")[0].strip().partition("=")
        token = token.strip().lower()
        if token == "respond-async":
            respond_async = True
        elif token == "wait":
            try:
                seconds = float(value.strip().strip('"'))
            except ValueError:
                continue
            if math.isfinite(seconds) and seconds >= 0:
                wait = seconds
    if wait is None:
        return (0.0 if respond_async else limit), respond_async
    return min(wait, limit), respond_async


def error_response(err: ZStackError) -> JSONResponse:
    return JSONResponse({"error": err.to_info().model_dump()}, status_code=err.code.http_status)


def create_app(
    portal: ApiPortal,
    *,
    node_uuid: str,
    readiness: Callable[[], Awaitable[dict[str, bool]]],
    metrics_registry: Any,
    guard: SessionGuard,
    call_timeout: float,
    fast_actions: bool = True,
) -> FastAPI:
    """The FastAPI app of one node; ``guard`` decides who may call (the plain API and ZStack's).
    ``fast_actions`` answers well-formed action requests before FastAPI (``ActionFastPath``)."""
    app = FastAPI(
        title="zstack-mn",
        version=__version__,
        description="Management-node API (ZStack style REST).",
        separate_input_output_schemas=False,
    )
    openapi.install(app, api_prefix=API_PREFIX)

    @app.exception_handler(ZStackError)
    async def _zstack_error(_: Request, exc: ZStackError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for e in exc.errors():
            loc = [str(p) for p in e.get("loc", ()) if p not in ("body", "query", "path", "params")]
            problems.append({"field": ".".join(loc), "message": e.get("msg", "invalid")})
        first = problems[0] if problems else {"field": "", "message": "invalid request"}
        return error_response(
            ZStackError(
                ErrorCode.INVALID_ARGUMENT,
                f"{first['field'] or 'body'}: {first['message']}",
                field=first["field"],
                errors=problems,
            )
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, ErrorCode.INVALID_ARGUMENT)
        resp = error_response(ZStackError(code, str(exc.detail)))
        resp.status_code = exc.status_code
        resp.headers.update(exc.headers or {})
        if exc.status_code == 405:
            resp.headers["Allow"] = ", ".join(_methods_at(app, request.scope))
        return resp

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error answering a request")
        return error_response(ZStackError(ErrorCode.INTERNAL_ERROR, f"internal error: {type(exc).__name__}"))

    async def ask(msg: Message) -> tuple[dict[str, Any], str]:
        """A query through the portal (it answers from the database here): the body and this node."""
        return await portal.handle(msg, request_id=portal.new_request_id(msg), keyed=False, timeout=call_timeout)

    jobs = JobRunner(portal)
    job_timeout = portal.ctx.settings.job_timeout

    async def run(msg: Message, key: str | None, prefer: str | None = None) -> Response:
        """An operation's answer as the HTTP response (orjson, no second validation of the
        body). An operation whose service records its outcome (a VM's) that is still running when
        the caller's wait ends (``Prefer``, else the call deadline) answers 202 with the job it
        goes on as, instead of a 504 for work that goes on: the job runs it again under the same
        request id, which waits for the work in the VM's chain or reads its record."""
        request_id = request_id_for_key(key) if key else portal.new_request_id(msg)
        target = msg.TARGET
        if target is None or not target.RECORDS_OUTCOME:
            body, handled_by = await portal.handle(msg, request_id=request_id, keyed=bool(key), timeout=call_timeout)
            return _json(body, handled_by)
        wait, respond_async = preferred_wait(prefer, call_timeout)
        if wait > 0:
            try:
                body, handled_by = await portal.handle(msg, request_id=request_id, keyed=bool(key), timeout=wait)
                return _json(body, handled_by)
            except ZStackError as err:
                if err.code is not ErrorCode.TIMEOUT:
                    raise
        await jobs.adopt(msg, uuidlib.UUID(request_id).hex, job_timeout)
        return _accepted(request_id, applied=respond_async)

    fast = ActionFastPath(run) if fast_actions else None
    app.state.fast_path = fast
    app.add_middleware(Gate, limit=MAX_BODY_BYTES, guard=guard, fast=fast)

    def build(api: type[Message], data: dict[str, Any]) -> Message:
        try:
            return api.model_validate(data)
        except ValidationError as exc:
            raise validation_error(exc, api.type_name) from None

    key_header = Header(None, alias=KEY_HEADER, min_length=1, max_length=KEY_MAX_LENGTH)
    prefer_header = Header(
        None,
        alias=PREFER_HEADER,
        max_length=PREFER_MAX_LENGTH,
        description="RFC 7240: respond-async (a job at once) or wait=N (a job after N seconds); "
        "without it the call waits up to its deadline, then answers with a job",
    )

    async def page(msg: APIQueryVmInstanceMsg | APIQueryHostMsg) -> Response:
        """A VM or host query, answered from the database here (any node can)."""
        repo = portal.vms if isinstance(msg, APIQueryVmInstanceMsg) else portal.hosts
        total, rows = await repo.query(
            msg.filters(), msg.limit, msg.start, after=msg.after, count=msg.counted, rows=not msg.count
        )
        return _json(msg.reply(total, rows), node_uuid)

    vm_reply: dict[int | str, dict[str, Any]] = {200: {"model": VmReply}, **openapi.accepted()}
    host_reply: dict[int | str, dict[str, Any]] = {200: {"model": HostReply}}

    @app.post("/v1/vm-instances", tags=["vm"], responses={**vm_reply, **openapi.errors(ACTION_ERRORS)})
    async def create_vm(
        body: CreateVmRequest, key: str | None = key_header, prefer: str | None = prefer_header
    ) -> Response:
        return await run(body.params, key, prefer)  # type: ignore[attr-defined]  # a model create_model builds at import time: mypy cannot see its fields

    @app.get("/v1/vm-instances", tags=["vm"], responses={200: {"model": VmPage}, **openapi.errors(QUERY_ERRORS)})
    async def query_vms(query: Annotated[APIQueryVmInstanceMsg, Query()]) -> Response:
        return await page(query)

    async def get_one(query: type[Message], kind: str, uuid: str) -> Response:
        page, handled_by = await ask(build(query, {"uuid": uuid}))
        if not page["inventories"]:
            raise ZStackError(ErrorCode.RESOURCE_NOT_FOUND, f"{kind} {uuid} not found", uuid=uuid)
        return _json({"inventory": page["inventories"][0]}, handled_by)

    @app.get("/v1/vm-instances/{uuid}", tags=["vm"], responses={**vm_reply, **openapi.errors(READ_ERRORS)})
    async def get_vm(uuid: Uuid) -> Response:
        return await get_one(APIQueryVmInstanceMsg, "vm", uuid)

    @app.put("/v1/vm-instances/{uuid}/actions", tags=["vm"], responses={**vm_reply, **openapi.errors(ACTION_ERRORS)})
    async def vm_action(
        uuid: Uuid,
        body: VmActionRequest,  # type: ignore[valid-type]  # a model class made by create_model at import time
        key: str | None = key_header,
        prefer: str | None = prefer_header,
    ) -> Response:
        return await run(_action_message(uuid, body, VM_ACTIONS), key, prefer)

    @app.delete("/v1/vm-instances/{uuid}", tags=["vm"], responses={**vm_reply, **openapi.errors(ACTION_ERRORS)})
    async def destroy_vm(uuid: Uuid, key: str | None = key_header, prefer: str | None = prefer_header) -> Response:
        return await run(build(APIDestroyVmInstanceMsg, {"uuid": uuid}), key, prefer)

    @app.post("/v1/hosts", tags=["host"], responses={**host_reply, **openapi.errors(ACTION_ERRORS)})
    async def add_host(body: AddHostRequest, key: str | None = key_header) -> Response:
        return await run(body.params, key)  # type: ignore[attr-defined]  # a model create_model builds at import time: mypy cannot see its fields

    @app.get("/v1/hosts", tags=["host"], responses={200: {"model": HostPage}, **openapi.errors(QUERY_ERRORS)})
    async def query_hosts(query: Annotated[APIQueryHostMsg, Query()]) -> Response:
        return await page(query)

    @app.get("/v1/hosts/{uuid}", tags=["host"], responses={**host_reply, **openapi.errors(READ_ERRORS)})
    async def get_host(uuid: Uuid) -> Response:
        return await get_one(APIQueryHostMsg, "host", uuid)

    @app.put("/v1/hosts/{uuid}/actions", tags=["host"], responses={**host_reply, **openapi.errors(ACTION_ERRORS)})
    async def host_action(
        uuid: Uuid,
        body: HostActionRequest,  # type: ignore[valid-type]  # a model class made by create_model at import time
        key: str | None = key_header,
    ) -> Response:
        return await run(_action_message(uuid, body, HOST_ACTIONS), key)

    @app.delete(
        "/v1/hosts/{uuid}",
        tags=["host"],
        responses={200: {"model": DeletedReply}, **openapi.errors(ACTION_ERRORS)},
    )
    async def delete_host(uuid: Uuid, key: str | None = key_header) -> Response:
        return await run(build(APIDeleteHostMsg, {"uuid": uuid}), key)

    @app.get(
        JOBS_PATH + "/{uuid}",
        tags=["jobs"],
        responses={
            200: {"model": VmReply, "description": "the operation's answer"},
            **openapi.accepted(),
            **openapi.errors(ACTION_ERRORS),
        },
    )
    async def get_job(uuid: Uuid) -> Response:
        """An operation that answered 202: 202 while it runs, then what it answered (its status,
        body and handling node), from any node; a job whose node is gone is taken over here. The
        job's uuid is its request id (the job table keeps it without dashes, as ZStack's)."""
        job = await jobs.poll(uuidlib.UUID(uuid).hex, plain=True)
        if job is None:
            raise ZStackError(ErrorCode.RESOURCE_NOT_FOUND, f"job {uuid} not found (or expired)", uuid=uuid)
        if not job.done:
            return _accepted(uuid, applied=False)
        assert job.result is not None
        return Response(
            orjson.dumps(job.result["body"]),
            status_code=int(job.result["status"]),
            media_type="application/json",
            headers={HANDLED_BY: str(job.result.get("handledBy") or node_uuid)},
        )

    @app.get(
        "/v1/management-nodes",
        tags=["cluster"],
        responses={200: {"model": ManagementNodePage}, **openapi.errors(QUERY_ERRORS)},
    )
    async def management_nodes(query: Annotated[APIQueryManagementNodeMsg, Query()]) -> Response:
        return _json(*await ask(query))

    @app.get("/healthz", tags=["ops"], response_model=Health, responses=openapi.errors(OPS_ERRORS))
    async def healthz() -> dict[str, str]:
        return {"status": "alive", "node": node_uuid}

    @app.get(
        "/readyz",
        tags=["ops"],
        response_model=Readiness,
        responses={
            503: {
                "model": Readiness,
                "description": "not ready; or plain text when the node is at its limit of requests in flight",
                "content": {openapi.TEXT_PLAIN: {"schema": {"type": "string"}}},
            },
            **openapi.errors((413,)),
        },
    )
    async def readyz() -> JSONResponse:
        checks = await readiness()
        return JSONResponse(
            {"ready": all(checks.values()), "checks": checks}, status_code=200 if all(checks.values()) else 503
        )

    @app.get(
        "/metrics",
        tags=["ops"],
        response_class=Response,
        responses={
            200: {"content": {openapi.TEXT_PLAIN: {"schema": {"type": "string"}}}, "description": "Prometheus metrics"},
            **openapi.errors(OPS_ERRORS),
        },
    )
    async def metrics() -> Response:
        return Response(generate_latest(metrics_registry), media_type=CONTENT_TYPE_LATEST)

    # After the plain API's dozen routes: Starlette matches routes in order, so a /v1 call does
    # not try ZStack's forty paths first (a ZStack call tries the dozen instead).
    mount_zstack_api(app, portal, guard, jobs)
    app.state.started = time.time()
    return app


class Gate:
    """Before a request reaches the app: refuse a body over ``limit`` bytes (413), by its
    ``Content-Length`` without reading it, or, for a body sent without one (chunked), by reading
    at most ``limit`` bytes of it before the app sees it; and any ``/v1/`` request without a live
    ZStack session in ``Authorization: OAuth <session>`` (401, ``ID.1001``), the same check as
    ZStack's own API. Plain ASGI: Starlette's BaseHTTPMiddleware costs a task per request, and a
    FastAPI dependency on every route costs more than the check."""

    def __init__(self, app: ASGIApp, limit: int, guard: SessionGuard, fast: ActionFastPath | None = None) -> None:
        self.app = app
        self.limit = limit
        self.guard = guard
        self.fast = fast

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            authorization: bytes | None = None
            sized = False
            for name, value in scope.get("headers", ()):
                if name == b"content-length":
                    if not value.isdigit() or int(value) > self.limit:
                        await error_response(self._too_large())(scope, receive, send)
                        return
                    sized = True
                elif name == b"authorization":
                    authorization = value
            if scope["path"].startswith(API_PREFIX):
                try:
                    header = None if authorization is None else authorization.decode("latin-1")
                    await self.guard.require(session_of_authorization(header))
                except ZStackError as err:
                    await error_response(err)(scope, receive, send)
                    return
            action = self.fast.action_of(scope) if self.fast is not None else None
            if action is not None or (not sized and scope["method"] in BODY_METHODS):
                try:
                    body = await self._read_at_most(receive)
                except _ClientGone:
                    return
                if body is None:
                    await error_response(self._too_large())(scope, receive, send)
                    return
                if action is not None and self.fast is not None:
                    response = await self.fast.answer(scope, action, body)
                    if response is not None:
                        await response(scope, receive, send)
                        return
                receive = _replay(body, receive)
        await self.app(scope, receive, send)

    def _too_large(self) -> ZStackError:
        return ZStackError(ErrorCode.MESSAGE_TOO_LARGE, f"request body over {self.limit} bytes")

    async def _read_at_most(self, receive: Receive) -> bytes | None:
        """The whole body of a request; None once it passes the limit. ``_ClientGone`` when the
        client disconnects first: a partial body is neither run nor passed on as a whole one."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


class _ClientGone(Exception):
    """The client disconnected before its whole body arrived: there is nobody left to answer."""


_Action = tuple[dict[str, type[Message]], type[BaseModel], str]


class ActionFastPath:
    """A well-formed action (``PUT /v1/vm-instances/<uuid>/actions`` or the hosts' twin: a uuid,
    a JSON body that validates, a valid ``Idempotency-Key`` if any) answered without FastAPI's
    routing, dependency solving and exception middleware, which cost about a tenth of a node's
    CPU per VM operation. It validates with the route's own models and answers with the route's
    own ``run``; whatever it does not find well formed (a body without a JSON content type too)
    goes on to the app untouched, so every refusal is the app's own answer. An unexpected
    exception propagates as the route's would (the server-error middleware answers it).
    ``answered`` counts the requests it took."""

    def __init__(self, run: Callable[[Message, str | None, str | None], Awaitable[Response]]) -> None:
        self.run = run
        self.answered = 0
        self._kinds: dict[str, tuple[dict[str, type[Message]], type[BaseModel]]] = {
            "vm-instances": (VM_ACTIONS, VmActionRequest),
            "hosts": (HOST_ACTIONS, HostActionRequest),
        }

    def action_of(self, scope: Scope) -> _Action | None:
        """The actions, body model and raw uuid of an action request; None for any other request."""
        if scope["method"] != "PUT":
            return None
        match = _ACTION_PATH.fullmatch(scope["path"])
        if match is None:
            return None
        actions, model = self._kinds[match.group(1)]
        return actions, model, match.group(2)

    async def answer(self, scope: Scope, action: _Action, body: bytes) -> Response | None:
        """The response to a well-formed action; None to leave the request to the app."""
        actions, model, raw_uuid = action
        key: str | None = None
        prefer: str | None = None
        keys = prefers = 0
        json = False
        for name, value in scope["headers"]:
            if name == b"content-type":
                if not _is_json(value):
                    return None
                json = True
            elif name == b"idempotency-key":
                key = value.decode("latin-1")
                keys += 1
            elif name == b"prefer":
                prefer = value.decode("latin-1")
                prefers += 1
        if (
            not json
            or not body
            or keys > 1
            or prefers > 1
            or (key is not None and not 1 <= len(key) <= KEY_MAX_LENGTH)
            or (prefer is not None and len(prefer) > PREFER_MAX_LENGTH)
        ):
            return None
        try:
            uuid = _UUID.validate_python(raw_uuid)
            params = model.model_validate(orjson.loads(body))
        except (ValidationError, orjson.JSONDecodeError):
            return None
        self.answered += 1
        try:
            return await self.run(_action_message(uuid, params, actions), key, prefer)
        except ZStackError as err:
            return error_response(err)


def _is_json(content_type: bytes) -> bool:
    """What FastAPI reads as a JSON body: ``application/json`` or ``application/<x>+json`` (a
    request without a content type is left to the route: FastAPI versions differ on it)."""
    media = content_type.split(b";", 1)[0].strip().lower()
    if media.count(b"/") != 1:
        return False
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives the app the body already read, then the connection's own events."""
    pending: list[ASGIMessage] = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> ASGIMessage:
        return pending.pop() if pending else await receive()

    return replayed


def _methods_at(app: FastAPI, scope: Scope) -> list[str]:
    """Every method some route serves at the request's path: Starlette's own ``Allow`` names only
    the first route that matched the path, and one path here has a route per method."""
    methods: set[str] = set()
    for route in app.router.routes:
        match, _ = route.matches(scope)
        if match is not Match.NONE and isinstance(route, BaseRoute):
            methods |= getattr(route, "methods", None) or set()
    return sorted(methods)


def _action_message(uuid: str, body: BaseModel, actions: dict[str, type[Message]]) -> Message:
    """The API message of the one action in ``body``, from its already validated parameters."""
    for key, api in actions.items():
        params = getattr(body, key)
        if params is not None:
            values = {name: getattr(params, name) for name in params.model_fields_set}
            values["uuid"] = uuid
            return api.model_construct(set(values), **values)
    raise ZStackError(ErrorCode.INVALID_ARGUMENT, "no action given")
